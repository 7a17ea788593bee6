//! The mask: how a K/V step is classified (empty, partial, full), and which pairs of a partial
//! step are visible.

// `#[cube]` code: a comptime `if` around a run-time one must stay separate.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use super::context::{Ctx, RunInputs};
use super::walk::{BlockWalk, StepKeys};
use crate::hooks::{Hooks, TileBounds, TILE_FULL, TILE_PARTIAL};

/// Classify one K/V step of a walk: empty (skip it), full (no mask arithmetic) or partial.
/// Uniform across the cube.
#[cube]
pub fn classify<M: Hooks>(ctx: &Ctx, walk: BlockWalk, keys: StepKeys, inputs: &RunInputs) -> u32 {
    let seq = ctx.site;
    let args = ctx.args;
    let first = walk.q_first as i32 + seq.shift;
    let last = walk.q_last as i32 + seq.shift;
    let k_lo = keys.start as i32;
    let k_hi = (keys.start + keys.len - 1) as i32;
    let mut full = true;
    if comptime!(ctx.mask.causal) {
        full = full && k_hi <= first;
    }
    if comptime!(ctx.mask.has_left()) {
        full = full && k_lo >= last - args.window_left;
    }
    if comptime!(ctx.mask.has_right()) {
        full = full && k_hi <= first + args.window_right;
    }
    if comptime!(ctx.mask.prefix_lm) {
        full = full && (k_hi < seq.prefix || k_hi <= first);
    }
    let mut class = select(full, TILE_FULL, TILE_PARTIAL);
    if comptime!(ctx.mask.custom) {
        let mut custom = TILE_PARTIAL.runtime();
        if comptime!(ctx.mask.custom_bounds) {
            let tile = TileBounds {
                q_lo: walk.q_first as i32,
                q_hi: walk.q_last as i32,
                k_lo,
                k_hi,
            };
            custom = M::classify(seq.index, seq.head as i32, tile, inputs);
        }
        class = select(custom < class, custom, class);
    }
    class
}

/// Whether key `k` is visible to query `q` (both sequence positions), on a partial step.
#[cube]
pub fn visible<M: Hooks>(ctx: &Ctx, q: i32, k: i32, inputs: &RunInputs) -> bool {
    let seq = ctx.site;
    let args = ctx.args;
    let at = q + seq.shift;
    let mut visible = true;
    if comptime!(ctx.mask.causal) {
        visible = visible && k <= at;
    }
    if comptime!(ctx.mask.has_left()) {
        visible = visible && k >= at - args.window_left;
    }
    if comptime!(ctx.mask.has_right()) {
        visible = visible && k <= at + args.window_right;
    }
    if comptime!(ctx.mask.prefix_lm) {
        visible = visible && (k < seq.prefix || k <= at);
    }
    if comptime!(ctx.mask.custom) {
        visible = visible && M::mask(seq.index, seq.head as i32, q, k, inputs);
    }
    visible
}
