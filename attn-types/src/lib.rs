//! The facts of an attention variant that both the declaration language (`attn-dsl`, at compile
//! time) and the runtime (`attn-runtime`) speak of, defined once: the element type, the head
//! grouping, the causal alignment, ALiBi's slopes and the tile shape. No dependencies.

#![warn(missing_docs)]

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

/// ALiBi slopes: the standard geometric sequence for the run-time number of query heads, or
/// given per head at run time.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum Alibi {
    /// `2^(−8(h+1)/n)` for `n` a power of two, interleaved otherwise (Press et al.).
    Geometric,
    /// A run-time `[Hq]` f32 tensor.
    Given,
}

/// A tile shape of the prefill kernels: `block_q` query rows per cube, `block_kv` keys per step.
///
/// QKᵀ is a `block_q × block_kv × head_dim` product and P·V a `block_q × value_dim × block_kv`
/// one.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct Tiling {
    /// Query rows per cube (the M dimension of both products).
    pub block_q: u32,
    /// Keys per K/V step (N of QKᵀ, K of P·V).
    pub block_kv: u32,
}

impl Tiling {
    /// A stable name, used in logs and as the tuning cache's candidate key (`q64_kv32`).
    pub fn name(&self) -> String {
        format!("q{}_kv{}", self.block_q, self.block_kv)
    }

    /// Shared memory the portable kernel (the one every back end runs) stages per cube, in
    /// bytes: one f32 K tile and one f32 V tile.
    pub const fn portable_shared_bytes(&self, head_dim: u32, value_dim: u32) -> usize {
        self.block_kv as usize * (head_dim + value_dim) as usize * 4
    }
}
