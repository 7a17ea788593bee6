//! The backward pass on Hopper's warpgroup tensor cores (wgmma), fed by the copy engine (TMA):
//! the tensor-core kernels' two-kernel shape ([`super::tensor_core`]) with every product a
//! warpgroup MMA reading 128-byte-swizzled tiles.
//!
//! Each cube keeps one side resident — 64 rows per warpgroup, loaded once — and streams the other
//! side's blocks through two shared-memory stages (the forward's [`Stages`]). Each stage is filled
//! two steps ahead of its use: the first two steps before the walk, then each stage again by
//! whichever plane is the last to release it ([`Refills`]), so no unit waits for the others to
//! free a stage and the copy of a step overlaps the whole step before it.
//!
//! - [`backward_dkdv_wg()`]: K and V resident (A of `Sᵀ = K Qᵀ` and `dPᵀ = V dOᵀ`), the query
//!   group's Q and dO streamed. `Pᵀ` and `dSᵀ` are formed on the accumulators' registers, which
//!   are also the A operands' layout, and `dV += Pᵀ dO`, `dK += dSᵀ Q` run from those registers
//!   against the same Q and dO stages read MN-major. dK and dV stay in registers for the whole
//!   walk; GQA's group is summed there.
//! - [`backward_dq_wg()`]: Q and dO resident, K and V streamed over the forward's walk; `S`,
//!   `dP`, then `dQ += dS K` with K's stage read MN-major.
//!
//! A tile written by the copy engine is read both ways: a `rows × width` tile in 64-column
//! panels is, byte for byte, the K-major tile of `rows × width` and the MN-major tile of `width`
//! rows by `rows` of K. Two kernels, no atomics: the same bits on every run.
//!
//! **dQ summed with atomics** (plans `…_atomic`, [`crate::backward::DqSum::Atomic`]): the dK/dV
//! kernel also forms dQ, so `S` and `dP` are computed once (five products per pair of blocks
//! instead of seven) and the dQ kernel does not run. Each warpgroup stages its `dSᵀ` in shared
//! memory and computes `dQᵀ = Kᵀ dSᵀ` over its own 64 keys (K read MN-major as the A operand),
//! then adds the tile into f32 sums in global memory with atomics; a last pass scales and rounds
//! them into dQ. The order of the additions varies from run to run, so the low bits of dQ do.

// `#[cube]` code: `div_ceil` has no GPU expansion, and a comptime `if` around a run-time one must
// stay separate.
#![allow(clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;
use cubecl::wgmma::{Accumulator, Fragment, Major, MatrixDescriptor, Swizzle, WgmmaTileLayout};

use super::{
    head_context, query_block_step, recompute, BackwardShape, KvGrads, LearnedSums, Meeting, Pair,
    QueryGrads, MIN_SPLIT_STEPS,
};
use crate::hooks::{Hooks, TILE_EMPTY};
use crate::kernels::common::walk::query_range;
use crate::kernels::common::{
    live_steps, mask, next_live, Args, BlockWalk, ClassifiedWalk, ClassifiedWalkExpand, Ctx,
    KeySteps, Lengths, RunInputs, Step, StepKeys,
};
use crate::kernels::prefill::config::{STAGES, WARPGROUP_ROWS, WARPGROUP_UNITS};
use crate::kernels::prefill::warpgroup::pipeline::{
    load_rows, opaque, sync_warpgroup, RowBox, Stages, TmaOrigin,
};
use crate::kernels::prefill::warpgroup::softmax::{exp2_approx, register_col, register_row, MMA_K};

/// `log2(e)`: probabilities are recomputed in base 2.
const LOG2_E: f32 = core::f32::consts::LOG2_E;
/// `ln(2)`: back from base 2.
const LN_2: f32 = core::f32::consts::LN_2;

/// Q, K, V and dO described to the copy engine (boxes of the resident or streamed rows by 64
/// columns, 128-byte swizzled), and the forward's per-row statistics.
#[derive(CubeType, CubeLaunch)]
pub struct BackwardMaps<E: Float> {
    /// Q, `[B, Hq, Nq, D]`.
    pub q: TensorMap<E, Tiled>,
    /// K, `[B, Hkv, Nk, D]`.
    pub k: TensorMap<E, Tiled>,
    /// V, `[B, Hkv, Nk, Dv]`.
    pub v: TensorMap<E, Tiled>,
    /// dO, `[B, Hq, Nq, Dv]`.
    pub d_out: TensorMap<E, Tiled>,
    /// The forward's LSE, `[B, Hq, Nq]`.
    pub lse: OwnedTensor<f32>,
    /// `D = rowsum(dO ∘ O)`, `[B, Hq, Nq]`.
    pub delta: OwnedTensor<f32>,
}

/// The warpgroup kernels' tiles.
impl BackwardShape {
    /// Warpgroups per cube.
    pub const fn warpgroups(&self) -> usize {
        self.resident() / WARPGROUP_ROWS
    }

    /// The resident tile of `width` columns, K-major (the A operand of both products).
    pub const fn resident_tile(&self, width: usize) -> WgmmaTileLayout {
        WgmmaTileLayout {
            major: Major::K,
            swizzle: Swizzle::B128,
            rows: self.resident(),
            k: width,
        }
    }

