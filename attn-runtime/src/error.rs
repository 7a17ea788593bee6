//! Errors of setting up and launching attention: every bad input is caught before a launch.

use std::fmt;

/// Which input a problem was found in.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Operand {
    /// The queries.
    Q,
    /// The keys.
    K,
    /// The values.
    V,
    /// A caller-owned output buffer.
    O,
    /// A caller-owned log-sum-exp buffer.
    Lse,
    /// The gradient of the output (the backward pass's input).
    DOut,
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operand::Q => "q",
            Operand::K => "k",
            Operand::V => "v",
            Operand::O => "output",
            Operand::Lse => "lse",
            Operand::DOut => "d_out",
        })
    }
}

/// A dimension of a `[batch, heads, seq, head_dim]` tensor.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Dim {
    /// Batch.
    Batch,
    /// Heads.
    Heads,
    /// Sequence length.
    Seq,
    /// Head dimension.
    HeadDim,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dim::Batch => "batch (dim 0)",
            Dim::Heads => "heads (dim 1)",
            Dim::Seq => "sequence (dim 2)",
            Dim::HeadDim => "head_dim (dim 3)",
        })
    }
}

/// Why an attention call was refused or failed. New kinds of failure may be added: match with a
/// wildcard arm.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum AttnError {
    /// A dimension is zero.
    #[error("{operand}: {dim} is 0; every dimension must be at least 1")]
    EmptyDim {
        /// The tensor.
        operand: Operand,
        /// The dimension.
        dim: Dim,
    },
    /// A dimension disagrees with the variant or with another tensor.
    #[error("{operand}: {dim} is {found}, expected {expected} ({why})")]
    DimMismatch {
        /// The tensor.
        operand: Operand,
        /// The dimension.
        dim: Dim,
        /// What it should be.
        expected: usize,
        /// What it is.
        found: usize,
        /// Where the expectation comes from.
        why: &'static str,
    },
    /// The head counts do not fit the variant's head grouping.
    #[error("heads: q has {hq} heads and k/v have {hkv}; {rule}")]
    HeadGrouping {
        /// Query heads.
        hq: usize,
        /// K/V heads.
        hkv: usize,
        /// The rule of the variant's grouping.
        rule: String,
    },
    /// The head dimension is not contiguous (its stride must be 1).
    #[error("{operand}: head_dim (dim 3) has stride {stride}; it must be 1 (contiguous)")]
    NotContiguous {
        /// The tensor.
        operand: Operand,
        /// The stride found.
        stride: usize,
    },
    /// Shape and strides reach past the end of the tensor's buffer.
    #[error("{operand}: shape {shape:?} with strides {strides:?} reaches element {needed}, but the buffer holds {len}")]
    OutOfBounds {
        /// The tensor.
        operand: Operand,
        /// Shape.
        shape: [usize; 4],
        /// Strides.
        strides: [usize; 4],
        /// Elements the view needs.
        needed: usize,
        /// Elements the buffer holds.
        len: usize,
    },
    /// A size past what the launch grid or this back end can address (a grid axis; a buffer of
    /// more than 2³² elements where the back end has no 64-bit offsets).
    #[error("{what} is {found}, more than the largest supported ({max})")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// The value.
        found: usize,
        /// The limit.
        max: usize,
    },
    /// A caller-owned output buffer is not a contiguous buffer of the expected size.
    #[error("{operand}: the buffer must be contiguous and hold at least {needed} elements")]
    OutputLayout {
        /// The buffer.
        operand: Operand,
        /// Elements it must hold.
        needed: usize,
    },
    /// Host data does not fill the shape it is uploaded as.
    #[error("host data has {found} elements, but shape {shape:?} needs {expected}")]
    DataLength {
        /// The shape asked for.
        shape: [usize; 4],
        /// Elements the shape needs.
        expected: usize,
        /// Elements given.
        found: usize,
    },
    /// A run-time input of the variant (key lengths, document offsets, prefix lengths, sinks,
    /// ALiBi slopes or a declared input) is missing, has the wrong length or an impossible value.
    #[error("input `{input}`: {reason}")]
    Input {
        /// The input's name, as in the variant's inputs struct.
        input: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The device cannot run this variant.
    #[error("unsupported on this device: {0}")]
    Unsupported(String),
    /// The device reported an error while running the kernel.
    #[error("launch failed: {0}")]
    Launch(String),
    /// A K/V cache is inconsistent or cannot take a request: page size, block table, lengths,
    /// free pages or room for appended tokens.
    #[error("kv cache: {field}: {reason}")]
    KvCache {
        /// The part of the cache at fault (`page_size`, `block_table`, `lengths`, `pages`, …).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The tuning cache could not be read, written, exported or imported.
    #[error("tuning cache: {0}")]
    Cache(String),
}
