//! The backward pass on tensor cores (16×16×16 cooperative matrix instructions, cubecl `cmma`):
//! the portable kernels' algorithm with every product of the FlashAttention-2 backward on tensor
//! cores, for f16 and bf16 on devices that have them.
//!
//! Both kernels share one shape. A cube keeps one side's block resident in shared memory (its
//! 16-row plane tiles, one per plane of 32 units) and streams the other side's blocks past it:
//!
//! - [`backward_dkdv_tc()`]: K and V of `block_kv` keys resident, the query group's Q, dO, LSE
//!   and `D` streamed `block_q` rows at a time; per plane `Sᵀ = K Qᵀ` and `dPᵀ = V dOᵀ`, then
//!   `Pᵀ` and `dSᵀ` elementwise, then `dV += Pᵀ dO` and `dK += dSᵀ Q` into f32 fragments that
//!   stay in registers for the whole walk (GQA's group summed there, K/V never repeated);
//! - [`backward_dq_tc()`]: Q and dO of `block_q` rows resident, K and V streamed over the
//!   forward's walk; per plane `S = Q Kᵀ`, `dP = dO Vᵀ`, `dS`, then `dQ += dS K`.
//!
//! No atomics: each gradient row is owned by one plane, so the results are the same bits on every
//! run. Tiles the mask rules out are skipped as in the forward; `P` and `dS` round to the element
//! type before their products, as in FlashAttention 2.

// `#[cube]` code: `div_ceil` has no GPU expansion, and a comptime `if` around a run-time one must
// stay separate (the outer branch disappears at expansion, the inner one is kept).
#![allow(clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use super::{
    head_context, query_block_step, recompute, BackwardOperands, BackwardShape, KvGrads, Meeting,
    Pair,
};
use crate::hooks::{Hooks, TILE_EMPTY};
use crate::kernels::common::walk::BlockWalk;
use crate::kernels::common::{mask, Args, Ctx, Lengths, RunInputs, Step, StepKeys};
use crate::kernels::prefill::config::MMA;
use crate::kernels::prefill::tensor_core::{operand, store_accumulator};

/// A plane's gradient accumulator: one 16 × 16 f32 fragment per 16 columns.
type Fragments = Sequence<cmma::Matrix<f32>>;

/// The resident block's first operand (K in the dK/dV kernel, Q in the dQ kernel).
pub const RESIDENT: usize = 0;
/// The resident block's second operand, `value_dim` wide (V, or dO).
pub const RESIDENT_VALUES: usize = 1;
/// The streamed blocks' first operand (Q, or K).
pub const STREAMED: usize = 2;
/// The streamed blocks' second operand (dO, or V).
pub const STREAMED_VALUES: usize = 3;

/// The tensor-core kernels' shared memory.
impl BackwardShape {
    /// Width of operand `slot`: `head_dim`, or `value_dim` for the second of a pair.
    pub const fn width(&self, slot: usize) -> usize {
        if slot.is_multiple_of(2) {
            self.config.head_dim()
        } else {
            self.config.value_dim()
        }
    }

    /// Row stride of the f32 product tiles (`S`, `dP`): padded by 4 floats against bank
    /// conflicts, a multiple of 4 as tensor-core stores require.
    pub const fn f32_stride(&self) -> usize {
        self.streamed() + 4
    }

    /// Row stride of the `E` probability and score-gradient tiles: padded by 8 elements, a
    /// multiple of 8 as 16-bit tensor-core loads require.
    pub const fn elem_stride(&self) -> usize {
        self.streamed() + 8
    }

    /// Offsets in the `E` shared array: the resident block's rows (width `head_dim`) and their
    /// second operand (`value_dim`), the streamed block's two, `P`, `dS`, and the length. The
    /// dK/dV kernel's resident pair is K and V, its streamed pair Q and dO; the dQ kernel's the
    /// other way round. Only the dK/dV kernel keeps `P` (for `dV`).
    pub const fn elem_layout(&self) -> [usize; 7] {
        let d = self.config.head_dim();
        let dv = self.config.value_dim();
        let x = 0;
        let x2 = x + self.resident() * d;
        let y = x2 + self.resident() * dv;
        let y2 = y + self.streamed() * d;
        let p = y2 + self.streamed() * dv;
        let tile = self.resident() * self.elem_stride();
        let ds = if self.keys { p + tile } else { p };
        [x, x2, y, y2, p, ds, ds + tile]
    }

