//! The prefill kernel on tensor cores (16×16×16 cooperative matrix
//! instructions), for devices that have them (NVIDIA: WMMA/`mma.sync` through cubecl's `cmma`).
//!
//! One cube per (query block, query head, batch), `block_q / 16` planes (warps) of 32 units; each
//! plane owns 16 query rows. Per K/V step of `block_kv` keys the cube stages K and V in shared
//! memory (element type `E`); each plane computes its 16×`block_kv` scores on tensor cores into an
//! f32 scratch tile, its 32 units run the online softmax (two per row, each over half the keys,
//! their max and sum combined with a plane shuffle; f32; probabilities written back in `E`), the
//! plane adds P·V on tensor cores into its f32 output accumulator, which stays in registers as
//! tensor-core fragments for the whole walk (rescaled through shared memory only on the steps
//! where some row's running max moved). One normalisation at the end; O and the LSE written out.
//! The N×N score matrix never exists: only a `block_q × block_kv` tile of it, per step.
//!
//! Mask tiles are classified as in the other families ([`crate::kernels::common::mask`]): keys outside
//! the block's visible range are never loaded, empty steps are skipped, full steps skip mask
//! arithmetic.
//!
//! Synchronous loads, 16×16×16 instructions and a scalar softmax over a shared-memory score tile:
//! on Hopper the warpgroup kernel ([`super::warpgroup`]) replaces it where it runs; this
//! one serves other tensor-core GPUs, head dim 256, and strides the copy engine cannot describe.

// `#[cube]` code: `div_ceil` has no GPU expansion, and a comptime `if` around a run-time one must
// stay separate (the outer branch disappears at expansion, the inner one is kept).
#![allow(clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use super::config::{PrefillConfig, MMA};
use crate::hooks::{Hooks, TILE_EMPTY};
use crate::kernels::common::softmax::{larger, probability};
use crate::kernels::common::{
    mask, score, Args, BlockWalk, Ctx, Lengths, Operands, Outputs, RowState, RunInputs, Step,
    StepKeys,
};

/// A plane's output accumulator: one 16 × 16 f32 tensor-core fragment per 16 columns of V.
type Fragments = cubecl::prelude::Sequence<cmma::Matrix<f32>>;

/// The fused forward pass on tensor cores: O = softmax(mod(scale · Q Kᵀ) + mask) V, and LSE.
#[cube(launch, address_type = "dynamic")]
pub fn prefill_forward_tc<E: Float, M: Hooks>(
    ops: &Operands<E>,
    outputs: &mut Outputs<E>,
    inputs: &RunInputs,
    args: Args,
    #[comptime] config: PrefillConfig,
) {
    let block_q = config.block_q();
    let block_kv = config.block_kv();
    let [_, _, _, moved_at, _] = config.f32_layout();
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
        let mut lane = LaneRow::new(&ctx, q_start);
        let mut tiles = Tiles::<E>::new(config);
        tiles.load_q(&ops.q, &ctx, q_start, config);
        // The output accumulator stays in registers (tensor-core fragments) for the whole walk.
        let mut acc = new_accumulator(config);

        let walk = BlockWalk::new(&ctx, q_start, block_q, block_kv);
        for index in walk.first_step..walk.end_step {
            let keys = walk.keys(index, block_kv);
            let step = Step {
                keys,
                class: mask::classify::<M>(&ctx, walk, keys, inputs),
            };
            if step.class != TILE_EMPTY {
                sync_cube();
                tiles.load_tile(&ops.k, &ctx, keys, false, config);
                tiles.load_tile(&ops.v, &ctx, keys, true, config);
                sync_cube();

                tiles.scores(lane.plane, config);
                if lane.lane == 0 {
                    tiles.f32s[moved_at + lane.plane] = 0.0f32;
                }
                sync_cube();

                tiles.online_softmax::<M>(&mut lane, &ctx, step, inputs, config);
                sync_cube();

                // Rescaling the accumulator is only needed when some row's running max moved;
                // after the first steps that is rare, and the flag is uniform across the plane.
                if tiles.f32s[moved_at + lane.plane] != 0.0f32 {
                    tiles.rescale(&mut acc, &lane, config);
                }
                sync_cube();
                tiles.accumulate_pv(&acc, lane.plane, config);
            }
        }
        tiles.store_output(&acc, lane.plane, config);
        sync_cube();

        if lane.row < ctx.site.seq_q {
            lane.write::<E>(outputs, &tiles, &ctx, inputs, config);
        }
    }
}

