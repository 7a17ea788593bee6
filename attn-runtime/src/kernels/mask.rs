//! The mask and score-modification phases both kernel families share: where a cube's sequence
//! lies, which keys its query block can see at all, how a K/V step is classified (empty, partial,
//! full), which pairs of a partial step are visible, and how a logit is modified.
//!
//! Positions are relative to the sequence (or packed document). Query `q` sits at key position
//! `q + shift` ("aligned"): `shift = seq_k − seq_q` for bottom-right alignment, 0 for top-left.

// `#[cube]` code: a comptime `if` around a run-time one must stay separate, and `div_ceil` has no
// GPU expansion.
#![allow(
    clippy::collapsible_if,
    clippy::too_many_arguments,
    clippy::manual_div_ceil
)]

use cubecl::prelude::*;

use crate::hooks::ops::{max_i32, min_i32};
use crate::hooks::{Hooks, TILE_FULL, TILE_PARTIAL};
use crate::inputs::slots;
use crate::kernels::prefill::{PrefillArgs, RowState};
use crate::variant::{CausalAlignment, MaskSpec, ScoreFlags};

/// Where one cube's sequence lies in the tensors, and its per-cube constants.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct SequenceSpan {
    /// Batch index into the tensors (0 for packed documents).
    pub batch: usize,
    /// The index expressions see as `b`: batch entry or document.
    pub index: i32,
    /// First query row of the sequence in the tensor.
    pub q_off: usize,
    /// Queries in the sequence.
    pub seq_q: usize,
    /// First key row of the sequence in the tensor.
    pub k_off: usize,
    /// Visible keys in the sequence (key lengths applied).
    pub seq_k: usize,
    /// Aligned position of query 0.
    pub shift: i32,
    /// Prefix length (prefix-LM), else 0.
    pub prefix: i32,
    /// This head's ALiBi slope, else 0.
    pub slope: f32,
}

/// Half-open key range `[start, end)` a query block can see; steps outside it are never loaded.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct KeyRange {
    /// First visible key.
    pub start: usize,
    /// One past the last visible key.
    pub end: usize,
}

/// A query block's walk over the keys: its last row, the keys it can see, and the K/V steps of
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

/// Plan the walk of the query block starting at row `q_start`.
#[cube]
pub fn block_walk(
    seq: SequenceSpan,
    q_start: usize,
    args: PrefillArgs,
    #[comptime] block_q: usize,
    #[comptime] block_kv: usize,
    #[comptime] mask: MaskSpec,
) -> BlockWalk {
    let block_end = q_start + block_q;
    let q_last = select(block_end < seq.seq_q, block_end, seq.seq_q) - 1;
    let range = key_range(seq, q_start, q_last, args, mask);
    BlockWalk {
        q_first: q_start,
        q_last,
        range,
        first_step: range.start / block_kv,
        end_step: (range.end + block_kv - 1) / block_kv,
    }
}

/// The keys of step `step` of a walk.
#[cube]
pub fn step_keys(walk: BlockWalk, step: usize, #[comptime] block_kv: usize) -> StepKeys {
    let start = step * block_kv;
    let remaining = walk.range.end - start;
    StepKeys {
        start,
        len: select(remaining < block_kv, remaining, block_kv),
    }
}

/// Locate the sequence: cube `seq` of the grid's z axis is a batch entry, or a packed document
/// whose rows are read from the offsets; key lengths, prefix length and ALiBi slope come from the
/// input slots.
#[cube]
pub fn locate_sequence(
    seq: usize,
    head: usize,
    seq_q_total: usize,
    seq_k_total: usize,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] mask: MaskSpec,
    #[comptime] score: ScoreFlags,
) -> SequenceSpan {
    let slot_len = args.slot_len as usize;
    let mut batch = seq;
    let mut q_off = 0usize.runtime();
    let mut seq_q = seq_q_total;
    let mut k_off = 0usize.runtime();
    let mut seq_k = seq_k_total;
    if comptime!(mask.documents) {
        let q_at = slots::Q_OFFSETS as usize * slot_len + seq;
        let k_at = slots::K_OFFSETS as usize * slot_len + seq;
        batch = 0;
        q_off = ints[q_at] as usize;
        seq_q = ints[q_at + 1] as usize - q_off;
        k_off = ints[k_at] as usize;
        seq_k = ints[k_at + 1] as usize - k_off;
    }
    if comptime!(mask.key_lengths) {
        seq_k = ints[slots::KEY_LENGTHS as usize * slot_len + seq] as usize;
    }
    let mut prefix = 0i32.runtime();
    if comptime!(mask.prefix_lm) {
        prefix = ints[slots::PREFIX_LENGTHS as usize * slot_len + seq];
    }
    let mut shift = 0i32.runtime();
    if comptime!(mask.align == CausalAlignment::BottomRight) {
        shift = seq_k as i32 - seq_q as i32;
    }
    let mut slope = 0.0f32.runtime();
    if comptime!(score.alibi) {
        slope = floats[slots::ALIBI_SLOPES as usize * slot_len + head];
    }
    SequenceSpan {
        batch,
        index: seq as i32,
        q_off,
        seq_q,
        k_off,
        seq_k,
        shift,
        prefix,
        slope,
    }
}