    /// Offsets in the f32 shared array: `S`, `dP`, the query rows' LSE and `D`, and the length.
    pub const fn f32_layout(&self) -> [usize; 5] {
        let tile = self.resident() * self.f32_stride();
        let s = 0;
        let dp = s + tile;
        let lse = dp + tile;
        let delta = lse + self.config.block_q();
        [s, dp, lse, delta, delta + self.config.block_q()]
    }

    /// Shared memory of one tensor-core cube, in bytes, for 16-bit elements.
    pub const fn tensor_core_bytes(&self) -> usize {
        self.elem_layout()[6] * 2 + self.f32_layout()[4] * 4
    }
}

/// Rows of one head of a `[B, H, N, width]` operand: element offset of the sequence's row 0,
/// the block's first row, and one past the sequence's last row (rows from there read as 0).
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Rows {
    /// Offset of the sequence's row 0 in its head.
    pub base: usize,
    /// First row of the block.
    pub start: usize,
    /// One past the sequence's last row.
    pub end: usize,
}

/// The cube's shared memory and this unit's place: plane `plane` owns resident rows
/// `16 · plane..`, and its product, probability and gradient tiles.
#[derive(CubeType)]
pub struct BackTiles<E: Float> {
    /// The `E` tiles ([`BackwardShape::elem_layout`]).
    elems: Shared<[E]>,
    /// The f32 tiles ([`BackwardShape::f32_layout`]).
    f32s: Shared<[f32]>,
    /// Plane in the cube.
    plane: usize,
    /// Lane in the plane.
    lane: usize,
}

#[cube]
impl<E: Float> BackTiles<E> {
    /// The cube's tiles.
    pub fn new(#[comptime] shape: BackwardShape) -> BackTiles<E> {
        let [_, _, _, _, _, _, elem_len] = shape.elem_layout();
        let [_, _, _, _, f32_len] = shape.f32_layout();
        BackTiles::<E> {
            elems: Shared::<[E]>::new_slice(elem_len),
            f32s: Shared::<[f32]>::new_slice(f32_len),
            plane: UNIT_POS_Y as usize,
            lane: UNIT_POS_X as usize,
        }
    }

    /// Load operand `slot` ([`RESIDENT`], [`RESIDENT_VALUES`], [`STREAMED`], [`STREAMED_VALUES`])
    /// from `src`, every unit of the cube taking a share; rows past the sequence are 0 (the
    /// tensor cores run whole 16-row blocks).
    pub fn load(
        &mut self,
        src: &Tensor<E>,
        rows: Rows,
        #[comptime] slot: usize,
        #[comptime] shape: BackwardShape,
    ) {
        let at = comptime!(shape.elem_layout()[slot]);
        let width = comptime!(shape.width(slot));
        let count = comptime!(if slot < STREAMED {
            shape.resident()
        } else {
            shape.streamed()
        });
        let units = shape.planes() * 32;
        for i in range_stepped(UNIT_POS as usize, count * width, units) {
            let row = rows.start + i / width;
            let mut value = E::cast_from(0.0f32);
            if row < rows.end {
                value = src[rows.base + row * src.stride(2) + i % width];
            }
            self.elems[at + i] = value;
        }
    }

    /// Load the LSE and `D` of query rows `q_start..` of the context's head (`block_q` of them);
    /// rows past the sequence get LSE +∞, so every probability of theirs is 0.
    pub fn load_stats(
        &mut self,
        ops: &BackwardOperands<E>,
        ctx: &Ctx,
        q_start: usize,
        #[comptime] shape: BackwardShape,
    ) {
        let [_, _, lse_at, delta_at, _] = shape.f32_layout();
        let seq = ctx.site;
        let base = (seq.batch * ops.lse.shape(1) + seq.head) * ops.lse.shape(2) + seq.q_off;
        for r in range_stepped(
            UNIT_POS as usize,
            shape.config.block_q(),
            shape.planes() * 32,
        ) {
            let row = q_start + r;
            let mut lse = -ctx.masked();
            let mut delta = 0.0f32.runtime();
            if row < seq.seq_q {
                lse = ops.lse[base + row];
                delta = ops.delta[base + row];
            }
            self.f32s[lse_at + r] = lse;
            self.f32s[delta_at + r] = delta;
        }
    }

