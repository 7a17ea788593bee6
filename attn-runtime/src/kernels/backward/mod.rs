//! The backward pass (FlashAttention-2's algorithm): gradients of Q, K and V recomputed from Q,
//! K, V, the forward's LSE and the output's gradient, without the N×N matrices and without
//! atomics (the same bits on every run):
//!
//! 1. [`backward_delta()`]: `D = rowsum(dO ∘ O)` per query row;
//! 2. [`backward_dkdv()`]: one cube per block of keys of one K/V head; each unit owns one key and
//!    walks every query row of the head's query group (GQA and MQA summed inside the kernel, K/V
//!    never repeated), staged through shared memory a block at a time: `P = exp(s − LSE)`,
//!    `dV += P dO`, `dS = P (dO·v − D) f′(s)`, `dK += scale · dS q`;
//! 3. [`backward_dq()`]: one cube per query block of one head, the forward's walk over the keys:
//!    `dQ += scale · dS k`;
//! 4. with sinks, [`backward_sinks()`]: per head, `d sink = −Σ P_sink D` over every query row, a
//!    tree reduction in a fixed order.
//!
//! Tiles the mask rules out are skipped as in the forward ([`crate::kernels::common::mask`]);
//! `f′` is the score modification's derivative: softcap's `1 − tanh²`, ALiBi's 1, and the
//! variant's own score expression's as the macro derived it ([`crate::Hooks::score_grad`]).
//! Portable form: one unit per row, shared memory only, every back end; on devices with tensor
//! cores, [`tensor_core`] runs steps 2 and 3 with every product on them, and on Hopper
//! [`warpgroup`] with warpgroup MMAs fed by the copy engine.

// `#[cube]` code: `div_ceil` has no GPU expansion, and a comptime `if` around a run-time one must
// stay separate (the outer branch disappears at expansion, the inner one is kept).
#![allow(clippy::manual_div_ceil, clippy::collapsible_if)]

pub mod tensor_core;
pub mod warpgroup;

use cubecl::prelude::*;

use crate::hooks::{Hooks, TILE_EMPTY};
use crate::inputs::slots;
use crate::kernels::common::walk::{BlockWalk, KeyRange};
use crate::kernels::common::{mask, score, Args, Ctx, Lengths, RunInputs, Step, StepKeys};
use crate::kernels::prefill::portable::load_tile;
use crate::kernels::prefill::PrefillConfig;
use crate::variant::{MaskSpec, ScoreFlags};

/// What the backward kernels read: the forward's operands, its LSE, the output's gradient and
/// the rows' `D`.
#[derive(CubeType, CubeLaunch)]
pub struct BackwardOperands<E: Float> {
    /// Q, `[B, Hq, Nq, D]`.
    pub q: OwnedTensor<E>,
    /// K, `[B, Hkv, Nk, D]`.
    pub k: OwnedTensor<E>,
    /// V, `[B, Hkv, Nk, Dv]`.
    pub v: OwnedTensor<E>,
    /// dO, `[B, Hq, Nq, Dv]`.
    pub d_out: OwnedTensor<E>,
    /// The forward's LSE, `[B, Hq, Nq]`.
    pub lse: OwnedTensor<f32>,
    /// `D = rowsum(dO ∘ O)`, `[B, Hq, Nq]`.
    pub delta: OwnedTensor<f32>,
}

/// The gradients of K and V.
#[derive(CubeType, CubeLaunch)]
pub struct KvGrads<E: Float> {
    /// dK, `[B, Hkv, Nk, D]`, contiguous.
    pub dk: OwnedTensor<E>,
    /// dV, `[B, Hkv, Nk, Dv]`, contiguous.
    pub dv: OwnedTensor<E>,
}

/// A pair's place: query and key positions in the sequence.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Pair {
    /// Query position.
    pub q: i32,
    /// Key position.
    pub k: i32,
}

/// A block of query rows of the dK/dV kernel's walk: its rows `start..start + len` and their
/// mask class against the cube's keys.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct QueryBlock {
    /// The cube's keys and the class of the tile.
    pub step: Step,
    /// First query row.
    pub start: usize,
    /// Rows in the block.
    pub len: usize,
}

/// The comptime shape of one tensor-core or warpgroup backward kernel: the prefill
/// configuration's tiles (`block_kv` keys resident and `block_q` query rows streamed in the dK/dV
/// kernel, the other way round in the dQ kernel), head dims, mask and score flags, and which
/// side is resident.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct BackwardShape {
    /// Tiles, head dims, mask and score flags.
    pub config: PrefillConfig,
    /// Whether the keys are resident (dK/dV) or the queries (dQ).
    pub keys: bool,
    /// The warpgroup dK/dV kernel also sums dQ, into an f32 buffer with atomics (no dQ kernel).
    pub atomic_dq: bool,
    /// The learnable inputs whose gradients a dQ kernel sums, and in the portable dK/dV kernel
    /// the `seq` tables' key-indexed reads.
    pub learn: LearnConfig,
    /// Cubes per block of keys in the warpgroup dK/dV kernel: a walk of at least
    /// [`MIN_SPLIT_STEPS`] steps per cube is split into this many parts, whose dK and dV are
    /// added into f32 sums with atomics (1: each block's walk in one cube, written directly).
    pub splits: usize,
}

impl BackwardShape {
    /// The portable kernels' shape: resident keys (dK/dV) or queries (dQ), with `learn`'s sums.
    pub const fn portable(config: PrefillConfig, keys: bool, learn: LearnConfig) -> Self {
        BackwardShape {
            config,
            keys,
            atomic_dq: false,
            learn,
            splits: 1,
        }
    }
}

/// The fewest steps of its walk each cube of a split block of keys takes: shorter walks run in
/// one cube.
pub const MIN_SPLIT_STEPS: usize = 16;

impl BackwardShape {
    /// Rows of the resident block (a multiple of 16; 64 per warpgroup in the warpgroup kernels).
    pub const fn resident(&self) -> usize {
        if self.keys {
            self.config.block_kv()
        } else {
            self.config.block_q()
        }
    }

    /// Rows of each streamed block.
    pub const fn streamed(&self) -> usize {
        if self.keys {
            self.config.block_q()
        } else {
            self.config.block_kv()
        }
    }

