//! The online-softmax state of a query row, and what every family does with it: fold a step's
//! maximum in, turn scores into probabilities, and finish (sinks, normaliser, log-sum-exp).
//!
//! Masked scores are −∞ ([`Ctx::masked`]). A row that has seen no key keeps −∞ as its running
//! maximum; its correction subtracts 0 instead ([`RowState::base`]), so no `−∞ − (−∞)` reaches
//! the state, and probabilities of masked scores are exactly 0 ([`probability()`]).

use cubecl::prelude::*;

use super::context::{Ctx, RunInputs};
use crate::inputs::slots;

/// A query row's online-softmax state: running max of its logits and the running sum of their
/// exponentials relative to that max.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct RowState {
    /// Running max (−∞ until the row sees a key).
    pub max: f32,
    /// Running sum.
    pub sum: f32,
}

#[cube]
impl RowState {
    /// The state of a row that has seen nothing.
    pub fn new(ctx: &Ctx) -> RowState {
        RowState {
            max: ctx.masked(),
            sum: 0.0f32,
        }
    }

    /// What the row's probabilities subtract under running max `max`: `max`, or 0 while the row
    /// has seen no key (max −∞).
    pub fn base(max: f32, ctx: &Ctx) -> f32 {
        select(max == ctx.masked(), 0.0f32, max)
    }

    /// Fold a step's maximum in: returns the new running max; the state keeps the old one until
    /// [`RowState::advance`].
    pub fn new_max(&self, step_max: f32) -> f32 {
        select(step_max > self.max, step_max, self.max)
    }

    /// Move to `new_max` with this step's probabilities summing to `step_sum`; returns the
    /// correction `exp(old max − new max)` the accumulator is multiplied by.
    pub fn advance(&mut self, new_max: f32, step_sum: f32, ctx: &Ctx) -> f32 {
        let correction = (self.max - RowState::base(new_max, ctx)).exp();
        self.sum = self.sum * correction + step_sum;
        self.max = new_max;
        correction
    }

    /// Finish: with sinks, fold the head's sink logit in so that `max + ln(sum)` is the LSE with
    /// the sink. Returns the factor that multiplies the accumulator (1 without sinks).
    pub fn fold_sink(&mut self, ctx: &Ctx, inputs: &RunInputs) -> f32 {
        let mut correction = 1.0f32.runtime();
        if comptime!(ctx.score.sinks) {
            let at = slots::SINKS as usize * inputs.slot_len as usize + ctx.site.head;
            let sink = inputs.floats[at];
            let new_max = select(sink > self.max, sink, self.max);
            correction = (self.max - new_max).exp();
            self.sum = self.sum * correction + (sink - new_max).exp();
            self.max = new_max;
        }
        correction
    }

    /// The normaliser of the finished row: `factor / sum`, 0 for a row that saw nothing.
    pub fn normaliser(&self, factor: f32) -> f32 {
        select(self.sum > 0.0, factor / self.sum, 0.0f32)
    }

    /// The finished row's log-sum-exp: −∞ for a row that saw nothing.
    pub fn lse(&self, ctx: &Ctx) -> f32 {
        select(self.sum > 0.0, self.max + self.sum.ln(), ctx.masked())
    }
}

/// The probability of score `s` under the row's running max: `exp(s − max)`, exactly 0 for a
/// masked score (some back ends' `exp(−∞)` is a denormal, not 0). While the max is −∞ every score
/// is masked, so the NaN of `exp(−∞ − (−∞))` is never selected.
#[cube]
pub fn probability(s: f32, max: f32, ctx: &Ctx) -> f32 {
    select(s > ctx.masked(), (s - max).exp(), 0.0f32)
}

/// The larger of `a` and `b`.
#[cube]
pub fn larger(a: f32, b: f32) -> f32 {
    select(a > b, a, b)
}
