//! The prefill kernel, portable form.
//!
//! One cube per (query block, query head, batch); one unit per query row. Q stays in the unit's
//! registers, pre-multiplied by the softmax scale; the cube walks K/V in `block_kv`-key steps
//! staged through shared memory; each unit keeps an online softmax (running max and sum, f32) and
//! an f32 accumulator, normalises once at the end and writes O and the log-sum-exp. The N×N score
//! matrix never exists: scores live for one K/V step in the unit's registers.
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

use super::PrefillConfig;
use crate::hooks::{Hooks, TILE_EMPTY};
use crate::kernels::common::softmax::{larger, probability};
use crate::kernels::common::{
    mask, score, Args, BlockWalk, Ctx, Lengths, Operands, Outputs, RowState, RunInputs, Step,
    StepKeys,
};

/// The fused forward pass: O = softmax(mod(scale · Q Kᵀ) + mask) V, and LSE per query row.
#[cube(launch, address_type = "dynamic")]
pub fn prefill_forward<E: Float, M: Hooks>(
    ops: &Operands<E>,
    outputs: &mut Outputs<E>,
    inputs: &RunInputs,
    args: Args,
    #[comptime] config: PrefillConfig,
) {
    let block_q = config.block_q();
    let block_kv = config.block_kv();
    let at = Lengths {
        sequence: CUBE_POS_Z as usize,
        head: CUBE_POS_Y as usize,
        q_total: ops.q.shape(2),
        k_total: ops.k.shape(2),
    };
    let ctx = Ctx::locate(at, inputs, args, config.mask, config.score);
    let q_start = CUBE_POS_X as usize * block_q;
    // Cubes past the end of a short document have nothing to do (uniform across the cube).
    if q_start < ctx.site.seq_q {
        let mut row = QueryRow::new(&ctx, q_start + UNIT_POS as usize, config);
        row.load_q::<E>(&ops.q, &ctx, config);

        // One allocation for both tiles, K first: one shared array keeps the emitted source stable.
        let mut kv_tiles = Shared::<[f32]>::new_slice(
            block_kv * config.head_dim() + block_kv * config.value_dim(),
        );

        let walk = BlockWalk::new(&ctx, q_start, block_q, block_kv);
        for index in walk.first_step..walk.end_step {
            let keys = walk.keys(index, block_kv);
            let step = Step {
                keys,
                class: mask::classify::<M>(&ctx, walk, keys, inputs),
            };
            if step.class != TILE_EMPTY {
                sync_cube();
                load_kv::<E>(ops, &mut kv_tiles, &ctx, keys, config);
                sync_cube();

                row.scores(&kv_tiles, keys, config);
                if comptime!(config.score.modifies_scores()) {
                    row.modify::<M>(&ctx, keys, inputs);
                }
                if comptime!(!config.mask.is_none()) {
                    if step.partial() {
                        row.mask::<M>(&ctx, keys, inputs);
                    }
                }
                row.online_softmax(&ctx, keys, config);
                row.accumulate_pv(&kv_tiles, keys, config);
            }
        }

        if row.valid {
            row.write::<E>(outputs, &ctx, inputs, config);
        }
    }
}

/// One query row, owned by one unit: its scaled Q, this step's scores, its online-softmax state
/// and its f32 output accumulator.
#[derive(CubeType)]
pub struct QueryRow {
    /// Q · scale, f32.
    q: Array<f32>,
    /// This step's scores, then probabilities.
    scores: Array<f32>,
    /// The output accumulator.
    acc: Array<f32>,
    /// The online-softmax state.
    state: RowState,
    /// Sequence position.
    row: usize,
    /// Whether the row lies in the sequence.
    valid: bool,
}

#[cube]
impl QueryRow {
    /// The row `row` of the cube's sequence, with a zero accumulator and no key seen.
    pub fn new(ctx: &Ctx, row: usize, #[comptime] config: PrefillConfig) -> QueryRow {
        let q = Array::<f32>::new(config.head_dim());
        let scores = Array::<f32>::new(config.block_kv());
        let mut acc = Array::<f32>::new(config.value_dim());
        #[unroll]
        for c in 0..config.value_dim() {
            acc[c] = 0.0;
        }
        QueryRow {
            q,
            scores,
            acc,
            state: RowState::new(ctx),
            row,
            valid: row < ctx.site.seq_q,
        }
    }

    /// Load Q: the row into registers as f32, pre-multiplied by the softmax scale.
    pub fn load_q<E: Float>(
        &mut self,
        q: &Tensor<E>,
        ctx: &Ctx,
        #[comptime] config: PrefillConfig,
    ) {
        let seq = ctx.site;
        let base =
            seq.batch * q.stride(0) + seq.head * q.stride(1) + (seq.q_off + self.row) * q.stride(2);
        #[unroll]
        for c in 0..config.head_dim() {
            let mut value = 0.0f32.runtime();
            if self.valid {
                value = f32::cast_from(q[base + c]) * ctx.args.scale;
            }
            self.q[c] = value;
        }
    }

    /// Scores: the row's logits against the step's keys, `q · k_j` (the scale is already in
    /// `q`).
    pub fn scores(
        &mut self,
        kv_tiles: &Shared<[f32]>,
        keys: StepKeys,
        #[comptime] config: PrefillConfig,
    ) {
        let head_dim = config.head_dim();
        for j in 0..keys.len {
            let base = j * head_dim;
            let mut dot = 0.0f32.runtime();
            #[unroll]
            for c in 0..head_dim {
                dot += self.q[c] * kv_tiles[base + c];
            }
            self.scores[j] = dot;
        }
    }

