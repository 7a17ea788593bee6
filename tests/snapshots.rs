//! Snapshots of what we generate, kept small enough that a change reads as a diff:
//!
//! - the macro's expansion of every example variant (`expansion__*`);
//! - the GPU source of the kernel that actually runs, for a few representative variants, produced
//!   without a GPU: WGSL of the portable kernel (what the wgpu back end runs, CI included) for
//!   MQA at head dim 64; CUDA C++ of the tensor-core kernel (NVIDIA before Hopper) for GQA causal,
//!   a softcapped window at head dim 256, packed documents, and sinks with a window; CUDA C++ of
//!   the decode kernel (GQA causal) and of its combine step (the variants' own mask and score
//!   expressions show in their expansions, as the `#[cube]` hooks the kernels inline);
//! - a digest of every kernel of every example variant (`digests`): lines, a hash of the
//!   normalised source and counts of the operations that matter (barriers, exponentials, matrix
//!   instructions, bulk copies), including the warpgroup kernel Hopper runs, whose cubecl IR is
//!   tens of thousands of lines of unrolled register code. A change to any kernel moves its
//!   digest; the full sources above show how.
//!
//! The example variants are declared in `examples/variants/`, which both the examples and this
//! test include, so the source is generated from the very types users get (their `#[cube]` mask
//! and score hooks included).
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

/// Which kernels of a variant the test writes out in full (the rest are digests only).
#[derive(Copy, Clone, Default)]
struct Full {
    /// WGSL of the portable kernel.
    wgsl: bool,
    /// CUDA C++ of the tensor-core kernel.
    tensor_cores: bool,
}

/// The kernels of one variant: `(kernel name, source)`; `full` says which get a snapshot of their
/// own.
fn kernels<V: Variant>(full: Full) -> Vec<(&'static str, String, bool)> {
    let spec = V::SPEC;
    let tiling = spec.tilings[0];
    let mut kernels = vec![(
        "portable_cuda",
        canonical_names(&attn::codegen::cuda_source::<V>(tiling)),
        false,
    )];
    // WGSL has no bf16.
    #[cfg(feature = "wgpu")]
    if spec.dtype != DType::BF16 {
        let wgsl = attn::codegen::wgsl_source::<V>(tiling);
        kernels.push(("portable_wgsl", canonical_names(&wgsl), full.wgsl));
    }
    #[cfg(not(feature = "wgpu"))]
    let _ = full.wgsl;
    // The 16-bit families.
    if spec.dtype != DType::F32 {
        let tc = attn::codegen::cuda_source_tensor_cores::<V>(tiling);
        kernels.push(("tensor_core_cuda", canonical_names(&tc), full.tensor_cores));
        if let Some(wg) = warpgroup_tiling(&spec) {
            let ir = attn::codegen::warpgroup_ir::<V>(wg);
            kernels.push((
                "warpgroup_ir",
                canonical_names(&without_ir_types(&ir)),
                false,
            ));
        }
    }
    kernels
}

/// The first declared tile shape the warpgroup kernel runs at the variant's head dims (sm_90).
fn warpgroup_tiling(spec: &attn::VariantSpec) -> Option<attn::Tiling> {
    let dims = |d: u32| d.is_multiple_of(64) && d <= 256;
    spec.tilings.iter().copied().find(|t| {
        (t.block_q == 64 || t.block_q == 128)
            && t.block_kv.is_multiple_of(16)
            && (64..=256).contains(&t.block_kv)
            && dims(spec.head_dim)
            && dims(spec.value_dim)
            && (spec.value_dim <= 128 || t.block_kv <= 64)
    })
}