/// A unit's place in the cube and the query row it shares with one other lane: units 0..16 of
/// each plane own one row each, units 16..32 the same rows again (lanes `l` and `l + 16`), each
/// taking half of a step's keys in the softmax and half of the row's columns in the finish.
#[derive(CubeType)]
pub struct LaneRow {
    /// Lane in the plane.
    lane: usize,
    /// Plane in the cube: 16 query rows each.
    plane: usize,
    /// The row's index in the block.
    row_in_block: usize,
    /// Which half of the keys and columns (0 or 1).
    half: usize,
    /// The row's sequence position.
    row: usize,
    /// The row's online-softmax state (equal in both lanes).
    state: RowState,
}

#[cube]
impl LaneRow {
    /// This unit's row of the block starting at `q_start`.
    pub fn new(ctx: &Ctx, q_start: usize) -> LaneRow {
        let lane = UNIT_POS_X as usize;
        let plane = UNIT_POS_Y as usize;
        let row_in_block = plane * MMA + lane % MMA;
        LaneRow {
            lane,
            plane,
            row_in_block,
            half: lane / MMA,
            row: q_start + row_in_block,
            state: RowState::new(ctx),
        }
    }

    /// Finish: fold the sink in, normalise the row once and write O (each of the row's two lanes
    /// half of its columns) and the LSE (O = 0, LSE = −∞ for a row that saw no key and has no
    /// sink).
    pub fn write<E: Float>(
        &mut self,
        outputs: &mut Outputs<E>,
        tiles: &Tiles<E>,
        ctx: &Ctx,
        inputs: &RunInputs,
        #[comptime] config: PrefillConfig,
    ) {
        let factor = self.state.fold_sink(ctx, inputs);
        let seq = ctx.site;
        let value_dim = config.value_dim();
        let half_dim = value_dim / 2;
        let [_, o_at, _, _, _] = config.f32_layout();
        let out_row = seq.q_off + self.row;
        let base = seq.batch * outputs.o.stride(0)
            + seq.head * outputs.o.stride(1)
            + out_row * outputs.o.stride(2);
        let inv = self.state.normaliser(factor);
        let o_row = o_at + self.row_in_block * value_dim;
        for cc in 0..half_dim {
            let c = self.half * half_dim + cc;
            outputs.o[base + c] = E::cast_from(tiles.f32s[o_row + c] * inv);
        }
        if self.half == 0 {
            let lse_index = seq.batch * outputs.lse.stride(0)
                + seq.head * outputs.lse.stride(1)
                + out_row * outputs.lse.stride(2);
            outputs.lse[lse_index] = self.state.lse(ctx);
        }
    }
}

/// The cube's shared memory: Q, K, V and P tiles in `E` ([`PrefillConfig::elem_layout`]), and
/// the f32 scores, output staging, row corrections and flags ([`PrefillConfig::f32_layout`]).
#[derive(CubeType)]
pub struct Tiles<E: Float> {
    /// The `E` tiles.
    elems: Shared<[E]>,
    /// The f32 tiles.
    f32s: Shared<[f32]>,
}

#[cube]
impl<E: Float> Tiles<E> {
    /// The cube's tiles.
    pub fn new(#[comptime] config: PrefillConfig) -> Tiles<E> {
        let [_, _, _, _, elem_len] = config.elem_layout();
        let [_, _, _, _, f32_len] = config.f32_layout();
        Tiles::<E> {
            elems: Shared::<[E]>::new_slice(elem_len),
            f32s: Shared::<[f32]>::new_slice(f32_len),
        }
    }

    /// Load Q: the cube's `block_q × head_dim` rows; rows past the sequence are 0.
    pub fn load_q(
        &mut self,
        q: &Tensor<E>,
        ctx: &Ctx,
        q_start: usize,
        #[comptime] config: PrefillConfig,
    ) {
        let seq = ctx.site;
        let head_dim = config.head_dim();
        let tile_len = config.block_q() * head_dim;
        let units = config.planes() * 32;
        let base = seq.batch * q.stride(0) + seq.head * q.stride(1);
        for i in range_stepped(UNIT_POS as usize, tile_len, units) {
            let row = q_start + i / head_dim;
            let mut value = E::cast_from(0.0f32);
            if row < seq.seq_q {
                value = q[base + (seq.q_off + row) * q.stride(2) + i % head_dim];
            }
            self.elems[i] = value;
        }
    }

