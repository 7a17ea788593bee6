//! Snapshot-testing generated kernels: the source of the kernels a variant compiles to, produced
//! without a GPU and normalised so that it is the same on every machine, build and checkout path
//! (value names renumbered in order of first appearance, kernel-name hashes replaced), and a
//! one-line digest per kernel (lines, a hash, counts of the operations that matter) small enough
//! to review every kernel of every variant as a diff.
//!
//! ```ignore
//! #[test]
//! fn my_kernels() {
//!     let kernels = attn::snapshot::kernels::<MyVariant>();
//!     insta::assert_snapshot!("my_variant_digests", attn::snapshot::digests(&kernels));
//!     insta::assert_snapshot!("my_variant_tensor_cores", kernels.source("tensor_core_cuda").unwrap());
//! }
//! ```

use crate::blueprint::Family;
use crate::kernels::decode::DecodeTiling;
use crate::variant::{DType, Tiling, Variant, VariantSpec};

/// One generated kernel: its name (`portable_cuda`, `portable_wgsl`, `tensor_core_cuda`,
/// `warpgroup_ir`, the backward's `backward_dkdv_cuda`, `backward_dq_cuda`,
/// `backward_dkdv_tc_cuda`, `backward_dq_tc_cuda`, `backward_dkdv_wg_ir`, `backward_dq_wg_ir`,
/// `backward_atomic_wg_ir`, `backward_split_wg_ir`, `decode_cuda`) and its normalised source.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Which kernel and form.
    pub name: &'static str,
    /// The normalised source (CUDA C++ for an sm_90 model, WGSL, or cubecl's IR).
    pub source: String,
}

/// Every kernel of a variant.
#[derive(Clone, Debug)]
pub struct Kernels {
    /// The variant's name.
    pub variant: &'static str,
    /// Its kernels, in the order above.
    pub kernels: Vec<Kernel>,
}

impl Kernels {
    /// The source of kernel `name`, if the variant has it.
    pub fn source(&self, name: &str) -> Option<&str> {
        self.kernels
            .iter()
            .find(|k| k.name == name)
            .map(|k| k.source.as_str())
    }
}

