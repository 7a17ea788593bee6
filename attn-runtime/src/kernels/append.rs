//! Appending new tokens' K or V to a cache: one unit per element of the new tokens, each written
//! at its sequence's next free position (through the block table when the cache is paged).

#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

/// Where each sequence's new tokens go: the block table (paged caches), each sequence's next free
/// position and its count of new tokens.
#[derive(CubeType, CubeLaunch)]
pub struct CacheSlots {
    /// `[B, max_pages]` page numbers (paged caches).
    pub table: OwnedTensor<i32>,
    /// `[B]` first position written.
    pub starts: OwnedTensor<i32>,
    /// `[B]` tokens written.
    pub counts: OwnedTensor<i32>,
    /// Tokens per page.
    pub page_size: u32,
    /// Entries per sequence in the block table.
    pub max_pages: u32,
}

/// The comptime shape of an append: units per cube, paged or contiguous.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct AppendConfig {
    /// Units per cube.
    pub units: u32,
    /// Whether the cache is paged.
    pub paged: bool,
}

/// Write `src` `[B, Hkv, n_new, D]` into the cache `dst` at positions `starts[b] + t` for the
/// first `counts[b]` tokens of each sequence. Paged: `dst` is `[pages, Hkv, page_size, D]` and
/// position `p` of sequence `b` lives in page `table[b·max_pages + p / page_size]`, slot
/// `p % page_size`; contiguous: `dst` is `[B, Hkv, capacity, D]`.
#[cube(launch)]
pub fn append_tokens<E: Float>(
    src: &Tensor<E>,
    dst: &mut Tensor<E>,
    slots: &CacheSlots,
    #[comptime] config: AppendConfig,
) {
    let paged = config.paged;
    let page_size = slots.page_size;
    let max_pages = slots.max_pages;
    let i = crate::kernels::flat_index(config.units);
    let batch = src.shape(0);
    let heads = src.shape(1);
    let tokens = src.shape(2);
    let width = src.shape(3);
    if i < batch * heads * tokens * width {
        let c = i % width;
        let t = (i / width) % tokens;
        let h = (i / (width * tokens)) % heads;
        let b = i / (width * tokens * heads);
        if t < slots.counts[b] as usize {
            let value = src[b * src.stride(0) + h * src.stride(1) + t * src.stride(2) + c];
            let position = slots.starts[b] as usize + t;
            let mut at = b * dst.stride(0) + h * dst.stride(1) + position * dst.stride(2) + c;
            if comptime!(paged) {
                let page =
                    slots.table[b * max_pages as usize + position / page_size as usize] as usize;
                let slot = position % page_size as usize;
                at = page * dst.stride(0) + h * dst.stride(1) + slot * dst.stride(2) + c;
            }
            dst[at] = value;
        }
    }
}
