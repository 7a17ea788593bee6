//! The validated meaning of a declaration: what the kernel must compute, spans kept for checks.

use proc_macro2::Span;
use syn::{Attribute, Ident, Visibility};

/// Head grouping as declared.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Heads {
    /// One K/V head per query head.
    Mha,
    /// `group` query heads per K/V head.
    Gqa {
        /// Query heads per K/V head (≥ 2).
        group: u32,
    },
    /// One K/V head for all query heads.
    Mqa,
}

/// Element type as declared.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum DType {
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single.
    F32,
}

/// Causal diagonal alignment when query and key lengths differ.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Alignment {
    /// The last query sees every key.
    BottomRight,
    /// Query `i` sees keys `0..=i`.
    TopLeft,
}

/// The mask as declared.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Mask {
    /// Every pair takes part.
    None,
    /// Keys up to the diagonal.
    Causal(Alignment),
}

/// A tile shape: `block_q` query rows by `block_kv` keys.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct TileShape {
    /// Query rows.
    pub block_q: u32,
    /// Keys per step.
    pub block_kv: u32,
}

impl TileShape {
    /// Shared memory the portable kernel stages per cube: f32 K and V tiles.
    pub const fn shared_bytes(&self, head_dim: u32) -> usize {
        2 * self.block_kv as usize * head_dim as usize * 4
    }
}

/// A value with the span of the tokens it came from.
#[derive(Copy, Clone, Debug)]
pub struct Spanned<T> {
    /// The value.
    pub value: T,
    /// Where the user wrote it.
    pub span: Span,
}

/// A validated variant declaration.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Attributes to carry over (doc comments).
    pub attrs: Vec<Attribute>,
    /// Visibility of the generated type.
    pub vis: Visibility,
    /// Name of the generated type.
    pub name: Ident,
    /// Head grouping.
    pub heads: Spanned<Heads>,
    /// Head dimension.
    pub head_dim: Spanned<u32>,
    /// Element type.
    pub dtype: Spanned<DType>,
    /// Mask.
    pub mask: Spanned<Mask>,
    /// Softmax scale, when given.
    pub scale: Option<Spanned<f64>>,
    /// Tile shapes, when given (else the planner's defaults).
    pub tiles: Vec<Spanned<TileShape>>,
}
