//! Generic `#[cube]` kernel families, specialised at compile time by a variant's comptime
//! configuration: [`common`] (context, walk, mask, score, softmax), [`prefill`] (portable,
//! tensor-core and warpgroup), [`decode`] (split-KV decoding and its combine step), and
//! [`append`] (writing new tokens into a K/V cache).

pub mod append;
pub mod backward;
pub mod common;
pub mod decode;
pub mod prefill;

use cubecl::prelude::*;

/// This unit's index in a launch of `units`-unit cubes on a 2-D grid laid out by
/// `kv_cache::grid` (the x axis first): one unit per element of an elementwise kernel.
#[cube]
pub fn flat_index(#[comptime] units: u32) -> usize {
    let cube = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    cube * units as usize + UNIT_POS as usize
}