    /// Both stages of a streamed operand of `width` columns read K-major: the B operand of a
    /// product over `width` (stage `s` is rows `s · streamed..`).
    pub const fn stage_tile(&self, width: usize) -> WgmmaTileLayout {
        WgmmaTileLayout {
            major: Major::K,
            swizzle: Swizzle::B128,
            rows: STAGES * self.streamed(),
            k: width,
        }
    }

    /// The same stages read MN-major: the B operand of a product over the streamed rows, `width`
    /// columns wide.
    pub const fn stage_tile_mn(&self, width: usize) -> WgmmaTileLayout {
        WgmmaTileLayout {
            major: Major::MN,
            swizzle: Swizzle::B128,
            rows: width,
            k: STAGES * self.streamed(),
        }
    }

    /// The dK/dV kernel's staged `dSᵀ` when it also sums dQ: per warpgroup, the step's query
    /// rows by its 64 keys, K-major (the B operand of `dQᵀ = Kᵀ dSᵀ`); 8 rows, unused, when it
    /// does not.
    pub const fn ds_tile(&self) -> WgmmaTileLayout {
        WgmmaTileLayout {
            major: Major::K,
            swizzle: Swizzle::B128,
            rows: if self.atomic_dq {
                self.warpgroups() * self.streamed()
            } else {
                8
            },
            k: WARPGROUP_ROWS,
        }
    }

    /// Shared memory of one cube, in bytes, for 16-bit elements (barriers and alignment
    /// included).
    pub const fn warpgroup_bytes(&self) -> usize {
        let width = self.config.head_dim() + self.config.value_dim();
        let ds = self.ds_tile().rows * WARPGROUP_ROWS * 2;
        (self.resident() + STAGES * self.streamed()) * width * 2 + ds + 3 * 1024
    }
}

/// One unit's place in its warpgroup's accumulators: each plane holds 16 rows, a unit two of
/// them (`row0`, `row0 + 8`) and a pair of columns in every 8.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Place {
    /// The unit's warpgroup.
    pub warpgroup: usize,
    /// Its first row in the warpgroup's 64.
    pub row0: usize,
    /// Its first column in each group of 8.
    pub col0: usize,
}

#[cube]
impl Place {
    /// This unit's place.
    pub fn of_unit() -> Place {
        let unit = UNIT_POS as usize % WARPGROUP_UNITS;
        Place {
            warpgroup: UNIT_POS as usize / WARPGROUP_UNITS,
            row0: (unit / 32) * 16 + (unit % 32) / 4,
            col0: (unit % 4) * 2,
        }
    }

    /// The resident row (in the cube's block) of accumulator register `nth`.
    pub fn row(&self, nth: usize) -> usize {
        self.warpgroup * WARPGROUP_ROWS + self.row0 + register_row(nth) * 8
    }

    /// The column of accumulator register `nth`.
    pub fn col(&self, nth: usize) -> usize {
        self.col0 + register_col(nth)
    }
}

/// The two products of a step, on the accumulators' registers: the scores and the
/// probabilities' gradients (transposed in the dK/dV kernel).
#[derive(CubeType)]
pub struct Products {
    /// `S` (or `Sᵀ`), raw `q·k`.
    pub s: Accumulator<f32>,
    /// `dP` (or `dPᵀ`).
    pub dp: Accumulator<f32>,
}

/// A step's pairs as A operands: `P` (the dK/dV kernel's, for `dV`) and `dS`, in `E`.
#[derive(CubeType)]
pub struct PairFragments<E: Float> {
    /// `Pᵀ`, one fragment per 16 streamed rows (empty in the dQ kernel).
    pub p: Sequence<Fragment<E>>,
    /// `dS` or `dSᵀ`.
    pub ds: Sequence<Fragment<E>>,
}

/// The step's two products, issued together and waited on once: `S = A Bᵀ` over `head_dim`
/// and `dP = A₂ B₂ᵀ` over `value_dim`, this warpgroup's 64 resident rows against the streamed
/// stage's rows from `b_row`, in f32 registers.
#[cube]
fn products<E: Float>(
    a: &MatrixDescriptor<E>,
    b: &MatrixDescriptor<E>,
    a2: &MatrixDescriptor<E>,
    b2: &MatrixDescriptor<E>,
    b_row: usize,
    #[comptime] shape: BackwardShape,
) -> Products {
    let n = shape.streamed();
    let mut s = Accumulator::<f32>::new(n).start();
    #[unroll]
    for kk in 0..shape.config.head_dim() / MMA_K {
        s.execute(&a.at(0usize, kk * MMA_K), &b.at(b_row, kk * MMA_K));
    }
    let mut dp = Accumulator::<f32>::new(n).start();
    #[unroll]
    for kk in 0..shape.config.value_dim() / MMA_K {
        dp.execute(&a2.at(0usize, kk * MMA_K), &b2.at(b_row, kk * MMA_K));
    }
    // The first wait commits and waits for both products.
    Products {
        s: s.wait(),
        dp: dp.wait(),
    }
}

/// The forward's statistics of the query rows a unit's registers meet — its two rows in the dQ
/// kernel, its `streamed / 4` columns in the dK/dV kernel — loaded once per step: the LSE in
/// base 2 (+∞ past the sequence, so those rows' probabilities are 0) and `D`.
#[derive(CubeType)]
pub struct UnitStats {
    /// LSE · log2(e).
    lse2: Array<f32>,
    /// `D`.
    delta: Array<f32>,
    /// In the dQ kernel, this unit's sums of the learnable inputs' gradients over the pairs it
    /// meets (empty elsewhere).
    pub learned: LearnedSums,
}

