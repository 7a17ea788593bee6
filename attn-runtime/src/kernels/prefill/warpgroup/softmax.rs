//! The warpgroup kernel's online softmax, on the registers of the scores' accumulator: each unit
//! holds two rows' values (`row0` and `row0 + 8` of its warpgroup's 64), in the layout of a
//! warpgroup MMA's accumulator, which is also the layout of the P·V MMA's A operand.

use cubecl::prelude::*;
use cubecl::wgmma::{Accumulator, Fragment};

use super::WARPGROUP_ROWS;
use crate::hooks::Hooks;
use crate::kernels::common::{mask, score, Ctx, RowState, RunInputs, Step};
use crate::kernels::prefill::config::PrefillConfig;

/// K (keys) of one warpgroup MMA on 16-bit elements.
pub const MMA_K: usize = 16;
/// Independent partial maxima and sums per row in the softmax (the joins below take four).
const PARTS: usize = 4;
const _: () = assert!(
    PARTS == 4,
    "join_parts and the sums' joins take exactly four parts"
);
/// `log2(e)`: the softmax runs in base 2.
const LOG2_E: f32 = core::f32::consts::LOG2_E;

/// One unit's share of its warpgroup's rows: where they are, their online-softmax state, the
/// factors this step's max moved their output by, and the output accumulator (the unit's
/// `value_dim / 2` f32 registers of the warpgroup's `64 × value_dim`), which stays in registers
/// for the whole walk.
#[derive(CubeType)]
pub struct UnitRows {
    /// Row `row0`.
    pub top: RowState,
    /// Row `row0 + 8`.
    pub bottom: RowState,
    /// `exp(old max − new max)` of the top row, this step.
    pub corr_top: f32,
    /// The same for the bottom row.
    pub corr_bottom: f32,
    /// The output accumulator.
    pub out: Array<f32>,
    /// The unit's warpgroup.
    pub warpgroup: usize,
    /// The unit's first row in its warpgroup's 64.
    pub row0: usize,
    /// The unit's first column in each group of 8.
    pub col0: usize,
    /// Sequence position of row `row0`.
    pub first_row: usize,
}

/// A unit's two rows as the score modification and the mask see them: each row's context (a
/// decode cube's rows span the query heads of a group, each with its own) and its position among
/// the sequence's queries.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct RowSites {
    /// Row `row0`'s context.
    pub top: Ctx,
    /// Row `row0 + 8`'s context.
    pub bottom: Ctx,
    /// Row `row0`'s query position.
    pub top_at: i32,
    /// Row `row0 + 8`'s query position.
    pub bottom_at: i32,
}

#[cube]
impl RowSites {
    /// The rows of a prefill block: one context (the cube's head), consecutive positions from
    /// `first_row`.
    pub fn block(ctx: Ctx, first_row: usize) -> RowSites {
        RowSites {
            top: ctx,
            bottom: ctx,
            top_at: first_row as i32,
            bottom_at: (first_row + 8) as i32,
        }
    }
}

/// [`register_row`] at compile time, where a branch picks the row's context.
const fn row_half(nth: usize) -> usize {
    (nth / 2) % 2
}

#[cube]
impl UnitRows {
    /// This unit's rows of the block starting at `q_start`: no key seen, a zero output.
    pub fn new(ctx: &Ctx, q_start: usize, #[comptime] config: PrefillConfig) -> UnitRows {
        let warpgroup = UNIT_POS as usize / super::WARPGROUP_UNITS;
        let unit = UNIT_POS as usize % super::WARPGROUP_UNITS;
        // The accumulator layout of a warpgroup MMA: two rows and a column pair per group of 8.
        let row0 = (unit / 32) * 16 + (unit % 32) / 4;
        let len = config.value_dim() / 2;
        let mut out = Array::<f32>::new(len);
        #[unroll]
        for i in 0..len {
            out[i] = 0.0f32;
        }
        UnitRows {
            top: RowState::new(ctx),
            bottom: RowState::new(ctx),
            corr_top: 1.0f32,
            corr_bottom: 1.0f32,
            out,
            warpgroup,
            row0,
            col0: (unit % 4) * 2,
            first_row: q_start + warpgroup * WARPGROUP_ROWS + row0,
        }
    }

