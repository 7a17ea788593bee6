//! The score modification of one scaled logit: softcap, then ALiBi, then the variant's
//! expression.

use cubecl::prelude::*;

use super::context::{Ctx, RunInputs};
use crate::hooks::{Hooks, NoHooks};

/// The modified logit of query `q` and key `k` (sequence positions) from the scaled logit `s`.
#[cube]
pub fn modify<M: Hooks>(s: f32, ctx: &Ctx, q: i32, k: i32, inputs: &RunInputs) -> f32 {
    let seq = ctx.site;
    let mut s = s;
    if comptime!(ctx.score.softcap) {
        s = ctx.args.softcap * (s * ctx.args.inv_softcap).tanh();
    }
    if comptime!(ctx.score.alibi) {
        let distance = q + seq.shift - k;
        let distance = select(distance < 0, -distance, distance);
        s -= seq.slope * f32::cast_from(distance);
    }
    if comptime!(ctx.score.custom) {
        s = M::score(s, seq.index, seq.head as i32, q, k, inputs);
    }
    s
}

/// The built-in modifications alone (softcap, then ALiBi): the value the variant's own score
/// expression receives (the backward pass's chain rule evaluates its derivative there). The
/// identity hooks stand in for the expression, so this is [`modify()`] itself.
#[cube]
pub fn modify_builtin(s: f32, ctx: &Ctx, q: i32, k: i32, inputs: &RunInputs) -> f32 {
    modify::<NoHooks>(s, ctx, q, k, inputs)
}