    /// Score modification: softcap, ALiBi and the variant's expression on the row's logits.
    pub fn modify<M: Hooks>(&mut self, ctx: &Ctx, keys: StepKeys, inputs: &RunInputs) {
        for j in 0..keys.len {
            let key = (keys.start + j) as i32;
            self.scores[j] = score::modify::<M>(self.scores[j], ctx, self.row as i32, key, inputs);
        }
    }

    /// Mask: entries the row cannot see become −∞.
    pub fn mask<M: Hooks>(&mut self, ctx: &Ctx, keys: StepKeys, inputs: &RunInputs) {
        for j in 0..keys.len {
            let key = (keys.start + j) as i32;
            let visible = mask::visible::<M>(ctx, self.row as i32, key, inputs);
            self.scores[j] = select(visible, self.scores[j], ctx.masked());
        }
    }

    /// Online softmax: fold the step's scores into the running max and sum, rescale the
    /// accumulator, and turn the scores into probabilities in place (masked entries exactly 0).
    pub fn online_softmax(&mut self, ctx: &Ctx, keys: StepKeys, #[comptime] config: PrefillConfig) {
        let mut step_max = ctx.masked();
        for j in 0..keys.len {
            step_max = larger(self.scores[j], step_max);
        }
        let new_max = self.state.new_max(step_max);
        let mut sum = 0.0f32.runtime();
        for j in 0..keys.len {
            let p = probability(self.scores[j], new_max, ctx);
            self.scores[j] = p;
            sum += p;
        }
        let correction = self.state.advance(new_max, sum, ctx);
        #[unroll]
        for c in 0..config.value_dim() {
            self.acc[c] *= correction;
        }
    }

    /// P·V: add the step's probabilities times the V tile into the f32 accumulator.
    pub fn accumulate_pv(
        &mut self,
        kv_tiles: &Shared<[f32]>,
        keys: StepKeys,
        #[comptime] config: PrefillConfig,
    ) {
        let value_dim = config.value_dim();
        let v_at = config.block_kv() * config.head_dim();
        for j in 0..keys.len {
            let p = self.scores[j];
            let base = v_at + j * value_dim;
            #[unroll]
            for c in 0..value_dim {
                self.acc[c] += p * kv_tiles[base + c];
            }
        }
    }

    /// Finish: fold the sink in, normalise once and write O and the LSE. A row that saw no key
    /// (and has no sink) writes O = 0, LSE = −∞.
    pub fn write<E: Float>(
        &mut self,
        outputs: &mut Outputs<E>,
        ctx: &Ctx,
        inputs: &RunInputs,
        #[comptime] config: PrefillConfig,
    ) {
        let factor = self.state.fold_sink(ctx, inputs);
        let seq = ctx.site;
        let out_row = seq.q_off + self.row;
        let base = seq.batch * outputs.o.stride(0)
            + seq.head * outputs.o.stride(1)
            + out_row * outputs.o.stride(2);
        let inv = self.state.normaliser(factor);
        #[unroll]
        for c in 0..config.value_dim() {
            outputs.o[base + c] = E::cast_from(self.acc[c] * inv);
        }
        let lse_index = seq.batch * outputs.lse.stride(0)
            + seq.head * outputs.lse.stride(1)
            + out_row * outputs.lse.stride(2);
        outputs.lse[lse_index] = self.state.lse(ctx);
    }
}

/// Load K/V: the step's `block_kv × head_dim` K tile and `block_kv × value_dim` V tile into
/// shared memory as f32 (V after K).
#[cube]
fn load_kv<E: Float>(
    ops: &Operands<E>,
    kv_tiles: &mut Shared<[f32]>,
    ctx: &Ctx,
    keys: StepKeys,
    #[comptime] config: PrefillConfig,
) {
    load_tile::<E>(&ops.k, kv_tiles, ctx, keys.start, false, config);
    load_tile::<E>(&ops.v, kv_tiles, ctx, keys.start, true, config);
}

/// One f32 tile of [`load_kv`] (and of the backward pass): K (`value` false) or V, `block_kv`
/// rows from key `kv_start`; keys past the sequence read as zero.
#[cube]
pub(crate) fn load_tile<E: Float>(
    src: &Tensor<E>,
    kv_tiles: &mut Shared<[f32]>,
    ctx: &Ctx,
    kv_start: usize,
    #[comptime] value: bool,
    #[comptime] config: PrefillConfig,
) {
    let width = comptime!(if value {
        config.value_dim()
    } else {
        config.head_dim()
    });
    let offset = comptime!(if value {
        config.block_kv() * config.head_dim()
    } else {
        0
    });
    let seq = ctx.site;
    let block_q = config.block_q();
    let tile_len = config.block_kv() * width;
    let base = seq.batch * src.stride(0) + seq.kv_head * src.stride(1);
    #[unroll]
    for t in 0..(tile_len + block_q - 1) / block_q {
        let i = t * block_q + UNIT_POS as usize;
        if i < tile_len {
            let key = kv_start + i / width;
            let mut value = 0.0f32.runtime();
            if key < seq.seq_k {
                value = f32::cast_from(src[base + (seq.k_off + key) * src.stride(2) + i % width]);
            }
            kv_tiles[offset + i] = value;
        }
    }
}