    /// This plane's two products against the streamed block, into its f32 tiles: the scores
    /// (resident rows · streamed rows over `head_dim`) and the probabilities' gradients (over
    /// `value_dim`): `Sᵀ`, `dPᵀ` in the dK/dV kernel, `S`, `dP` in the dQ kernel.
    pub fn products(&mut self, #[comptime] shape: BackwardShape) {
        let [x_at, x2_at, y_at, y2_at, _, _, _] = shape.elem_layout();
        let [s_at, dp_at, _, _, _] = shape.f32_layout();
        self.product(x_at, y_at, s_at, shape.config.head_dim(), shape);
        self.product(x2_at, y2_at, dp_at, shape.config.value_dim(), shape);
    }

    /// One plane's `16 × streamed` product of resident rows at `x_at` and streamed rows at
    /// `y_at` (both `width` wide, the streamed ones read transposed), into the f32 tile `to`.
    fn product(
        &mut self,
        #[comptime] x_at: usize,
        #[comptime] y_at: usize,
        #[comptime] to: usize,
        #[comptime] width: usize,
        #[comptime] shape: BackwardShape,
    ) {
        let stride = shape.f32_stride();
        let x_rows = x_at + self.plane * MMA * width;
        let out_rows = to + self.plane * MMA * stride;
        #[unroll]
        for nb in 0..shape.streamed() / MMA {
            let acc = cmma::Matrix::<f32>::from_value(
                cmma::MatrixIdent::Accumulator,
                MMA,
                MMA,
                MMA,
                cmma::MatrixLayout::Undefined,
                0.0,
            );
            for kb in 0..width / MMA {
                let a = operand::<E>(
                    &self.elems,
                    x_rows + kb * MMA,
                    width,
                    cmma::MatrixIdent::A,
                    cmma::MatrixLayout::RowMajor,
                );
                // The streamed rows as B, transposed: B[k][n] = Y[n][k], read column-major.
                let b = operand::<E>(
                    &self.elems,
                    y_at + nb * MMA * width + kb * MMA,
                    width,
                    cmma::MatrixIdent::B,
                    cmma::MatrixLayout::ColMajor,
                );
                cmma::execute(&a, &b, &acc, &acc);
            }
            store_accumulator(&mut self.f32s, &acc, out_rows + nb * MMA, stride);
        }
    }

    /// Elementwise over this plane's tiles: each pair's probability recomputed as the forward
    /// computed it (`P = exp(s′ − LSE)`, 0 where masked or outside the sequences) and its score
    /// gradient `dS = P (dP − D) f′(s)`, both rounded to `E` for the products that follow.
    pub fn pair_grads<M: Hooks>(
        &mut self,
        ctx: &Ctx,
        meet: Meeting,
        inputs: &RunInputs,
        #[comptime] shape: BackwardShape,
    ) {
        let [_, _, _, _, p_at, ds_at, _] = shape.elem_layout();
        let [s_at, dp_at, lse_at, delta_at, _] = shape.f32_layout();
        let streamed = shape.streamed();
        let first = self.plane * MMA;
        for i in range_stepped(self.lane, MMA * streamed, 32) {
            let r = i / streamed;
            let c = i % streamed;
            // Resident row `first + r` against streamed row `c`: which is the query, which the key.
            let mut q_row = meet.q_start + c;
            let mut key = first + r;
            let mut stat = c;
            if comptime!(!shape.keys) {
                q_row = meet.q_start + first + r;
                key = c;
                stat = first + r;
            }
            let valid = key < meet.step.keys.len;
            let at = Pair {
                q: q_row as i32,
                k: (meet.step.keys.start + key) as i32,
            };
            let f32_at = (first + r) * shape.f32_stride() + c;
            let lse = self.f32s[lse_at + stat];
            let grad = recompute::<M>(self.f32s[s_at + f32_at], lse, at, meet.step, ctx, inputs);
            let p = select(valid, grad.p, 0.0f32);
            let ds = p * (self.f32s[dp_at + f32_at] - self.f32s[delta_at + stat]) * grad.slope;
            let elem_at = (first + r) * shape.elem_stride() + c;
            if comptime!(shape.keys) {
                self.elems[p_at + elem_at] = E::cast_from(p);
            }
            self.elems[ds_at + elem_at] = E::cast_from(ds);
        }
    }