/// `(file stem, variant name, which kernels in full, its kernels)` for every example variant.
type Entry = (
    &'static str,
    &'static str,
    Full,
    fn(Full) -> Vec<(&'static str, String, bool)>,
);

macro_rules! registry {
    (@full) => { Full::default() };
    (@full $full:expr) => { $full };
    ($($file:ident :: $variant:ident $(: $full:expr)?),* $(,)?) => {
        vec![$((
            stringify!($file),
            stringify!($variant),
            registry!(@full $($full)?),
            kernels::<variants::$file::$variant> as fn(Full) -> Vec<(&'static str, String, bool)>,
        )),*] as Vec<Entry>
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

/// One digest line: lines, an FNV-1a hash of the source and counts of the marker strings.
fn digest(kernel: &str, variant: &str, source: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in source.bytes() {
        hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let markers: &[&str] = match kernel {
        "warpgroup_ir" => &["wgmma", "tma", "barrier.", "cube.asm", "plane."],
        "portable_wgsl" | "decode_wgsl" => &["workgroupBarrier", "exp("],
        _ => &["__syncthreads", "exp", "mma"],
    };
    let counts: Vec<String> = markers
        .iter()
        .map(|m| format!("{m}×{}", source.matches(m).count()))
        .collect();
    format!(
        "{kernel:<17} {variant:<36} {:>6} lines  {hash:016x}  {}",
        source.lines().count(),
        counts.join(" ")
    )
}

#[test]
fn example_variants() {
    let tc = Full {
        tensor_cores: true,
        ..Full::default()
    };
    let registry = registry![
        alibi::Alibi,
        alibi::AlibiGiven,
        gemma2::Gemma2Local: tc,
        gemma2::Gemma2Global,
        llama3::Llama3: tc,
        llama3::Llama3F16,
        mha::Mha64,
        mistral::Mistral,
        mistral::MistralSmallWindow,
        mqa::Mqa64: Full { wgsl: true, tensor_cores: false },
        packed_documents::PackedCausal: tc,
        sinks::SinkWindow: tc,
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/variants");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    let mut names = Vec::new();
    let mut digests = Vec::new();
    let mut declared = 0;
    for file in files {
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        for body in declarations(&file) {
            let plans = attn_dsl::analyse(body).unwrap_or_else(|(e, _)| panic!("{stem}: {e}"));
            for plan in &plans {
                declared += 1;
                let variant = plan.spec.name.to_string();
                let name = format!("{stem}__{variant}");
                let expansion = format!("expansion__{name}");
                insta::assert_snapshot!(
                    expansion.clone(),
                    attn_dsl::pretty(&attn_dsl::codegen::variant(plan))
                );
                names.push(expansion);
                let Some((_, _, full, make)) = registry
                    .iter()
                    .find(|(f, v, _, _)| *f == stem && *v == variant)
                else {
                    panic!("{stem}::{variant} is not in this test's registry: add it");
                };
                for (kernel, source, whole) in make(*full) {
                    digests.push(digest(kernel, &name, &source));
                    if whole {
                        let snapshot = format!("{kernel}__{name}");
                        insta::assert_snapshot!(snapshot.clone(), source);
                        names.push(snapshot);
                    }
                }
            }
        }
    }
    assert_eq!(
        declared,
        registry.len(),
        "every example variant is in the registry, and only those"
    );
    digests.extend(decode_kernels(&mut names));
    insta::assert_snapshot!("digests", digests.join("\n"));
    names.push("digests".to_string());
    reject_unreferenced(&names);
}

/// The decode family: the decode kernel of the Llama-3 variant (GQA, causal) in full and of
/// Mistral (sliding window) as a digest, for the sm_90 model at the CUDA default tile; the f16
/// form in WGSL as a digest; the combine step in full. Returns the digests.
fn decode_kernels(names: &mut Vec<String>) -> Vec<String> {
    use attn::DecodeTiling;
    let tile = DecodeTiling {
        rows: 4,
        units: 128,
        chunk: 8,
    };
    let llama =
        canonical_names(&attn::codegen::decode_cuda_source::<variants::llama3::Llama3>(tile));
    let mistral = canonical_names(&attn::codegen::decode_cuda_source::<
        variants::mistral::Mistral,
    >(tile));
    let combine = canonical_names(&attn::codegen::combine_cuda_source::<attn::bf16>(
        128, false,
    ));
    let mut digests = vec![
        digest("decode_cuda", "llama3__Llama3", &llama),
        digest("decode_cuda", "mistral__Mistral", &mistral),
        digest("combine_cuda", "bf16_d128", &combine),
    ];
    #[cfg(feature = "wgpu")]
    {
        let wgsl = canonical_names(&attn::codegen::decode_wgsl_source::<
            variants::llama3::Llama3F16,
        >(tile));
        digests.push(digest("decode_wgsl", "llama3__Llama3F16", &wgsl));
    }
    for (name, source) in [
        ("decode_cuda__llama3__Llama3", llama),
        ("combine_cuda__bf16_d128", combine),
    ] {
        insta::assert_snapshot!(name, source);
        names.push(name.to_string());
    }
    digests
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
        let other_backend = cfg!(not(feature = "wgpu")) && name.starts_with("portable_wgsl__");
        assert!(
            known || other_backend,
            "unreferenced snapshot {file}: delete it or restore its variant"
        );
    }
}