    /// Planes per cube: one per 16 resident rows.
    pub const fn planes(&self) -> usize {
        self.resident() / 16
    }
}

/// A streamed block against a resident one in the tensor-core and warpgroup kernels: the first
/// query row of the pairs (the streamed block's in the dK/dV kernels, the resident one's in the
/// dQ kernels) and the step's keys (the cube's own in the dK/dV kernels) and mask class.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Meeting {
    /// First query row.
    pub q_start: usize,
    /// The keys and the class.
    pub step: Step,
}

/// A pair's probability and the derivative of its score modification.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct PairGrad {
    /// `P = exp(s′ − LSE)`, 0 where the pair does not take part.
    pub p: f32,
    /// `f′(s)`: 1 without a softcap.
    pub slope: f32,
    /// The value the variant's own score expression receives (after softcap and ALiBi).
    pub pre: f32,
    /// The expression's derivative there (1 without one).
    pub custom_slope: f32,
}

/// Units of a cube of the element-wise kernels ([`backward_zero()`], [`backward_delta()`]).
pub const ELEMENTWISE_UNITS: u32 = 256;

/// Zeros every element of `t` (contiguous, a whole number of `N`-element vectors), one vector
/// per unit on a grid of [`ELEMENTWISE_UNITS`]-unit cubes: where some gradient rows belong to no
/// sequence (outside every document, past a key length), or f32 sums that atomics add into.
#[cube(launch, address_type = "dynamic")]
pub fn backward_zero<E: Float, N: Size>(t: &mut Tensor<Vector<E, N>>) {
    let i = crate::kernels::flat_index(ELEMENTWISE_UNITS);
    let vectors = t.shape(0) * t.shape(1) * t.shape(2) * t.shape(3) / N::value();
    if i < vectors {
        t[i] = Vector::<E, N>::new(E::cast_from(0.0f32));
    }
}

/// A gradient from the f32 sums the warpgroup dK/dV kernel added up with atomics:
/// `grad = factor · sums`, element by element (both contiguous, one shape), one unit per element
/// on a grid of `units`-unit cubes. dQ's sums are scaled here (by the softmax scale), dK's and
/// dV's were scaled as they were added (factor 1).
#[cube(launch, address_type = "dynamic")]
pub fn backward_from_sums<E: Float>(
    acc: &Tensor<f32>,
    grad: &mut Tensor<E>,
    factor: f32,
    #[comptime] units: u32,
) {
    let i = crate::kernels::flat_index(units);
    if i < grad.len() {
        grad[i] = E::cast_from(acc[i] * factor);
    }
}

/// How [`backward_delta()`] reads a row of O and dO: `per_row` vectors of the launch's width,
/// `lanes` units per row (a power of two, at most 32), unit `l` summing vectors `l`, `l + lanes`,
/// …; [`ELEMENTWISE_UNITS`]` / lanes` rows per cube.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct DeltaShape {
    /// Vectors per row (`value_dim / width`).
    pub per_row: usize,
    /// Units per row.
    pub lanes: usize,
}

impl DeltaShape {
    /// The shape for rows of `value_dim` elements read `width` at a time.
    pub const fn new(value_dim: usize, width: usize) -> Self {
        let per_row = value_dim / width;
        let most = if per_row < 32 { per_row } else { 32 };
        let mut lanes = 1;
        while lanes * 2 <= most {
            lanes *= 2;
        }
        DeltaShape { per_row, lanes }
    }

    /// Rows per cube.
    pub const fn rows_per_cube(&self) -> usize {
        ELEMENTWISE_UNITS as usize / self.lanes
    }
}

/// `D = rowsum(dO ∘ O)` for every query row of `[B, Hq, Nq]`: each row's `lanes` units read
/// neighbouring `N`-element vectors of O and dO (a plane reads whole rows, coalesced), then the
/// row's first unit adds their partial sums from shared memory, in the same order on every run.
#[cube(launch, address_type = "dynamic")]
pub fn backward_delta<E: Float, N: Size>(
    o: &Tensor<Vector<E, N>>,
    d_out: &Tensor<Vector<E, N>>,
    delta: &mut Tensor<f32>,
    #[comptime] shape: DeltaShape,
) {
    let lanes = comptime!(shape.lanes);
    let per_lane = comptime!(shape.per_row.div_ceil(shape.lanes));
    let width = N::value();
    let unit = UNIT_POS as usize;
    let lane = unit % lanes;
    let cube = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    let row = cube * comptime!(shape.rows_per_cube()) + unit / lanes;
    let rows = o.shape(0) * o.shape(1) * o.shape(2);
    let mut sum = 0.0f32.runtime();
    if row < rows {
        let n = row % o.shape(2);
        let h = (row / o.shape(2)) % o.shape(1);
        let b = row / (o.shape(2) * o.shape(1));
        let o_at = (b * o.stride(0) + h * o.stride(1) + n * o.stride(2)) / width;
        let d_at = (b * d_out.stride(0) + h * d_out.stride(1) + n * d_out.stride(2)) / width;
        #[unroll]
        for i in 0..per_lane {
            let c = lane + i * lanes;
            if c < shape.per_row {
                let x = Vector::<f32, N>::cast_from(o[o_at + c]);
                let y = Vector::<f32, N>::cast_from(d_out[d_at + c]);
                #[unroll]
                for e in 0..width {
                    sum += x.extract(e) * y.extract(e);
                }
            }
        }
    }
    let mut partial = Shared::<[f32]>::new_slice(ELEMENTWISE_UNITS as usize);
    partial[unit] = sum;
    sync_cube();
    if lane == 0 && row < rows {
        let mut total = 0.0f32.runtime();
        #[unroll]
        for l in 0..lanes {
            total += partial[unit + l];
        }
        delta[row] = total;
    }
}

