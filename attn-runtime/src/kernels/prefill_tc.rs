//! The fused FlashAttention-2 style forward kernel on tensor cores (16×16×16 cooperative matrix
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
//! Mask tiles are classified as in the portable kernel ([`crate::kernels::mask`]): keys outside
//! the block's visible range are never loaded, empty steps are skipped, full steps skip mask
//! arithmetic.
//!
//! Synchronous loads, 16×16×16 instructions and a scalar softmax over a shared-memory score tile:
//! on Hopper the warpgroup kernel ([`crate::kernels::prefill_wg`]) replaces it where it runs; this
//! one serves other tensor-core GPUs, head dim 256, and strides the copy engine cannot describe.

// `#[cube]` code: `div_ceil` has no GPU expansion, and a comptime `if` around a run-time one must
// stay separate (the outer branch disappears at expansion, the inner one is kept).
#![allow(clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::*;

use crate::hooks::{Hooks, TILE_EMPTY, TILE_PARTIAL};
use crate::kernels::mask::{
    block_walk, classify_step, finish_state, key_visible, locate_sequence, modify_score, step_keys,
    SequenceSpan,
};
use crate::kernels::prefill::{PrefillArgs, PrefillConfig, RowState};

/// A plane's output accumulator: one 16 × 16 f32 tensor-core fragment per 16 columns of V.
type Fragments = cubecl::prelude::Sequence<cmma::Matrix<f32>>;

/// Rows, columns and depth of one tensor-core instruction.
pub const MMA: usize = 16;

/// The tensor-core kernel takes the same comptime configuration as the portable one; what only
/// it needs (planes, shared-memory layout) is derived here. Its tile constraints: `block_q` and
/// `block_kv` multiples of 16, `head_dim` a multiple of 16.
impl PrefillConfig {
    /// Planes per cube: one per 16 query rows.
    pub const fn planes(&self) -> usize {
        self.block_q() / MMA
    }

    /// Row stride of the f32 score tile: `block_kv` plus 4 floats of padding, so the 16 lanes
    /// that each read one row do not all land in the same shared-memory banks (a multiple of 4,
    /// as tensor-core stores require).
    pub const fn score_stride(&self) -> usize {
        self.block_kv() + 4
    }

    /// Row stride of the probability tile (`E`): `block_kv` plus 8 elements of padding, for the
    /// same reason (a multiple of 8, as 16-bit tensor-core loads require).
    pub const fn prob_stride(&self) -> usize {
        self.block_kv() + 8
    }

    /// Offsets in the `E` shared array: Q tile, K tile, V tile, P tile, and its length.
    pub const fn elem_layout(&self) -> [usize; 5] {
        let q = 0;
        let k = q + self.block_q() * self.head_dim();
        let v = k + self.block_kv() * self.head_dim();
        let p = v + self.block_kv() * self.value_dim();
        [q, k, v, p, p + self.block_q() * self.prob_stride()]
    }

    /// Offsets in the f32 shared array: scores, output accumulator, row corrections, per-plane
    /// "some row's max moved" flags, and the length.
    pub const fn f32_layout(&self) -> [usize; 5] {
        let s = 0;
        let o = s + self.block_q() * self.score_stride();
        let corr = o + self.block_q() * self.value_dim();
        let moved = corr + self.block_q();
        [s, o, corr, moved, moved + self.planes()]
    }

    /// Shared memory of one tensor-core cube, in bytes, for elements of `elem_bytes`.
    pub const fn tensor_core_shared_bytes(&self, elem_bytes: usize) -> usize {
        self.elem_layout()[4] * elem_bytes + self.f32_layout()[4] * 4
    }
}

