//! What every attention kernel family shares: the cube's context (where it works, the launch's
//! run-time scalars and inputs, the variant's comptime mask and score flags), the walk over the
//! keys, the mask, the score modification and the online-softmax state.
//!
//! Positions are relative to the sequence (or packed document). Query `q` sits at key position
//! `q + shift` ("aligned"): `shift = seq_k − seq_q` for bottom-right alignment, 0 for top-left.
//! A masked score is −∞ in every kernel ([`Ctx::masked`]).

pub mod context;
pub mod fp8;
pub mod mask;
pub mod score;
pub mod softmax;
pub mod walk;

pub use context::{
    Args, ArgsLaunch, Ctx, Lengths, Operands, OperandsLaunch, Outputs, OutputsLaunch, RunInputs,
    RunInputsLaunch, Site,
};
pub use softmax::RowState;

/// Four f32 values: a vector of K, V or Q widened for arithmetic.
pub type F32x4 = cubecl::prelude::Vector<f32, cubecl::prelude::Const<4>>;
pub use walk::{
    live_steps, next_live, BlockWalk, ClassifiedWalk, ClassifiedWalkExpand, KeyRange, KeySteps,
    Step, StepKeys,
};
