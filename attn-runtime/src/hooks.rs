//! The seam between a variant's own expressions and the generic kernels: `attention!` compiles a
//! declaration's `mask: |b, h, q, k| …` and `score: |s, b, h, q, k| …` into an implementation of
//! [`Hooks`], and the kernels call it, comptime-specialised by the variant's type.
//!
//! Indices are `i32` and relative to the sequence (or document): `b` is the batch entry (or
//! document), `h` the query head, `q` and `k` the query's and key's positions. The run-time inputs
//! a variant declares live in two flat device buffers, one `i32` and one `f32`, in slots of
//! `slot_len` values ([`crate::inputs::slots`]), passed to every hook as one [`RunInputs`].

use cubecl::prelude::*;

pub use crate::kernels::common::RunInputs;

/// Tile class: no pair of the tile takes part; the tile is never loaded.
pub const TILE_EMPTY: u32 = 0;
/// Tile class: some pairs take part; the mask is evaluated per element.
pub const TILE_PARTIAL: u32 = 1;
/// Tile class: every pair takes part; no mask arithmetic.
pub const TILE_FULL: u32 = 2;

/// The tile a mask classification covers: queries `q_lo..=q_hi` and keys `k_lo..=k_hi`
/// (sequence positions).
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct TileBounds {
    /// First query.
    pub q_lo: i32,
    /// Last query.
    pub q_hi: i32,
    /// First key.
    pub k_lo: i32,
    /// Last key.
    pub k_hi: i32,
}

/// A variant's `#[cube]` mask and score expressions, and the tile classification derived from
/// its mask expression by interval reasoning. `inputs` holds the call's run-time inputs.
#[cube]
pub trait Hooks: Send + Sync + 'static {
    /// Whether key `k` is visible to query `q` of head `h` in batch entry `b`.
    fn mask(b: i32, h: i32, q: i32, k: i32, inputs: &RunInputs) -> bool;

    /// The modified logit `s` (already scaled) of query `q` and key `k`.
    fn score(s: f32, b: i32, h: i32, q: i32, k: i32, inputs: &RunInputs) -> f32;

    /// `∂ score / ∂ s` at `s`, derived from the score expression by the macro (1 without one):
    /// the backward pass's chain rule through the variant's own score modification.
    fn score_grad(s: f32, b: i32, h: i32, q: i32, k: i32, inputs: &RunInputs) -> f32;

    /// `∂ score / ∂ x` for the element `x` of declared input number `input` that the expression
    /// reads at this pair (0 for an `i32` input), derived by the macro: what a learnable input's
    /// gradient sums over the pairs.
    #[allow(clippy::too_many_arguments)]
    fn score_input_grad(
        s: f32,
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        inputs: &RunInputs,
        input: u32,
    ) -> f32;

    /// `∂ score / ∂ x` for the element `x` that table read number `read` of the score
    /// expression reads at this pair, derived by the macro: what a learnable table's gradient
    /// sums, element by element.
    #[allow(clippy::too_many_arguments)]
    fn score_read_grad(
        s: f32,
        b: i32,
        h: i32,
        q: i32,
        k: i32,
        inputs: &RunInputs,
        read: u32,
    ) -> f32;

    /// Where along its table's inner dimension table read number `read` of the score expression
    /// reads at this pair (clamped to the dimension; 0 without one).
    fn read_position(b: i32, h: i32, q: i32, k: i32, inputs: &RunInputs, read: u32) -> u32;

    /// The class ([`TILE_EMPTY`], [`TILE_PARTIAL`], [`TILE_FULL`]) of the mask over `tile`;
    /// [`TILE_PARTIAL`] whenever unsure.
    fn classify(b: i32, h: i32, tile: TileBounds, inputs: &RunInputs) -> u32;
}

/// The hooks of a variant without expressions: every pair visible, logits unchanged.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NoHooks;

#[cube]
impl Hooks for NoHooks {
    fn mask(_b: i32, _h: i32, _q: i32, _k: i32, _inputs: &RunInputs) -> bool {
        true
    }

    fn score(s: f32, _b: i32, _h: i32, _q: i32, _k: i32, _inputs: &RunInputs) -> f32 {
        s
    }

    fn score_grad(_s: f32, _b: i32, _h: i32, _q: i32, _k: i32, _inputs: &RunInputs) -> f32 {
        1.0
    }

    fn score_input_grad(
        _s: f32,
        _b: i32,
        _h: i32,
        _q: i32,
        _k: i32,
        _inputs: &RunInputs,
        _input: u32,
    ) -> f32 {
        0.0
    }

    fn score_read_grad(
        _s: f32,
        _b: i32,
        _h: i32,
        _q: i32,
        _k: i32,
        _inputs: &RunInputs,
        _read: u32,
    ) -> f32 {
        0.0
    }

    fn read_position(_b: i32, _h: i32, _q: i32, _k: i32, _inputs: &RunInputs, _read: u32) -> u32 {
        0
    }

    fn classify(_b: i32, _h: i32, _tile: TileBounds, _inputs: &RunInputs) -> u32 {
        TILE_FULL
    }
}

/// Helpers the generated expression code calls: `min`, `max` and `abs` on `i32` and `f32`,
/// written with `select` so every back end has them, and the reads of tables.
pub mod ops {
    use cubecl::prelude::*;

    use super::RunInputs;
    use crate::inputs::slots;

    /// The positions a table's `seq` dimension holds.
    #[cube]
    pub fn table_positions(inputs: &RunInputs) -> i32 {
        inputs.ints[slots::TABLES as usize * inputs.slot_len as usize]
    }

    /// The query heads (the rows per batch entry of a table with both dimensions).
    #[cube]
    pub fn table_heads(inputs: &RunInputs) -> i32 {
        inputs.ints[slots::TABLES as usize * inputs.slot_len as usize + 1]
    }

    /// `i` clamped to `0..len`.
    #[cube]
    pub fn table_clamp(i: i32, len: i32) -> i32 {
        max_i32(min_i32(i, len - 1), 0)
    }

    /// Where, in its buffer, declared input number `table` holds the value of row `outer` (its
    /// batch entry, head, or both flattened) at inner position `i` (clamped to `0..len`).
    #[cube]
    pub fn table_at(
        inputs: &RunInputs,
        outer: i32,
        i: i32,
        len: i32,
        #[comptime] table: u32,
    ) -> usize {
        let info = slots::TABLES as usize * inputs.slot_len as usize;
        let base = inputs.ints[info + 2 + table as usize];
        (base + outer * len + table_clamp(i, len)) as usize
    }

    /// `a.min(b)` on `i32`.
    #[cube]
    pub fn min_i32(a: i32, b: i32) -> i32 {
        select(a < b, a, b)
    }

    /// `a.max(b)` on `i32`.
    #[cube]
    pub fn max_i32(a: i32, b: i32) -> i32 {
        select(a > b, a, b)
    }

    /// `a.abs()` on `i32`.
    #[cube]
    pub fn abs_i32(a: i32) -> i32 {
        select(a < 0, -a, a)
    }

    /// `a.min(b)` on `f32`.
    #[cube]
    pub fn min_f32(a: f32, b: f32) -> f32 {
        select(a < b, a, b)
    }

    /// `a.max(b)` on `f32`.
    #[cube]
    pub fn max_f32(a: f32, b: f32) -> f32 {
        select(a > b, a, b)
    }

    /// `a.abs()` on `f32`.
    #[cube]
    pub fn abs_f32(a: f32) -> f32 {
        select(a < 0.0, -a, a)
    }
}
