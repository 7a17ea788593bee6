pub mod data;
pub mod engine;
mod lljit;
#[cfg(feature = "jitdump")]
mod perf_support;
mod symbols;
