//! The fused FlashAttention-2 style forward kernel, portable form.
//!
//! One cube per (query block, query head, batch); one unit per query row. Q stays in the unit's
//! registers, pre-multiplied by the softmax scale; the cube walks K/V in `block_kv`-key steps
//! staged through shared memory; each unit keeps an online softmax (running max and sum, f32) and
//! an f32 accumulator, normalises once at the end and writes O and the log-sum-exp. The N×N score
//! matrix never exists: scores live for one K/V step in the unit's registers.
//!
//! Mask tiles are classified per step: steps wholly above a causal diagonal are never loaded, steps
//! wholly below it run without mask arithmetic, and only the straddling steps (and the ragged last
//! step) evaluate the mask per element.
//!
//! This path uses no warp shuffles and no tensor cores, so it runs on every cubecl back end,
//! lavapipe included. cubecl 0.12 exposes `exp` but no `exp2`; the scale is folded into Q, so the
//! inner loop does one subtraction and one `exp` per score.

use cubecl::prelude::*;

use crate::variant::{MaskKind, Tiling};

/// A score no real logit reaches: marks masked entries inside a step.
const MASKED: f32 = -1.0e30;
/// Scores below this are masked entries (half of [`MASKED`], far below any real logit).
const MASKED_BELOW: f32 = -5.0e29;

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

    let mut k_tile = Shared::<[f32]>::new_slice(block_kv * head_dim);
    let mut v_tile = Shared::<[f32]>::new_slice(block_kv * head_dim);
    let mut scores = Array::<f32>::new(block_kv);
    let mut acc = Array::<f32>::new(head_dim);
    for c in 0..head_dim {
        acc[c] = 0.0;
    }
    let mut row_max = MASKED;
    let mut row_sum = 0.0f32;

    let kv_end = visible_key_end(q_start, seq_q, seq_k, args, config);
    let num_steps = kv_end.div_ceil(block_kv);
    for step in 0..num_steps {
        let kv_start = step * block_kv;
        sync_cube();
        load_kv_tile::<E>(k, &mut k_tile, batch, kv_head, kv_start, config);
        load_kv_tile::<E>(v, &mut v_tile, batch, kv_head, kv_start, config);
        sync_cube();

        compute_scores(&q_row, &k_tile, &mut scores, config);
        if needs_mask(q_start, kv_start, seq_k, args, config) {
            apply_mask(&mut scores, row, kv_start, seq_k, args, config);
        }
        online_softmax_step(&mut scores, &mut acc, &mut row_max, &mut row_sum, config);
        accumulate_pv(&scores, &v_tile, &mut acc, config);
    }

    if row_valid {
        write_output::<E>(
            out, lse, &acc, row_max, row_sum, batch, head, row, args, config,
        );
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
    let head_dim = config.head_dim();
    if row_valid {
        let base = batch * q.stride(0) + head * q.stride(1) + row * q.stride(2);
        for c in 0..head_dim {
            q_row[c] = f32::cast_from(q[base + c]) * scale;
        }
    } else {
        for c in 0..head_dim {
            q_row[c] = 0.0;
        }
    }
}

/// End of the keys this query block can see: the whole sequence, or up to the causal diagonal of
/// the block's last row. K/V steps past it are never loaded.
#[cube]
fn visible_key_end(
    q_start: usize,
    seq_q: usize,
    seq_k: usize,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) -> usize {
    let mut end = seq_k;
    if comptime!(config.is_causal()) {
        let last_row = Min::min(q_start + config.block_q(), seq_q) - 1;
        // Keys `k` with `k + shift_k <= last_row + shift_q` are visible.
        let reach = last_row + args.shift_q as usize + 1;
        let shift_k = args.shift_k as usize;
        end = select(reach > shift_k, Min::min(reach - shift_k, seq_k), 0);
    }
    end
}

/// Load K/V: one `block_kv × head_dim` tile into shared memory as f32; keys past the sequence
/// read as zero.
#[cube]
fn load_kv_tile<E: Float>(
    src: &Tensor<E>,
    tile: &mut Shared<[f32]>,
    batch: usize,
    kv_head: usize,
    kv_start: usize,
    #[comptime] config: PrefillConfig,
) {
    let head_dim = config.head_dim();
    let tile_len = config.block_kv() * head_dim;
    let seq_k = src.shape(2);
    let base = batch * src.stride(0) + kv_head * src.stride(1);
    for i in (UNIT_POS as usize..tile_len).step_by(config.block_q()) {
        let key = kv_start + i / head_dim;
        let c = i % head_dim;
        let mut value = 0.0f32;
        if key < seq_k {
            value = f32::cast_from(src[base + key * src.stride(2) + c]);
        }
        tile[i] = value;
    }
}

