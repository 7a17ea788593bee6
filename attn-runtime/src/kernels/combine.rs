//! Merging attention results over disjoint key sets, exactly, through their log-sum-exps:
//! `O = Σᵢ e^(LSEᵢ − LSE) Oᵢ` with `LSE = log Σᵢ e^(LSEᵢ)`. Two kernels: the combine step of
//! split-KV decoding (a row's partial results from every split, sinks folded in once), and the
//! merge of two finished results (cascade or shared-prefix decoding).
//!
//! A part that saw no key carries LSE −∞ and counts for nothing; a row no part saw writes O = 0,
//! LSE −∞ (or, with a sink, O = 0 and the sink's logit).

// `%` stays in `#[cube]` code: cubecl's frontend expands operators, not `is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]
#![allow(clippy::too_many_arguments)]

use cubecl::prelude::*;

use crate::inputs::slots;

/// Everything that selects the generated code of the combine kernel.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct CombineConfig {
    /// Head dimension of V and O.
    pub value_dim: u32,
    /// Units per cube; each writes every `units`-th column.
    pub units: u32,
    /// Fold the head's sink logit into the denominator.
    pub sinks: bool,
}

/// Combine step of split-KV decoding: one cube per output row `(token, head, sequence)` merges the
/// row's `splits` partial outputs `[rows, splits, Dv]` and LSEs `[rows, splits]` (f32) into O and
/// the LSE.
#[cube(launch)]
pub fn combine_splits<E: Float>(
    part_o: &Tensor<f32>,
    part_lse: &Tensor<f32>,
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    floats: &Tensor<f32>,
    splits: u32,
    slot_len: u32,
    neg_inf: f32,
    #[comptime] config: CombineConfig,
) {
    let token = CUBE_POS_X as usize;
    let head = CUBE_POS_Y as usize;
    let batch = CUBE_POS_Z as usize;
    let row = (batch * CUBE_COUNT_Y as usize + head) * CUBE_COUNT_X as usize + token;
    let splits = splits as usize;
    let first = row * splits;

    // The row's largest LSE (the sink counts as a part with O = 0).
    let mut max = (-1.0e30f32).runtime();
    for s in 0..splits {
        let l = part_lse[first + s];
        max = select(l > max, l, max);
    }
    let mut sink = (-1.0e30f32).runtime();
    if comptime!(config.sinks) {
        sink = floats[slots::SINKS as usize * slot_len as usize + head];
        max = select(sink > max, sink, max);
    }
    let seen = max > -5.0e29f32;
    let mut total = 0.0f32.runtime();
    for s in 0..splits {
        let l = part_lse[first + s];
        total += select(l > -5.0e29f32, (l - max).exp(), 0.0f32);
    }
    if comptime!(config.sinks) {
        total += select(seen, (sink - max).exp(), 0.0f32);
    }
    let inv = select(seen, 1.0 / total, 0.0f32);

    let value_dim = config.value_dim as usize;
    let base = batch * out.stride(0) + head * out.stride(1) + token * out.stride(2);
    for c in range_stepped(UNIT_POS as usize, value_dim, config.units as usize) {
        let mut o = 0.0f32.runtime();
        for s in 0..splits {
            let l = part_lse[first + s];
            let w = select(l > -5.0e29f32, (l - max).exp(), 0.0f32);
            o += w * part_o[(first + s) * value_dim + c];
        }
        out[base + c] = E::cast_from(o * inv);
    }
    if UNIT_POS == 0 {
        lse[row] = select(seen, max + total.ln(), neg_inf);
    }
}

/// Merge two finished results row by row: one unit per output element of a `[rows, Dv]` view
/// (contiguous O and LSE), on a 2-D grid of cubes of `units` units.
#[cube(launch)]
pub fn merge_states<E: Float>(
    o_a: &Tensor<E>,
    lse_a: &Tensor<f32>,
    o_b: &Tensor<E>,
    lse_b: &Tensor<f32>,
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    elements: u32,
    neg_inf: f32,
    #[comptime] value_dim: u32,
    #[comptime] units: u32,
) {
    let i = crate::kernels::flat_index(units);
    if i < elements as usize {
        let row = i / value_dim as usize;
        let la = lse_a[row];
        let lb = lse_b[row];
        let max = select(la > lb, la, lb);
        let seen = max > -5.0e29f32;
        let wa = select(la > -5.0e29f32, (la - max).exp(), 0.0f32);
        let wb = select(lb > -5.0e29f32, (lb - max).exp(), 0.0f32);
        let total = wa + wb;
        let inv = select(seen, 1.0 / total, 0.0f32);
        let o = (wa * f32::cast_from(o_a[i]) + wb * f32::cast_from(o_b[i])) * inv;
        out[i] = E::cast_from(o);
        if i % value_dim as usize == 0 {
            lse[row] = select(seen, max + total.ln(), neg_inf);
        }
    }
}