#[cube]
impl UnitStats {
    /// The statistics of the query rows from `q_start` that this unit meets, of the context's
    /// head.
    pub fn load<E: Float>(
        maps: &BackwardMaps<E>,
        ctx: &Ctx,
        q_start: usize,
        #[comptime] shape: BackwardShape,
    ) -> UnitStats {
        let place = Place::of_unit();
        let seq = ctx.site;
        let base = (seq.batch * maps.lse.shape(1) + seq.head) * maps.lse.shape(2) + seq.q_off;
        let count = comptime!(if shape.keys { shape.streamed() / 4 } else { 2 });
        let mut lse2 = Array::<f32>::new(count);
        let mut delta = Array::<f32>::new(count);
        #[unroll]
        for j in 0..count {
            let mut row = q_start + place.warpgroup * WARPGROUP_ROWS + place.row0 + j * 8;
            if comptime!(shape.keys) {
                row = q_start + place.col0 + (j / 2) * 8 + j % 2;
            }
            let in_rows = row < seq.seq_q;
            let at = base + select(in_rows, row, 0);
            lse2[j] = select(in_rows, maps.lse[at] * LOG2_E, -ctx.masked());
            delta[j] = select(in_rows, maps.delta[at], 0.0f32);
        }
        UnitStats {
            lse2,
            delta,
            learned: LearnedSums::new(shape.learn),
        }
    }
}

/// Which of [`UnitStats`]' entries accumulator register `nth` meets: its column's in the dK/dV
/// kernel, its row's in the dQ kernel. `nth` is an unrolled constant.
#[cube]
fn stat_index(nth: usize, #[comptime] keys: bool) -> usize {
    if comptime!(keys) {
        (nth / 4) * 2 + nth % 2
    } else {
        register_row(nth)
    }
}

/// Each pair's probability, recomputed as the forward computed it (0 where masked, past the
/// step's keys or past the sequence's queries), and its score gradient
/// `dS = P (dP − D) f′(s)`, rounded to `E` into A-operand fragments; in the dQ kernel of a
/// variant with learnable inputs, each pair's share of their gradients into `stats.learned`. Without a score
/// modification, one fused multiply-add and one `ex2` per probability, the mask in a pass taken
/// only on the steps that need it (as in the forward's softmax).
#[cube]
fn pair_fragments<E: Float, M: Hooks>(
    products: &Products,
    stats: &mut UnitStats,
    ctx: &Ctx,
    meet: Meeting,
    inputs: &RunInputs,
    #[comptime] shape: BackwardShape,
) -> PairFragments<E> {
    let place = Place::of_unit();
    let keys = meet.step.keys;
    let scale2 = ctx.args.scale * LOG2_E;
    let ragged = meet.step.partial() || keys.len < shape.config.block_kv();
    let mut p_frags = Sequence::<Fragment<E>>::new();
    let mut ds_frags = Sequence::<Fragment<E>>::new();
    #[unroll]
    for t in 0..shape.streamed() / MMA_K {
        let mut p_frag = Fragment::<E>::new();
        let mut ds_frag = Fragment::<E>::new();
        #[unroll]
        for i in 0..8 {
            let nth = t * 8 + i;
            // Resident row against streamed column: which is the query, which the key.
            let mut q_row = meet.q_start + place.col(nth);
            let mut key = place.row(nth);
            if comptime!(!shape.keys) {
                q_row = meet.q_start + place.row(nth);
                key = place.col(nth);
            }
            let j = stat_index(nth, shape.keys);
            // The raw `q·k`, then the probability.
            let mut p = products.s.get(nth);
            let mut slope = 1.0f32.runtime();
            if comptime!(shape.config.score.modifies_scores()) {
                let at = Pair {
                    q: q_row as i32,
                    k: (keys.start + key) as i32,
                };
                let lse = stats.lse2[j] * LN_2;
                let grad = recompute::<M>(p, lse, at, meet.step, ctx, inputs);
                p = select(key < keys.len, grad.p, 0.0f32);
                slope = grad.slope;
                // The learnable inputs' share of this pair (the dQ kernel's, where declared).
                if comptime!(shape.learn.slots() > 0) {
                    let d_score = p * (products.dp.get(nth) - stats.delta[j]);
                    stats.learned.add_pair::<M>(d_score, grad, at, ctx, inputs);
                }
            } else {
                p = exp2_approx(p * scale2 - stats.lse2[j]);
                if ragged {
                    let mut visible = key < keys.len;
                    if comptime!(!shape.config.mask.is_none()) {
                        visible = visible
                            && mask::visible::<M>(
                                ctx,
                                q_row as i32,
                                (keys.start + key) as i32,
                                inputs,
                            );
                    }
                    p = select(visible, p, 0.0f32);
                }
            }
            let ds = p * (products.dp.get(nth) - stats.delta[j]) * slope;
            if comptime!(shape.keys) {
                p_frag.set(i, E::cast_from(p));
            }
            ds_frag.set(i, E::cast_from(ds));
        }
        if comptime!(shape.keys) {
            p_frags.push(p_frag);
        }
        ds_frags.push(ds_frag);
    }
    PairFragments::<E> {
        p: p_frags,
        ds: ds_frags,
    }
}