    /// Load K (`value` false) or V: the step's `block_kv × width` tile; keys past the step are
    /// 0, so the tensor cores can always run whole 16-key blocks.
    pub fn load_tile(
        &mut self,
        src: &Tensor<E>,
        ctx: &Ctx,
        keys: StepKeys,
        #[comptime] value: bool,
        #[comptime] config: PrefillConfig,
    ) {
        let [_, k_at, v_at, _, _] = config.elem_layout();
        let width = comptime!(if value {
            config.value_dim()
        } else {
            config.head_dim()
        });
        let offset = comptime!(if value { v_at } else { k_at });
        let seq = ctx.site;
        let tile_len = config.block_kv() * width;
        let units = config.planes() * 32;
        let base =
            seq.batch * src.stride(0) + seq.kv_head * src.stride(1) + seq.k_off * src.stride(2);
        for i in range_stepped(UNIT_POS as usize, tile_len, units) {
            let key = i / width;
            let mut value = E::cast_from(0.0f32);
            if key < keys.len {
                value = src[base + (keys.start + key) * src.stride(2) + i % width];
            }
            self.elems[offset + i] = value;
        }
    }

    /// Scores: this plane's 16 × `block_kv` logits `Q Kᵀ` on tensor cores, into the f32 scratch
    /// tile.
    pub fn scores(&mut self, plane: usize, #[comptime] config: PrefillConfig) {
        let head_dim = config.head_dim();
        let block_kv = config.block_kv();
        let [q_at, k_at, _, _, _] = config.elem_layout();
        let [s_at, _, _, _, _] = config.f32_layout();
        let score_stride = config.score_stride();
        let q_rows = q_at + plane * MMA * head_dim;
        let s_rows = s_at + plane * MMA * score_stride;
        for nb in 0..block_kv / MMA {
            let acc = cmma::Matrix::<f32>::from_value(
                cmma::MatrixIdent::Accumulator,
                MMA,
                MMA,
                MMA,
                cmma::MatrixLayout::Undefined,
                0.0,
            );
            for kb in 0..head_dim / MMA {
                let a = operand::<E>(
                    &self.elems,
                    q_rows + kb * MMA,
                    head_dim,
                    cmma::MatrixIdent::A,
                    cmma::MatrixLayout::RowMajor,
                );
                // Kᵀ as B: B[k][n] = K[n][k], i.e. K read column-major.
                let b_at = k_at + nb * MMA * head_dim + kb * MMA;
                let b = operand::<E>(
                    &self.elems,
                    b_at,
                    head_dim,
                    cmma::MatrixIdent::B,
                    cmma::MatrixLayout::ColMajor,
                );
                cmma::execute(&a, &b, &acc, &acc);
            }
            store_accumulator(&mut self.f32s, &acc, s_rows + nb * MMA, score_stride);
        }
    }

    /// Online softmax of one row, by the two lanes that share it: each scales, modifies and
    /// masks half of the step's keys; the halves' max and sum meet through one plane shuffle
    /// each, so both lanes hold the same running state. Writes the probabilities (in `E`, 0 for
    /// masked and missing keys) and the accumulator's correction factor.
    pub fn online_softmax<M: Hooks>(
        &mut self,
        lane: &mut LaneRow,
        ctx: &Ctx,
        step: Step,
        inputs: &RunInputs,
        #[comptime] config: PrefillConfig,
    ) {
        let keys = step.keys;
        let half_len = config.block_kv() / 2;
        let [_, _, _, p_at, _] = config.elem_layout();
        let [s_at, _, corr_at, moved_at, _] = config.f32_layout();
        let s_row = s_at + lane.row_in_block * config.score_stride();
        let p_row = p_at + lane.row_in_block * config.prob_stride();
        let first = lane.half * half_len;

        let mut step_max = ctx.masked();
        for jj in 0..half_len {
            let j = first + jj;
            if j < keys.len {
                let key = (keys.start + j) as i32;
                let mut s = self.f32s[s_row + j] * ctx.args.scale;
                if comptime!(config.score.modifies_scores()) {
                    s = score::modify::<M>(s, ctx, lane.row as i32, key, inputs);
                }
                if comptime!(!config.mask.is_none()) {
                    if step.partial() && !mask::visible::<M>(ctx, lane.row as i32, key, inputs) {
                        s = ctx.masked();
                    }
                }
                self.f32s[s_row + j] = s;
                step_max = larger(s, step_max);
            }
        }
        step_max = larger(plane_shuffle_xor(step_max, MMA as u32), step_max);
        let new_max = lane.state.new_max(step_max);
        let mut part = 0.0f32.runtime();
        for jj in 0..half_len {
            let j = first + jj;
            let mut p = 0.0f32.runtime();
            if j < keys.len {
                p = probability(self.f32s[s_row + j], new_max, ctx);
            }
            part += p;
            self.elems[p_row + j] = E::cast_from(p);
        }
        // `a + b` in one lane and `b + a` in the other: the same float, so the states stay equal.
        let total = part + plane_shuffle_xor(part, MMA as u32);
        let correction = lane.state.advance(new_max, total, ctx);
        if lane.half == 0 {
            self.f32s[corr_at + lane.row_in_block] = correction;
            if correction != 1.0f32 {
                self.f32s[moved_at + lane.row_in_block / MMA] = 1.0f32;
            }
        }
    }