/// The gradient of each head's sink logit: `−Σ exp(sink − LSE) · D` over the query rows of every
/// sequence (the sink's probability times the row's `D`: the sink's value is 0, so it moves O
/// only through the normalisation). One cube of [`SINK_UNITS`] units per query head, written to
/// `d_sinks[h]`.
#[cube(launch)]
pub fn backward_sinks(
    stats: &SinkStats,
    d_sinks: &mut Tensor<f32>,
    inputs: &RunInputs,
    args: Args,
    #[comptime] config: SinkConfig,
) {
    let head = CUBE_POS_X as usize;
    let units = SINK_UNITS as usize;
    let unit = UNIT_POS as usize;
    let sink = inputs.floats[slots::SINKS as usize * inputs.slot_len as usize + head];
    let mut part = 0.0f32.runtime();
    for sequence in 0..stats.sequences as usize {
        let at = Lengths {
            sequence,
            head,
            q_total: stats.lse.shape(2),
            k_total: 0,
        };
        let ctx = Ctx::locate(at, inputs, args, config.mask, config.score);
        let seq = ctx.site;
        let base = (seq.batch * stats.lse.shape(1) + head) * stats.lse.shape(2) + seq.q_off;
        for i in range_stepped(unit, seq.seq_q, units) {
            part -= (sink - stats.lse[base + i]).exp() * stats.delta[base + i];
        }
    }
    let mut sums = Shared::<[f32]>::new_slice(units);
    sums[unit] = part;
    sync_cube();
    // Halving, in the same order on every run.
    #[unroll]
    for level in 0..SINK_LEVELS {
        let width = comptime!((SINK_UNITS >> (level + 1)) as usize);
        if unit < width {
            sums[unit] += sums[unit + width];
        }
        sync_cube();
    }
    if unit == 0 {
        d_sinks[head] = sums[0];
    }
}

/// The forward's per-row statistics the sinks' gradient reads, and the number of sequences.
#[derive(CubeType, CubeLaunch)]
pub struct SinkStats {
    /// The forward's LSE, `[B, Hq, Nq]`.
    pub lse: OwnedTensor<f32>,
    /// `D`, `[B, Hq, Nq]`.
    pub delta: OwnedTensor<f32>,
    /// Sequences (batch entries or documents).
    pub sequences: u32,
}

/// Units per cube of [`backward_sinks()`] (a power of two).
pub const SINK_UNITS: u32 = 256;
/// Halvings of its reduction: `log2(SINK_UNITS)`.
const SINK_LEVELS: u32 = 8;
const _: () = assert!(1 << SINK_LEVELS == SINK_UNITS);

/// The comptime facts [`backward_sinks()`] needs to find each sequence.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct SinkConfig {
    /// The variant's mask.
    pub mask: MaskSpec,
    /// Its score flags.
    pub score: ScoreFlags,
}

/// The probability of a pair from its raw `q·k` under the row's LSE, recomputed as the forward
/// computed it (scale, score modification, mask), and the modification's derivative.
#[cube]
fn recompute<M: Hooks>(
    dot: f32,
    lse: f32,
    at: Pair,
    step: Step,
    ctx: &Ctx,
    inputs: &RunInputs,
) -> PairGrad {
    let s = dot * ctx.args.scale;
    let mut modified = s;
    if comptime!(ctx.score.modifies_scores()) {
        modified = score::modify_builtin(s, ctx, at.q, at.k, inputs);
    }
    let mut slope = 1.0f32.runtime();
    if comptime!(ctx.score.softcap) {
        let t = (s * ctx.args.inv_softcap).tanh();
        slope = 1.0 - t * t;
    }
    let pre = modified;
    let mut custom_slope = 1.0f32.runtime();
    if comptime!(ctx.score.custom) {
        // The chain rule through the variant's own expression, at the value it receives.
        let (b, h) = (ctx.site.index, ctx.site.head as i32);
        custom_slope = M::score_grad(modified, b, h, at.q, at.k, inputs);
        slope *= custom_slope;
        modified = M::score(modified, b, h, at.q, at.k, inputs);
    }
    let mut visible = true;
    if comptime!(!ctx.mask.is_none()) {
        if step.partial() {
            visible = mask::visible::<M>(ctx, at.q, at.k, inputs);
        }
    }
    PairGrad {
        p: select(visible, (modified - lse).exp(), 0.0f32),
        slope,
        pre,
        custom_slope,
    }
}

/// The dK/dV kernels' step: the cube's `keys` against the query block of `block_q` rows from
/// `q_start` (clipped to the sequence), classified by the mask as the forward classifies its
/// tiles.
#[cube]
fn query_block_step<M: Hooks>(
    ctx: &Ctx,
    keys: StepKeys,
    q_start: usize,
    #[comptime] block_q: usize,
    inputs: &RunInputs,
) -> Step {
    let seq_q = ctx.site.seq_q;
    let q_end = select(q_start + block_q < seq_q, q_start + block_q, seq_q);
    let walk = BlockWalk {
        q_first: q_start,
        q_last: q_end - 1,
        range: KeyRange { start: 0, end: 0 },
        first_step: 0,
        end_step: 0,
    };
    Step {
        keys,
        class: mask::classify::<M>(ctx, walk, keys, inputs),
    }
}

/// The context of query head `head`: its ALiBi slope read from the input slots.
#[cube]
fn head_context(ctx: &Ctx, head: usize, inputs: &RunInputs) -> Ctx {
    let mut slope = ctx.site.slope;
    if comptime!(ctx.score.alibi) {
        slope = inputs.floats[slots::ALIBI_SLOPES as usize * inputs.slot_len as usize + head];
    }
    ctx.with_head(head, slope)
}

