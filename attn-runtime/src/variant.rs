//! What a declared variant tells the runtime: its compile-time facts and its tile candidates.

use crate::tensor::Element;

/// How query heads share K/V heads.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum HeadGrouping {
    /// One K/V head per query head (`Hq == Hkv`).
    Mha,
    /// `group` query heads share each K/V head (`Hq == group × Hkv`).
    Gqa {
        /// Query heads per K/V head.
        group: u32,
    },
    /// All query heads share one K/V head (`Hkv == 1`).
    Mqa,
}

/// Where the causal diagonal sits when the query and key lengths differ.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum CausalAlignment {
    /// Query `i` sees keys `0 ..= i + (Nk − Nq)`: the last query sees every key (FlashAttention 2,
    /// the layout of decoding and chunked prefill).
    BottomRight,
    /// Query `i` sees keys `0 ..= i` (PyTorch's `is_causal=True`).
    TopLeft,
}

/// Which (query, key) pairs take part.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum MaskKind {
    /// Every pair.
    None,
    /// Keys at or before the query's diagonal.
    Causal(CausalAlignment),
}

/// The element type of Q, K, V and O (accumulation is always f32).
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
}

impl DType {
    /// The name users write in a declaration (`f16`, `bf16`, `f32`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }
}

/// A tile shape of the prefill kernel: `block_q` query rows per cube, `block_kv` keys per step.
///
/// QKᵀ is a `block_q × block_kv × head_dim` product and P·V a `block_q × head_dim × block_kv` one.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct Tiling {
    /// Query rows per cube (the M dimension of both products).
    pub block_q: u32,
    /// Keys per K/V step (N of QKᵀ, K of P·V).
    pub block_kv: u32,
}

impl Tiling {
    /// A stable name, used in logs and as the tuning cache's candidate key.
    pub fn name(&self) -> String {
        format!("q{}_kv{}", self.block_q, self.block_kv)
    }

    /// Shared memory the portable kernel needs: one f32 K tile and one f32 V tile.
    pub const fn shared_bytes(&self, head_dim: u32) -> usize {
        2 * self.block_kv as usize * head_dim as usize * 4
    }

    /// Units per cube of the portable kernel: one per query row.
    pub const fn units_per_cube(&self) -> u32 {
        self.block_q
    }
}

/// The compile-time facts of a declared variant.
#[derive(Copy, Clone, PartialEq, Debug)]
pub struct VariantSpec {
    /// The variant's Rust name.
    pub name: &'static str,
    /// Head grouping.
    pub heads: HeadGrouping,
    /// Head dimension of Q, K and V.
    pub head_dim: u32,
    /// Element type.
    pub dtype: DType,
    /// Mask.
    pub mask: MaskKind,
    /// Softmax scale; `None` means `1/√head_dim`.
    pub scale: Option<f64>,
    /// Tile shapes the launcher and the tuner may use, in order of preference.
    pub tilings: &'static [Tiling],
}

impl VariantSpec {
    /// The softmax scale this variant applies to `q·k`.
    pub fn softmax_scale(&self) -> f64 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f64).sqrt())
    }
}

/// A variant declared with `attention!`: the type the macro generates implements this.
pub trait Variant {
    /// Element type of Q, K, V and O.
    type Elem: Element;
    /// The variant's compile-time facts.
    const SPEC: VariantSpec;
}