/// The fused forward pass on tensor cores: O = softmax(mod(scale · Q Kᵀ) + mask) V, and LSE.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn prefill_forward_tc<E: Float, M: Hooks>(
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
    let [_, k_at, v_at, _, elem_len] = config.elem_layout();
    let [_, _, _, moved_at, f32_len] = config.f32_layout();

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
        let kv_head = head / args.group as usize;
        // Units 0..16 of each plane own one query row each for the softmax and the finish.
        let lane = UNIT_POS_X as usize;
        let plane = UNIT_POS_Y as usize;
        // Two lanes per query row (lanes l and l + 16): each takes half of a step's keys in the
        // softmax and half of the row's columns in the finish.
        let row_in_block = plane * MMA + lane % MMA;
        let half = lane / MMA;

        let mut elems = Shared::<[E]>::new_slice(elem_len);
        let mut floats_smem = Shared::<[f32]>::new_slice(f32_len);

        load_q_tile::<E>(q, &mut elems, seq, head, q_start, config);
        // The output accumulator stays in registers (tensor-core fragments) for the whole walk.
        let mut acc = new_accumulator(config);
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
                load_kv_tile_tc::<E>(
                    k,
                    &mut elems,
                    k_at,
                    seq,
                    kv_head,
                    kv_start,
                    kv_len,
                    config.head_dim(),
                    config,
                );
                load_kv_tile_tc::<E>(
                    v,
                    &mut elems,
                    v_at,
                    seq,
                    kv_head,
                    kv_start,
                    kv_len,
                    config.value_dim(),
                    config,
                );
                sync_cube();

                scores_tc::<E>(&elems, &mut floats_smem, plane, config);
                if lane == 0 {
                    floats_smem[moved_at + plane] = 0.0f32;
                }
                sync_cube();

                online_softmax_tc::<E, M>(
                    &mut floats_smem,
                    &mut elems,
                    &mut state,
                    seq,
                    head,
                    q_start + row_in_block,
                    row_in_block,
                    half,
                    kv_start,
                    kv_len,
                    class == TILE_PARTIAL,
                    ints,
                    floats,
                    args,
                    config,
                );
                sync_cube();

                // Rescaling the accumulator is only needed when some row's running max moved;
                // after the first steps that is rare, and the flag is uniform across the plane.
                if floats_smem[moved_at + plane] != 0.0f32 {
                    rescale_accumulator(&mut acc, &mut floats_smem, plane, lane, config);
                }
                sync_cube();
                accumulate_pv_tc::<E>(&elems, &acc, plane, config);
            }
        }
        store_output(&acc, &mut floats_smem, plane, config);
        sync_cube();

        let row = q_start + row_in_block;
        if row < seq.seq_q {
            let factor = finish_state(&mut state, head, floats, args, config.score);
            write_output_tc::<E>(
                out,
                lse,
                &floats_smem,
                state,
                factor,
                seq,
                head,
                row,
                row_in_block,
                half,
                args,
                config,
            );
        }
    }
}

/// Load Q: the cube's `block_q × head_dim` rows into shared memory; rows past the sequence are 0.
#[cube]
fn load_q_tile<E: Float>(
    q: &Tensor<E>,
    elems: &mut Shared<[E]>,
    seq: SequenceSpan,
    head: usize,
    q_start: usize,
    #[comptime] config: PrefillConfig,
) {
    let head_dim = config.head_dim();
    let tile_len = config.block_q() * head_dim;
    let units = config.planes() * 32;
    let base = seq.batch * q.stride(0) + head * q.stride(1);
    for i in range_stepped(UNIT_POS as usize, tile_len, units) {
        let row = q_start + i / head_dim;
        let mut value = E::cast_from(0.0f32);
        if row < seq.seq_q {
            value = q[base + (seq.q_off + row) * q.stride(2) + i % head_dim];
        }
        elems[i] = value;
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

/// Load K/V: one `block_kv × width` tile into shared memory at `offset`; keys past `kv_len` are
/// 0, so the tensor cores can always run whole 16-key blocks.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_kv_tile_tc<E: Float>(
    src: &Tensor<E>,
    elems: &mut Shared<[E]>,
    offset: usize,
    seq: SequenceSpan,
    kv_head: usize,
    kv_start: usize,
    kv_len: usize,
    #[comptime] width: usize,
    #[comptime] config: PrefillConfig,
) {
    let tile_len = config.block_kv() * width;
    let units = config.planes() * 32;
    let base = seq.batch * src.stride(0) + kv_head * src.stride(1) + seq.k_off * src.stride(2);
    for i in range_stepped(UNIT_POS as usize, tile_len, units) {
        let key = i / width;
        let mut value = E::cast_from(0.0f32);
        if key < kv_len {
            value = src[base + (kv_start + key) * src.stride(2) + i % width];
        }
        elems[offset + i] = value;
    }
}

/// Scores: this plane's 16 × `block_kv` logits `Q Kᵀ` on tensor cores, into the f32 scratch tile.
#[cube]
fn scores_tc<E: Float>(
    elems: &Shared<[E]>,
    floats: &mut Shared<[f32]>,
    plane: usize,
    #[comptime] config: PrefillConfig,
) {
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
                elems,
                q_rows + kb * MMA,
                head_dim,
                cmma::MatrixIdent::A,
                cmma::MatrixLayout::RowMajor,
            );
            // Kᵀ as B: B[k][n] = K[n][k], i.e. K read column-major.
            let b_at = k_at + nb * MMA * head_dim + kb * MMA;
            let b = operand::<E>(
                elems,
                b_at,
                head_dim,
                cmma::MatrixIdent::B,
                cmma::MatrixLayout::ColMajor,
            );
            cmma::execute(&a, &b, &acc, &acc);
        }
        store_accumulator(floats, &acc, s_rows + nb * MMA, score_stride);
    }
}