/// A shared-memory tile laid out as `layout` (aligned as its swizzle requires).
#[cube]
fn swizzled_tile<E: Float>(#[comptime] layout: WgmmaTileLayout) -> Shared<[E]> {
    Shared::<[E]>::new_aligned_slice(layout.rows * layout.k, layout.alignment())
}

/// Write one warpgroup's `64 × width` accumulator times `factor` into the contiguous gradient
/// `dst` (`[B, H, N, width]`), rows `first..` of the head's sequence at `base`; rows from `end`
/// are another sequence's and stay untouched.
#[cube]
fn write_rows<E: Float>(
    acc: &Accumulator<f32>,
    dst: &mut Tensor<E>,
    base: usize,
    first: usize,
    end: usize,
    factor: f32,
) {
    let place = Place::of_unit();
    let width = dst.shape(3);
    #[unroll]
    for nth in 0..acc.len() {
        let row = first + place.row(nth);
        if row < end {
            dst[base + row * width + place.col(nth)] = E::cast_from(acc.get(nth) * factor);
        }
    }
}

/// The f32 sums the warpgroup dK/dV kernel adds into with atomics (each a one-element stand-in
/// where the plan has none): dQ's where the kernel sums dQ, dK's and dV's where it splits long
/// walks.
#[derive(CubeType, CubeLaunch)]
pub struct Sums {
    /// dQ, `[B, Hq, Nq, D]`, unscaled.
    pub dq: OwnedTensor<Atomic<f32>>,
    /// dK, `[B, Hkv, Nk, D]`, scaled.
    pub dk: OwnedTensor<Atomic<f32>>,
    /// dV, `[B, Hkv, Nk, Dv]`.
    pub dv: OwnedTensor<Atomic<f32>>,
}

/// The steps of a dK/dV walk one cube takes, `from..to` of the block's `group · blocks`: all of
/// them in the block's first cube, or, where the kernel splits walks and this one is long
/// enough, the cube's share of a split (`shared`).
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct StepRun {
    /// First step.
    pub from: usize,
    /// One past the last.
    pub to: usize,
    /// Whether other cubes take the walk's other runs (the cube adds its dK and dV into the
    /// sums).
    pub shared: bool,
    /// Whether the cube takes part (a split walk's every cube, else the block's first).
    pub takes_part: bool,
}

#[cube]
impl StepRun {
    /// Cube `part` of `splits`' run of a walk of `steps` steps.
    pub fn of(steps: usize, part: usize, #[comptime] splits: usize) -> StepRun {
        let shared = splits > 1 && steps >= splits * MIN_SPLIT_STEPS;
        StepRun {
            from: select(shared, part * steps / splits, 0),
            to: select(shared, (part + 1) * steps / splits, steps),
            shared,
            takes_part: shared || part == 0,
        }
    }
}