/// dK and dV: one cube per block of `block_kv` keys of one K/V head, one unit per key; with
/// learnable `seq` tables read at the key, each key's sum per query head ([`PositionSums`]).
#[cube(launch, address_type = "dynamic")]
pub fn backward_dkdv<E: Float, M: Hooks>(
    ops: &BackwardOperands<E>,
    grads: &mut KvGrads<E>,
    positions: &mut Tensor<f32>,
    inputs: &RunInputs,
    args: Args,
    #[comptime] shape: BackwardShape,
) {
    let config = comptime!(shape.config);
    let block_kv = config.block_kv();
    let at = Lengths {
        sequence: CUBE_POS_Z as usize,
        head: CUBE_POS_Y as usize * args.group as usize,
        q_total: ops.q.shape(2),
        k_total: ops.k.shape(2),
    };
    let ctx = Ctx::locate(at, inputs, args, config.mask, config.score);
    let key_start = CUBE_POS_X as usize * block_kv;
    // Blocks past the end of a short document have nothing to do (uniform across the cube).
    if key_start < ctx.site.seq_k {
        let mut key = KeyRow::new(
            ops,
            &ctx,
            key_start + UNIT_POS as usize,
            config,
            shape.learn,
        );
        let heads = CUBE_COUNT_Y as usize * args.group as usize;
        let layout = PositionSums::new(heads, inputs, shape.learn);
        let remaining = ctx.site.seq_k - key_start;
        let keys = StepKeys {
            start: key_start,
            len: select(remaining < block_kv, remaining, block_kv),
        };
        let mut tiles = Shared::<[f32]>::new_slice(
            config.block_q() * (config.head_dim() + config.value_dim() + 2),
        );
        for g in 0..args.group as usize {
            let head_ctx = head_context(&ctx, ctx.site.head + g, inputs);
            let blocks = (ctx.site.seq_q + config.block_q() - 1) / config.block_q();
            for qb in 0..blocks {
                let q_start = qb * config.block_q();
                let q_end = select(
                    q_start + config.block_q() < ctx.site.seq_q,
                    q_start + config.block_q(),
                    ctx.site.seq_q,
                );
                let step =
                    query_block_step::<M>(&head_ctx, keys, q_start, config.block_q(), inputs);
                if step.class != TILE_EMPTY {
                    sync_cube();
                    load_query_rows::<E>(ops, &mut tiles, &head_ctx, q_start, config);
                    sync_cube();
                    let block = QueryBlock {
                        step,
                        start: q_start,
                        len: q_end - q_start,
                    };
                    key.accumulate::<M>(&tiles, &head_ctx, block, inputs, config);
                }
            }
            key.write_positions(positions, &head_ctx, layout);
        }
        key.write::<E>(grads, &ctx, config);
    }
}

/// One key row owned by one unit: its K and V (f32) and its gradients' accumulators.
#[derive(CubeType)]
pub struct KeyRow {
    /// The key row, f32.
    k: Array<f32>,
    /// The value row, f32.
    v: Array<f32>,
    /// dK accumulator.
    dk: Array<f32>,
    /// dV accumulator.
    dv: Array<f32>,
    /// Sequence position.
    key: usize,
    /// Whether the key lies in the sequence.
    valid: bool,
    /// The current query head's sums of the learnable `seq` tables' reads at this key.
    along: PositionGrads,
}

#[cube]
impl KeyRow {
    /// Key `key` of the cube's K/V head, loaded; zero accumulators.
    pub fn new<E: Float>(
        ops: &BackwardOperands<E>,
        ctx: &Ctx,
        key: usize,
        #[comptime] config: PrefillConfig,
        #[comptime] learn: LearnConfig,
    ) -> KeyRow {
        let seq = ctx.site;
        let valid = key < seq.seq_k;
        let row = seq.k_off + select(valid, key, 0);
        let k_at =
            seq.batch * ops.k.stride(0) + seq.kv_head * ops.k.stride(1) + row * ops.k.stride(2);
        let v_at =
            seq.batch * ops.v.stride(0) + seq.kv_head * ops.v.stride(1) + row * ops.v.stride(2);
        let mut k = Array::<f32>::new(config.head_dim());
        let mut dk = Array::<f32>::new(config.head_dim());
        #[unroll]
        for c in 0..config.head_dim() {
            let mut x = 0.0f32.runtime();
            if valid {
                x = f32::cast_from(ops.k[k_at + c]);
            }
            k[c] = x;
            dk[c] = 0.0;
        }
        let mut v = Array::<f32>::new(config.value_dim());
        let mut dv = Array::<f32>::new(config.value_dim());
        #[unroll]
        for c in 0..config.value_dim() {
            let mut x = 0.0f32.runtime();
            if valid {
                x = f32::cast_from(ops.v[v_at + c]);
            }
            v[c] = x;
            dv[c] = 0.0;
        }
        KeyRow {
            k,
            v,
            dk,
            dv,
            key,
            valid,
            along: PositionGrads::new(learn, ALONG_KEY),
        }
    }

    /// Add the staged query rows' contributions: `dV += P dO`, `dK += scale · dS q`.
    pub fn accumulate<M: Hooks>(
        &mut self,
        tiles: &Shared<[f32]>,
        ctx: &Ctx,
        block: QueryBlock,
        inputs: &RunInputs,
        #[comptime] config: PrefillConfig,
    ) {
        let d = config.head_dim();
        let dv = config.value_dim();
        let do_at = config.block_q() * d;
        let stats_at = config.block_q() * (d + dv);
        for r in 0..block.len {
            let mut dot = 0.0f32.runtime();
            #[unroll]
            for c in 0..d {
                dot += tiles[r * d + c] * self.k[c];
            }
            let at = Pair {
                q: (block.start + r) as i32,
                k: self.key as i32,
            };
            let grad = recompute::<M>(dot, tiles[stats_at + r], at, block.step, ctx, inputs);
            let p = select(self.valid, grad.p, 0.0f32);
            let mut dp = 0.0f32.runtime();
            #[unroll]
            for c in 0..dv {
                let g = tiles[do_at + r * dv + c];
                self.dv[c] += p * g;
                dp += g * self.v[c];
            }
            let delta = tiles[stats_at + config.block_q() + r];
            let d_score = p * (dp - delta);
            let ds = d_score * grad.slope * ctx.args.scale;
            #[unroll]
            for c in 0..d {
                self.dk[c] += ds * tiles[r * d + c];
            }
            self.along.add::<M>(d_score, grad, at, ctx, inputs);
        }
    }

    /// Store the current query head's sums of the learnable `seq` tables' reads at this key,
    /// and zero them for the next head.
    pub fn write_positions(&mut self, out: &mut Tensor<f32>, ctx: &Ctx, layout: PositionSums) {
        self.along.store(out, ctx, self.key, self.valid, layout);
    }