/// The kernels `V` compiles to, at its first declared tile shape: the portable prefill kernel
/// (CUDA C++, and WGSL for f16/f32 with the `wgpu` feature), for 16-bit elements the tensor-core
/// kernel (CUDA C++) and the warpgroup kernel (cubecl IR, at the first declared tile it runs),
/// the backward kernels of each family that runs the variant (at each family's first tile), the
/// decode kernel (CUDA C++, paged, split) and for 16-bit elements its warpgroup form (cubecl IR,
/// pages of 16, split). Produced without a device; normalised.
pub fn kernels<V: Variant>() -> Kernels {
    let spec = V::SPEC;
    let tiling = spec.tilings[0];
    let mut kernels = vec![Kernel {
        name: "portable_cuda",
        source: normalise(&crate::codegen::cuda_source::<V>(tiling)),
    }];
    #[cfg(feature = "wgpu")]
    if spec.dtype != DType::BF16 {
        kernels.push(Kernel {
            name: "portable_wgsl",
            source: normalise(&crate::codegen::wgsl_source::<V>(tiling)),
        });
    }
    if spec.dtype != DType::F32 {
        kernels.push(Kernel {
            name: "tensor_core_cuda",
            source: normalise(&crate::codegen::cuda_source_tensor_cores::<V>(tiling)),
        });
        if let Some(wg) = warpgroup_tiling(&spec) {
            let ir = crate::codegen::warpgroup_ir::<V>(wg);
            kernels.push(Kernel {
                name: "warpgroup_ir",
                source: normalise(&without_ir_types(&ir)),
            });
        }
    }
    // The backward kernels (dK/dV, dQ) of each family that runs the variant.
    let mut families = vec![(Family::Portable, "portable")];
    if spec.dtype != DType::F32 {
        families.push((Family::TensorCores, "tc"));
        let half_panels = |d: u32| d == 64 || d == 128;
        if half_panels(spec.head_dim) && half_panels(spec.value_dim) {
            families.push((Family::Warpgroup, "wg"));
        }
    }
    for (family, short) in families {
        let plan = crate::backward::first_plan(family, &spec);
        let [dkdv, dq] = crate::codegen::backward_sources::<V>(plan);
        let form = |source: &str| {
            if family == Family::Warpgroup {
                normalise(&without_ir_types(source))
            } else {
                normalise(source)
            }
        };
        let (dkdv_name, dq_name) = match short {
            "portable" => ("backward_dkdv_cuda", "backward_dq_cuda"),
            "tc" => ("backward_dkdv_tc_cuda", "backward_dq_tc_cuda"),
            _ => ("backward_dkdv_wg_ir", "backward_dq_wg_ir"),
        };
        kernels.push(Kernel {
            name: dkdv_name,
            source: form(&dkdv),
        });
        kernels.push(Kernel {
            name: dq_name,
            source: form(&dq),
        });
        // On Hopper also the dK/dV kernel that sums dQ with atomics (no dQ kernel runs then).
        if family == Family::Warpgroup {
            let mut atomic = plan;
            atomic.dq = crate::backward::DqSum::Atomic;
            atomic.tile.dq_streamed = atomic.tile.streamed;
            let [dkdv, _] = crate::codegen::backward_sources::<V>(atomic);
            kernels.push(Kernel {
                name: "backward_atomic_wg_ir",
                source: form(&dkdv),
            });
            // And the one that splits long walks between cubes.
            let mut split = plan;
            split.kv_splits = crate::backward::KV_SPLITS;
            let [dkdv, _] = crate::codegen::backward_sources::<V>(split);
            kernels.push(Kernel {
                name: "backward_split_wg_ir",
                source: form(&dkdv),
            });
        }
    }
    let decode = DecodeTiling {
        rows: 4,
        units: 128,
        chunk: 8,
    };
    kernels.push(Kernel {
        name: "decode_cuda",
        source: normalise(&crate::codegen::decode_cuda_source::<V>(decode)),
    });
    // On Hopper, 16-bit decoding runs the warpgroup kernel (its default 64 keys per step, paged
    // in pages of 16, split), from 16-bit and from fp8 caches.
    if spec.dtype != DType::F32 && warpgroup_tiling(&spec).is_some() {
        for (name, fp8) in [("decode_wg_ir", false), ("decode_wg_fp8_ir", true)] {
            let ir = crate::codegen::decode_warpgroup_ir::<V>(64, Some(16), fp8);
            kernels.push(Kernel {
                name,
                source: normalise(&without_ir_types(&ir)),
            });
        }
    }
    Kernels {
        variant: spec.name,
        kernels,
    }
}

/// One digest line per kernel of `kernels` (see [`digest`]).
pub fn digests(kernels: &Kernels) -> String {
    kernels
        .kernels
        .iter()
        .map(|k| digest(k.name, kernels.variant, &k.source))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A kernel's source normalised for comparison: the hash suffix of kernel names replaced, value
/// names renumbered in order of first appearance.
pub fn normalise(source: &str) -> String {
    canonical_names(source)
}

/// The first declared tile shape the warpgroup kernel runs at the variant's head dims (sm_90).
fn warpgroup_tiling(spec: &VariantSpec) -> Option<Tiling> {
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

/// One digest line: lines, an FNV-1a hash of the source and counts of the marker strings.
pub fn digest(kernel: &str, variant: &str, source: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in source.bytes() {
        hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let markers: &[&str] = match kernel {
        "warpgroup_ir"
        | "backward_dkdv_wg_ir"
        | "backward_dq_wg_ir"
        | "backward_atomic_wg_ir"
        | "backward_split_wg_ir"
        | "decode_wg_ir"
        | "decode_wg_fp8_ir" => &["wgmma", "tma", "barrier.", "cube.asm", "plane."],
        "portable_wgsl" | "decode_wgsl" => &["workgroupBarrier", "exp("],
        _ => &["__syncthreads", "exp", "mma"],
    };
    let counts: Vec<String> = markers
        .iter()
        .map(|m| format!("{m}×{}", source.matches(m).count()))
        .collect();
    format!(
        "{kernel:<21} {variant:<36} {:>6} lines  {hash:016x}  {}",
        source.lines().count(),
        counts.join(" ")
    )
}

/// cubecl's IR with the type signature dropped from the end of each operation (` [..] [..]: <..>`
/// or ` : type`): the operations and their operands are what a review reads, and the types
/// follow from them.
pub fn without_ir_types(ir: &str) -> String {
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
    while let Some(at) = [
        "prefill_forward",
        "decode_forward",
        "combine_splits",
        "backward_dkdv",
        "backward_dq",
    ]
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