    /// The online softmax of one step on the unit's registers: modify and mask each score,
    /// update both rows' running max (joined across the row's four units), sum (the unit's part;
    /// joined at the end) and correction, and round the probabilities into the P·V operand
    /// fragments.
    ///
    /// Everything runs in base 2 on the logits' own units: without a score modification the raw
    /// `q·k` (the positive scale commutes with the max), with one the modified scaled logit. One
    /// fused multiply-add by `log2(e)` (times the scale) and one `ex2` give each probability; the
    /// rows' maxima stay in the same units until the finish.
    pub fn online_softmax<E: Float, M: Hooks>(
        &mut self,
        scores: &Accumulator<f32>,
        sites: &RowSites,
        step: Step,
        inputs: &RunInputs,
        #[comptime] config: PrefillConfig,
    ) -> Sequence<Fragment<E>> {
        // The launch's scalars and −∞ are every row's.
        let ctx = sites.top;
        let keys = step.keys;
        let len = config.block_kv() / 2;
        let mut x = Array::<f32>::new(len);
        #[unroll]
        for nth in 0..len {
            let mut s = scores.get(nth);
            if comptime!(config.score.modifies_scores()) {
                let key = (keys.start + self.col0 + register_col(nth)) as i32;
                let scaled = s * ctx.args.scale;
                if comptime!(row_half(nth) == 0) {
                    s = score::modify::<M>(scaled, &sites.top, sites.top_at, key, inputs);
                } else {
                    s = score::modify::<M>(scaled, &sites.bottom, sites.bottom_at, key, inputs);
                }
            }
            x[nth] = s;
        }
        // Keys past the step's length (the ragged last step, or another document's) and masked
        // pairs are set to −∞ before the max, in a pass of its own taken only on the steps that
        // need it: full steps pay nothing for it (folded into the loop above, it became two
        // selects per score on every step).
        if step.partial() || keys.len < config.block_kv() {
            #[unroll]
            for nth in 0..len {
                let key = self.col0 + register_col(nth);
                let mut visible = key < keys.len;
                if comptime!(!config.mask.is_none()) {
                    let at = (keys.start + key) as i32;
                    if comptime!(row_half(nth) == 0) {
                        visible =
                            visible && mask::visible::<M>(&sites.top, sites.top_at, at, inputs);
                    } else {
                        visible = visible
                            && mask::visible::<M>(&sites.bottom, sites.bottom_at, at, inputs);
                    }
                }
                x[nth] = select(visible, x[nth], ctx.masked());
            }
        }
        // Each row's max over the unit's 32 scores, in `PARTS` independent running maxima (one
        // `max` each, not a compare and a select): while the other warpgroup's MMAs run, this
        // warpgroup's planes have their sub-partitions to themselves, and the latency of a chain
        // of dependent instructions is what a long chain costs.
        let mut part = Array::<f32>::new(2 * PARTS);
        #[unroll]
        for i in 0..2 * PARTS {
            part[i] = ctx.masked();
        }
        #[unroll]
        for nth in 0..len {
            let at = register_row(nth) * PARTS + register_part(nth);
            part[at] = f32::max(part[at], x[nth]);
        }
        let max0 = join_parts(&part, 0usize);
        let max1 = join_parts(&part, PARTS);
        let new0 = row_max(max0, self.top.max);
        let new1 = row_max(max1, self.bottom.max);
        // log2(e), times the scale when the logits are still raw.
        let mut to_log2 = LOG2_E.runtime();
        if comptime!(!config.score.modifies_scores()) {
            to_log2 *= ctx.args.scale;
        }
        // A row that has seen no key yet keeps −∞ as its max and subtracts 0 instead, so masked
        // scores (−∞) give 0 and nothing gives NaN.
        let base0 = RowState::base(new0, &ctx) * to_log2;
        let base1 = RowState::base(new1, &ctx) * to_log2;
        let corr0 = exp2_approx(self.top.max * to_log2 - base0);
        let corr1 = exp2_approx(self.bottom.max * to_log2 - base1);
        // The rows' sums in `PARTS` independent parts each, as the maxima.
        #[unroll]
        for i in 0..2 * PARTS {
            part[i] = 0.0f32;
        }
        let mut fragments = Sequence::<Fragment<E>>::new();
        #[unroll]
        for t in 0..config.block_kv() / MMA_K {
            let mut fragment = Fragment::<E>::new();
            #[unroll]
            for i in 0..8 {
                let nth = t * 8 + i;
                let which = register_row(nth);
                let p = exp2_approx(x[nth] * to_log2 - select(which == 0, base0, base1));
                let at = which * PARTS + register_part(nth);
                part[at] += p;
                fragment.set(i, E::cast_from(p));
            }
            fragments.push(fragment);
        }
        let sum0 = sum_parts(&part, 0usize);
        let sum1 = sum_parts(&part, PARTS);
        self.top.sum = self.top.sum * corr0 + sum0;
        self.bottom.sum = self.bottom.sum * corr1 + sum1;
        self.top.max = new0;
        self.bottom.max = new1;
        self.corr_top = corr0;
        self.corr_bottom = corr1;
        fragments
    }
}