    /// Write dK and dV (contiguous).
    pub fn write<E: Float>(
        &self,
        grads: &mut KvGrads<E>,
        ctx: &Ctx,
        #[comptime] config: PrefillConfig,
    ) {
        if self.valid {
            let seq = ctx.site;
            let row = seq.k_off + self.key;
            let k_at = seq.batch * grads.dk.stride(0)
                + seq.kv_head * grads.dk.stride(1)
                + row * grads.dk.stride(2);
            let v_at = seq.batch * grads.dv.stride(0)
                + seq.kv_head * grads.dv.stride(1)
                + row * grads.dv.stride(2);
            #[unroll]
            for c in 0..config.head_dim() {
                grads.dk[k_at + c] = E::cast_from(self.dk[c]);
            }
            #[unroll]
            for c in 0..config.value_dim() {
                grads.dv[v_at + c] = E::cast_from(self.dv[c]);
            }
        }
    }
}

/// Stage `block_q` query rows of the context's head from `q_start`: Q and dO (f32), and per row
/// its LSE and `D`; rows past the sequence have LSE +∞, so every probability of theirs is 0.
#[cube]
fn load_query_rows<E: Float>(
    ops: &BackwardOperands<E>,
    tiles: &mut Shared<[f32]>,
    ctx: &Ctx,
    q_start: usize,
    #[comptime] config: PrefillConfig,
) {
    let seq = ctx.site;
    let d = config.head_dim();
    let dv = config.value_dim();
    let block_q = config.block_q();
    let units = config.block_kv();
    let do_at = block_q * d;
    let stats_at = block_q * (d + dv);
    let q_base = seq.batch * ops.q.stride(0) + seq.head * ops.q.stride(1);
    for i in range_stepped(UNIT_POS as usize, block_q * d, units) {
        let row = q_start + i / d;
        let mut x = 0.0f32.runtime();
        if row < seq.seq_q {
            x = f32::cast_from(ops.q[q_base + (seq.q_off + row) * ops.q.stride(2) + i % d]);
        }
        tiles[i] = x;
    }
    let o_base = seq.batch * ops.d_out.stride(0) + seq.head * ops.d_out.stride(1);
    for i in range_stepped(UNIT_POS as usize, block_q * dv, units) {
        let row = q_start + i / dv;
        let mut x = 0.0f32.runtime();
        if row < seq.seq_q {
            x = f32::cast_from(
                ops.d_out[o_base + (seq.q_off + row) * ops.d_out.stride(2) + i % dv],
            );
        }
        tiles[do_at + i] = x;
    }
    for r in range_stepped(UNIT_POS as usize, block_q, units) {
        let row = q_start + r;
        let stat = (seq.batch * ops.lse.shape(1) + seq.head) * ops.lse.shape(2) + seq.q_off + row;
        let mut lse = -ctx.masked();
        let mut delta = 0.0f32.runtime();
        if row < seq.seq_q {
            lse = ops.lse[stat];
            delta = ops.delta[stat];
        }
        tiles[stats_at + r] = lse;
        tiles[stats_at + block_q + r] = delta;
    }
}

/// dQ: one cube per query block of one head, one unit per query row, the forward's walk over the
/// keys with K and V staged in shared memory; the learnable inputs' partial sums per cube, and
/// with learnable `seq` tables read at the query, each row's sums ([`PositionSums`]).
#[cube(launch, address_type = "dynamic")]
pub fn backward_dq<E: Float, M: Hooks>(
    ops: &BackwardOperands<E>,
    grads: &mut QueryGrads<E>,
    positions: &mut Tensor<f32>,
    inputs: &RunInputs,
    args: Args,
    #[comptime] shape: BackwardShape,
) {
    let config = comptime!(shape.config);
    let learn = comptime!(shape.learn);
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
    if q_start < ctx.site.seq_q {
        let mut row = QueryGradRow::new(ops, &ctx, q_start + UNIT_POS as usize, config, learn);
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
                load_tile::<E>(&ops.k, &mut kv_tiles, &ctx, keys.start, false, config);
                load_tile::<E>(&ops.v, &mut kv_tiles, &ctx, keys.start, true, config);
                sync_cube();
                row.accumulate::<M>(&kv_tiles, &ctx, step, inputs, config);
            }
        }
        row.write::<E>(&mut grads.dq, &ctx, config);
        let layout = PositionSums::new(CUBE_COUNT_Y as usize, inputs, learn);
        row.write_positions(positions, &ctx, layout);
        row.learned.reduce(&mut grads.partials, config.block_q());
    }
}

/// The learnable run-time inputs whose gradients the dQ kernel sums: up to [`MAX_LEARNED`]
/// declared `f32` inputs ([`crate::InputDecl::learnable`]) and the given ALiBi slopes. Each cube
/// reads one element of an input without an inner dimension (its batch entry's, its head's), and
/// up to `width` elements of a table's (the inner dimension of its batch entry's or head's row):
/// one gradient slot each, the inputs' slots in declaration order, the slopes' last.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug, Default)]
pub struct LearnConfig {
    /// Learnable inputs.
    pub count: u32,
    /// Each one's place among the gradient slots, shape and declaration index.
    pub inputs: [Learned; MAX_LEARNED],
    /// Table reads of the score expression ([`crate::Hooks::score_read_grad`]).
    pub reads: u32,
    /// The learnable input (its position in `inputs`) each read reads; `MAX_LEARNED` where the
    /// table is not learnable.
    pub read_of: [u32; MAX_READS],
    /// Whether the ALiBi slopes are given at run time (their gradient comes last).
    pub alibi: bool,
    /// Per read: [`ALONG_QUERY`] or [`ALONG_KEY`] for a read of a learnable `seq` table at the
    /// query or key position (summed per position, [`PositionGrads`]), 0 for the others.
    pub along: [u32; MAX_READS],
}

/// [`LearnConfig::along`]: a read at the query position, summed by the dQ kernel's rows.
pub const ALONG_QUERY: u32 = 1;
/// [`LearnConfig::along`]: a read at the key position, summed by the dK/dV kernel's keys.
pub const ALONG_KEY: u32 = 2;

/// One learnable input's gradient slots.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug, Default)]
pub struct Learned {
    /// Declaration index.
    pub decl: u32,
    /// Whether it is a table (read through [`crate::Hooks::score_read_grad`]).
    pub table: bool,
    /// Its outer dimensions: bit 0 one row per batch entry (or document), bit 1 one per head.
    pub outer: u32,
    /// Its inner count (1 without an inner dimension; 0 for a `seq` table, summed per position
    /// outside the slots).
    pub width: u32,
    /// Its first gradient slot.
    pub first: u32,
}

