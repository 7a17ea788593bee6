//! The validated meaning of a declaration: what the kernel must compute, spans kept for checks.

use proc_macro2::Span;
use syn::{Attribute, Ident, Visibility};

pub use attn_types::{Alibi, CausalAlignment, DType, HeadGrouping, Tiling};

use crate::expr::{Closure, InputDecl};

/// A sliding window as declared: keys `left` before and `right` after the query's position.
#[derive(Copy, Clone, Debug)]
pub struct WindowDecl {
    /// Keys before the query that stay visible.
    pub left: Option<Spanned<u32>>,
    /// Keys after the query that stay visible.
    pub right: Option<Spanned<u32>>,
}

/// The mask as declared: the conjunction of its terms, each with the span it was written at.
#[derive(Clone, Debug, Default)]
pub struct MaskDecl {
    /// `none`.
    pub none: Option<Span>,
    /// `causal` and its alignment.
    pub causal: Option<Spanned<CausalAlignment>>,
    /// `window(…)`.
    pub window: Option<Spanned<WindowDecl>>,
    /// `key_lengths`.
    pub key_lengths: Option<Span>,
    /// `documents`.
    pub documents: Option<Span>,
    /// `prefix_lm`.
    pub prefix_lm: Option<Span>,
    /// `|b, h, q, k| …`.
    pub custom: Option<Closure>,
}

impl MaskDecl {
    /// Whether every pair takes part.
    pub fn is_none(&self) -> bool {
        self.causal.is_none()
            && self.window.is_none()
            && self.key_lengths.is_none()
            && self.documents.is_none()
            && self.prefix_lm.is_none()
            && self.custom.is_none()
    }

    /// The alignment of the diagonal (causal's, else bottom-right).
    pub fn alignment(&self) -> CausalAlignment {
        self.causal
            .map_or(CausalAlignment::BottomRight, |c| c.value)
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
    pub heads: Spanned<HeadGrouping>,
    /// Head dimension of Q and K.
    pub head_dim: Spanned<u32>,
    /// Head dimension of V and O, when it differs.
    pub value_dim: Option<Spanned<u32>>,
    /// Element type: the first declared, which the variant's plain name stands for.
    pub dtype: Spanned<DType>,
    /// Further element types declared with `|` (`dtype: bf16 | f16`): the variant's type takes
    /// its element type as a parameter, the first one its default.
    pub also: Vec<Spanned<DType>>,
    /// Mask.
    pub mask: MaskDecl,
    /// The variant's own score expression.
    pub score: Option<Closure>,
    /// Softcap.
    pub softcap: Option<Spanned<f64>>,
    /// ALiBi.
    pub alibi: Option<Spanned<Alibi>>,
    /// Attention sinks (`sinks: per_head`).
    pub sinks: Option<Span>,
    /// Run-time inputs the expressions read.
    pub inputs: Vec<InputDecl>,
    /// Softmax scale, when given.
    pub scale: Option<Spanned<f64>>,
    /// Tile shapes, when given (else the planner's defaults).
    pub tiles: Vec<Spanned<Tiling>>,
}

impl Spec {
    /// Head dimension of V and O.
    pub fn value_dim(&self) -> u32 {
        self.value_dim.map_or(self.head_dim.value, |v| v.value)
    }

    /// Whether a call needs run-time inputs (and the variant gets an inputs struct).
    pub fn has_inputs(&self) -> bool {
        self.mask.key_lengths.is_some()
            || self.mask.documents.is_some()
            || self.mask.prefix_lm.is_some()
            || self.sinks.is_some()
            || self.alibi.is_some_and(|a| a.value == Alibi::Given)
            || !self.inputs.is_empty()
    }
}
