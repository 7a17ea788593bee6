//! Tile shapes (and decode and backward plans) per device: candidates, the autotune key, cubecl's tuner with its persistent
//! cache, the install-time shape grid and the registry of declared variants.
//!
//! Built on cubecl's autotune (`LocalTuner`, `TunableSet`, `AutotuneKey`, its on-disk store and
//! environment bundles). What we add, because cubecl leaves it to its users:
//! - candidates pruned per device before anything launches, the untuned default shape first
//!   ([`candidates`]);
//! - a tuning policy: tune on a miss (cubecl's behaviour), or never tune ([`Policy`]);
//! - the cache's place (`ATTN_CACHE_DIR`), a file that is not a database moved aside and rebuilt
//!   (cubecl would fall back to memory on every later run), a warning when the cache holds
//!   results for other devices or cubecl versions only ([`cache`]);
//! - scratch outputs while candidates are timed, so a caller's buffers only ever receive the
//!   winner's result;
//! - a pick kept only when it beats the fallback by more than the measurement's spread
//!   ([`verdict`]).

#![warn(missing_docs)]

mod backward;
pub mod cache;
mod candidates;
mod decode;
mod grid;
mod key;
mod prepared;
mod registry;
mod tuner;
pub mod verdict;

pub use backward::chosen_backward;
pub(crate) use backward::{backward_tuned, BackwardCall};
pub use candidates::{candidates, Candidate};
pub(crate) use decode::decode_tuned;
pub use decode::{plan_choices, DecodeKey, PlanChoice};
pub use grid::{
    tune_decode_variant, tune_variant, BackwardReport, DecodePoint, DecodeReport, Grid, KeyReport,
    Shape, ShapePoint,
};
pub use key::{fingerprint, TuneKey};
pub use registry::{registered, Registration};
pub(crate) use tuner::forward_tuned;
pub use tuner::{chosen, policy, set_policy, wait_for_background_tuning, Policy};
