//! Appending new tokens' K or V to a cache: one unit per element of the new tokens, each written
//! at its sequence's next free position (through the block table when the cache is paged).

#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use crate::kernels::common::fp8::pack;
use crate::kernels::common::F32x4;

/// Where each sequence's new tokens go: the block table (paged caches) and each sequence's
/// length before the append (the cache's device-resident lengths).
#[derive(CubeType, CubeLaunch)]
pub struct CacheSlots {
    /// `[B, max_pages]` page numbers (paged caches).
    pub table: OwnedTensor<i32>,
    /// `[B]` each sequence's length: its first position written.
    pub lengths: OwnedTensor<i32>,
    /// Tokens per page.
    pub page_size: u32,
    /// Entries per sequence in the block table.
    pub max_pages: u32,
}

/// How many new tokens each sequence takes.
#[derive(CubeType, CubeLaunch)]
pub struct NewTokens {
    /// `[B]` tokens per sequence (ragged appends).
    pub counts: OwnedTensor<i32>,
    /// Tokens every sequence takes (appends of the same count).
    pub count: u32,
}

/// The comptime shape of an append: units per cube, paged or contiguous, one count or one per
/// sequence.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct AppendConfig {
    /// Units per cube.
    pub units: u32,
    /// Whether the cache is paged.
    pub paged: bool,
    /// Whether each sequence has its own count (`counts`), else all take `count`.
    pub ragged: bool,
}

/// Tokens sequence `b` takes.
#[cube]
fn count_of(new: &NewTokens, b: usize, #[comptime] config: AppendConfig) -> usize {
    let mut count = new.count as usize;
    if comptime!(config.ragged) {
        count = new.counts[b] as usize;
    }
    count
}

/// Write `src` `[B, Hkv, n_new, D]` into the cache `dst` at positions `lengths[b] + t` for the
/// first `count` tokens of each sequence. Paged: `dst` is `[pages, Hkv, page_size, D]` and
/// position `p` of sequence `b` lives in page `table[b·max_pages + p / page_size]`, slot
/// `p % page_size`; contiguous: `dst` is `[B, Hkv, capacity, D]`.
#[cube(launch, address_type = "dynamic")]
pub fn append_tokens<E: Float>(
    src: &Tensor<E>,
    dst: &mut Tensor<E>,
    slots: &CacheSlots,
    new: &NewTokens,
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
        if t < count_of(new, b, config) {
            let value = src[b * src.stride(0) + h * src.stride(1) + t * src.stride(2) + c];
            let position = slots.lengths[b] as usize + t;
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

/// [`append_tokens()`] into an fp8 cache ([`crate::fp8`]): one unit per four elements of a new
/// token's row, encoded with the head's inverse scale into one word of `dst` (`[pages, Hkv,
/// page_size, D / 4]` or `[B, Hkv, capacity, D / 4]` words).
#[cube(launch, address_type = "dynamic")]
pub fn append_tokens_fp8<E: Float>(
    src: &Tensor<E>,
    dst: &mut Tensor<u32>,
    inverse_scales: &Tensor<f32>,
    slots: &CacheSlots,
    new: &NewTokens,
    #[comptime] config: AppendConfig,
) {
    let i = crate::kernels::flat_index(config.units);
    let batch = src.shape(0);
    let heads = src.shape(1);
    let tokens = src.shape(2);
    let words = src.shape(3) / 4;
    if i < batch * heads * tokens * words {
        let w = i % words;
        let t = (i / words) % tokens;
        let h = (i / (words * tokens)) % heads;
        let b = i / (words * tokens * heads);
        if t < count_of(new, b, config) {
            let from = b * src.stride(0) + h * src.stride(1) + t * src.stride(2) + w * 4;
            let mut values = F32x4::new(0.0);
            #[unroll]
            for e in 0..4usize {
                values.insert(e, f32::cast_from(src[from + e]));
            }
            let position = slots.lengths[b] as usize + t;
            let mut row = b;
            let mut slot = position;
            if comptime!(config.paged) {
                let page_size = slots.page_size as usize;
                row = slots.table[b * slots.max_pages as usize + position / page_size] as usize;
                slot = position % page_size;
            }
            let at = row * dst.stride(0) + h * dst.stride(1) + slot * dst.stride(2) + w;
            dst[at] = pack(values, inverse_scales[h]);
        }
    }
}

/// After an append (launched behind it on the same stream): each sequence's device-resident
/// length grows by its count.
#[cube(launch)]
pub fn advance_lengths(
    lengths: &mut Tensor<i32>,
    new: &NewTokens,
    #[comptime] config: AppendConfig,
) {
    let b = crate::kernels::flat_index(config.units);
    if b < lengths.len() {
        lengths[b] += count_of(new, b, config) as i32;
    }
}