/// dK and dV on warpgroup tensor cores: one cube per `block_kv` keys (64 per warpgroup) of one
/// K/V head; the query group's Q and dO streamed `block_q` rows at a time over the query blocks
/// that can see the keys.
///
/// With `shape.splits` cubes per block of keys, a walk of at least `splits · MIN_SPLIT_STEPS`
/// steps is cut into that many runs of consecutive steps, one per cube, each adding its dK and dV
/// into the f32 sums with atomics: a block of keys that every query sees (a custom mask's
/// `|| k < 4`) no longer keeps one cube busy long after the others are done. Shorter walks stay
/// in the block's first cube, which stores its sums.
#[cube(launch, address_type = "dynamic")]
pub fn backward_dkdv_wg<E: Float, M: Hooks>(
    maps: &BackwardMaps<E>,
    grads: &mut KvGrads<E>,
    sums: &mut Sums,
    inputs: &RunInputs,
    args: Args,
    #[comptime] shape: BackwardShape,
) {
    let config = comptime!(shape.config);
    let (d, dv) = comptime!((config.head_dim(), config.value_dim()));
    let block_kv = shape.resident();
    let block_q = shape.streamed();
    let at = Lengths {
        sequence: CUBE_POS_Z as usize,
        head: CUBE_POS_Y as usize * args.group as usize,
        q_total: maps.lse.shape(2),
        k_total: maps.k.shape(2),
    };
    let ctx = Ctx::locate(at, inputs, args, config.mask, config.score);
    let splits = comptime!(shape.splits);
    let part = CUBE_POS_X as usize % splits;
    let key_start = (CUBE_POS_X as usize / splits) * block_kv;
    if key_start < ctx.site.seq_k {
        let seq = ctx.site;
        let remaining = seq.seq_k - key_start;
        let keys = StepKeys {
            start: key_start,
            len: select(remaining < block_kv, remaining, block_kv),
        };
        // The query blocks that can see the cube's keys, in every head of the group, and the
        // cube's run of them.
        let rows = query_range(&ctx, keys.start, keys.start + keys.len - 1);
        let first_block = rows.start / block_q;
        let blocks = select(
            rows.end > rows.start,
            (rows.end + block_q - 1) / block_q - first_block,
            0,
        );
        let run = StepRun::of(args.group as usize * blocks, part, splits);
        if run.takes_part {
            let k_tile = shape.resident_tile(d);
            let v_tile = shape.resident_tile(dv);
            let q_tile = shape.stage_tile(d);
            let o_tile = shape.stage_tile(dv);
            let mut k_smem = swizzled_tile::<E>(k_tile);
            let mut v_smem = swizzled_tile::<E>(v_tile);
            let mut q_smem = swizzled_tile::<E>(q_tile);
            let mut o_smem = swizzled_tile::<E>(o_tile);
            let k_bar = Barrier::shared(1, UNIT_POS == 0);
            let v_bar = Barrier::shared(1, UNIT_POS == 0);
            let planes = comptime!(shape.planes() as u32);
            let q_stages = Stages::new(planes, d, block_q);
            let o_stages = Stages::new(planes, dv, block_q);
            let refills = Refills::new(planes);
            sync_async_proxy_shared();
            sync_cube();

            let query_steps = QuerySteps {
                keys,
                first_block,
                blocks,
                run,
                block_q,
            };
            // Only the (head, query block) steps the mask leaves are fetched.
            let steps = live_steps::<QuerySteps, M>(&query_steps, &ctx, inputs);
            let mut at = next_live::<QuerySteps, M>(&query_steps, &ctx, 0usize, inputs);
            // The step after the current one: the walk fills each stage two steps ahead.
            let mut ahead = next_live::<QuerySteps, M>(&query_steps, &ctx, at + 1, inputs);
            let kv_row = (seq.k_off + key_start) as i32;
            if UNIT_POS == 0 {
                let origin = TmaOrigin {
                    batch: seq.batch,
                    head: seq.kv_head,
                    row: kv_row,
                };
                let k_box = comptime!(RowBox {
                    at: 0,
                    rows: block_kv,
                    lines: block_kv,
                    width: d,
                });
                let v_box = comptime!(RowBox {
                    at: 0,
                    rows: block_kv,
                    lines: block_kv,
                    width: dv,
                });
                load_rows::<E>(&maps.k, &k_bar, &mut k_smem, origin, k_box);
                load_rows::<E>(&maps.v, &v_bar, &mut v_smem, origin, v_box);
                // The first two steps, one per stage.
                if steps > 0 {
                    let first = stream_origin(&ctx, run.from + at, first_block, blocks, block_q);
                    q_stages.fill_now::<E>(&maps.q, &mut q_smem, first, 0usize);
                    o_stages.fill_now::<E>(&maps.d_out, &mut o_smem, first, 0usize);
                }
                if steps > 1 {
                    let second =
                        stream_origin(&ctx, run.from + ahead, first_block, blocks, block_q);
                    q_stages.fill_now::<E>(&maps.q, &mut q_smem, second, 1usize);
                    o_stages.fill_now::<E>(&maps.d_out, &mut o_smem, second, 1usize);
                }
            }
            let place = Place::of_unit();
            let wg_row = place.warpgroup * WARPGROUP_ROWS;
            let k_desc = MatrixDescriptor::new(&k_smem, k_tile).at(wg_row, 0usize);
            let v_desc = MatrixDescriptor::new(&v_smem, v_tile).at(wg_row, 0usize);
            let q_desc = MatrixDescriptor::new(&q_smem, q_tile);
            let o_desc = MatrixDescriptor::new(&o_smem, o_tile);
            let q_mn = MatrixDescriptor::new(&q_smem, shape.stage_tile_mn(d));
            let o_mn = MatrixDescriptor::new(&o_smem, shape.stage_tile_mn(dv));
            // Summing dQ here: each warpgroup's dSᵀ staged as the B operand of dQᵀ = Kᵀ dSᵀ, with K
            // read MN-major as A (a 64-byte tile when unused).
            let ds_layout = comptime!(shape.ds_tile());
            let mut ds_smem = swizzled_tile::<E>(ds_layout);
            let ds_desc =
                MatrixDescriptor::new(&ds_smem, ds_layout).at(place.warpgroup * block_q, 0usize);
            let k_as_a = MatrixDescriptor::new(
                &k_smem,
                comptime!(WgmmaTileLayout {
                    major: Major::MN,
                    swizzle: Swizzle::B128,
                    rows: d,
                    k: block_kv,
                }),
            );
            let mut dk = Accumulator::<f32>::new(d).start();
            let mut dv_acc = Accumulator::<f32>::new(dv).start();
            k_bar.wait_parity(0);
            v_bar.wait_parity(0);

            for pair in 0..(steps + STAGES - 1) / STAGES {
                #[unroll]
                for stage in 0..STAGES {
                    let index = pair * STAGES + stage;
                    if index < steps {
                        let parity = (pair % 2) as u32;
                        let g = (run.from + at) / blocks;
                        let q_start = (first_block + (run.from + at) % blocks) * block_q;
                        let head_ctx = head_context(&ctx, seq.head + g, inputs);
                        let step = query_block_step::<M>(&head_ctx, keys, q_start, block_q, inputs);
                        let after = ahead;
                        ahead = next_live::<QuerySteps, M>(&query_steps, &ctx, after + 1, inputs);
                        sync_plane();
                        q_stages.wait(stage, parity);
                        o_stages.wait(stage, parity);
                        if step.class != TILE_EMPTY {
                            let mut stats = UnitStats::load(maps, &head_ctx, q_start, shape);
                            let stage_at = opaque(comptime!((stage * block_q) as u32)) as usize;
                            let products =
                                products::<E>(&k_desc, &q_desc, &v_desc, &o_desc, stage_at, shape);
                            let meet = Meeting { q_start, step };
                            let frags = pair_fragments::<E, M>(
                                &products, &mut stats, &head_ctx, meet, inputs, shape,
                            );
                            #[unroll]
                            for t in 0..block_q / MMA_K {
                                dv_acc.execute_registers(
                                    frags.p.index(t),
                                    &o_mn.at(0usize, stage_at + t * MMA_K),
                                );
                                dk.execute_registers(
                                    frags.ds.index(t),
                                    &q_mn.at(0usize, stage_at + t * MMA_K),
                                );
                            }
                            if comptime!(shape.atomic_dq) {
                                stage_ds::<E>(&frags, &mut ds_smem, place, shape);
                                sync_async_proxy_shared();
                                sync_warpgroup(place.warpgroup as u32);
                                #[unroll]
                                for mt in 0..d / WARPGROUP_ROWS {
                                    let mut dq_t = Accumulator::<f32>::new(block_q).start();
                                    #[unroll]
                                    for kk in 0..WARPGROUP_ROWS / MMA_K {
                                        dq_t.execute(
                                            &k_as_a.at(mt * WARPGROUP_ROWS, wg_row + kk * MMA_K),
                                            &ds_desc.at(0usize, kk * MMA_K),
                                        );
                                    }
                                    let dq_t = dq_t.wait();
                                    let q_head = seq.head + g;
                                    let rows = SumRows {
                                        base: seq.batch * sums.dq.stride(0)
                                            + q_head * sums.dq.stride(1)
                                            + (seq.q_off + q_start) * sums.dq.stride(2),
                                        rows: select(q_start < seq.seq_q, seq.seq_q - q_start, 0),
                                    };
                                    add_dq(&dq_t, &mut sums.dq, &rows, mt);
                                }
                            }
                            dk.commit().wait();
                        }
                        // The last plane done with the stage refills it with the step after next.
                        if refills.last_release(stage, pair as u32) && index + 2 < steps {
                            let two =
                                stream_origin(&ctx, run.from + ahead, first_block, blocks, block_q);
                            q_stages.fill_now::<E>(&maps.q, &mut q_smem, two, stage);
                            o_stages.fill_now::<E>(&maps.d_out, &mut o_smem, two, stage);
                        }
                        at = after;
                    }
                }
            }
            let dk = dk.wait();
            let dv_acc = dv_acc.wait();
            let end = seq.k_off + key_start + keys.len;
            let first = seq.k_off + key_start;
            let k_base = seq.batch * grads.dk.stride(0) + seq.kv_head * grads.dk.stride(1);
            let v_base = seq.batch * grads.dv.stride(0) + seq.kv_head * grads.dv.stride(1);
            if comptime!(splits > 1) {
                let into = SumRows {
                    base: k_base,
                    rows: end,
                };
                add_rows(&dk, &mut sums.dk, into, first, ctx.args.scale, run.shared);
                let into = SumRows {
                    base: v_base,
                    rows: end,
                };
                add_rows(&dv_acc, &mut sums.dv, into, first, 1.0f32, run.shared);
            } else {
                write_rows::<E>(&dk, &mut grads.dk, k_base, first, end, ctx.args.scale);
                write_rows::<E>(&dv_acc, &mut grads.dv, v_base, first, end, 1.0f32);
            }
        }
    }
}

