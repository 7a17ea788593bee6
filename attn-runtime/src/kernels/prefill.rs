//! The fused FlashAttention-2 style forward kernel, portable form.
//!
//! One cube per (query block, query head, batch); one unit per query row. Q stays in the unit's
//! registers, pre-multiplied by the softmax scale; the cube walks K/V in `block_kv`-key steps
//! staged through shared memory; each unit keeps an online softmax (running max and sum, f32) and
//! an f32 accumulator, normalises once at the end and writes O and the log-sum-exp. The N×N score
//! matrix never exists: scores live for one K/V step in the unit's registers.
//!
//! Mask tiles are classified per step ([`crate::kernels::mask`]): keys outside the block's visible
//! range (causal, window, prefix-LM, key length, document) are never loaded, steps the custom mask
//! rules out are skipped, full steps run without mask arithmetic, and only partial steps evaluate
//! the mask per element. The ragged last step is just shorter (`kv_len` keys).
//!
//! This path uses no warp shuffles and no tensor cores, so it runs on every cubecl back end,
//! lavapipe included. cubecl 0.12 exposes `exp` but no `exp2`; the scale is folded into Q, so the
//! inner loop does one subtraction and one `exp` per score.
//!
//! Loop shapes are chosen for both kinds of target: loops over the head dimension are unrolled
//! (the row's Q and accumulator then live in registers), loops over keys have a run-time trip
//! count. Mesa's llvmpipe unrolls every loop of up to 32 constant iterations itself (a fully
//! unrolled key loop took minutes to compile) and counts the iterations of the remaining loops
//! against a limit of 65 535 per invocation, after which it silently leaves every loop: see
//! [`crate::launch::check_loop_budget`].

// `#[cube]` code: `div_ceil` has no GPU expansion, and a comptime `if` around a run-time one must
// stay separate (the outer branch disappears at expansion, the inner one is kept).
#![allow(clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use crate::hooks::{Hooks, TILE_EMPTY, TILE_PARTIAL};
use crate::kernels::mask::{
    block_walk, classify_step, finish_state, key_visible, locate_sequence, modify_score, step_keys,
    SequenceSpan,
};
use crate::variant::{MaskSpec, ScoreFlags, Tiling};

// Masked entries inside a step hold −1e30, a score no real logit reaches; anything below −5e29
// counts as masked. Finite on purpose: −∞ − (−∞) would be NaN in the running-max update.

/// A query row's online-softmax state: running max of its scaled logits and the running sum of
/// their exponentials relative to that max.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct RowState {
    /// Running max.
    pub max: f32,
    /// Running sum.
    pub sum: f32,
}

/// Everything that selects the generated code of the prefill kernels.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct PrefillConfig {
    /// Tile shape.
    pub tiling: Tiling,
    /// Head dimension of Q and K.
    pub head_dim: u32,
    /// Head dimension of V and O.
    pub value_dim: u32,
    /// The mask.
    pub mask: MaskSpec,
    /// The score modifications.
    pub score: ScoreFlags,
}

impl PrefillConfig {
    /// Query rows per cube (M of QKᵀ and of P·V).
    pub const fn block_q(&self) -> usize {
        self.tiling.block_q as usize
    }

    /// Keys per step (N of QKᵀ, K of P·V).
    pub const fn block_kv(&self) -> usize {
        self.tiling.block_kv as usize
    }

    /// Head dimension of Q and K (K of QKᵀ).
    pub const fn head_dim(&self) -> usize {
        self.head_dim as usize
    }

    /// Head dimension of V and O (N of P·V).
    pub const fn value_dim(&self) -> usize {
        self.value_dim as usize
    }
}

/// Run-time scalars of one launch, grouped so the kernel signature stays readable.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct PrefillArgs {
    /// Softmax scale applied to q·k.
    pub scale: f32,
    /// Query heads per K/V head.
    pub group: u32,
    /// Values per slot of the packed input buffers.
    pub slot_len: u32,
    /// Window: keys before the aligned query position that stay visible.
    pub window_left: i32,
    /// Window: keys after it.
    pub window_right: i32,
    /// Softcap `cap`.
    pub softcap: f32,
    /// `1 / cap`.
    pub inv_softcap: f32,
    /// −∞, passed in because not every shading language can spell it.
    pub neg_inf: f32,
}

