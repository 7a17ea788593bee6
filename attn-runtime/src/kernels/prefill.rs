//! The fused FlashAttention-2 style forward kernel, portable form.
//!
//! One cube per (query block, query head, batch); one unit per query row. Q stays in the unit's
//! registers, pre-multiplied by the softmax scale; the cube walks K/V in `block_kv`-key steps
//! staged through shared memory; each unit keeps an online softmax (running max and sum, f32) and
//! an f32 accumulator, normalises once at the end and writes O and the log-sum-exp. The N×N score
//! matrix never exists: scores live for one K/V step in the unit's registers.
//!
//! Mask tiles are classified per step: steps wholly above a causal diagonal are never loaded, steps
//! wholly below it run without mask arithmetic, and only the steps straddling the diagonal evaluate
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

use crate::variant::{MaskKind, Tiling};

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

/// Everything that selects the generated code of the prefill kernel.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct PrefillConfig {
    /// Tile shape.
    pub tiling: Tiling,
    /// Head dimension of Q, K and V.
    pub head_dim: u32,
    /// The mask.
    pub mask: MaskKind,
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

    /// Head dimension (K of QKᵀ, N of P·V).
    pub const fn head_dim(&self) -> usize {
        self.head_dim as usize
    }

    /// Whether the mask is causal (of either alignment).
    pub const fn is_causal(&self) -> bool {
        matches!(self.mask, MaskKind::Causal(_))
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
    /// Causal diagonal: key `k` is visible to query `q` when `k + shift_k <= q + shift_q`.
    pub shift_q: u32,
    /// See `shift_q`.
    pub shift_k: u32,
    /// −∞, passed in because not every shading language can spell it.
    pub neg_inf: f32,
}

/// The fused forward pass: O = softmax(scale · Q Kᵀ + mask) V, and LSE per query row.
#[cube(launch)]
pub fn prefill_forward<E: Float>(
    q: &Tensor<E>,
    k: &Tensor<E>,
    v: &Tensor<E>,
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    let block_q = config.block_q();
    let block_kv = config.block_kv();
    let head_dim = config.head_dim();

    let batch = CUBE_POS_Z as usize;
    let head = CUBE_POS_Y as usize;
    let q_start = CUBE_POS_X as usize * block_q;
    let row = q_start + UNIT_POS as usize;
    let kv_head = head / args.group as usize;
    let seq_q = q.shape(2);
    let seq_k = k.shape(2);
    let row_valid = row < seq_q;

    let mut q_row = Array::<f32>::new(head_dim);
    load_q_row::<E>(
        q, &mut q_row, batch, head, row, row_valid, args.scale, config,
    );

    // One allocation for both tiles, K first: one shared array keeps the emitted source stable.
    let tile_len = block_kv * head_dim;
    let mut kv_tiles = Shared::<[f32]>::new_slice(2 * tile_len);
    let mut scores = Array::<f32>::new(block_kv);
    let mut acc = Array::<f32>::new(head_dim);
    #[unroll]
    for c in 0..head_dim {
        acc[c] = 0.0;
    }
    let mut state = RowState {
        max: -1.0e30f32,
        sum: 0.0f32,
    };

    let kv_end = visible_key_end(q_start, seq_q, seq_k, args, block_q, config.is_causal());
    let num_steps = (kv_end + block_kv - 1) / block_kv;
    for step in 0..num_steps {
        let kv_start = step * block_kv;
        // Keys of this step that exist; the ragged last step is simply shorter.
        let remaining = kv_end - kv_start;
        let kv_len = select(remaining < block_kv, remaining, block_kv);
        sync_cube();
        load_kv_tile::<E>(k, &mut kv_tiles, 0, batch, kv_head, kv_start, config);
        load_kv_tile::<E>(v, &mut kv_tiles, tile_len, batch, kv_head, kv_start, config);
        sync_cube();

        compute_scores(&q_row, &kv_tiles, &mut scores, kv_len, config);
        if comptime!(config.is_causal()) {
            if straddles_diagonal(q_start, kv_start, kv_len, args) {
                apply_causal_mask(&mut scores, row, kv_start, kv_len, args);
            }
        }
        online_softmax_step(&mut scores, &mut acc, &mut state, kv_len, config);
        accumulate_pv(&scores, &kv_tiles, tile_len, &mut acc, kv_len, config);
    }

    if row_valid {
        write_output::<E>(out, lse, &acc, state, batch, head, row, args, config);
    }
}