/// Like [`write_rows`], into f32 sums of the same shape (`into.rows` is the end row): each
/// element added with an atomic where other cubes add into the same rows (`shared`), else
/// stored.
#[cube]
fn add_rows(
    acc: &Accumulator<f32>,
    dst: &mut Tensor<Atomic<f32>>,
    into: SumRows,
    first: usize,
    factor: f32,
    shared: bool,
) {
    let place = Place::of_unit();
    let width = dst.shape(3);
    #[unroll]
    for nth in 0..acc.len() {
        let row = first + place.row(nth);
        if row < into.rows {
            let at = into.base + row * width + place.col(nth);
            let x = acc.get(nth) * factor;
            if shared {
                dst[at].fetch_add(x);
            } else {
                dst[at].store(x);
            }
        }
    }
}

/// The dK/dV kernel's walk, as [`ClassifiedWalk`]: step `index` of the cube's run is step
/// `s = run.from + index` of the block's walk, query block `first_block + s % blocks` of head
/// `s / blocks` of the group, against the cube's keys.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct QuerySteps {
    /// The cube's keys.
    pub keys: StepKeys,
    /// The first query block that can see them.
    pub first_block: usize,
    /// Query blocks per head.
    pub blocks: usize,
    /// The cube's steps of the walk over the group's heads.
    pub run: StepRun,
    /// Query rows per block.
    #[cube(comptime)]
    pub block_q: usize,
}

#[cube]
impl<M: Hooks> ClassifiedWalk<M> for QuerySteps {
    fn steps(&self) -> usize {
        self.run.to - self.run.from
    }

    fn class_at(&self, ctx: &Ctx, index: usize, inputs: &RunInputs) -> u32 {
        let step = self.run.from + index;
        let q_start = (self.first_block + step % self.blocks) * self.block_q;
        let head_ctx = head_context(ctx, ctx.site.head + step / self.blocks, inputs);
        query_block_step::<M>(&head_ctx, self.keys, q_start, self.block_q, inputs).class
    }
}

/// Where the dK/dV kernel's step `index` reads Q and dO: head `index / blocks` of the group,
/// query block `first_block + index % blocks`.
#[cube]
fn stream_origin(
    ctx: &Ctx,
    index: usize,
    first_block: usize,
    blocks: usize,
    #[comptime] block_q: usize,
) -> TmaOrigin {
    let blocks = select(blocks > 0, blocks, 1);
    TmaOrigin {
        batch: ctx.site.batch,
        head: ctx.site.head + index / blocks,
        row: (ctx.site.q_off + (first_block + index % blocks) * block_q) as i32,
    }
}