    /// `acc += T · Y`: this plane's `16 × streamed` tile `T` at `t_at` (`P` or `dS`) times the
    /// streamed rows at `y_at` (`width` wide), on tensor cores.
    pub fn accumulate(
        &self,
        acc: &Fragments,
        #[comptime] t_at: usize,
        #[comptime] y_at: usize,
        #[comptime] width: usize,
        #[comptime] shape: BackwardShape,
    ) {
        let stride = shape.elem_stride();
        let t_rows = t_at + self.plane * MMA * stride;
        #[unroll]
        for db in 0..width / MMA {
            let fragment = acc.index(db);
            for kb in 0..shape.streamed() / MMA {
                let a = operand::<E>(
                    &self.elems,
                    t_rows + kb * MMA,
                    stride,
                    cmma::MatrixIdent::A,
                    cmma::MatrixLayout::RowMajor,
                );
                let b = operand::<E>(
                    &self.elems,
                    y_at + kb * MMA * width + db * MMA,
                    width,
                    cmma::MatrixIdent::B,
                    cmma::MatrixLayout::RowMajor,
                );
                cmma::execute(&a, &b, fragment, fragment);
            }
        }
    }

    /// Write this plane's accumulated rows (`width` wide) times `factor` into the contiguous
    /// gradient `dst` at `rows`, a fragment at a time through the plane's f32 score tile.
    pub fn write(
        &mut self,
        acc: &Fragments,
        dst: &mut Tensor<E>,
        rows: Rows,
        factor: f32,
        #[comptime] shape: BackwardShape,
    ) {
        let width = dst.shape(3);
        let stride = shape.f32_stride();
        let tile = self.plane * MMA * stride;
        let first = rows.start + self.plane * MMA;
        #[unroll]
        for db in 0..acc.len() {
            store_accumulator(&mut self.f32s, acc.index(db), tile, stride);
            sync_plane();
            for i in range_stepped(self.lane, MMA * MMA, 32) {
                let row = first + i / MMA;
                if row < rows.end {
                    let value = self.f32s[tile + (i / MMA) * stride + i % MMA] * factor;
                    dst[rows.base + row * width + db * MMA + i % MMA] = E::cast_from(value);
                }
            }
            sync_plane();
        }
    }
}

/// Zero f32 fragments for `width` columns.
#[cube]
fn zero_fragments(#[comptime] width: usize) -> Fragments {
    let mut acc = Fragments::new();
    #[unroll]
    for _ in 0..width / MMA {
        acc.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            MMA,
            MMA,
            MMA,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    acc
}

/// The rows of `t` (`[B, H, N, ·]`) of the context's sequence in head `head`, block from `start`.
#[cube]
fn rows_of<E: Float>(t: &Tensor<E>, ctx: &Ctx, head: usize, start: usize, end: usize) -> Rows {
    Rows {
        base: ctx.site.batch * t.stride(0) + head * t.stride(1),
        start,
        end,
    }
}

/// dK and dV on tensor cores: one cube per block of `block_kv` keys of one K/V head, one plane
/// per 16 keys; the head's query group streamed past them `block_q` rows at a time.
#[cube(launch, address_type = "dynamic")]
pub fn backward_dkdv_tc<E: Float, M: Hooks>(
    ops: &BackwardOperands<E>,
    grads: &mut KvGrads<E>,
    inputs: &RunInputs,
    args: Args,
    #[comptime] shape: BackwardShape,
) {
    let config = comptime!(shape.config);
    let block_kv = config.block_kv();
    let block_q = config.block_q();
    let [_, _, q_at, do_at, p_at, ds_at, _] = shape.elem_layout();
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
        let seq = ctx.site;
        let remaining = seq.seq_k - key_start;
        let keys = StepKeys {
            start: key_start,
            len: select(remaining < block_kv, remaining, block_kv),
        };
        let key_end = seq.k_off + key_start + keys.len;
        let mut tiles = BackTiles::<E>::new(shape);
        let k_rows = rows_of::<E>(&ops.k, &ctx, seq.kv_head, seq.k_off + key_start, key_end);
        let v_rows = rows_of::<E>(&ops.v, &ctx, seq.kv_head, seq.k_off + key_start, key_end);
        tiles.load(&ops.k, k_rows, RESIDENT, shape);
        tiles.load(&ops.v, v_rows, RESIDENT_VALUES, shape);
        let dk = zero_fragments(config.head_dim());
        let dv = zero_fragments(config.value_dim());
        for g in 0..args.group as usize {
            let head_ctx = head_context(&ctx, seq.head + g, inputs);
            let q_end = seq.q_off + seq.seq_q;
            let blocks = (seq.seq_q + block_q - 1) / block_q;
            for qb in 0..blocks {
                let q_start = qb * block_q;
                let step = query_block_step::<M>(&head_ctx, keys, q_start, block_q, inputs);
                if step.class != TILE_EMPTY {
                    sync_cube();
                    let head = seq.head + g;
                    let q_rows = rows_of::<E>(&ops.q, &ctx, head, seq.q_off + q_start, q_end);
                    let o_rows = rows_of::<E>(&ops.d_out, &ctx, head, seq.q_off + q_start, q_end);
                    tiles.load(&ops.q, q_rows, STREAMED, shape);
                    tiles.load(&ops.d_out, o_rows, STREAMED_VALUES, shape);
                    tiles.load_stats(ops, &head_ctx, q_start, shape);
                    sync_cube();
                    tiles.products(shape);
                    sync_plane();
                    let meet = Meeting { q_start, step };
                    tiles.pair_grads::<M>(&head_ctx, meet, inputs, shape);
                    sync_plane();
                    tiles.accumulate(&dv, p_at, do_at, config.value_dim(), shape);
                    tiles.accumulate(&dk, ds_at, q_at, config.head_dim(), shape);
                }
            }
        }
        sync_cube();
        let dk_rows = rows_of::<E>(&grads.dk, &ctx, seq.kv_head, seq.k_off + key_start, key_end);
        let dv_rows = rows_of::<E>(&grads.dv, &ctx, seq.kv_head, seq.k_off + key_start, key_end);
        tiles.write(&dk, &mut grads.dk, dk_rows, ctx.args.scale, shape);
        tiles.write(&dv, &mut grads.dv, dv_rows, 1.0f32, shape);
    }
}