/// Which of the unit's two rows its `nth` accumulator register belongs to (0: `row0`, 1:
/// `row0 + 8`). `nth` is an unrolled constant, so this folds away.
#[cube]
pub fn register_row(nth: usize) -> usize {
    (nth / 2) % 2
}

/// The column of the unit's `nth` accumulator register, from the unit's first column.
#[cube]
pub fn register_col(nth: usize) -> usize {
    (nth / 4) * 8 + nth % 2
}

/// Which of a row's `PARTS` partial maxima and sums the unit's `nth` accumulator register goes
/// to: consecutive registers of a row take turns. `nth` is an unrolled constant.
#[cube]
fn register_part(nth: usize) -> usize {
    (nth / 4) % PARTS
}

/// The max of a row's `PARTS` partial maxima starting at `at`, in a tree.
#[cube]
fn join_parts(part: &Array<f32>, #[comptime] at: usize) -> f32 {
    f32::max(
        f32::max(part[at], part[at + 1]),
        f32::max(part[at + 2], part[at + 3]),
    )
}

/// The sum of a row's `PARTS` partial sums starting at `at`, in a tree.
#[cube]
fn sum_parts(part: &Array<f32>, #[comptime] at: usize) -> f32 {
    (part[at] + part[at + 1]) + (part[at + 2] + part[at + 3])
}

/// A row's new running max: the unit's step max joined across the row's four units (lanes
/// `4r..4r + 4`), and the old max.
#[cube]
fn row_max(unit_max: f32, old: f32) -> f32 {
    let other = plane_shuffle_xor(unit_max, 1);
    let a = select(other > unit_max, other, unit_max);
    let other = plane_shuffle_xor(a, 2);
    let b = select(other > a, other, a);
    select(old > b, old, b)
}

/// A row's sum over its four units.
#[cube]
pub fn quad_sum(x: f32) -> f32 {
    let a = x + plane_shuffle_xor(x, 1);
    a + plane_shuffle_xor(a, 2)
}

/// `2^x` in one `ex2.approx.ftz` (relative error about 2⁻²²; −∞ gives 0, results below 2⁻¹²⁶
/// flush to 0, which a probability may).
#[cube]
pub fn exp2_approx(x: f32) -> f32 {
    let y: f32;
    gpu_asm!("ex2.approx.ftz.f32 {}, {};", out(_) y, in(_) x, options(pure, nomem));
    y
}
