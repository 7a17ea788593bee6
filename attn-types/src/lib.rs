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

/// The shape of a run-time input a variant declares (`inputs: { name: [f32; heads, 32] }`):
/// optional leading batch and head dimensions, which expressions index with `b` and `h`, then
/// optionally one inner dimension (one value per position, or a fixed count such as T5's
/// buckets), which they index with any `i32` expression, clamped to its ends.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct InputShape {
    /// A leading dimension of one value per sequence (batch entry or document).
    pub per_batch: bool,
    /// A dimension of one value per query head (after the batch one).
    pub per_head: bool,
    /// The inner dimension.
    pub inner: Inner,
}

/// The inner dimension of a declared input.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum Inner {
    /// None: one value per `b` and `h` index.
    None,
    /// One value per position (`seq`): as many as the longer of Q's and K's sequence dimension.
    Seq,
    /// A fixed count, written as a literal.
    Fixed(u32),
}

impl InputShape {
    /// A single value.
    pub const SCALAR: InputShape = InputShape {
        per_batch: false,
        per_head: false,
        inner: Inner::None,
    };

    /// Whether it is stored as a table beside the fixed slots (an inner dimension, or both a
    /// batch and a head dimension); the others fill one slot each.
    pub const fn is_table(&self) -> bool {
        !matches!(self.inner, Inner::None) || (self.per_batch && self.per_head)
    }

    /// Values along the inner dimension: its count, `positions` for `seq`, 1 without one.
    pub const fn inner_len(&self, positions: usize) -> usize {
        match self.inner {
            Inner::None => 1,
            Inner::Seq => positions,
            Inner::Fixed(n) => n as usize,
        }
    }

    /// Values in all, row-major: `[sequences?, heads?, inner]`.
    pub const fn len(&self, sequences: usize, heads: usize, positions: usize) -> usize {
        let batch = if self.per_batch { sequences } else { 1 };
        let head = if self.per_head { heads } else { 1 };
        batch * head * self.inner_len(positions)
    }

    /// Its dimensions in order, named by `names` (batch, heads, positions); a count by its
    /// value.
    pub fn dims(&self, [batch, heads, positions]: [&str; 3]) -> Vec<String> {
        let mut dims = Vec::new();
        if self.per_batch {
            dims.push(batch.to_string());
        }
        if self.per_head {
            dims.push(heads.to_string());
        }
        match self.inner {
            Inner::None => {}
            Inner::Seq => dims.push(positions.to_string()),
            Inner::Fixed(n) => dims.push(n.to_string()),
        }
        dims
    }

    /// As a declaration writes it, for element type `ty`: `f32`, `[i32; batch]`,
    /// `[f32; heads, 32]`.
    pub fn declared(&self, ty: &str) -> String {
        let dims = self.dims(["batch", "heads", "seq"]);
        if dims.is_empty() {
            ty.to_string()
        } else {
            format!("[{ty}; {}]", dims.join(", "))
        }
    }
}
