//! Appending new tokens' K or V to a cache: one unit per element of the new tokens, each written
//! at its sequence's next free position (through the block table when the cache is paged).

#![allow(clippy::too_many_arguments, clippy::collapsible_if)]

use cubecl::prelude::*;

/// Write `src` `[B, Hkv, n_new, D]` into the cache `dst` at positions `starts[b] + t` for the
/// first `counts[b]` tokens of each sequence. Paged: `dst` is `[pages, Hkv, page_size, D]` and
/// position `p` of sequence `b` lives in page `table[b·max_pages + p / page_size]`, slot
/// `p % page_size`; contiguous: `dst` is `[B, Hkv, capacity, D]`.
#[cube(launch)]
pub fn append_tokens<E: Float>(
    src: &Tensor<E>,
    dst: &mut Tensor<E>,
    table: &Tensor<i32>,
    starts: &Tensor<i32>,
    counts: &Tensor<i32>,
    page_size: u32,
    max_pages: u32,
    #[comptime] units: u32,
    #[comptime] paged: bool,
) {
    let i = crate::kernels::flat_index(units);
    let batch = src.shape(0);
    let heads = src.shape(1);
    let tokens = src.shape(2);
    let width = src.shape(3);
    if i < batch * heads * tokens * width {
        let c = i % width;
        let t = (i / width) % tokens;
        let h = (i / (width * tokens)) % heads;
        let b = i / (width * tokens * heads);
        if t < counts[b] as usize {
            let value = src[b * src.stride(0) + h * src.stride(1) + t * src.stride(2) + c];
            let position = starts[b] as usize + t;
            let mut at = b * dst.stride(0) + h * dst.stride(1) + position * dst.stride(2) + c;
            if comptime!(paged) {
                let page = table[b * max_pages as usize + position / page_size as usize] as usize;
                let slot = position % page_size as usize;
                at = page * dst.stride(0) + h * dst.stride(1) + slot * dst.stride(2) + c;
            }
            dst[at] = value;
        }
    }
}
