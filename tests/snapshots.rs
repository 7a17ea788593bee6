//! Snapshots of what we generate for every example variant: the macro's expansion, and the GPU
//! source cubecl emits for its kernels at the variant's first tile shape — CUDA C++ of the portable
//! and the tensor-core kernel for an sm_90 device model, and WGSL for the portable back end — all
//! produced without a GPU. The example variants are declared in `examples/variants/`, which both
//! the examples and this test include, so the source is generated from the very types users get
//! (their `#[cube]` mask and score hooks included).
//!
//! Review changes with `cargo insta review`. Two things cubecl emits are not stable and are
//! normalised before comparison: value names (`v123`, renumbered in order of first appearance;
//! the numbering was seen to vary between processes while the code did not) and the hash suffix
//! of kernel names (it changes with the build, e.g. the checkout's path).

use std::path::Path;

use attn::{DType, Variant};

/// The example variants, compiled here exactly as the examples compile them.
mod variants {
    #![allow(dead_code)]
    pub mod alibi {
        include!("../examples/variants/alibi.rs");
    }
    pub mod gemma2 {
        include!("../examples/variants/gemma2.rs");
    }
    pub mod llama3 {
        include!("../examples/variants/llama3.rs");
    }
    pub mod mha {
        include!("../examples/variants/mha.rs");
    }
    pub mod mistral {
        include!("../examples/variants/mistral.rs");
    }
    pub mod mqa {
        include!("../examples/variants/mqa.rs");
    }
    pub mod packed_documents {
        include!("../examples/variants/packed_documents.rs");
    }
    pub mod sinks {
        include!("../examples/variants/sinks.rs");
    }
}

/// The GPU source of one variant's kernels.
struct Sources {
    cuda: String,
    cuda_tensor_cores: Option<String>,
    wgsl: Option<String>,
}

fn sources<V: Variant>() -> Sources {
    let tiling = V::SPEC.tilings[0];
    Sources {
        cuda: attn::codegen::cuda_source::<V>(tiling),
        // The tensor-core kernel serves f16 and bf16.
        cuda_tensor_cores: (V::SPEC.dtype != DType::F32)
            .then(|| attn::codegen::cuda_source_tensor_cores::<V>(tiling)),
        // WGSL has no bf16.
        #[cfg(feature = "wgpu")]
        wgsl: (V::SPEC.dtype != DType::BF16).then(|| attn::codegen::wgsl_source::<V>(tiling)),
        #[cfg(not(feature = "wgpu"))]
        wgsl: None,
    }
}

/// `(file stem, variant name, its sources)` for every example variant.
macro_rules! registry {
    ($($file:ident :: $variant:ident),* $(,)?) => {
        vec![$((stringify!($file), stringify!($variant), sources::<variants::$file::$variant> as fn() -> Sources)),*] as Vec<(&str, &str, fn() -> Sources)>
    };
}

