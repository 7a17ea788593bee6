//! Generic `#[cube]` kernel families, specialised at compile time by a variant's comptime
//! configuration.

pub mod append;
pub mod combine;
pub mod decode;
pub mod mask;
pub mod prefill;
pub mod prefill_tc;