    /// Rescale this plane's 16 rows of the output accumulator by their rows' correction factors:
    /// each fragment goes through the plane's rows of the score tile (free at this point of the
    /// step).
    pub fn rescale(
        &mut self,
        acc: &mut Fragments,
        lane: &LaneRow,
        #[comptime] config: PrefillConfig,
    ) {
        let [s_at, _, corr_at, _, _] = config.f32_layout();
        let stride = config.score_stride();
        let rows = s_at + lane.plane * MMA * stride;
        #[unroll]
        for db in 0..config.value_dim() / MMA {
            cmma::store(
                &mut self.f32s[rows..rows + MMA * stride],
                acc.index(db),
                stride as u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_plane();
            for i in range_stepped(lane.lane, MMA * MMA, 32) {
                let r = i / MMA;
                let at = rows + r * stride + i % MMA;
                self.f32s[at] *= self.f32s[corr_at + lane.plane * MMA + r];
            }
            sync_plane();
            cmma::load_with_layout(
                acc.index_mut(db),
                &self.f32s[rows..rows + MMA * stride],
                stride as u32,
                cmma::MatrixLayout::RowMajor,
            );
            sync_plane();
        }
    }

    /// P·V: add this plane's 16 × `value_dim` product of probabilities and the V tile into the
    /// output accumulator's fragments, on tensor cores.
    pub fn accumulate_pv(&self, acc: &Fragments, plane: usize, #[comptime] config: PrefillConfig) {
        let value_dim = config.value_dim();
        let block_kv = config.block_kv();
        let [_, _, v_at, p_at, _] = config.elem_layout();
        let prob_stride = config.prob_stride();
        let p_rows = p_at + plane * MMA * prob_stride;
        #[unroll]
        for db in 0..value_dim / MMA {
            let fragment = acc.index(db);
            for kb in 0..block_kv / MMA {
                let a = operand::<E>(
                    &self.elems,
                    p_rows + kb * MMA,
                    prob_stride,
                    cmma::MatrixIdent::A,
                    cmma::MatrixLayout::RowMajor,
                );
                let b_at = v_at + kb * MMA * value_dim + db * MMA;
                let b = operand::<E>(
                    &self.elems,
                    b_at,
                    value_dim,
                    cmma::MatrixIdent::B,
                    cmma::MatrixLayout::RowMajor,
                );
                cmma::execute(&a, &b, fragment, fragment);
            }
        }
    }

    /// The finished accumulator into the plane's rows of the f32 output tile, for the finish.
    pub fn store_output(
        &mut self,
        acc: &Fragments,
        plane: usize,
        #[comptime] config: PrefillConfig,
    ) {
        let value_dim = config.value_dim();
        let [_, o_at, _, _, _] = config.f32_layout();
        let o_rows = o_at + plane * MMA * value_dim;
        #[unroll]
        for db in 0..value_dim / MMA {
            store_accumulator(&mut self.f32s, acc.index(db), o_rows + db * MMA, value_dim);
        }
    }
}

/// A zero output accumulator: `value_dim / 16` tensor-core fragments holding this plane's 16 rows.
#[cube]
fn new_accumulator(#[comptime] config: PrefillConfig) -> Fragments {
    let mut acc = Fragments::new();
    #[unroll]
    for _ in 0..config.value_dim() / MMA {
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

/// A 16×16 operand of a tensor-core product, read from shared memory at `at`, `stride` elements
/// between consecutive rows (row-major) or columns (column-major).
#[cube]
pub(crate) fn operand<E: Float>(
    tile: &Shared<[E]>,
    at: usize,
    #[comptime] stride: usize,
    #[comptime] ident: cmma::MatrixIdent,
    layout: cmma::MatrixLayout,
) -> cmma::Matrix<E> {
    cmma::Matrix::<E>::from_slice(
        ident,
        MMA,
        MMA,
        MMA,
        layout,
        &tile[at..at + MMA * stride],
        stride as u32,
    )
}

/// Writes a 16×16 f32 accumulator to shared memory at `at`, rows `stride` floats apart.
#[cube]
pub(crate) fn store_accumulator(
    floats: &mut Shared<[f32]>,
    acc: &cmma::Matrix<f32>,
    at: usize,
    #[comptime] stride: usize,
) {
    cmma::store(
        &mut floats[at..at + MMA * stride],
        acc,
        stride as u32,
        cmma::MatrixLayout::RowMajor,
    );
}