/// Scores: this row's `block_kv` logits, `q_row · k_j` (the scale is already in `q_row`).
#[cube]
fn compute_scores(
    q_row: &Array<f32>,
    k_tile: &Shared<[f32]>,
    scores: &mut Array<f32>,
    #[comptime] config: PrefillConfig,
) {
    let head_dim = config.head_dim();
    for j in 0..config.block_kv() {
        let base = j * head_dim;
        let mut dot = 0.0f32;
        for c in 0..head_dim {
            dot += q_row[c] * k_tile[base + c];
        }
        scores[j] = dot;
    }
}

/// Whether a step straddles the mask for some row of the block: the ragged last step, or a causal
/// step that reaches past the diagonal of the block's first row. Other steps skip mask arithmetic.
#[cube]
fn needs_mask(
    q_start: usize,
    kv_start: usize,
    seq_k: usize,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) -> bool {
    let kv_last = kv_start + config.block_kv() - 1;
    let mut partial = kv_last >= seq_k;
    if comptime!(config.is_causal()) {
        partial = partial || kv_last + args.shift_k as usize > q_start + args.shift_q as usize;
    }
    partial
}

/// Mask: entries of keys past the sequence, or past this row's causal diagonal, become `MASKED`.
#[cube]
fn apply_mask(
    scores: &mut Array<f32>,
    row: usize,
    kv_start: usize,
    seq_k: usize,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    for j in 0..config.block_kv() {
        let key = kv_start + j;
        let mut visible = key < seq_k;
        if comptime!(config.is_causal()) {
            visible = visible && key + args.shift_k as usize <= row + args.shift_q as usize;
        }
        scores[j] = select(visible, scores[j], MASKED);
    }
}

/// Online softmax: fold this step's scores into the running max and sum, rescale the accumulator,
/// and turn the scores into probabilities in place (masked entries become exactly 0).
#[cube]
fn online_softmax_step(
    scores: &mut Array<f32>,
    acc: &mut Array<f32>,
    row_max: &mut f32,
    row_sum: &mut f32,
    #[comptime] config: PrefillConfig,
) {
    let mut step_max = MASKED;
    for j in 0..config.block_kv() {
        step_max = Max::max(step_max, scores[j]);
    }
    let new_max = Max::max(*row_max, step_max);
    let correction = f32::exp(*row_max - new_max);
    let mut sum = *row_sum * correction;
    for j in 0..config.block_kv() {
        let s = scores[j];
        let p = select(s > MASKED_BELOW, f32::exp(s - new_max), 0.0);
        scores[j] = p;
        sum += p;
    }
    for c in 0..config.head_dim() {
        acc[c] *= correction;
    }
    *row_max = new_max;
    *row_sum = sum;
}

/// P·V: add this step's probabilities times the V tile into the f32 accumulator.
#[cube]
fn accumulate_pv(
    probs: &Array<f32>,
    v_tile: &Shared<[f32]>,
    acc: &mut Array<f32>,
    #[comptime] config: PrefillConfig,
) {
    let head_dim = config.head_dim();
    for j in 0..config.block_kv() {
        let p = probs[j];
        let base = j * head_dim;
        for c in 0..head_dim {
            acc[c] += p * v_tile[base + c];
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
    row_max: f32,
    row_sum: f32,
    batch: usize,
    head: usize,
    row: usize,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    let base = batch * out.stride(0) + head * out.stride(1) + row * out.stride(2);
    let seen = row_sum > 0.0;
    let inv = select(seen, 1.0 / row_sum, 0.0);
    for c in 0..config.head_dim() {
        out[base + c] = E::cast_from(acc[c] * inv);
    }
    let lse_index = batch * lse.stride(0) + head * lse.stride(1) + row * lse.stride(2);
    lse[lse_index] = select(seen, row_max + f32::ln(row_sum), args.neg_inf);
}