/// The most declared `f32` inputs whose gradients one backward call computes.
pub const MAX_LEARNED: usize = 4;
/// The most table reads a score expression makes.
pub const MAX_READS: usize = 8;
/// The most gradient slots of one backward call: the inner counts of its learnable tables and
/// one per other learnable input (each a private sum per query row of the dQ kernel).
pub const MAX_LEARNED_SLOTS: usize = 128;

impl LearnConfig {
    /// Gradient slots: the inputs', then the slopes'.
    pub const fn slots(&self) -> usize {
        let mut total = 0;
        let mut g = 0;
        while g < self.count as usize {
            total += self.inputs[g].width as usize;
            g += 1;
        }
        total + if self.alibi { 1 } else { 0 }
    }

    /// The reads summed per position ([`LearnConfig::along`]): one region of [`PositionSums`]
    /// each.
    pub const fn regions(&self) -> usize {
        self.region(self.reads as usize)
    }

    /// The regions (a bit each) of learnable input `g`'s per-position reads.
    pub const fn regions_of(&self, g: usize) -> u32 {
        let mut mask = 0;
        let mut r = 0;
        while r < self.reads as usize {
            if self.along[r] != 0 && self.read_of[r] as usize == g {
                mask |= 1 << self.region(r);
            }
            r += 1;
        }
        mask
    }

    /// The region of read `read`: how many reads before it are summed per position.
    pub const fn region(&self, read: usize) -> usize {
        let mut n = 0;
        let mut r = 0;
        while r < read {
            if self.along[r] != 0 {
                n += 1;
            }
            r += 1;
        }
        n
    }
}

/// What the dQ kernel writes: dQ, and per learnable input slot one partial sum per cube
/// (`[slots, cubes]`, f32, zeroed by the caller).
#[derive(CubeType, CubeLaunch)]
pub struct QueryGrads<E: Float> {
    /// dQ, `[B, Hq, Nq, D]`.
    pub dq: OwnedTensor<E>,
    /// The cubes' partial sums.
    pub partials: OwnedTensor<f32>,
}

/// The grid of the dQ kernel, for [`backward_learned()`] to map cubes to input elements; for
/// [`backward_positions()`], the shape of a region of [`PositionSums`] (x positions, y query
/// heads, z sequences).
#[derive(CubeType, CubeLaunch, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Grid {
    /// Cubes along x (query blocks), or positions.
    pub x: u32,
    /// Along y (heads).
    pub y: u32,
    /// Along z (sequences).
    pub z: u32,
}

/// One learnable input's gradient: element `e` (one unit each; row-major over its outer
/// dimensions, then its inner count) sums, in a fixed order, its slot's partials of the dQ cubes
/// that read it: those of its head, of its sequence, or all of them.
#[cube(launch)]
pub fn backward_learned(
    partials: &Tensor<f32>,
    out: &mut Tensor<f32>,
    grid: Grid,
    #[comptime] learned: Learned,
) {
    let e = ABSOLUTE_POS;
    if e < out.len() {
        let (gx, gy, gz) = (grid.x as usize, grid.y as usize, grid.z as usize);
        let cubes = gx * gy * gz;
        let width = comptime!(learned.width as usize);
        let row = e / width;
        let base = (learned.first as usize + e % width) * cubes;
        let mut sum = 0.0f32.runtime();
        for z in 0..gz {
            for y in 0..gy {
                if reads_row(z, y, gy, row, learned.outer) {
                    for x in 0..gx {
                        sum += partials[base + (z * gy + y) * gx + x];
                    }
                }
            }
        }
        out[e] = sum;
    }
}

/// Whether sequence `z` and query head `y` (of `heads`) read row `row` of a learnable input whose
/// outer dimensions are `outer` ([`Learned::outer`]).
#[cube]
fn reads_row(z: usize, y: usize, heads: usize, row: usize, #[comptime] outer: u32) -> bool {
    let mut take = true;
    if comptime!(outer == 3) {
        take = z * heads + y == row;
    }
    if comptime!(outer == 2) {
        take = y == row;
    }
    if comptime!(outer == 1) {
        take = z == row;
    }
    take
}

/// One unit's partial gradients of the learnable inputs, a private sum per gradient slot: the
/// pairs the unit meets are added in its own order, then the cube's units are summed in a fixed
/// order — the same bits on every run, and no contention however many pairs share a slot (a
/// table's bucket). Without learnable inputs it is empty and costs nothing.
#[derive(CubeType)]
pub struct LearnedSums {
    /// The sums, one per slot.
    sums: Array<f32>,
    /// Which inputs those are.
    #[cube(comptime)]
    learn: LearnConfig,
}

#[cube]
impl LearnedSums {
    /// Zero sums of `learn`'s slots.
    pub fn new(#[comptime] learn: LearnConfig) -> LearnedSums {
        let mut sums = Array::<f32>::new(comptime!(learn.slots().max(1)));
        #[unroll]
        for g in 0..comptime!(learn.slots()) {
            sums[g] = 0.0;
        }
        LearnedSums { sums, learn }
    }