/// Load Q: one query row into registers as f32, pre-multiplied by the softmax scale.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_q_row<E: Float>(
    q: &Tensor<E>,
    q_row: &mut Array<f32>,
    batch: usize,
    head: usize,
    row: usize,
    row_valid: bool,
    scale: f32,
    #[comptime] config: PrefillConfig,
) {
    let base = batch * q.stride(0) + head * q.stride(1) + row * q.stride(2);
    #[unroll]
    for c in 0..config.head_dim() {
        let mut value = 0.0f32.runtime();
        if row_valid {
            value = f32::cast_from(q[base + c]) * scale;
        }
        q_row[c] = value;
    }
}

/// End of the keys a query block of `block_q` rows starting at `q_start` can see: the whole
/// sequence, or up to the causal diagonal of the block's last row. K/V steps past it are never
/// loaded. Shared by both kernel families.
#[cube]
pub fn visible_key_end(
    q_start: usize,
    seq_q: usize,
    seq_k: usize,
    args: PrefillArgs,
    #[comptime] block_q: usize,
    #[comptime] causal: bool,
) -> usize {
    let mut end = seq_k;
    if causal {
        let block_end = q_start + block_q;
        let last_row = select(block_end < seq_q, block_end, seq_q) - 1;
        // Keys `k` with `k + shift_k <= last_row + shift_q` are visible.
        let reach = last_row + args.shift_q as usize + 1;
        let shift_k = args.shift_k as usize;
        let mut visible = 0usize.runtime();
        if reach > shift_k {
            visible = reach - shift_k;
        }
        end = select(visible < seq_k, visible, seq_k);
    }
    end
}

/// Load K/V: one `block_kv × head_dim` tile into shared memory at `offset`, as f32; keys past
/// the sequence read as zero.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_kv_tile<E: Float>(
    src: &Tensor<E>,
    tiles: &mut Shared<[f32]>,
    offset: usize,
    batch: usize,
    kv_head: usize,
    kv_start: usize,
    #[comptime] config: PrefillConfig,
) {
    let head_dim = config.head_dim();
    let block_q = config.block_q();
    let tile_len = config.block_kv() * head_dim;
    let seq_k = src.shape(2);
    let base = batch * src.stride(0) + kv_head * src.stride(1);
    #[unroll]
    for t in 0..(tile_len + block_q - 1) / block_q {
        let i = t * block_q + UNIT_POS as usize;
        if i < tile_len {
            let key = kv_start + i / head_dim;
            let mut value = 0.0f32.runtime();
            if key < seq_k {
                value = f32::cast_from(src[base + key * src.stride(2) + i % head_dim]);
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

/// Whether a causal step reaches past the diagonal of the block's first row, so some of its
/// entries are masked. Steps wholly below the diagonal skip mask arithmetic.
#[cube]
fn straddles_diagonal(q_start: usize, kv_start: usize, kv_len: usize, args: PrefillArgs) -> bool {
    kv_start + kv_len - 1 + args.shift_k as usize > q_start + args.shift_q as usize
}

/// Causal mask: entries past this row's diagonal become −1e30.
#[cube]
fn apply_causal_mask(
    scores: &mut Array<f32>,
    row: usize,
    kv_start: usize,
    kv_len: usize,
    args: PrefillArgs,
) {
    for j in 0..kv_len {
        let visible = kv_start + j + args.shift_k as usize <= row + args.shift_q as usize;
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
    for c in 0..config.head_dim() {
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
    let head_dim = config.head_dim();
    for j in 0..kv_len {
        let p = probs[j];
        let base = v_offset + j * head_dim;
        #[unroll]
        for c in 0..head_dim {
            acc[c] += p * tiles[base + c];
        }
    }
}

/// Finish: normalise once and write O and the LSE. A row that saw no key writes O = 0, LSE = −∞.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_output<E: Float>(
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    acc: &Array<f32>,
    state: RowState,
    batch: usize,
    head: usize,
    row: usize,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    let base = batch * out.stride(0) + head * out.stride(1) + row * out.stride(2);
    let seen = state.sum > 0.0;
    let inv = select(seen, 1.0f32 / state.sum, 0.0f32);
    #[unroll]
    for c in 0..config.head_dim() {
        out[base + c] = E::cast_from(acc[c] * inv);
    }
    let lse_index = batch * lse.stride(0) + head * lse.stride(1) + row * lse.stride(2);
    lse[lse_index] = select(seen, state.max + state.sum.ln(), args.neg_inf);
}
