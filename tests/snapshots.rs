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
//!   tens of thousands of lines of unrolled register code, and the backward kernels (dK/dV and
//!   dQ) of each family that runs the variant. A change to any kernel moves its
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
    pub mod train_bias {
        include!("../examples/variants/train_bias.rs");
    }
}

/// The kernels of the variant a registry entry names.
type Make = fn() -> attn::snapshot::Kernels;

/// `(file stem, variant name, element type, kernels written out in full, its kernels)` per
/// example variant and declared element type.
type Entry = (
    &'static str,
    &'static str,
    attn::DType,
    &'static [&'static str],
    Make,
);

macro_rules! registry {
    ($($file:ident :: $variant:ident $(<$elem:ty>)? : $full:expr),* $(,)?) => {
        vec![$((
            stringify!($file),
            stringify!($variant),
            <variants::$file::$variant $(<$elem>)? as attn::Variant>::SPEC.dtype,
            $full,
            attn::snapshot::kernels::<variants::$file::$variant $(<$elem>)?> as Make,
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

#[test]
fn example_variants() {
    const NONE: &[&str] = &[];
    const TC: &[&str] = &["tensor_core_cuda"];
    let registry = registry![
        alibi::Alibi: NONE,
        alibi::AlibiGiven: NONE,
        gemma2::Gemma2Local: TC,
        gemma2::Gemma2Global: NONE,
        llama3::Llama3: &["tensor_core_cuda", "decode_cuda"],
        llama3::Llama3<attn::f16>: NONE,
        mha::Mha64: NONE,
        mistral::Mistral: NONE,
        mistral::MistralSmallWindow: NONE,
        mqa::Mqa64: &["portable_wgsl"],
        packed_documents::PackedCausal: TC,
        sinks::SinkWindow: TC,
        train_bias::RelBias: NONE,
        train_bias::RelBias<attn::bf16>: NONE,
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
                let variant = plan.spec.name.to_string();
                let name = format!("{stem}__{variant}");
                let expansion = format!("expansion__{name}");
                insta::assert_snapshot!(
                    expansion.clone(),
                    attn_dsl::pretty(&attn_dsl::codegen::variant(plan))
                );
                names.push(expansion);
                // One set of kernels per declared element type; the first is the plain name's.
                let dtypes = std::iter::once(plan.spec.dtype.value)
                    .chain(plan.spec.also.iter().map(|d| d.value));
                for (i, dtype) in dtypes.enumerate() {
                    declared += 1;
                    let (label, name) = if i == 0 {
                        (variant.clone(), name.clone())
                    } else {
                        (
                            format!("{variant}<{}>", dtype.name()),
                            format!("{name}_{}", dtype.name()),
                        )
                    };
                    let Some((_, _, _, full, make)) = registry
                        .iter()
                        .find(|(f, v, d, _, _)| *f == stem && *v == variant && *d == dtype)
                    else {
                        panic!("{stem}::{label} is not in this test's registry: add it");
                    };
                    let kernels = make();
                    for kernel in &kernels.kernels {
                        digests.push(attn::snapshot::digest(kernel.name, &label, &kernel.source));
                    }
                    for &kernel in *full {
                        let snapshot = format!("{kernel}__{name}");
                        let source = kernels.source(kernel).expect("the kernel is generated");
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
    digests.extend(other_kernels(&mut names));
    insta::assert_snapshot!("digests", digests.join("\n"));
    names.push("digests".to_string());
    reject_unreferenced(&names);
}

/// Kernels no variant's set covers: the combine step of split decoding and the decode kernel
/// against an fp8 cache in full, and the decode kernel's WGSL form (f16) as a digest. Returns
/// the digests.
fn other_kernels(names: &mut Vec<String>) -> Vec<String> {
    use attn::snapshot::{digest, normalise};
    let combine = normalise(&attn::codegen::combine_cuda_source::<attn::bf16>(
        128, false,
    ));
    // Only the `wgpu` build adds to it.
    #[cfg_attr(not(feature = "wgpu"), allow(unused_mut))]
    let mut digests = vec![digest("combine_cuda", "bf16_d128", &combine)];
    #[cfg(feature = "wgpu")]
    {
        let tile = attn::DecodeTiling {
            rows: 4,
            units: 128,
            chunk: 8,
        };
        let wgsl = normalise(&attn::codegen::decode_wgsl_source::<
            variants::llama3::Llama3<attn::f16>,
        >(tile));
        digests.push(digest("decode_wgsl", "Llama3<f16>", &wgsl));
    }
    insta::assert_snapshot!("combine_cuda__bf16_d128", combine);
    names.push("combine_cuda__bf16_d128".to_string());
    // The decode kernel against an fp8 cache, in full: its e4m3 words decoded in registers.
    let tile = attn::DecodeTiling {
        rows: 4,
        units: 128,
        chunk: 8,
    };
    let fp8 = normalise(&attn::codegen::decode_fp8_cuda_source::<
        variants::llama3::Llama3<attn::bf16>,
    >(tile));
    digests.push(digest("decode_fp8_cuda", "Llama3<bf16>", &fp8));
    insta::assert_snapshot!("decode_fp8_cuda__llama3_bf16", fp8);
    names.push("decode_fp8_cuda__llama3_bf16".to_string());
    digests
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
        let other_backend = cfg!(not(feature = "wgpu")) && name.contains("wgsl");
        assert!(
            known || other_backend,
            "unreferenced snapshot {file}: delete it or restore its variant"
        );
    }
}