/// Where the dQ kernel's step `index` of `walk` reads K and V.
#[cube]
fn key_origin(ctx: &Ctx, walk: BlockWalk, index: usize, #[comptime] block_kv: usize) -> TmaOrigin {
    TmaOrigin {
        batch: ctx.site.batch,
        head: ctx.site.kv_head,
        row: (ctx.site.k_off + (walk.first_step + index) * block_kv) as i32,
    }
}

/// dQ on warpgroup tensor cores: one cube per `block_q` query rows (64 per warpgroup) of one
/// head; K and V streamed over the forward's walk.
#[cube(launch, address_type = "dynamic")]
pub fn backward_dq_wg<E: Float, M: Hooks>(
    maps: &BackwardMaps<E>,
    grads: &mut QueryGrads<E>,
    inputs: &RunInputs,
    args: Args,
    #[comptime] shape: BackwardShape,
) {
    let config = comptime!(shape.config);
    let (d, dv) = comptime!((config.head_dim(), config.value_dim()));
    let block_q = shape.resident();
    let block_kv = shape.streamed();
    let at = Lengths {
        sequence: CUBE_POS_Z as usize,
        head: CUBE_POS_Y as usize,
        q_total: maps.lse.shape(2),
        k_total: maps.k.shape(2),
    };
    let ctx = Ctx::locate(at, inputs, args, config.mask, config.score);
    // Heaviest blocks first, as in the forward.
    let mut block = CUBE_POS_X as usize;
    if comptime!(config.mask.causal) {
        block = CUBE_COUNT_X as usize - 1 - block;
    }
    let q_start = block * block_q;
    if q_start < ctx.site.seq_q {
        let seq = ctx.site;
        let q_tile = shape.resident_tile(d);
        let o_tile = shape.resident_tile(dv);
        let k_tile = shape.stage_tile(d);
        let v_tile = shape.stage_tile(dv);
        let mut q_smem = swizzled_tile::<E>(q_tile);
        let mut o_smem = swizzled_tile::<E>(o_tile);
        let mut k_smem = swizzled_tile::<E>(k_tile);
        let mut v_smem = swizzled_tile::<E>(v_tile);
        let q_bar = Barrier::shared(1, UNIT_POS == 0);
        let o_bar = Barrier::shared(1, UNIT_POS == 0);
        let planes = comptime!(shape.planes() as u32);
        let k_stages = Stages::new(planes, d, block_kv);
        let v_stages = Stages::new(planes, dv, block_kv);
        let refills = Refills::new(planes);
        sync_async_proxy_shared();
        sync_cube();

        let walk = BlockWalk::new(&ctx, q_start, block_q, block_kv);
        let key_steps = KeySteps { walk, block_kv };
        // The forward's walk: only the steps the mask leaves are fetched.
        let steps = live_steps::<KeySteps, M>(&key_steps, &ctx, inputs);
        let mut at = next_live::<KeySteps, M>(&key_steps, &ctx, 0usize, inputs);
        // The step after the current one: the walk fills each stage two steps ahead.
        let mut ahead = next_live::<KeySteps, M>(&key_steps, &ctx, at + 1, inputs);
        if UNIT_POS == 0 {
            let origin = TmaOrigin {
                batch: seq.batch,
                head: seq.head,
                row: (seq.q_off + q_start) as i32,
            };
            let q_box = comptime!(RowBox {
                at: 0,
                rows: block_q,
                lines: block_q,
                width: d,
            });
            let o_box = comptime!(RowBox {
                at: 0,
                rows: block_q,
                lines: block_q,
                width: dv,
            });
            load_rows::<E>(&maps.q, &q_bar, &mut q_smem, origin, q_box);
            load_rows::<E>(&maps.d_out, &o_bar, &mut o_smem, origin, o_box);
            // The first two steps, one per stage.
            if steps > 0 {
                let first = key_origin(&ctx, walk, at, block_kv);
                k_stages.fill_now::<E>(&maps.k, &mut k_smem, first, 0usize);
                v_stages.fill_now::<E>(&maps.v, &mut v_smem, first, 0usize);
            }
            if steps > 1 {
                let second = key_origin(&ctx, walk, ahead, block_kv);
                k_stages.fill_now::<E>(&maps.k, &mut k_smem, second, 1usize);
                v_stages.fill_now::<E>(&maps.v, &mut v_smem, second, 1usize);
            }
        }
        let place = Place::of_unit();
        let wg_row = place.warpgroup * WARPGROUP_ROWS;
        let q_desc = MatrixDescriptor::new(&q_smem, q_tile).at(wg_row, 0usize);
        let o_desc = MatrixDescriptor::new(&o_smem, o_tile).at(wg_row, 0usize);
        let k_desc = MatrixDescriptor::new(&k_smem, k_tile);
        let v_desc = MatrixDescriptor::new(&v_smem, v_tile);
        let k_mn = MatrixDescriptor::new(&k_smem, shape.stage_tile_mn(d));
        let mut acc = Accumulator::<f32>::new(d).start();
        let mut stats = UnitStats::load(maps, &ctx, q_start, shape);
        q_bar.wait_parity(0);
        o_bar.wait_parity(0);

        for pair in 0..(steps + STAGES - 1) / STAGES {
            #[unroll]
            for stage in 0..STAGES {
                let index = pair * STAGES + stage;
                if index < steps {
                    let parity = (pair % 2) as u32;
                    let keys = walk.keys(walk.first_step + at, block_kv);
                    let step = Step {
                        keys,
                        class: mask::classify::<M>(&ctx, walk, keys, inputs),
                    };
                    let after = ahead;
                    ahead = next_live::<KeySteps, M>(&key_steps, &ctx, after + 1, inputs);
                    sync_plane();
                    k_stages.wait(stage, parity);
                    v_stages.wait(stage, parity);
                    if step.class != TILE_EMPTY {
                        let stage_at = opaque(comptime!((stage * block_kv) as u32)) as usize;
                        let products =
                            products::<E>(&q_desc, &k_desc, &o_desc, &v_desc, stage_at, shape);
                        let meet = Meeting { q_start, step };
                        let frags = pair_fragments::<E, M>(
                            &products, &mut stats, &ctx, meet, inputs, shape,
                        );
                        #[unroll]
                        for t in 0..block_kv / MMA_K {
                            acc.execute_registers(
                                frags.ds.index(t),
                                &k_mn.at(0usize, stage_at + t * MMA_K),
                            );
                        }
                        acc.commit().wait();
                    }
                    // The last plane done with the stage refills it with the step after next.
                    if refills.last_release(stage, pair as u32) && index + 2 < steps {
                        let two = key_origin(&ctx, walk, ahead, block_kv);
                        k_stages.fill_now::<E>(&maps.k, &mut k_smem, two, stage);
                        v_stages.fill_now::<E>(&maps.v, &mut v_smem, two, stage);
                    }
                    at = after;
                }
            }
        }
        let acc = acc.wait();
        let dq = &mut grads.dq;
        let base = seq.batch * dq.stride(0) + seq.head * dq.stride(1);
        let first = seq.q_off + q_start;
        let end = seq.q_off + seq.seq_q;
        write_rows::<E>(&acc, dq, base, first, end, ctx.args.scale);
        stats.learned.reduce(
            &mut grads.partials,
            comptime!(shape.warpgroups() * WARPGROUP_UNITS),
        );
    }
}