/// A 16×16 operand of a tensor-core product, read from shared memory at `at`, `stride` elements
/// between consecutive rows (row-major) or columns (column-major).
#[cube]
fn operand<E: Float>(
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
fn store_accumulator(
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

/// Online softmax of one row, by the two lanes that share it: each scales, modifies and masks
/// half of the step's keys; the halves' max and sum meet through one plane shuffle each, so both
/// lanes hold the same running state. Writes the probabilities (in `E`, 0 for masked and missing
/// keys) and the accumulator's correction factor.
#[cube]
#[allow(clippy::too_many_arguments)]
fn online_softmax_tc<E: Float, M: Hooks>(
    floats_smem: &mut Shared<[f32]>,
    elems: &mut Shared<[E]>,
    state: &mut RowState,
    seq: SequenceSpan,
    head: usize,
    row: usize,
    row_in_block: usize,
    half: usize,
    kv_start: usize,
    kv_len: usize,
    partial: bool,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    let half_len = config.block_kv() / 2;
    let [_, _, _, p_at, _] = config.elem_layout();
    let [s_at, _, corr_at, moved_at, _] = config.f32_layout();
    let s_row = s_at + row_in_block * config.score_stride();
    let p_row = p_at + row_in_block * config.prob_stride();
    let first = half * half_len;

    let mut step_max = (-1.0e30f32).runtime();
    for jj in 0..half_len {
        let j = first + jj;
        if j < kv_len {
            let mut s = floats_smem[s_row + j] * args.scale;
            if comptime!(config.score.modifies_scores()) {
                s = modify_score::<M>(
                    s,
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
            if comptime!(!config.mask.is_none()) {
                if partial
                    && !key_visible::<M>(
                        seq,
                        head,
                        row as i32,
                        (kv_start + j) as i32,
                        ints,
                        floats,
                        args,
                        config.mask,
                    )
                {
                    s = -1.0e30f32;
                }
            }
            floats_smem[s_row + j] = s;
            step_max = select(s > step_max, s, step_max);
        }
    }
    let other_max = plane_shuffle_xor(step_max, MMA as u32);
    step_max = select(other_max > step_max, other_max, step_max);
    let new_max = select(step_max > state.max, step_max, state.max);
    let correction = (state.max - new_max).exp();
    let mut part = 0.0f32.runtime();
    for jj in 0..half_len {
        let j = first + jj;
        let mut p = 0.0f32.runtime();
        if j < kv_len {
            let s = floats_smem[s_row + j];
            p = select(s > -5.0e29f32, (s - new_max).exp(), 0.0f32);
        }
        part += p;
        elems[p_row + j] = E::cast_from(p);
    }
    // `a + b` in one lane and `b + a` in the other: the same float, so the states stay equal.
    let total = part + plane_shuffle_xor(part, MMA as u32);
    if half == 0 {
        floats_smem[corr_at + row_in_block] = correction;
        if correction != 1.0f32 {
            floats_smem[moved_at + row_in_block / MMA] = 1.0f32;
        }
    }
    state.max = new_max;
    state.sum = state.sum * correction + total;
}

/// Rescale this plane's 16 rows of the output accumulator by their rows' correction factors: each
/// fragment goes through the plane's rows of the score tile (free at this point of the step).
#[cube]
fn rescale_accumulator(
    acc: &mut Fragments,
    floats: &mut Shared<[f32]>,
    plane: usize,
    lane: usize,
    #[comptime] config: PrefillConfig,
) {
    let [s_at, _, corr_at, _, _] = config.f32_layout();
    let stride = config.score_stride();
    let rows = s_at + plane * MMA * stride;
    #[unroll]
    for db in 0..config.value_dim() / MMA {
        cmma::store(
            &mut floats[rows..rows + MMA * stride],
            acc.index(db),
            stride as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
        for i in range_stepped(lane, MMA * MMA, 32) {
            let r = i / MMA;
            let at = rows + r * stride + i % MMA;
            floats[at] *= floats[corr_at + plane * MMA + r];
        }
        sync_plane();
        cmma::load_with_layout(
            acc.index_mut(db),
            &floats[rows..rows + MMA * stride],
            stride as u32,
            cmma::MatrixLayout::RowMajor,
        );
        sync_plane();
    }
}

/// P·V: add this plane's 16 × `value_dim` product of probabilities and the V tile into the
/// output accumulator's fragments, on tensor cores.
#[cube]
fn accumulate_pv_tc<E: Float>(
    elems: &Shared<[E]>,
    acc: &Fragments,
    plane: usize,
    #[comptime] config: PrefillConfig,
) {
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
                elems,
                p_rows + kb * MMA,
                prob_stride,
                cmma::MatrixIdent::A,
                cmma::MatrixLayout::RowMajor,
            );
            let b_at = v_at + kb * MMA * value_dim + db * MMA;
            let b = operand::<E>(
                elems,
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
#[cube]
fn store_output(
    acc: &Fragments,
    floats: &mut Shared<[f32]>,
    plane: usize,
    #[comptime] config: PrefillConfig,
) {
    let value_dim = config.value_dim();
    let [_, o_at, _, _, _] = config.f32_layout();
    let o_rows = o_at + plane * MMA * value_dim;
    #[unroll]
    for db in 0..value_dim / MMA {
        store_accumulator(floats, acc.index(db), o_rows + db * MMA, value_dim);
    }
}

/// Finish: normalise one row once and write O (each of the row's two lanes half of its columns)
/// and the LSE (O = 0, LSE = −∞ for a row that saw no key and has no sink).
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_output_tc<E: Float>(
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    floats: &Shared<[f32]>,
    state: RowState,
    factor: f32,
    seq: SequenceSpan,
    head: usize,
    row: usize,
    row_in_block: usize,
    half: usize,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    let value_dim = config.value_dim();
    let half_dim = value_dim / 2;
    let [_, o_at, _, _, _] = config.f32_layout();
    let out_row = seq.q_off + row;
    let base = seq.batch * out.stride(0) + head * out.stride(1) + out_row * out.stride(2);
    let seen = state.sum > 0.0;
    let inv = select(seen, factor / state.sum, 0.0f32);
    let o_row = o_at + row_in_block * value_dim;
    for cc in 0..half_dim {
        let c = half * half_dim + cc;
        out[base + c] = E::cast_from(floats[o_row + c] * inv);
    }
    if half == 0 {
        let lse_index = seq.batch * lse.stride(0) + head * lse.stride(1) + out_row * lse.stride(2);
        lse[lse_index] = select(seen, state.max + state.sum.ln(), args.neg_inf);
    }
}
