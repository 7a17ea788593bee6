//! The walk over the keys: which keys a query block can see at all (closed-form mask terms and
//! the key length), and the K/V steps that cover them. Keys outside the range are never loaded.

// `#[cube]` code: `div_ceil` has no GPU expansion.
#![allow(clippy::manual_div_ceil)]

use cubecl::prelude::*;

use super::context::{Ctx, RunInputs};
use super::mask;
use crate::hooks::ops::{max_i32, min_i32};
use crate::hooks::{Hooks, TILE_EMPTY, TILE_PARTIAL};

/// Half-open key range `[start, end)` a query block can see; steps outside it are never loaded.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct KeyRange {
    /// First visible key.
    pub start: usize,
    /// One past the last visible key.
    pub end: usize,
}

/// A query block's walk over the keys: its rows, the keys it can see, and the K/V steps of
/// `block_kv` keys that cover them. Uniform across the cube.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct BlockWalk {
    /// First query row of the block (sequence position).
    pub q_first: usize,
    /// Last query row of the block that exists.
    pub q_last: usize,
    /// The keys any row of the block can see.
    pub range: KeyRange,
    /// First step.
    pub first_step: usize,
    /// One past the last step.
    pub end_step: usize,
}

/// The keys of one K/V step: `start..start + len` (the ragged last step is shorter).
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct StepKeys {
    /// First key.
    pub start: usize,
    /// Keys in the step.
    pub len: usize,
}

/// One K/V step: its keys and its mask class ([`crate::TILE_EMPTY`], [`crate::TILE_PARTIAL`],
/// [`crate::TILE_FULL`]), uniform across the cube.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Step {
    /// The step's keys.
    pub keys: StepKeys,
    /// Its class.
    pub class: u32,
}

#[cube]
impl Step {
    /// Whether the mask must be evaluated per pair on this step.
    pub fn partial(&self) -> bool {
        self.class == TILE_PARTIAL
    }
}

#[cube]
impl BlockWalk {
    /// Plan the walk of the query block starting at row `q_start`.
    pub fn new(
        ctx: &Ctx,
        q_start: usize,
        #[comptime] block_q: usize,
        #[comptime] block_kv: usize,
    ) -> BlockWalk {
        let block_end = q_start + block_q;
        let q_last = select(block_end < ctx.site.seq_q, block_end, ctx.site.seq_q) - 1;
        let range = key_range(ctx, q_start, q_last);
        BlockWalk {
            q_first: q_start,
            q_last,
            range,
            first_step: range.start / block_kv,
            end_step: (range.end + block_kv - 1) / block_kv,
        }
    }

    /// The keys of step `step`.
    pub fn keys(&self, step: usize, #[comptime] block_kv: usize) -> StepKeys {
        let start = step * block_kv;
        let remaining = self.range.end - start;
        StepKeys {
            start,
            len: select(remaining < block_kv, remaining, block_kv),
        }
    }
}

/// The keys queries `q_first..=q_last` can see under the closed-form terms (causal, window,
/// prefix-LM) and the sequence's key length; the custom mask is classified per step.
#[cube]
pub fn key_range(ctx: &Ctx, q_first: usize, q_last: usize) -> KeyRange {
    let seq = ctx.site;
    let args = ctx.args;
    let first = q_first as i32 + seq.shift;
    let last = q_last as i32 + seq.shift;
    let mut lo = 0i32.runtime();
    let mut hi = seq.seq_k as i32;
    if comptime!(ctx.mask.causal) {
        hi = min_i32(hi, last + 1);
    }
    if comptime!(ctx.mask.has_left()) {
        lo = max_i32(lo, first - args.window_left);
    }
    if comptime!(ctx.mask.has_right()) {
        hi = min_i32(hi, last + args.window_right + 1);
    }
    if comptime!(ctx.mask.prefix_lm) {
        hi = min_i32(hi, max_i32(seq.prefix, last + 1));
    }
    // A window can start past the last visible key (a query far beyond the keys): the range is
    // then empty, never a range past `seq_k`.
    let end = max_i32(hi, 0);
    let start = min_i32(max_i32(lo, 0), end);
    KeyRange {
        start: start as usize,
        end: end as usize,
    }
}