/// Counts of the planes done with each stage's current fill, in shared memory: the plane that
/// completes a count refills the stage two steps ahead, so no unit waits for the others to
/// free a stage (a lagging plane delays only the fill it is the last to release).
#[derive(CubeType)]
pub struct Refills {
    /// Releases per stage, over the whole walk.
    released: Shared<[Atomic<u32>]>,
    /// Planes per cube.
    #[cube(comptime)]
    planes: u32,
}

#[cube]
impl Refills {
    /// Zeroed counts (unit 0; the cube syncs before the walk).
    pub fn new(#[comptime] planes: u32) -> Refills {
        let released = Shared::<[Atomic<u32>]>::new_slice(STAGES);
        if UNIT_POS == 0 {
            #[unroll]
            for s in 0..STAGES {
                released[s].store(0u32);
            }
        }
        Refills { released, planes }
    }

    /// This plane is done with fill `uses` of `stage` (its MMAs reading it have completed):
    /// true on the first unit of the plane that released it last.
    pub fn last_release(&self, #[comptime] stage: usize, uses: u32) -> bool {
        let mut last = false;
        if UNIT_POS_PLANE == 0 {
            let done = self.released[stage].fetch_add(1u32) + 1;
            last = done == comptime!(self.planes) * (uses + 1);
        }
        last
    }
}

/// This warpgroup's `dSᵀ` fragments (its 64 keys by the step's query rows) written to its rows
/// of the staged tile as `(query row, key)`: the B operand of `dQᵀ = Kᵀ dSᵀ`.
#[cube]
fn stage_ds<E: Float>(
    frags: &PairFragments<E>,
    ds_smem: &mut Shared<[E]>,
    place: Place,
    #[comptime] shape: BackwardShape,
) {
    let block_q = shape.streamed();
    let layout = comptime!(shape.ds_tile());
    #[unroll]
    for t in 0..block_q / MMA_K {
        let frag = frags.ds.index(t);
        #[unroll]
        for i in 0..8 {
            let nth = t * 8 + i;
            let key = place.row0 + register_row(nth) * 8;
            let q = place.warpgroup * block_q + place.col(nth);
            ds_smem[layout.offset(q, key, 2usize)] = frag.get(i);
        }
    }
}

/// Where a step's query rows of one head land in the f32 dQ sums.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct SumRows {
    /// Element index of the step's first row, column 0.
    pub base: usize,
    /// Rows of the step that exist.
    pub rows: usize,
}

/// Adds a warpgroup's `dQᵀ` tile (64 head-dim columns from `64 · mt`, by the step's query rows)
/// into the f32 sums.
#[cube]
fn add_dq(acc: &Accumulator<f32>, sums: &mut Tensor<Atomic<f32>>, rows: &SumRows, mt: usize) {
    let place = Place::of_unit();
    #[unroll]
    for nth in 0..acc.len() {
        let col = mt * WARPGROUP_ROWS + place.row0 + register_row(nth) * 8;
        let q = place.col(nth);
        if q < rows.rows {
            sums[rows.base + q * sums.stride(2) + col].fetch_add(acc.get(nth));
        }
    }
}