/// The fused forward pass: O = softmax(mod(scale · Q Kᵀ) + mask) V, and LSE per query row.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn prefill_forward<E: Float, M: Hooks>(
    q: &Tensor<E>,
    k: &Tensor<E>,
    v: &Tensor<E>,
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    let block_q = config.block_q();
    let block_kv = config.block_kv();
    let head = CUBE_POS_Y as usize;
    let seq = locate_sequence(
        CUBE_POS_Z as usize,
        head,
        q.shape(2),
        k.shape(2),
        ints,
        floats,
        args,
        config.mask,
        config.score,
    );
    let q_start = CUBE_POS_X as usize * block_q;
    // Cubes past the end of a short document have nothing to do (uniform across the cube).
    if q_start < seq.seq_q {
        let row = q_start + UNIT_POS as usize;
        let kv_head = head / args.group as usize;
        let row_valid = row < seq.seq_q;

        let mut q_row = Array::<f32>::new(config.head_dim());
        load_q_row::<E>(q, &mut q_row, seq, head, row, row_valid, args.scale, config);

        // One allocation for both tiles, K first: one shared array keeps the emitted source stable.
        let v_at = block_kv * config.head_dim();
        let mut kv_tiles = Shared::<[f32]>::new_slice(v_at + block_kv * config.value_dim());
        let mut scores = Array::<f32>::new(block_kv);
        let mut acc = Array::<f32>::new(config.value_dim());
        #[unroll]
        for c in 0..config.value_dim() {
            acc[c] = 0.0;
        }
        let mut state = RowState {
            max: -1.0e30f32,
            sum: 0.0f32,
        };

        let walk = block_walk(seq, q_start, args, block_q, block_kv, config.mask);
        for step in walk.first_step..walk.end_step {
            let keys = step_keys(walk, step, block_kv);
            let kv_start = keys.start;
            let kv_len = keys.len;
            let class = classify_step::<M>(seq, head, walk, keys, ints, floats, args, config.mask);
            if class != TILE_EMPTY {
                sync_cube();
                load_kv_tile::<E>(
                    k,
                    &mut kv_tiles,
                    0,
                    seq,
                    kv_head,
                    kv_start,
                    config.head_dim(),
                    config,
                );
                load_kv_tile::<E>(
                    v,
                    &mut kv_tiles,
                    v_at,
                    seq,
                    kv_head,
                    kv_start,
                    config.value_dim(),
                    config,
                );
                sync_cube();

                compute_scores(&q_row, &kv_tiles, &mut scores, kv_len, config);
                if comptime!(config.score.modifies_scores()) {
                    modify_scores::<M>(
                        &mut scores,
                        seq,
                        head,
                        row,
                        kv_start,
                        kv_len,
                        ints,
                        floats,
                        args,
                        config,
                    );
                }
                if comptime!(!config.mask.is_none()) {
                    if class == TILE_PARTIAL {
                        apply_mask::<M>(
                            &mut scores,
                            seq,
                            head,
                            row,
                            kv_start,
                            kv_len,
                            ints,
                            floats,
                            args,
                            config,
                        );
                    }
                }
                online_softmax_step(&mut scores, &mut acc, &mut state, kv_len, config);
                accumulate_pv(&scores, &kv_tiles, v_at, &mut acc, kv_len, config);
            }
        }

        if row_valid {
            let factor = finish_state(&mut state, head, floats, args, config.score);
            write_output::<E>(out, lse, &acc, state, factor, seq, head, row, args, config);
        }
    }
}

/// Load Q: one query row into registers as f32, pre-multiplied by the softmax scale.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_q_row<E: Float>(
    q: &Tensor<E>,
    q_row: &mut Array<f32>,
    seq: SequenceSpan,
    head: usize,
    row: usize,
    row_valid: bool,
    scale: f32,
    #[comptime] config: PrefillConfig,
) {
    let base = seq.batch * q.stride(0) + head * q.stride(1) + (seq.q_off + row) * q.stride(2);
    #[unroll]
    for c in 0..config.head_dim() {
        let mut value = 0.0f32.runtime();
        if row_valid {
            value = f32::cast_from(q[base + c]) * scale;
        }
        q_row[c] = value;
    }
}

/// Load K/V: one `block_kv × width` tile into shared memory at `offset`, as f32; keys past the
/// sequence read as zero.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_kv_tile<E: Float>(
    src: &Tensor<E>,
    tiles: &mut Shared<[f32]>,
    offset: usize,
    seq: SequenceSpan,
    kv_head: usize,
    kv_start: usize,
    #[comptime] width: usize,
    #[comptime] config: PrefillConfig,
) {
    let block_q = config.block_q();
    let tile_len = config.block_kv() * width;
    let base = seq.batch * src.stride(0) + kv_head * src.stride(1);
    #[unroll]
    for t in 0..(tile_len + block_q - 1) / block_q {
        let i = t * block_q + UNIT_POS as usize;
        if i < tile_len {
            let key = kv_start + i / width;
            let mut value = 0.0f32.runtime();
            if key < seq.seq_k {
                value = f32::cast_from(src[base + (seq.k_off + key) * src.stride(2) + i % width]);
            }
            tiles[offset + i] = value;
        }
    }
}