/// The keys queries `q_first..=q_last` can see under the closed-form terms (causal, window,
/// prefix-LM) and the sequence's key length; the custom mask is classified per step.
#[cube]
pub fn key_range(
    seq: SequenceSpan,
    q_first: usize,
    q_last: usize,
    args: PrefillArgs,
    #[comptime] mask: MaskSpec,
) -> KeyRange {
    let first = q_first as i32 + seq.shift;
    let last = q_last as i32 + seq.shift;
    let mut lo = 0i32.runtime();
    let mut hi = seq.seq_k as i32;
    if comptime!(mask.causal) {
        hi = min_i32(hi, last + 1);
    }
    if comptime!(mask.has_left()) {
        lo = max_i32(lo, first - args.window_left);
    }
    if comptime!(mask.has_right()) {
        hi = min_i32(hi, last + args.window_right + 1);
    }
    if comptime!(mask.prefix_lm) {
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

/// Classify one K/V step of a walk: empty (skip it), full (no mask arithmetic) or partial.
/// Uniform across the cube.
#[cube]
pub fn classify_step<M: Hooks>(
    seq: SequenceSpan,
    head: usize,
    walk: BlockWalk,
    keys: StepKeys,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] mask: MaskSpec,
) -> u32 {
    let first = walk.q_first as i32 + seq.shift;
    let last = walk.q_last as i32 + seq.shift;
    let k_lo = keys.start as i32;
    let k_hi = (keys.start + keys.len - 1) as i32;
    let mut full = true;
    if comptime!(mask.causal) {
        full = full && k_hi <= first;
    }
    if comptime!(mask.has_left()) {
        full = full && k_lo >= last - args.window_left;
    }
    if comptime!(mask.has_right()) {
        full = full && k_hi <= first + args.window_right;
    }
    if comptime!(mask.prefix_lm) {
        full = full && (k_hi < seq.prefix || k_hi <= first);
    }
    let mut class = select(full, TILE_FULL, TILE_PARTIAL);
    if comptime!(mask.custom) {
        let mut custom = TILE_PARTIAL.runtime();
        if comptime!(mask.custom_bounds) {
            custom = M::classify(
                seq.index,
                head as i32,
                walk.q_first as i32,
                walk.q_last as i32,
                k_lo,
                k_hi,
                ints,
                floats,
                args.slot_len,
            );
        }
        class = select(custom < class, custom, class);
    }
    class
}

/// Whether key `k` is visible to query `q` (both sequence positions), on a partial step.
#[cube]
pub fn key_visible<M: Hooks>(
    seq: SequenceSpan,
    head: usize,
    q: i32,
    k: i32,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] mask: MaskSpec,
) -> bool {
    let at = q + seq.shift;
    let mut visible = true;
    if comptime!(mask.causal) {
        visible = visible && k <= at;
    }
    if comptime!(mask.has_left()) {
        visible = visible && k >= at - args.window_left;
    }
    if comptime!(mask.has_right()) {
        visible = visible && k <= at + args.window_right;
    }
    if comptime!(mask.prefix_lm) {
        visible = visible && (k < seq.prefix || k <= at);
    }
    if comptime!(mask.custom) {
        visible = visible && M::mask(seq.index, head as i32, q, k, ints, floats, args.slot_len);
    }
    visible
}

/// Score modification of one scaled logit: softcap, then ALiBi, then the variant's expression.
#[cube]
pub fn modify_score<M: Hooks>(
    s: f32,
    seq: SequenceSpan,
    head: usize,
    q: i32,
    k: i32,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] score: ScoreFlags,
) -> f32 {
    let mut s = s;
    if comptime!(score.softcap) {
        s = args.softcap * (s * args.inv_softcap).tanh();
    }
    if comptime!(score.alibi) {
        let distance = q + seq.shift - k;
        let distance = select(distance < 0, -distance, distance);
        s -= seq.slope * f32::cast_from(distance);
    }
    if comptime!(score.custom) {
        s = M::score(s, seq.index, head as i32, q, k, ints, floats, args.slot_len);
    }
    s
}

/// Finish a row's softmax state: with sinks, fold the head's sink logit in so that
/// `max + ln(sum)` is the LSE with the sink. Returns the factor that multiplies the accumulator
/// (1 without sinks).
#[cube]
pub fn finish_state(
    state: &mut RowState,
    head: usize,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] score: ScoreFlags,
) -> f32 {
    let mut correction = 1.0f32.runtime();
    if comptime!(score.sinks) {
        let sink = floats[slots::SINKS as usize * args.slot_len as usize + head];
        let new_max = select(sink > state.max, sink, state.max);
        correction = (state.max - new_max).exp();
        state.sum = state.sum * correction + (sink - new_max).exp();
        state.max = new_max;
    }
    correction
}