    /// Add one pair's share: the score gradient `d_score` times the score's derivative with
    /// respect to each input (the macro's; a table read's to the element it reads), and for
    /// given ALiBi slopes times `−|q′ − k|` through the expression's derivative. A pair that
    /// does not take part (`d_score` 0) adds nothing, whatever the derivative there.
    pub fn add_pair<M: Hooks>(
        &mut self,
        d_score: f32,
        grad: PairGrad,
        at: Pair,
        ctx: &Ctx,
        inputs: &RunInputs,
    ) {
        let learn = comptime!(self.learn);
        let live = d_score != 0.0;
        let (b, h) = (ctx.site.index, ctx.site.head as i32);
        #[unroll]
        for g in 0..learn.count as usize {
            let input = comptime!(learn.inputs[g]);
            if comptime!(!input.table) {
                let dx = M::score_input_grad(grad.pre, b, h, at.q, at.k, inputs, input.decl);
                self.sums[input.first as usize] += select(live, d_score * dx, 0.0f32);
            }
        }
        #[unroll]
        for r in 0..learn.reads as usize {
            let g = comptime!(learn.read_of[r] as usize);
            if comptime!(g < MAX_LEARNED && learn.along[r] == 0) {
                let first = comptime!(learn.inputs[g].first);
                let read = comptime!(r as u32);
                let slot = first + M::read_position(b, h, at.q, at.k, inputs, read);
                let dx = M::score_read_grad(grad.pre, b, h, at.q, at.k, inputs, read);
                self.sums[slot as usize] += select(live, d_score * dx, 0.0f32);
            }
        }
        if comptime!(learn.alibi) {
            let distance = at.q + ctx.site.shift - at.k;
            let distance = select(distance < 0, -distance, distance);
            let slot = comptime!(learn.slots() - 1);
            let share = d_score * grad.custom_slope * f32::cast_from(distance);
            self.sums[slot] -= select(live, share, 0.0f32);
        }
    }

    /// Sum the `units` units' sums over the cube, slot by slot in a fixed order (a halving
    /// tree), into this cube's entry of `partials` (`[slots, cubes]`).
    pub fn reduce(&self, partials: &mut Tensor<f32>, #[comptime] units: usize) {
        let slots = comptime!(self.learn.slots());
        if comptime!(slots > 0) {
            let unit = UNIT_POS as usize;
            let mut sums = Shared::<[f32]>::new_slice(units);
            let cube = (CUBE_POS_Z as usize * CUBE_COUNT_Y as usize + CUBE_POS_Y as usize)
                * CUBE_COUNT_X as usize
                + CUBE_POS_X as usize;
            let cubes = CUBE_COUNT_X as usize * CUBE_COUNT_Y as usize * CUBE_COUNT_Z as usize;
            let levels = comptime!(units.next_power_of_two().trailing_zeros() as usize);
            for g in 0..slots {
                sync_cube();
                sums[unit] = self.sums[g];
                sync_cube();
                #[unroll]
                for level in 0..levels {
                    let width = comptime!(units.next_power_of_two() >> (level + 1));
                    if unit < width && unit + width < units {
                        sums[unit] += sums[unit + width];
                    }
                    sync_cube();
                }
                if unit == 0 {
                    partials[g * cubes + cube] = sums[0];
                }
            }
        }
    }
}

/// One query row of the dQ kernel: its Q and dO (f32), LSE and `D`, and the dQ accumulator.
#[derive(CubeType)]
pub struct QueryGradRow {
    /// Q, f32.
    q: Array<f32>,
    /// dO, f32.
    d_out: Array<f32>,
    /// dQ accumulator.
    dq: Array<f32>,
    /// The forward's LSE (+∞ for a row past the sequence).
    lse: f32,
    /// `D`.
    delta: f32,
    /// Sequence position.
    row: usize,
    /// Whether the row lies in the sequence.
    valid: bool,
    /// This row's partial gradients of the learnable inputs.
    pub learned: LearnedSums,
    /// Its sums of the learnable `seq` tables' reads at its query position.
    along: PositionGrads,
}

#[cube]
impl QueryGradRow {
    /// Row `row` of the cube's head, loaded; a zero accumulator.
    pub fn new<E: Float>(
        ops: &BackwardOperands<E>,
        ctx: &Ctx,
        row: usize,
        #[comptime] config: PrefillConfig,
        #[comptime] learn: LearnConfig,
    ) -> QueryGradRow {
        let seq = ctx.site;
        let valid = row < seq.seq_q;
        let at = seq.q_off + select(valid, row, 0);
        let q_at = seq.batch * ops.q.stride(0) + seq.head * ops.q.stride(1) + at * ops.q.stride(2);
        let o_at = seq.batch * ops.d_out.stride(0)
            + seq.head * ops.d_out.stride(1)
            + at * ops.d_out.stride(2);
        let mut q = Array::<f32>::new(config.head_dim());
        let mut dq = Array::<f32>::new(config.head_dim());
        #[unroll]
        for c in 0..config.head_dim() {
            q[c] = f32::cast_from(ops.q[q_at + c]);
            dq[c] = 0.0;
        }
        let mut d_out = Array::<f32>::new(config.value_dim());
        #[unroll]
        for c in 0..config.value_dim() {
            d_out[c] = f32::cast_from(ops.d_out[o_at + c]);
        }
        let stat = (seq.batch * ops.lse.shape(1) + seq.head) * ops.lse.shape(2) + at;
        QueryGradRow {
            q,
            d_out,
            dq,
            lse: select(valid, ops.lse[stat], -ctx.masked()),
            delta: ops.delta[stat],
            row,
            valid,
            learned: LearnedSums::new(learn),
            along: PositionGrads::new(learn, ALONG_QUERY),
        }
    }

    /// Add the staged keys' contributions: `dQ += scale · dS k`.
    pub fn accumulate<M: Hooks>(
        &mut self,
        kv_tiles: &Shared<[f32]>,
        ctx: &Ctx,
        step: Step,
        inputs: &RunInputs,
        #[comptime] config: PrefillConfig,
    ) {
        let d = config.head_dim();
        let dv = config.value_dim();
        let v_at = config.block_kv() * d;
        for j in 0..step.keys.len {
            let mut dot = 0.0f32.runtime();
            #[unroll]
            for c in 0..d {
                dot += self.q[c] * kv_tiles[j * d + c];
            }
            let at = Pair {
                q: self.row as i32,
                k: (step.keys.start + j) as i32,
            };
            let grad = recompute::<M>(dot, self.lse, at, step, ctx, inputs);
            let mut dp = 0.0f32.runtime();
            #[unroll]
            for c in 0..dv {
                dp += self.d_out[c] * kv_tiles[v_at + j * dv + c];
            }
            // The gradient with respect to the modified score, then through the modification.
            let d_score = grad.p * (dp - self.delta);
            let ds = d_score * grad.slope * ctx.args.scale;
            #[unroll]
            for c in 0..d {
                self.dq[c] += ds * kv_tiles[j * d + c];
            }
            self.learned.add_pair::<M>(d_score, grad, at, ctx, inputs);
            self.along.add::<M>(d_score, grad, at, ctx, inputs);
        }
    }

