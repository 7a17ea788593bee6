//! The fused FlashAttention-2 style forward pass (prefill), in three kernel families that share
//! one skeleton — locate the cube ([`crate::kernels::common::Ctx`]), load Q, walk the visible K/V
//! steps (classify → load K/V → scores → score modification → mask → online softmax → P·V),
//! finish (sinks, normalise, write O and the LSE) — and one comptime configuration
//! ([`PrefillConfig`]):
//!
//! - [`portable`]: every back end and f32; one unit per query row, shared memory only;
//! - [`tensor_core`]: 16×16×16 cooperative-matrix instructions (NVIDIA);
//! - [`warpgroup`]: Hopper's warpgroup MMAs fed by the bulk tensor copy engine.
//!
//! Which family runs a call is the host's [`crate::blueprint`] decision.

pub mod config;
pub mod portable;
pub mod tensor_core;
pub mod warpgroup;

pub use config::PrefillConfig;
