//! Merging attention results over disjoint key sets, exactly, through their log-sum-exps:
//! `O = Σᵢ e^(LSEᵢ − LSE) Oᵢ` with `LSE = log Σᵢ e^(LSEᵢ)`. Two kernels: the combine step of
//! split-KV decoding (a row's partial results from every split, sinks folded in once), and the
//! merge of two finished results (cascade or shared-prefix decoding).
//!
//! A part that saw no key carries LSE −∞ and counts for nothing; a row no part saw writes O = 0,
//! LSE −∞ (or, with a sink, O = 0 and the sink's logit).

// `%` stays in `#[cube]` code: cubecl's frontend expands operators, not `is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]

use cubecl::prelude::*;

use crate::inputs::slots;
use crate::kernels::common::{Outputs, RunInputs};

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

/// The partial results of split-KV decoding: outputs `[rows, splits, Dv]` and LSEs
/// `[rows, splits]`, f32.
#[derive(CubeType, CubeLaunch)]
pub struct Parts {
    /// Partial outputs.
    pub o: OwnedTensor<f32>,
    /// Partial LSEs.
    pub lse: OwnedTensor<f32>,
}

/// The weight `e^(l − max)` of a part with LSE `l` under the row's largest LSE; 0 for a part
/// that saw no key (`l = −∞`).
#[cube]
fn weight(l: f32, max: f32, neg_inf: f32) -> f32 {
    select(l > neg_inf, (l - max).exp(), 0.0f32)
}

/// Combine step of split-KV decoding: one cube per output row `(token, head, sequence)` merges the
/// row's `splits` partial outputs and LSEs into O and the LSE.
#[cube(launch, address_type = "dynamic")]
pub fn combine_splits<E: Float>(
    parts: &Parts,
    outputs: &mut Outputs<E>,
    inputs: &RunInputs,
    splits: u32,
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
    let mut max = neg_inf;
    for s in 0..splits {
        let l = parts.lse[first + s];
        max = select(l > max, l, max);
    }
    let mut sink = neg_inf;
    if comptime!(config.sinks) {
        sink = inputs.floats[slots::SINKS as usize * inputs.slot_len as usize + head];
        max = select(sink > max, sink, max);
    }
    let seen = max > neg_inf;
    let mut total = 0.0f32.runtime();
    for s in 0..splits {
        total += weight(parts.lse[first + s], max, neg_inf);
    }
    if comptime!(config.sinks) {
        total += select(seen, (sink - max).exp(), 0.0f32);
    }
    let inv = select(seen, 1.0 / total, 0.0f32);

    let value_dim = config.value_dim as usize;
    let base =
        batch * outputs.o.stride(0) + head * outputs.o.stride(1) + token * outputs.o.stride(2);
    for c in range_stepped(UNIT_POS as usize, value_dim, config.units as usize) {
        let mut o = 0.0f32.runtime();
        for s in 0..splits {
            let w = weight(parts.lse[first + s], max, neg_inf);
            o += w * parts.o[(first + s) * value_dim + c];
        }
        outputs.o[base + c] = E::cast_from(o * inv);
    }
    if UNIT_POS == 0 {
        outputs.lse[row] = select(seen, max + total.ln(), neg_inf);
    }
}

/// The shape of a merge: value dim and units per cube.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct MergeConfig {
    /// Head dimension of V and O.
    pub value_dim: u32,
    /// Units per cube.
    pub units: u32,
}

/// Merge two finished results row by row: one unit per output element of a `[rows, Dv]` view
/// (contiguous O and LSE), on a 2-D grid of cubes of `units` units.
#[cube(launch, address_type = "dynamic")]
pub fn merge_states<E: Float>(
    a: &Outputs<E>,
    b: &Outputs<E>,
    out: &mut Outputs<E>,
    elements: usize,
    neg_inf: f32,
    #[comptime] config: MergeConfig,
) {
    let i = crate::kernels::flat_index(config.units);
    if i < elements {
        let row = i / config.value_dim as usize;
        let la = a.lse[row];
        let lb = b.lse[row];
        let max = select(la > lb, la, lb);
        let seen = max > neg_inf;
        let wa = weight(la, max, neg_inf);
        let wb = weight(lb, max, neg_inf);
        let total = wa + wb;
        let inv = select(seen, 1.0 / total, 0.0f32);
        let o = (wa * f32::cast_from(a.o[i]) + wb * f32::cast_from(b.o[i])) * inv;
        out.o[i] = E::cast_from(o);
        if i % config.value_dim as usize == 0 {
            out.lse[row] = select(seen, max + total.ln(), neg_inf);
        }
    }
}