    /// Store the row's sums of the learnable `seq` tables' reads at its query position.
    pub fn write_positions(&mut self, out: &mut Tensor<f32>, ctx: &Ctx, layout: PositionSums) {
        self.along.store(out, ctx, self.row, self.valid, layout);
    }

    /// Write dQ (contiguous).
    pub fn write<E: Float>(
        &self,
        dq: &mut Tensor<E>,
        ctx: &Ctx,
        #[comptime] config: PrefillConfig,
    ) {
        if self.valid {
            let seq = ctx.site;
            let at = seq.batch * dq.stride(0)
                + seq.head * dq.stride(1)
                + (seq.q_off + self.row) * dq.stride(2);
            #[unroll]
            for c in 0..config.head_dim() {
                dq[at + c] = E::cast_from(self.dq[c]);
            }
        }
    }
}

/// Where the per-position sums of the learnable `seq` tables' reads live: `[regions,
/// sequences, query heads, positions]` f32 (regions: [`LearnConfig::regions`]), zeroed by the
/// caller. Each element is stored by the one unit resident at that position (the dQ kernel's row
/// for a query-indexed read, the dK/dV kernel's key for a key-indexed one), so nothing contends
/// and the bits are the same on every run; [`backward_positions()`] then sums each table
/// element's share over the sequences and heads that read it.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct PositionSums {
    /// Sequences (batch entries or documents).
    sequences: usize,
    /// Query heads.
    heads: usize,
    /// Positions (a `seq` table's inner length).
    positions: usize,
}

#[cube]
impl PositionSums {
    /// The layout of a launch over `heads` query heads (one sequence per cube along z) with
    /// `learn`'s reads (the positions are read from the table slots only where it has some: a
    /// variant without tables has no such slot).
    pub fn new(heads: usize, inputs: &RunInputs, #[comptime] learn: LearnConfig) -> PositionSums {
        let mut positions = 0usize.runtime();
        if comptime!(learn.regions() > 0) {
            positions = crate::hooks::ops::table_positions(inputs) as usize;
        }
        PositionSums {
            sequences: CUBE_COUNT_Z as usize,
            heads,
            positions,
        }
    }

    /// The element of `region` at position `pos` of `ctx`'s sequence and query head.
    pub fn index(&self, #[comptime] region: usize, ctx: &Ctx, pos: usize) -> usize {
        ((region * self.sequences + ctx.site.index as usize) * self.heads + ctx.site.head)
            * self.positions
            + pos
    }
}

/// One unit's sums, at its own position, of the reads of learnable `seq` tables indexed by that
/// position (`t[q]` for a query row, `t[k]` for a key): one per region, zero without them.
#[derive(CubeType)]
pub struct PositionGrads {
    /// The sums.
    sums: Array<f32>,
    /// Which reads are summed.
    #[cube(comptime)]
    learn: LearnConfig,
    /// [`ALONG_QUERY`] or [`ALONG_KEY`]: the reads this unit sums.
    #[cube(comptime)]
    along: u32,
}

#[cube]
impl PositionGrads {
    /// Zero sums of `learn`'s reads along `along`.
    pub fn new(#[comptime] learn: LearnConfig, #[comptime] along: u32) -> PositionGrads {
        let mut sums = Array::<f32>::new(comptime!(learn.regions().max(1)));
        #[unroll]
        for g in 0..comptime!(learn.regions()) {
            sums[g] = 0.0;
        }
        PositionGrads { sums, learn, along }
    }

    /// Add one pair's share: the score gradient times the score's derivative with respect to
    /// the element each read reads (the macro's).
    pub fn add<M: Hooks>(
        &mut self,
        d_score: f32,
        grad: PairGrad,
        at: Pair,
        ctx: &Ctx,
        inputs: &RunInputs,
    ) {
        let learn = comptime!(self.learn);
        let along = comptime!(self.along);
        let live = d_score != 0.0;
        let (b, h) = (ctx.site.index, ctx.site.head as i32);
        #[unroll]
        for r in 0..learn.reads as usize {
            if comptime!(learn.along[r] == along) {
                let region = comptime!(learn.region(r));
                let read = comptime!(r as u32);
                let dx = M::score_read_grad(grad.pre, b, h, at.q, at.k, inputs, read);
                self.sums[region] += select(live, d_score * dx, 0.0f32);
            }
        }
    }

    /// Store the sums at position `pos` of `ctx`'s sequence and head (where `valid`), and zero
    /// them.
    pub fn store(
        &mut self,
        out: &mut Tensor<f32>,
        ctx: &Ctx,
        pos: usize,
        valid: bool,
        layout: PositionSums,
    ) {
        let learn = comptime!(self.learn);
        let along = comptime!(self.along);
        #[unroll]
        for r in 0..learn.reads as usize {
            if comptime!(learn.along[r] == along) {
                let region = comptime!(learn.region(r));
                if valid {
                    out[layout.index(region, ctx, pos)] = self.sums[region];
                }
                self.sums[region] = 0.0;
            }
        }
    }
}

/// One learnable `seq` table's gradient: element `e` (one unit each; row-major over its outer
/// dimensions, then its positions) sums, in a fixed order, the [`PositionSums`] of the regions in
/// `regions` (a bit each: the reads of this table) over the sequences and heads that read its
/// row.
#[cube(launch)]
pub fn backward_positions(
    sums: &Tensor<f32>,
    out: &mut Tensor<f32>,
    shape: Grid,
    #[comptime] learned: Learned,
    #[comptime] regions: u32,
) {
    let e = ABSOLUTE_POS;
    if e < out.len() {
        let (seqs, heads) = (shape.z as usize, shape.y as usize);
        let positions = shape.x as usize;
        let row = e / positions;
        let pos = e % positions;
        let mut sum = 0.0f32.runtime();
        #[unroll]
        for region in 0..MAX_READS {
            if comptime!(regions >> region & 1 == 1) {
                for z in 0..seqs {
                    for y in 0..heads {
                        if reads_row(z, y, heads, row, learned.outer) {
                            sum += sums[((region * seqs + z) * heads + y) * positions + pos];
                        }
                    }
                }
            }
        }
        out[e] = sum;
    }
}