/// Every `attention! { … }` body in a file.
fn declarations(file: &Path) -> Vec<proc_macro2::TokenStream> {
    let source = std::fs::read_to_string(file).expect("readable example");
    let parsed = syn::parse_file(&source).expect("example parses");
    parsed
        .items
        .into_iter()
        .filter_map(|item| match item {
            syn::Item::Macro(m)
                if m.mac
                    .path
                    .segments
                    .last()
                    .is_some_and(|s| s.ident == "attention") =>
            {
                Some(m.mac.tokens)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn example_variants() {
    let registry = registry![
        alibi::Alibi,
        alibi::AlibiGiven,
        gemma2::Gemma2Local,
        gemma2::Gemma2Global,
        llama3::Llama3,
        llama3::Llama3F16,
        mha::Mha64,
        mistral::Mistral,
        mistral::MistralSmallWindow,
        mqa::Mqa64,
        packed_documents::PackedCausal,
        sinks::SinkWindow,
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/variants");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    let mut names = Vec::new();
    for file in files {
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        for body in declarations(&file) {
            let plans = attn_dsl::analyse(body).unwrap_or_else(|(e, _)| panic!("{stem}: {e}"));
            for plan in &plans {
                let variant = plan.spec.name.to_string();
                let name = format!("{stem}__{variant}");
                let expansion = format!("expansion__{name}");
                insta::assert_snapshot!(
                    expansion.clone(),
                    attn_dsl::pretty(&attn_dsl::codegen::variant(plan))
                );
                names.push(expansion);
                let Some((_, _, make)) = registry
                    .iter()
                    .find(|(f, v, _)| *f == stem && *v == variant)
                else {
                    panic!("{stem}::{variant} is not in this test's registry: add it");
                };
                let sources = make();
                let cuda_name = format!("cuda__{name}");
                insta::assert_snapshot!(cuda_name.clone(), canonical_names(&sources.cuda));
                names.push(cuda_name);
                if let Some(source) = sources.cuda_tensor_cores {
                    let tc_name = format!("cuda_tc__{name}");
                    insta::assert_snapshot!(tc_name.clone(), canonical_names(&source));
                    names.push(tc_name);
                }
                if let Some(source) = sources.wgsl {
                    let wgsl_name = format!("wgsl__{name}");
                    insta::assert_snapshot!(wgsl_name.clone(), canonical_names(&source));
                    names.push(wgsl_name);
                }
            }
        }
    }
    assert!(
        names.len() >= 3 * registry.len(),
        "expected every example variant, found {names:?}"
    );
    names.extend(decode_kernels());
    names.extend(warpgroup_kernels());
    reject_unreferenced(&names);
}

/// The decode family: the decode kernel of the Llama-3 variant (GQA, causal) and of Mistral
/// (sliding window) for the sm_90 model at the CUDA default tile, the f16 form in WGSL at a CI tile,
/// and the combine step.
fn decode_kernels() -> Vec<String> {
    use attn::DecodeTiling;
    let cuda_tile = DecodeTiling {
        rows: 4,
        units: 128,
        chunk: 8,
    };
    let wgsl_tile = DecodeTiling {
        rows: 4,
        units: 128,
        chunk: 8,
    };
    let mut sources = vec![
        (
            "decode_cuda__llama3__Llama3",
            attn::codegen::decode_cuda_source::<variants::llama3::Llama3>(cuda_tile),
        ),
        (
            "decode_cuda__mistral__Mistral",
            attn::codegen::decode_cuda_source::<variants::mistral::Mistral>(cuda_tile),
        ),
        (
            "combine_cuda__bf16_d128",
            attn::codegen::combine_cuda_source::<attn::bf16>(128, false),
        ),
    ];
    #[cfg(feature = "wgpu")]
    {
        sources.push((
            "decode_wgsl__llama3__Llama3F16",
            attn::codegen::decode_wgsl_source::<variants::llama3::Llama3F16>(wgsl_tile),
        ));
    }
    sources
        .into_iter()
        .map(|(name, source)| {
            insta::assert_snapshot!(name, canonical_names(&source));
            name.to_string()
        })
        .collect()
}

/// The warpgroup prefill kernel (Hopper: wgmma fed by bulk tensor copies) of the Llama-3 variant
/// (GQA, causal) at 64 × 64, as cubecl's IR: that kernel has no CUDA C++ form in cubecl (its LLVM
/// back end compiles it), and the IR of larger tiles only repeats the unrolled register code.
fn warpgroup_kernels() -> Vec<String> {
    let tile = attn::Tiling {
        block_q: 64,
        block_kv: 64,
    };
    let name = "wg_ir__llama3__Llama3";
    let source = attn::codegen::warpgroup_ir::<variants::llama3::Llama3>(tile);
    insta::assert_snapshot!(name, canonical_names(&without_ir_types(&source)));
    vec![name.to_string()]
}

/// cubecl's IR with the type signature dropped from the end of each operation (` [..] [..]: <..>`
/// or ` : type`): the operations and their operands are what a review reads, and the types
/// follow from them.
fn without_ir_types(ir: &str) -> String {
    ir.lines()
        .map(|line| {
            let Some(body) = line.strip_suffix(';') else {
                return line.to_string();
            };
            let cut = body
                .find(" [] []: <")
                .or_else(|| body.rfind(" : ").filter(|&at| !body[at..].contains('=')));
            match cut {
                Some(at) => format!("{};", &body[..at]),
                None => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Renames every value name `v<digits>` (also inside longer names such as `shared_v12`) to
/// `v<k>`, where `k` counts distinct names in order of first appearance.
fn canonical_names(source: &str) -> String {
    let unhashed = without_kernel_hashes(source);
    let source = unhashed.as_str();
    let mut names = std::collections::HashMap::new();
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut previous: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        let digits = rest[1..].bytes().take_while(u8::is_ascii_digit).count();
        let starts_name =
            c == 'v' && digits > 0 && !previous.is_some_and(|p| p.is_ascii_alphanumeric());
        if starts_name {
            let number = &rest[1..1 + digits];
            let next = names.len();
            let k = *names.entry(number).or_insert(next);
            out.push_str(&format!("v{k}"));
            rest = &rest[1 + digits..];
            previous = Some('0');
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
            previous = Some(c);
        }
    }
    out
}

/// Replaces the 8-hex-digit suffix of every kernel name (`prefill_forward…_xxxxxxxx`,
/// `decode_forward…`, `combine_splits…`) by `HASH`.
fn without_kernel_hashes(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = ["prefill_forward", "decode_forward", "combine_splits"]
        .iter()
        .filter_map(|stem| rest.find(stem))
        .min()
    {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..len];
        match name.rsplit_once('_') {
            Some((stem, hash))
                if hash.len() == 8 && hash.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                out.push_str(stem);
                out.push_str("_HASH");
            }
            _ => out.push_str(name),
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// A snapshot file that no assertion wrote is stale: fail, so it is deleted or renamed on purpose.
fn reject_unreferenced(names: &[String]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    for entry in std::fs::read_dir(dir).unwrap() {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        let Some(name) = file
            .strip_prefix("snapshots__")
            .and_then(|f| f.strip_suffix(".snap"))
        else {
            assert!(
                !file.ends_with(".snap.new"),
                "pending snapshot {file}: run `cargo insta review`"
            );
            continue;
        };
        let known = names.iter().any(|n| n == name);
        // Without the wgpu feature the WGSL snapshots are not produced, but they are not stale.
        let other_backend = cfg!(not(feature = "wgpu")) && name.starts_with("wgsl__");
        assert!(
            known || other_backend,
            "unreferenced snapshot {file}: delete it or restore its variant"
        );
    }
}