/// Scores: this row's logits against the step's `kv_len` keys, `q_row · k_j` (the scale is
/// already in `q_row`).
#[cube]
fn compute_scores(
    q_row: &Array<f32>,
    k_tile: &Shared<[f32]>,
    scores: &mut Array<f32>,
    kv_len: usize,
    #[comptime] config: PrefillConfig,
) {
    let head_dim = config.head_dim();
    for j in 0..kv_len {
        let base = j * head_dim;
        let mut dot = 0.0f32.runtime();
        #[unroll]
        for c in 0..head_dim {
            dot += q_row[c] * k_tile[base + c];
        }
        scores[j] = dot;
    }
}

/// Score modification: softcap, ALiBi and the variant's expression on this row's logits.
#[cube]
#[allow(clippy::too_many_arguments)]
fn modify_scores<M: Hooks>(
    scores: &mut Array<f32>,
    seq: SequenceSpan,
    head: usize,
    row: usize,
    kv_start: usize,
    kv_len: usize,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    for j in 0..kv_len {
        scores[j] = modify_score::<M>(
            scores[j],
            seq,
            head,
            row as i32,
            (kv_start + j) as i32,
            ints,
            floats,
            args,
            config.score,
        );
    }
}

/// Mask: entries this row cannot see become −1e30.
#[cube]
#[allow(clippy::too_many_arguments)]
fn apply_mask<M: Hooks>(
    scores: &mut Array<f32>,
    seq: SequenceSpan,
    head: usize,
    row: usize,
    kv_start: usize,
    kv_len: usize,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    for j in 0..kv_len {
        let key = kv_start + j;
        let visible = key_visible::<M>(
            seq,
            head,
            row as i32,
            key as i32,
            ints,
            floats,
            args,
            config.mask,
        );
        scores[j] = select(visible, scores[j], -1.0e30f32);
    }
}

/// Online softmax: fold this step's scores into the running max and sum, rescale the accumulator,
/// and turn the scores into probabilities in place (masked entries become exactly 0).
#[cube]
fn online_softmax_step(
    scores: &mut Array<f32>,
    acc: &mut Array<f32>,
    state: &mut RowState,
    kv_len: usize,
    #[comptime] config: PrefillConfig,
) {
    let mut step_max = (-1.0e30f32).runtime();
    for j in 0..kv_len {
        let s = scores[j];
        step_max = select(s > step_max, s, step_max);
    }
    let new_max = select(step_max > state.max, step_max, state.max);
    let correction = (state.max - new_max).exp();
    let mut sum = state.sum * correction;
    for j in 0..kv_len {
        let s = scores[j];
        let p = select(s > -5.0e29f32, (s - new_max).exp(), 0.0f32);
        scores[j] = p;
        sum += p;
    }
    #[unroll]
    for c in 0..config.value_dim() {
        acc[c] *= correction;
    }
    state.max = new_max;
    state.sum = sum;
}

/// P·V: add this step's probabilities times the V tile into the f32 accumulator.
#[cube]
fn accumulate_pv(
    probs: &Array<f32>,
    tiles: &Shared<[f32]>,
    v_offset: usize,
    acc: &mut Array<f32>,
    kv_len: usize,
    #[comptime] config: PrefillConfig,
) {
    let value_dim = config.value_dim();
    for j in 0..kv_len {
        let p = probs[j];
        let base = v_offset + j * value_dim;
        #[unroll]
        for c in 0..value_dim {
            acc[c] += p * tiles[base + c];
        }
    }
}

/// Finish: normalise once and write O and the LSE. A row that saw no key (and has no sink) writes
/// O = 0, LSE = −∞.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_output<E: Float>(
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    acc: &Array<f32>,
    state: RowState,
    factor: f32,
    seq: SequenceSpan,
    head: usize,
    row: usize,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    let out_row = seq.q_off + row;
    let base = seq.batch * out.stride(0) + head * out.stride(1) + out_row * out.stride(2);
    let seen = state.sum > 0.0;
    let inv = select(seen, factor / state.sum, 0.0f32);
    #[unroll]
    for c in 0..config.value_dim() {
        out[base + c] = E::cast_from(acc[c] * inv);
    }
    let lse_index = seq.batch * lse.stride(0) + head * lse.stride(1) + out_row * lse.stride(2);
    lse[lse_index] = select(seen, state.max + state.sum.ln(), args.neg_inf);
}