/// dQ on tensor cores: one cube per block of `block_q` query rows of one head, one plane per 16
/// rows; K and V streamed over the forward's walk.
#[cube(launch, address_type = "dynamic")]
pub fn backward_dq_tc<E: Float, M: Hooks>(
    ops: &BackwardOperands<E>,
    dq: &mut Tensor<E>,
    inputs: &RunInputs,
    args: Args,
    #[comptime] shape: BackwardShape,
) {
    let config = comptime!(shape.config);
    let block_q = config.block_q();
    let block_kv = config.block_kv();
    let [_, _, k_at, _, _, ds_at, _] = shape.elem_layout();
    let at = Lengths {
        sequence: CUBE_POS_Z as usize,
        head: CUBE_POS_Y as usize,
        q_total: ops.q.shape(2),
        k_total: ops.k.shape(2),
    };
    let ctx = Ctx::locate(at, inputs, args, config.mask, config.score);
    let q_start = CUBE_POS_X as usize * block_q;
    if q_start < ctx.site.seq_q {
        let seq = ctx.site;
        let q_end = seq.q_off + seq.seq_q;
        let k_end = seq.k_off + seq.seq_k;
        let mut tiles = BackTiles::<E>::new(shape);
        let q_rows = rows_of::<E>(&ops.q, &ctx, seq.head, seq.q_off + q_start, q_end);
        let o_rows = rows_of::<E>(&ops.d_out, &ctx, seq.head, seq.q_off + q_start, q_end);
        tiles.load(&ops.q, q_rows, RESIDENT, shape);
        tiles.load(&ops.d_out, o_rows, RESIDENT_VALUES, shape);
        tiles.load_stats(ops, &ctx, q_start, shape);
        let acc = zero_fragments(config.head_dim());
        let walk = BlockWalk::new(&ctx, q_start, block_q, block_kv);
        for index in walk.first_step..walk.end_step {
            let keys = walk.keys(index, block_kv);
            let step = Step {
                keys,
                class: mask::classify::<M>(&ctx, walk, keys, inputs),
            };
            if step.class != TILE_EMPTY {
                sync_cube();
                let first = seq.k_off + keys.start;
                let k_rows = rows_of::<E>(&ops.k, &ctx, seq.kv_head, first, k_end);
                let v_rows = rows_of::<E>(&ops.v, &ctx, seq.kv_head, first, k_end);
                tiles.load(&ops.k, k_rows, STREAMED, shape);
                tiles.load(&ops.v, v_rows, STREAMED_VALUES, shape);
                sync_cube();
                tiles.products(shape);
                sync_plane();
                let meet = Meeting { q_start, step };
                tiles.pair_grads::<M>(&ctx, meet, inputs, shape);
                sync_plane();
                tiles.accumulate(&acc, ds_at, k_at, config.head_dim(), shape);
            }
        }
        sync_cube();
        tiles.write(&acc, dq, q_rows, ctx.args.scale, shape);
    }
}