/// The query rows that can see any of keys `k_first..=k_last` under the closed-form terms
/// (causal, window, prefix-LM), within the sequence's query length: the backward's dK/dV walk
/// over the query blocks, the mirror of [`key_range()`]. Custom masks are classified per block.
#[cube]
pub fn query_range(ctx: &Ctx, k_first: usize, k_last: usize) -> KeyRange {
    let seq = ctx.site;
    let args = ctx.args;
    let first = k_first as i32 - seq.shift;
    let last = k_last as i32 - seq.shift;
    let mut lo = 0i32.runtime();
    let mut hi = seq.seq_q as i32;
    if comptime!(ctx.mask.causal) {
        lo = max_i32(lo, first);
    }
    if comptime!(ctx.mask.has_left()) {
        hi = min_i32(hi, last + args.window_left + 1);
    }
    if comptime!(ctx.mask.has_right()) {
        lo = max_i32(lo, first - args.window_right);
    }
    if comptime!(ctx.mask.prefix_lm) {
        // Keys before the prefix are seen by every row; past it, only causally.
        if k_first as i32 >= seq.prefix {
            lo = max_i32(lo, first);
        }
    }
    let end = max_i32(hi, 0);
    let start = min_i32(max_i32(lo, 0), end);
    KeyRange {
        start: start as usize,
        end: end as usize,
    }
}

/// A walk whose next step is fetched ahead (the warpgroup kernels): how many steps it has and
/// the mask's class of each. The closed-form terms cut a walk to the steps they can see, but a
/// custom mask the interval reasoning bounds can rule out steps anywhere inside it (the band and
/// the first keys of `q >= k && (q - k) < 256 || k < 4` leave every step between them empty):
/// such a walk goes from one live step to the next ([`live_steps()`], [`next_live()`]), and the
/// steps between are neither fetched nor waited on.
#[cube]
pub trait ClassifiedWalk<M: Hooks> {
    /// Steps of the walk, empty ones included.
    fn steps(&self) -> usize;

    /// The mask's class of step `index < steps()`.
    fn class_at(&self, ctx: &Ctx, index: usize, inputs: &RunInputs) -> u32;
}

/// A query block's walk over its K/V steps of `block_kv` keys, as [`ClassifiedWalk`].
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct KeySteps {
    /// The walk.
    pub walk: BlockWalk,
    /// Keys per step.
    #[cube(comptime)]
    pub block_kv: usize,
}

#[cube]
impl<M: Hooks> ClassifiedWalk<M> for KeySteps {
    fn steps(&self) -> usize {
        self.walk.end_step - self.walk.first_step
    }

    fn class_at(&self, ctx: &Ctx, index: usize, inputs: &RunInputs) -> u32 {
        let keys = self.walk.keys(self.walk.first_step + index, self.block_kv);
        mask::classify::<M>(ctx, self.walk, keys, inputs)
    }
}

/// How many steps of `walk` the mask leaves: all of them, unless a bounded custom mask can rule
/// some out, when a plane classifies 32 steps at once and counts the live ones. Uniform across the
/// cube (every plane computes the same count).
#[cube]
pub fn live_steps<W: ClassifiedWalk<M>, M: Hooks>(
    walk: &W,
    ctx: &Ctx,
    inputs: &RunInputs,
) -> usize {
    let steps = W::steps(walk);
    let mut live = steps;
    if comptime!(ctx.mask.custom && ctx.mask.custom_bounds) {
        live = 0;
        let mut at = 0usize.runtime();
        while at < steps {
            let index = at + UNIT_POS_PLANE as usize;
            let counted = select(is_live::<W, M>(walk, ctx, index, inputs), 1u32, 0u32);
            live += plane_sum(counted) as usize;
            at += PLANE_DIM as usize;
        }
    }
    live
}

/// The first step at or after `from` the mask leaves (`walk.steps()` when none does): `from`
/// itself unless a bounded custom mask can rule steps out, when a plane classifies 32 steps at
/// once and takes the first live one. Uniform across the cube.
#[cube]
pub fn next_live<W: ClassifiedWalk<M>, M: Hooks>(
    walk: &W,
    ctx: &Ctx,
    from: usize,
    inputs: &RunInputs,
) -> usize {
    let mut next = from;
    if comptime!(ctx.mask.custom && ctx.mask.custom_bounds) {
        let steps = W::steps(walk);
        next = steps;
        let mut at = from;
        while at < steps {
            let index = at + UNIT_POS_PLANE as usize;
            let candidate = select(
                is_live::<W, M>(walk, ctx, index, inputs),
                index as u32,
                steps as u32,
            );
            next = plane_min(candidate) as usize;
            at = select(next < steps, steps, at + PLANE_DIM as usize);
        }
    }
    next
}

/// Whether step `index` exists and the mask leaves it (one unit's share of a plane's scan).
#[cube]
fn is_live<W: ClassifiedWalk<M>, M: Hooks>(
    walk: &W,
    ctx: &Ctx,
    index: usize,
    inputs: &RunInputs,
) -> bool {
    let steps = W::steps(walk);
    let inside = index < steps;
    // Units past the end classify the last step, and discard it.
    let class = walk.class_at(ctx, select(inside, index, steps - 1), inputs);
    inside && class != TILE_EMPTY
}
