//! Generic `#[cube]` kernel families, specialised at compile time by a variant's comptime
//! configuration.

pub mod mask;
pub mod prefill;
pub mod prefill_tc;
