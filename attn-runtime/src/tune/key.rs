//! The autotune key: what a tuned tile shape is valid for.

use cubecl::AutotuneKey;
use serde::{Deserialize, Serialize};

use crate::inputs::Packed;
use crate::problem::Problem;
use crate::variant::VariantSpec;

/// One tuning decision's scope. Sequence lengths and B×H are bucketed (cubecl's anchors: powers
/// of four between the bounds), so a new length inside a bucket reuses the decision and never
/// recompiles. The device is not a field: cubecl keeps each device's results apart (its cache
/// namespace holds the hardware identity and the cubecl version).
#[derive(AutotuneKey, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TuneKey {
    /// The variant's Rust name and a hash of its compile-time facts (`Llama3#1f2e3d4c`), so two
    /// declarations of one name do not share results.
    pub variant: String,
    /// Element type (`bf16`).
    pub dtype: String,
    /// Head dimension of Q and K.
    pub head_dim: u32,
    /// Head dimension of V.
    pub value_dim: u32,
    /// Query heads per K/V head.
    pub group: usize,
    /// The mask and score modifications (`causal+window(4095,·) softcap`).
    pub kind: String,
    /// Query rows per sequence (the longest document for packed documents).
    #[autotune(anchor(exp(min = 256, max = 16384, base = 4)))]
    pub seq_q: usize,
    /// Keys per sequence.
    #[autotune(anchor(exp(min = 256, max = 16384, base = 4)))]
    pub seq_k: usize,
    /// Sequences × query heads: how many independent rows of cubes fill the device.
    #[autotune(anchor(exp(min = 16, max = 256, base = 4)))]
    pub batch_heads: usize,
}

impl TuneKey {
    /// The key of one call.
    pub fn of(spec: &VariantSpec, problem: &Problem, packed: &Packed) -> TuneKey {
        TuneKey::from_parts(fingerprint(spec), kind(spec), spec, problem, packed)
    }

    /// The key of one call, given the variant's [`fingerprint`] and [`kind`] (worked out once).
    pub(crate) fn from_parts(
        variant: String,
        kind: String,
        spec: &VariantSpec,
        problem: &Problem,
        packed: &Packed,
    ) -> TuneKey {
        let seq_k = if spec.mask.documents {
            // Per document, keys follow their queries; the longest document stands for all.
            packed.max_seq_q.max(1)
        } else {
            problem.seq_k
        };
        TuneKey::new(
            variant,
            spec.dtype.name().to_string(),
            spec.head_dim,
            spec.value_dim,
            problem.group,
            kind,
            packed.max_seq_q,
            seq_k,
            packed.sequences * problem.heads_q,
        )
    }
}

/// The mask and the score modifications in a few words (the key's `kind`).
pub(crate) fn kind(spec: &VariantSpec) -> String {
    let flags = spec.score.flags();
    let mut kind = spec.mask.describe();
    for (on, name) in [
        (flags.softcap, "softcap"),
        (flags.alibi, "alibi"),
        (flags.custom, "score"),
        (flags.sinks, "sinks"),
    ] {
        if on {
            kind.push(' ');
            kind.push_str(name);
        }
    }
    kind
}

/// `Name#hash`: FNV-1a over the spec's debug form (stable across builds of one attn version).
pub fn fingerprint(spec: &VariantSpec) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in format!("{spec:?}").bytes() {
        hash = (hash ^ byte as u32).wrapping_mul(0x0100_0193);
    }
    format!("{}#{hash:08x}", spec.name)
}
