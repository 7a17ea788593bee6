//! K/V caches for decoding: paged (pools of fixed-size pages addressed through a block table, as
//! in vLLM) or contiguous (one `[B, Hkv, capacity, D]` tensor, the special case without a table),
//! in the variant's element type or in e4m3 with a scale per K/V head ([`crate::fp8`]), and
//! appending new tokens' K and V to them (encoded on the device for an fp8 cache).
//!
//! The block table and the lengths are kept on the host, where every change is checked: a page
//! past the pool, a page two sequences share, lengths the table cannot hold and unsupported page
//! sizes are [`AttnError::KvCache`] errors before anything is launched. The kernels read them from
//! device buffers the cache keeps beside them: an append advances the lengths there by a kernel,
//! and the host writes a buffer in place only after a host-side change (a page handed out, a
//! sequence released or cut), so a steady-state decode step (append, then
//! [`crate::decode::DecodeStep::run`]) uploads nothing.

use std::sync::Mutex;

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl_common::bytes::Bytes;

use crate::error::{AttnError, Operand};
use crate::fp8::KvScales;
use crate::kernels::append::{
    advance_lengths, append_tokens, append_tokens_fp8, AppendConfig, CacheSlotsLaunch,
    NewTokensLaunch,
};
use crate::launch::{flat_arg, tensor_arg};
use crate::problem::check_view;
use crate::tensor::{ComputeClient, Element, Tensor};

/// The smallest page size, in tokens.
pub const MIN_PAGE_SIZE: usize = 16;
/// The largest page size, in tokens.
pub const MAX_PAGE_SIZE: usize = 256;

/// The shape of a paged cache.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub struct PagedLayout {
    /// Sequences (rows of the block table).
    pub batch: usize,
    /// K/V heads.
    pub heads_kv: usize,
    /// Head dimension of K.
    pub head_dim: usize,
    /// Head dimension of V.
    pub value_dim: usize,
    /// Tokens per page, 16 to 256.
    pub page_size: usize,
    /// Pages in the pool, shared by all sequences.
    pub pages: usize,
    /// Block-table entries per sequence: a sequence holds at most `max_pages × page_size` tokens.
    pub max_pages: usize,
}

/// How a cache stores its tokens.
#[derive(Clone, Debug, PartialEq)]
enum Storage {
    /// `[B, Hkv, capacity, D]`.
    Contiguous,
    /// `[pages, Hkv, page_size, D]` and a block table `[B, max_pages]` (−1: no page yet).
    Paged {
        page_size: usize,
        max_pages: usize,
        table: Vec<i32>,
        /// Pages no sequence holds, handed out from the end.
        free: Vec<i32>,
        /// Sequences holding each page (more than one: a shared prefix, read-only).
        refs: Vec<u32>,
    },
}

/// A K or V pool (or contiguous tensor) as a cache stores it.
#[derive(Clone, Debug)]
pub enum KvPool<E> {
    /// In the variant's element type.
    Native(Tensor<E>),
    /// In e4m3 with a scale per K/V head ([`crate::fp8`]).
    Fp8(Fp8Pool),
}

impl<E: Element> KvPool<E> {
    /// `[pages, Hkv, page_size, D]` (paged) or `[B, Hkv, capacity, D]`, in elements.
    pub fn shape(&self) -> [usize; 4] {
        match self {
            Self::Native(t) => t.shape(),
            Self::Fp8(p) => p.shape,
        }
    }

    /// Elements its buffer holds (an fp8 pool's codes): what decides the width of the offsets
    /// of the kernels that read or write it ([`crate::launch::offsets`]).
    pub(crate) fn buffer_elements(&self) -> usize {
        match self {
            Self::Native(t) => t.buffer_len(),
            Self::Fp8(p) => p.shape.iter().product(),
        }
    }

    /// The pool in the element type, if it is stored so.
    pub fn native(&self) -> Option<&Tensor<E>> {
        match self {
            Self::Native(t) => Some(t),
            Self::Fp8(_) => None,
        }
    }

    /// The pool in e4m3, if it is stored so.
    pub fn fp8(&self) -> Option<&Fp8Pool> {
        match self {
            Self::Native(_) => None,
            Self::Fp8(p) => Some(p),
        }
    }
}

/// An e4m3 pool: contiguous, four values per `u32` word (the first in the low byte), so the
/// head dim is a multiple of 4; one scale per K/V head.
#[derive(Clone, Debug)]
pub struct Fp8Pool {
    words: Handle,
    shape: [usize; 4],
    scales: Vec<f32>,
    /// `1 / scale` per head, on the device: the appends' factors.
    inverse: Handle,
}

impl Fp8Pool {
    fn new(client: &ComputeClient, shape: [usize; 4], scales: &[f32]) -> Self {
        let inverse: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
        Self {
            words: client.empty((shape.iter().product::<usize>() / 4).max(1) * 4),
            shape,
            scales: scales.to_vec(),
            inverse: client.create(Bytes::from_elems(inverse)),
        }
    }

    /// A pool of e4m3 codes the caller holds (an engine's own fp8 cache, read back or built on
    /// the host): `codes` contiguous in the order of `shape` (`[pages, Hkv, page_size, D]` or
    /// `[B, Hkv, capacity, D]`), D a multiple of 4, one scale per K/V head (an element reads
    /// `decode(code) · scale`). Uploaded once; wrap a K and a V pool into a cache with
    /// [`KvCache::from_paged_parts_fp8`] or [`KvCache::from_contiguous_parts_fp8`].
    pub fn from_codes(
        client: &ComputeClient,
        codes: &[u8],
        shape: [usize; 4],
        scales: &[f32],
    ) -> Result<Self, AttnError> {
        let elements: usize = shape.iter().product();
        if elements == 0 {
            return Err(kv_error(
                "codes",
                format!("shape {shape:?} holds no element"),
            ));
        }
        if !shape[3].is_multiple_of(4) {
            return Err(kv_error(
                "head_dim",
                format!(
                    "an fp8 pool packs four values per word; head dim {} is not a multiple of 4",
                    shape[3]
                ),
            ));
        }
        if codes.len() != elements {
            return Err(kv_error(
                "codes",
                format!(
                    "{} codes for shape {shape:?} ({elements} elements)",
                    codes.len()
                ),
            ));
        }
        KvScales {
            k: scales.to_vec(),
            v: scales.to_vec(),
        }
        .check(shape[1])?;
        let inverse: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
        Ok(Self {
            words: client.create(Bytes::from_elems(codes.to_vec())),
            shape,
            scales: scales.to_vec(),
            inverse: client.create(Bytes::from_elems(inverse)),
        })
    }

    /// Elements: `[pages, Hkv, page_size, D]` or `[B, Hkv, capacity, D]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The scale of each K/V head: an element reads `stored · scale`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The stored e4m3 bytes in the order of [`Self::shape`] (read from the device; positions
    /// never written hold whatever the buffer held).
    pub fn to_bytes(&self, client: &ComputeClient) -> Vec<u8> {
        let bytes = client.read_one_unchecked(self.words.clone());
        bytes[..self.shape.iter().product::<usize>()].to_vec()
    }

    /// The values the kernels read: each byte decoded, times its head's scale.
    pub fn to_values(&self, client: &ComputeClient) -> Vec<f32> {
        let per_head = self.shape[2] * self.shape[3];
        let heads = self.shape[1];
        self.to_bytes(client)
            .iter()
            .enumerate()
            .map(|(i, &b)| crate::fp8::decode(b) * self.scales[(i / per_head) % heads])
            .collect()
    }

    /// The words as a kernel argument: `[.., D / 4]` `u32`s.
    pub(crate) fn words_arg(&self) -> TensorArg {
        self.view_arg(1)
    }

    /// The words' bytes as `[.., D / 4 · per_word]` elements of `4 / per_word` bytes (1: the
    /// words; 2: 16-bit halves, as a stand-in for a 16-bit pool a kernel never reads).
    pub(crate) fn view_arg(&self, per_word: usize) -> TensorArg {
        let [a, b, c, d] = self.shape;
        let shape = [a, b, c, d / 4 * per_word];
        let strides = crate::tensor::contiguous_strides(shape);
        // SAFETY: the buffer was created with one word per four of the shape's elements.
        unsafe {
            TensorArg::from_raw_parts(
                self.words.clone(),
                strides.to_vec().into(),
                shape.to_vec().into(),
            )
        }
    }

    /// The inverse scales as a kernel argument, `[Hkv]`.
    pub(crate) fn inverse_arg(&self) -> TensorArg {
        // SAFETY: created from one value per head.
        unsafe { flat_arg(&self.inverse, self.scales.len()) }
    }
}

/// A K/V cache: the K and V pools (or tensors), the block table and the per-sequence lengths.
#[derive(Debug)]
pub struct KvCache<E> {
    k: KvPool<E>,
    v: KvPool<E>,
    /// An fp8 cache's scales on the device, `[2 · Hkv]`: K's per head, then V's.
    fp8_scales: Option<Handle>,
    batch: usize,
    lengths: Vec<usize>,
    storage: Storage,
    /// Bumped by every host-side change of the lengths / of the block table.
    versions: Versions,
    /// The device-resident lengths and table (created on first use).
    device: Mutex<Option<Mirror>>,
}

impl<E: Element> Clone for KvCache<E> {
    /// A cache over the same K and V buffers, with its own lengths and table (its device copies
    /// are made on its first use).
    fn clone(&self) -> Self {
        Self {
            k: self.k.clone(),
            v: self.v.clone(),
            fp8_scales: self.fp8_scales.clone(),
            batch: self.batch,
            lengths: self.lengths.clone(),
            storage: self.storage.clone(),
            versions: self.versions,
            device: Mutex::new(None),
        }
    }
}

/// Versions of the host's lengths and block table.
#[derive(Copy, Clone, Default, Debug, PartialEq, Eq)]
struct Versions {
    lengths: u64,
    table: u64,
}

/// The device buffers the kernels read, and the host versions they hold.
#[derive(Debug)]
struct Mirror {
    lengths: Handle,
    table: Handle,
    holds: Versions,
}

/// The cache's device-resident lengths `[B]` and block table `[B × max_pages]` (a contiguous
/// cache: one unused entry), as the kernels read them.
#[derive(Clone, Debug)]
pub(crate) struct DeviceTables {
    /// Each sequence's length.
    pub lengths: Handle,
    /// The block table.
    pub table: Handle,
    /// Entries in the table.
    pub table_len: usize,
}

impl<E: Element> KvCache<E> {
    /// An empty paged cache with a new pool; pages are handed to sequences as they grow.
    pub fn paged(client: &ComputeClient, layout: PagedLayout) -> Result<Self, AttnError> {
        check_layout(&layout)?;
        let pool = |d| [layout.pages, layout.heads_kv, layout.page_size, d];
        let k = new_pool(client, pool(layout.head_dim));
        let v = new_pool(client, pool(layout.value_dim));
        Self::from_paged_parts(
            k,
            v,
            layout.page_size,
            vec![-1; layout.batch * layout.max_pages],
            layout.max_pages,
            vec![0; layout.batch],
        )
    }

    /// An empty contiguous cache `[batch, heads_kv, capacity, D]`.
    pub fn contiguous(
        client: &ComputeClient,
        batch: usize,
        heads_kv: usize,
        capacity: usize,
        head_dim: usize,
        value_dim: usize,
    ) -> Result<Self, AttnError> {
        let k = new_pool(client, [batch, heads_kv, capacity, head_dim]);
        let v = new_pool(client, [batch, heads_kv, capacity, value_dim]);
        Self::from_contiguous_parts(k, v, vec![0; batch])
    }

    /// An empty paged cache storing K and V in e4m3 with `scales` ([`crate::fp8`]): half the
    /// bytes of a 16-bit cache for [`crate::decode()`] to read. Appends take `E` tokens and
    /// encode them; head dims must be multiples of 4.
    pub fn paged_fp8(
        client: &ComputeClient,
        layout: PagedLayout,
        scales: &KvScales,
    ) -> Result<Self, AttnError> {
        check_layout(&layout)?;
        let pool = |d| [layout.pages, layout.heads_kv, layout.page_size, d];
        let storage = Storage::Paged {
            page_size: layout.page_size,
            max_pages: layout.max_pages,
            table: vec![-1; layout.batch * layout.max_pages],
            free: (0..layout.pages as i32).rev().collect(),
            refs: vec![0; layout.pages],
        };
        let [k, v] = fp8_pools(
            client,
            [pool(layout.head_dim), pool(layout.value_dim)],
            scales,
        )?;
        Ok(Self::empty(k, v, layout.batch, storage).with_scales(client, scales))
    }

    /// An empty contiguous e4m3 cache `[batch, heads_kv, capacity, D]` with `scales`, as
    /// [`Self::paged_fp8`].
    pub fn contiguous_fp8(
        client: &ComputeClient,
        [batch, heads_kv, capacity]: [usize; 3],
        head_dim: usize,
        value_dim: usize,
        scales: &KvScales,
    ) -> Result<Self, AttnError> {
        for (field, n) in [("batch", batch), ("heads_kv", heads_kv)] {
            if n == 0 {
                return Err(kv_error(field, "must be at least 1".into()));
            }
        }
        let pool = |d| [batch, heads_kv, capacity, d];
        let [k, v] = fp8_pools(client, [pool(head_dim), pool(value_dim)], scales)?;
        Ok(Self::empty(k, v, batch, Storage::Contiguous).with_scales(client, scales))
    }

    /// A cache of empty sequences over `k` and `v`.
    fn empty(k: KvPool<E>, v: KvPool<E>, batch: usize, storage: Storage) -> Self {
        Self {
            k,
            v,
            fp8_scales: None,
            batch,
            lengths: vec![0; batch],
            storage,
            versions: Versions::default(),
            device: Mutex::new(None),
        }
    }

    /// The fp8 scales on the device, as the decode kernel reads them.
    fn with_scales(mut self, client: &ComputeClient, scales: &KvScales) -> Self {
        let both: Vec<f32> = scales.k.iter().chain(&scales.v).copied().collect();
        self.fp8_scales = Some(client.create(Bytes::from_elems(both)));
        self
    }

    /// A paged cache over pools the caller filled: K `[pages, Hkv, page_size, D]`, V
    /// `[pages, Hkv, page_size, Dv]` (any strides with a contiguous last dimension), a block
    /// table `[batch × max_pages]` (−1 where a sequence has no page) and each sequence's length.
    pub fn from_paged_parts(
        k: Tensor<E>,
        v: Tensor<E>,
        page_size: usize,
        block_table: Vec<i32>,
        max_pages: usize,
        lengths: Vec<usize>,
    ) -> Result<Self, AttnError> {
        check_pools(&k, &v)?;
        let table = PageTable {
            page_size,
            block_table,
            max_pages,
        };
        Self::from_paged_pools([KvPool::Native(k), KvPool::Native(v)], table, lengths)
    }

    /// [`Self::from_paged_parts`] over e4m3 pools the caller filled ([`Fp8Pool::from_codes`]):
    /// `decode` reads them as a cache made by [`Self::paged_fp8`], appends encode with their
    /// scales.
    pub fn from_paged_parts_fp8(
        client: &ComputeClient,
        [k, v]: [Fp8Pool; 2],
        table: PageTable,
        lengths: Vec<usize>,
    ) -> Result<Self, AttnError> {
        let scales = fp8_scales_of(&k, &v)?;
        let cache = Self::from_paged_pools([KvPool::Fp8(k), KvPool::Fp8(v)], table, lengths)?;
        Ok(cache.with_scales(client, &scales))
    }

    /// [`Self::from_contiguous_parts`] over e4m3 pools the caller filled
    /// ([`Fp8Pool::from_codes`], `[B, Hkv, capacity, D]`).
    pub fn from_contiguous_parts_fp8(
        client: &ComputeClient,
        [k, v]: [Fp8Pool; 2],
        lengths: Vec<usize>,
    ) -> Result<Self, AttnError> {
        let scales = fp8_scales_of(&k, &v)?;
        let cache = Self {
            batch: k.shape[0],
            k: KvPool::Fp8(k),
            v: KvPool::Fp8(v),
            fp8_scales: None,
            lengths: Vec::new(),
            storage: Storage::Contiguous,
            versions: Versions::default(),
            device: Mutex::new(None),
        };
        Ok(cache.with_lengths(lengths)?.with_scales(client, &scales))
    }

    /// A paged cache over pools whose shapes agree (checked by the caller's constructor).
    fn from_paged_pools(
        [k, v]: [KvPool<E>; 2],
        table: PageTable,
        lengths: Vec<usize>,
    ) -> Result<Self, AttnError> {
        let PageTable {
            page_size,
            block_table,
            max_pages,
        } = table;
        check_page_size(page_size)?;
        let pages = k.shape()[0];
        for (operand, shape) in [(Operand::K, k.shape()), (Operand::V, v.shape())] {
            if shape[2] != page_size {
                return Err(kv_error(
                    "page_size",
                    format!(
                        "{operand} pool pages hold {} tokens (dim 2), but the page size is {page_size}",
                        shape[2]
                    ),
                ));
            }
        }
        if max_pages == 0 || !block_table.len().is_multiple_of(max_pages) {
            return Err(kv_error(
                "block_table",
                format!(
                    "holds {} entries, not a multiple of {max_pages} pages per sequence",
                    block_table.len()
                ),
            ));
        }
        let batch = block_table.len() / max_pages;
        // Where each page is held: (first sequence, its entry). Sequences may share a page only
        // at the same entry (a common prefix).
        let mut held: Vec<Option<(usize, usize)>> = vec![None; pages];
        let mut refs = vec![0u32; pages];
        for (i, &page) in block_table.iter().enumerate() {
            let (seq, slot) = (i / max_pages, i % max_pages);
            if page == -1 {
                continue;
            }
            if page < 0 || page as usize >= pages {
                return Err(kv_error(
                    "block_table",
                    format!("sequence {seq}, entry {slot}: page {page} is outside the pool of {pages} pages"),
                ));
            }
            match held[page as usize] {
                Some((other, at)) if other == seq || at != slot => {
                    return Err(kv_error(
                        "block_table",
                        format!("page {page} is entry {at} of sequence {other} and entry {slot} of sequence {seq}; sequences share a page only at the same entry (a common prefix)"),
                    ));
                }
                Some(_) => {}
                None => held[page as usize] = Some((seq, slot)),
            }
            refs[page as usize] += 1;
        }
        let free = (0..pages as i32)
            .rev()
            .filter(|&p| refs[p as usize] == 0)
            .collect();
        let cache = Self {
            k,
            v,
            fp8_scales: None,
            batch,
            lengths: Vec::new(),
            storage: Storage::Paged {
                page_size,
                max_pages,
                table: block_table,
                free,
                refs,
            },
            versions: Versions::default(),
            device: Mutex::new(None),
        };
        cache.with_lengths(lengths)
    }

    /// A contiguous cache over tensors the caller filled: K `[B, Hkv, capacity, D]`, V
    /// `[B, Hkv, capacity, Dv]`, and each sequence's length.
    pub fn from_contiguous_parts(
        k: Tensor<E>,
        v: Tensor<E>,
        lengths: Vec<usize>,
    ) -> Result<Self, AttnError> {
        check_pools(&k, &v)?;
        let cache = Self {
            batch: k.shape()[0],
            k: KvPool::Native(k),
            v: KvPool::Native(v),
            fp8_scales: None,
            lengths: Vec::new(),
            storage: Storage::Contiguous,
            versions: Versions::default(),
            device: Mutex::new(None),
        };
        cache.with_lengths(lengths)
    }

    fn with_lengths(mut self, lengths: Vec<usize>) -> Result<Self, AttnError> {
        if lengths.len() != self.batch {
            return Err(kv_error(
                "lengths",
                format!("{} lengths for {} sequences", lengths.len(), self.batch),
            ));
        }
        for (seq, &len) in lengths.iter().enumerate() {
            self.check_room(seq, len)?;
            if let Storage::Paged {
                page_size,
                max_pages,
                table,
                ..
            } = &self.storage
            {
                let row = &table[seq * max_pages..(seq + 1) * max_pages];
                if let Some(slot) = row[..len.div_ceil(*page_size)].iter().position(|&p| p < 0) {
                    return Err(kv_error(
                        "block_table",
                        format!(
                            "sequence {seq} holds {len} tokens but has no page at entry {slot}"
                        ),
                    ));
                }
            }
        }
        self.lengths = lengths;
        Ok(self)
    }

    /// Whether sequence `seq` can hold `len` tokens: the table's row (paged) or the capacity.
    fn check_room(&self, seq: usize, len: usize) -> Result<(), AttnError> {
        let room = self.capacity();
        if len > room {
            return Err(kv_error(
                "lengths",
                format!(
                    "sequence {seq} would hold {len} tokens; the cache allows {room} per sequence"
                ),
            ));
        }
        Ok(())
    }

    /// Hands sequence `seq` the given pages, in order, replacing its row of the block table from
    /// the start (paged caches). Each page must be free or already the sequence's own (a prefix
    /// it shares stays shared where it keeps the page at the same entry).
    pub fn set_pages(&mut self, seq: usize, pages: &[i32]) -> Result<(), AttnError> {
        self.check_sequence(seq)?;
        let pool = self.k.shape()[0];
        let len = self.lengths[seq];
        let Storage::Paged {
            page_size,
            max_pages,
            table,
            free,
            refs,
        } = &mut self.storage
        else {
            return Err(kv_error(
                "block_table",
                "a contiguous cache has no pages".into(),
            ));
        };
        if pages.len() > *max_pages {
            return Err(kv_error(
                "block_table",
                format!("{} pages for a row of {max_pages}", pages.len()),
            ));
        }
        let row = &mut table[seq * *max_pages..(seq + 1) * *max_pages];
        for (slot, &page) in pages.iter().enumerate() {
            if page < 0 || page as usize >= pool {
                return Err(kv_error(
                    "block_table",
                    format!("entry {slot}: page {page} is outside the pool of {pool} pages"),
                ));
            }
            let own = row.iter().position(|&p| p == page);
            let shared_elsewhere = refs[page as usize] > 1 && own != Some(slot);
            if pages[..slot].contains(&page)
                || (own.is_none() && refs[page as usize] > 0)
                || shared_elsewhere
            {
                return Err(kv_error(
                    "block_table",
                    format!(
                        "entry {slot}: page {page} is held by another sequence (or given twice)"
                    ),
                ));
            }
        }
        if pages.len() * *page_size < len {
            return Err(kv_error(
                "block_table",
                format!(
                    "sequence {seq} holds {len} tokens; {} pages of {page_size} cannot",
                    pages.len()
                ),
            ));
        }
        for &page in row.iter().filter(|&&p| p >= 0) {
            refs[page as usize] -= 1;
        }
        for &page in pages {
            refs[page as usize] += 1;
        }
        row.fill(-1);
        row[..pages.len()].copy_from_slice(pages);
        *free = (0..pool as i32)
            .rev()
            .filter(|&p| refs[p as usize] == 0)
            .collect();
        self.versions.table += 1;
        Ok(())
    }

    /// Gives sequence `to` (empty, holding no page) the first `tokens` tokens of sequence `from`
    /// by sharing their pages, not copying them: a common prompt prefix, parallel samples of one
    /// prompt. `tokens` is a whole number of pages, so each sequence's own tokens go to pages of
    /// its own; a shared page is read-only (an append that would write into one is refused) and
    /// returns to the pool when the last sequence holding it is released.
    pub fn share_prefix(&mut self, from: usize, to: usize, tokens: usize) -> Result<(), AttnError> {
        self.check_sequence(from)?;
        self.check_sequence(to)?;
        let from_len = self.lengths[from];
        let to_len = self.lengths[to];
        let Storage::Paged {
            page_size,
            max_pages,
            table,
            refs,
            ..
        } = &mut self.storage
        else {
            return Err(kv_error(
                "block_table",
                "a contiguous cache has no pages to share".into(),
            ));
        };
        let (page_size, max_pages) = (*page_size, *max_pages);
        let fail = |reason: String| Err(kv_error("share_prefix", reason));
        if from == to {
            return fail(format!("sequence {from} with itself"));
        }
        if tokens > from_len {
            return fail(format!(
                "{tokens} tokens of sequence {from}, which holds {from_len}"
            ));
        }
        if !tokens.is_multiple_of(page_size) {
            return fail(format!(
                "{tokens} tokens are not whole pages of {page_size}: share {} and append the rest",
                tokens / page_size * page_size
            ));
        }
        let to_row = to * max_pages..(to + 1) * max_pages;
        if to_len > 0 || table[to_row.clone()].iter().any(|&p| p >= 0) {
            return fail(format!(
                "sequence {to} holds {to_len} tokens or pages: release it first"
            ));
        }
        let n = tokens / page_size;
        for i in 0..n {
            let page = table[from * max_pages + i];
            table[to * max_pages + i] = page;
            refs[page as usize] += 1;
        }
        self.lengths[to] = tokens;
        self.versions.table += 1;
        self.versions.lengths += 1;
        Ok(())
    }

    /// Empties sequence `seq`: length 0, its pages back to the pool.
    pub fn release(&mut self, seq: usize) -> Result<(), AttnError> {
        self.check_sequence(seq)?;
        self.lengths[seq] = 0;
        self.versions.lengths += 1;
        if let Storage::Paged {
            max_pages,
            table,
            free,
            refs,
            ..
        } = &mut self.storage
        {
            for entry in &mut table[seq * *max_pages..(seq + 1) * *max_pages] {
                if *entry >= 0 {
                    refs[*entry as usize] -= 1;
                    if refs[*entry as usize] == 0 {
                        free.push(*entry);
                    }
                }
                *entry = -1;
            }
            self.versions.table += 1;
        }
        Ok(())
    }

    /// Cuts sequence `seq` back to its first `len` tokens (say, the draft tokens a speculative
    /// step rejected); it keeps its pages. A length can only shrink here: tokens come in through
    /// [`Self::append`].
    pub fn truncate(&mut self, seq: usize, len: usize) -> Result<(), AttnError> {
        self.check_sequence(seq)?;
        if len > self.lengths[seq] {
            return Err(kv_error(
                "lengths",
                format!(
                    "sequence {seq} holds {} tokens; truncate cannot grow it to {len}",
                    self.lengths[seq]
                ),
            ));
        }
        if len != self.lengths[seq] {
            self.lengths[seq] = len;
            self.versions.lengths += 1;
        }
        Ok(())
    }

    /// The device-resident lengths and table, brought up to date with the host's first: created
    /// on first use, then written in place only where the host changed them since.
    pub(crate) fn device_tables(&self, client: &ComputeClient) -> DeviceTables {
        let lengths = || {
            let host: Vec<i32> = self.lengths.iter().map(|&l| l as i32).collect();
            Bytes::from_elems(host)
        };
        let (_, _, table) = self.table_parts();
        let mut device = self.device.lock().unwrap_or_else(|e| e.into_inner());
        let mirror = device.get_or_insert_with(|| Mirror {
            lengths: client.create(lengths()),
            table: client.create_from_slice(i32::as_bytes(table)),
            holds: self.versions,
        });
        if mirror.holds.lengths != self.versions.lengths {
            tracing::trace!("attn: the cache's lengths written to the device");
            client.write(&mirror.lengths, lengths());
        }
        if mirror.holds.table != self.versions.table {
            tracing::trace!("attn: the cache's block table written to the device");
            client.write(&mirror.table, Bytes::from_elems(table.to_vec()));
        }
        mirror.holds = self.versions;
        DeviceTables {
            lengths: mirror.lengths.clone(),
            table: mirror.table.clone(),
            table_len: table.len(),
        }
    }

    /// Appends new tokens' K `[B, Hkv, n, D]` and V `[B, Hkv, n, Dv]` after each sequence's
    /// current length; with `counts`, sequence `b` takes only its first `counts[b] ≤ n` tokens.
    /// A paged cache takes the pages it needs from its pool; the lengths grow.
    pub fn append(
        &mut self,
        client: &ComputeClient,
        k_new: &Tensor<E>,
        v_new: &Tensor<E>,
        counts: Option<&[usize]>,
    ) -> Result<(), AttnError> {
        if !crate::tensor::supports::<E>(client) {
            return Err(AttnError::Unsupported(format!(
                "a K/V cache of {} elements: this device does not support {0}",
                E::DTYPE.name()
            )));
        }
        for (operand, new, pool) in [(Operand::K, k_new, &self.k), (Operand::V, v_new, &self.v)] {
            // (A contiguous head dim too: an fp8 append reads each token's row in fours.)
            check_view(operand, new.shape(), new.strides(), new.buffer_len())?;
            let [b, h, _, d] = new.shape();
            let expected = [self.batch, pool.shape()[1], new.shape()[2], pool.shape()[3]];
            if [b, h, new.shape()[2], d] != expected || v_new.shape()[2] != k_new.shape()[2] {
                return Err(kv_error(
                    "append",
                    format!(
                        "new {operand} has shape {:?}; the cache takes [{}, {}, n, {}] (the same n for k and v)",
                        new.shape(),
                        self.batch,
                        pool.shape()[1],
                        pool.shape()[3]
                    ),
                ));
            }
        }
        let n = k_new.shape()[2];
        let counts: Vec<usize> = match counts {
            Some(c) if c.len() != self.batch => {
                return Err(kv_error(
                    "append",
                    format!("{} counts for {} sequences", c.len(), self.batch),
                ))
            }
            Some(c) => c.to_vec(),
            None => vec![n; self.batch],
        };
        if let Some(seq) = counts.iter().position(|&c| c > n) {
            return Err(kv_error(
                "append",
                format!(
                    "sequence {seq}: count {} but only {n} new tokens",
                    counts[seq]
                ),
            ));
        }
        for (seq, &count) in counts.iter().enumerate() {
            self.check_room(seq, self.lengths[seq] + count)?;
        }
        let address = crate::launch::offsets(
            client,
            &[
                k_new.buffer_len(),
                v_new.buffer_len(),
                self.k.buffer_elements(),
                self.v.buffer_elements(),
            ],
        )?;
        self.reserve_pages(&counts)?;

        let tables = self.device_tables(client);
        let (page_size, max_pages, _) = self.table_parts();
        let uniform = counts.iter().all(|&c| c == n);
        // Ragged appends upload their counts (`B` values); appends of one count upload nothing.
        // (Without counts the kernels never read the buffer: the table stands in, read-only, so
        // no buffer is bound twice with one binding written.)
        let (counts_handle, counts_len) = if uniform {
            (tables.table.clone(), tables.table_len)
        } else {
            let counts_i32: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
            (client.create(Bytes::from_elems(counts_i32)), self.batch)
        };
        let config = AppendConfig {
            units: 256,
            paged: self.is_paged(),
            ragged: !uniform,
        };
        let new_tokens =
            || unsafe { NewTokensLaunch::new(flat_arg(&counts_handle, counts_len), n as u32) };
        let slots = || unsafe {
            CacheSlotsLaunch::new(
                flat_arg(&tables.table, tables.table_len),
                flat_arg(&tables.lengths, self.batch),
                page_size as u32,
                max_pages as u32,
            )
        };
        for (src, dst) in [(k_new, &self.k), (v_new, &self.v)] {
            let elements = src.shape().iter().product::<usize>();
            if elements == 0 {
                continue;
            }
            // SAFETY: `src` was checked against its buffer above; the pools were created with
            // their shapes and the tables with their lengths.
            unsafe {
                match dst {
                    KvPool::Native(dst) => append_tokens::launch::<E>(
                        client,
                        grid(elements, config.units),
                        CubeDim::new_1d(config.units),
                        address,
                        tensor_arg(src),
                        tensor_arg(dst),
                        slots(),
                        new_tokens(),
                        config,
                    ),
                    KvPool::Fp8(dst) => append_tokens_fp8::launch::<E>(
                        client,
                        grid(elements / 4, config.units),
                        CubeDim::new_1d(config.units),
                        address,
                        tensor_arg(src),
                        dst.words_arg(),
                        dst.inverse_arg(),
                        slots(),
                        new_tokens(),
                        config,
                    ),
                }
            }
        }
        if n > 0 {
            // Behind the two appends on the stream: they read the old lengths.
            unsafe {
                advance_lengths::launch(
                    client,
                    grid(self.batch, config.units),
                    CubeDim::new_1d(config.units),
                    flat_arg(&tables.lengths, self.batch),
                    new_tokens(),
                    config,
                );
            }
        }
        for (len, count) in self.lengths.iter_mut().zip(&counts) {
            *len += count;
        }
        // The device's lengths advanced with the host's.
        self.versions.lengths += 1;
        let mirror = self.device.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(mirror) = mirror {
            mirror.holds.lengths = self.versions.lengths;
        }
        Ok(())
    }

    /// Gives each sequence the pages its new length needs, from the free pool.
    fn reserve_pages(&mut self, counts: &[usize]) -> Result<(), AttnError> {
        let Storage::Paged {
            page_size,
            max_pages,
            table,
            free,
            refs,
        } = &mut self.storage
        else {
            return Ok(());
        };
        // A shared page is read-only: no sequence writes into one.
        for (seq, &c) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
            let len = self.lengths[seq];
            let row = &table[seq * *max_pages..(seq + 1) * *max_pages];
            let pages = len / *page_size..(len + c).div_ceil(*page_size);
            if let Some(&page) = row[pages].iter().find(|&&p| p >= 0 && refs[p as usize] > 1) {
                return Err(kv_error(
                    "append",
                    format!(
                        "sequence {seq} would write into page {page}, which {} sequences share; a shared prefix is read-only",
                        refs[page as usize]
                    ),
                ));
            }
        }
        let needed: usize = counts
            .iter()
            .enumerate()
            .map(|(seq, &c)| {
                let row = &table[seq * *max_pages..(seq + 1) * *max_pages];
                let want = (self.lengths[seq] + c).div_ceil(*page_size);
                row[..want].iter().filter(|&&p| p < 0).count()
            })
            .sum();
        if needed > free.len() {
            return Err(kv_error(
                "pages",
                format!(
                    "the append needs {needed} more pages; {} are free",
                    free.len()
                ),
            ));
        }
        for (seq, &c) in counts.iter().enumerate() {
            let want = (self.lengths[seq] + c).div_ceil(*page_size);
            for entry in &mut table[seq * *max_pages..seq * *max_pages + want] {
                if *entry < 0 {
                    *entry = free.pop().expect("counted above");
                    refs[*entry as usize] = 1;
                }
            }
        }
        if needed > 0 {
            self.versions.table += 1;
        }
        Ok(())
    }

    fn check_sequence(&self, seq: usize) -> Result<(), AttnError> {
        if seq >= self.batch {
            return Err(kv_error(
                "lengths",
                format!(
                    "sequence {seq} does not exist; the cache has {}",
                    self.batch
                ),
            ));
        }
        Ok(())
    }

    /// `(page_size, max_pages, table)`; a contiguous cache gives `(1, 1, [0])`, which its kernels
    /// never read.
    pub(crate) fn table_parts(&self) -> (usize, usize, &[i32]) {
        match &self.storage {
            Storage::Paged {
                page_size,
                max_pages,
                table,
                ..
            } => (*page_size, *max_pages, table),
            Storage::Contiguous => (1, 1, &[0]),
        }
    }

    /// The K pool (paged: `[pages, Hkv, page_size, D]`) or tensor (`[B, Hkv, capacity, D]`).
    pub fn k(&self) -> &KvPool<E> {
        &self.k
    }

    /// The V pool or tensor.
    pub fn v(&self) -> &KvPool<E> {
        &self.v
    }

    /// Whether K and V are stored in e4m3 ([`Self::paged_fp8`], [`Self::contiguous_fp8`]).
    pub fn is_fp8(&self) -> bool {
        self.k.fp8().is_some()
    }

    /// An fp8 cache's scales on the device, `[2 · Hkv]` (K's, then V's), and their count.
    pub(crate) fn fp8_scales(&self) -> Option<(&Handle, usize)> {
        self.fp8_scales.as_ref().map(|h| (h, 2 * self.heads_kv()))
    }

    /// Tokens held per sequence.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// K/V heads.
    pub fn heads_kv(&self) -> usize {
        self.k.shape()[1]
    }

    /// The most tokens one sequence can hold.
    pub fn capacity(&self) -> usize {
        match &self.storage {
            Storage::Paged {
                page_size,
                max_pages,
                ..
            } => page_size * max_pages,
            Storage::Contiguous => self.k.shape()[2],
        }
    }

    /// Whether the cache is paged.
    pub fn is_paged(&self) -> bool {
        matches!(self.storage, Storage::Paged { .. })
    }

    /// Tokens per page (paged caches).
    pub fn page_size(&self) -> Option<usize> {
        match &self.storage {
            Storage::Paged { page_size, .. } => Some(*page_size),
            Storage::Contiguous => None,
        }
    }

    /// The block table `[batch × max_pages]`, −1 where a sequence has no page (paged caches).
    pub fn block_table(&self) -> Option<&[i32]> {
        match &self.storage {
            Storage::Paged { table, .. } => Some(table),
            Storage::Contiguous => None,
        }
    }

    /// Pages no sequence holds (paged caches).
    pub fn free_pages(&self) -> usize {
        match &self.storage {
            Storage::Paged { free, .. } => free.len(),
            Storage::Contiguous => 0,
        }
    }
}

/// K and V pools agree on every dimension but the last, and lie inside their buffers.
/// The scales of K's and V's e4m3 pools, once their shapes agree.
fn fp8_scales_of(k: &Fp8Pool, v: &Fp8Pool) -> Result<KvScales, AttnError> {
    if k.shape[..3] != v.shape[..3] {
        return Err(kv_error(
            "pages",
            format!(
                "k is {:?} and v is {:?}; they must agree on all but the last dimension",
                k.shape, v.shape
            ),
        ));
    }
    Ok(KvScales {
        k: k.scales.clone(),
        v: v.scales.clone(),
    })
}

fn check_pools<E: Element>(k: &Tensor<E>, v: &Tensor<E>) -> Result<(), AttnError> {
    check_view(Operand::K, k.shape(), k.strides(), k.buffer_len())?;
    check_view(Operand::V, v.shape(), v.strides(), v.buffer_len())?;
    if k.shape()[..3] != v.shape()[..3] {
        return Err(kv_error(
            "pages",
            format!(
                "k is {:?} and v is {:?}; they must agree on all but the last dimension",
                k.shape(),
                v.shape()
            ),
        ));
    }
    Ok(())
}

/// How a caller's pools are paged: tokens per page, the block table `[batch × max_pages]` (−1
/// where a sequence has no page; sequences share a page only at the same entry) and its width.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageTable {
    /// Tokens per page.
    pub page_size: usize,
    /// Page of each sequence's entries, row by row.
    pub block_table: Vec<i32>,
    /// Entries per sequence.
    pub max_pages: usize,
}

/// A layout's page size, and at least one of everything.
fn check_layout(layout: &PagedLayout) -> Result<(), AttnError> {
    check_page_size(layout.page_size)?;
    for (field, n) in [
        ("batch", layout.batch),
        ("heads_kv", layout.heads_kv),
        ("pages", layout.pages),
        ("max_pages", layout.max_pages),
    ] {
        if n == 0 {
            return Err(kv_error(field, "must be at least 1".into()));
        }
    }
    Ok(())
}

/// New e4m3 pools of K's and V's shapes: one scale per head each, head dims multiples of 4.
fn fp8_pools<E: Element>(
    client: &ComputeClient,
    shapes: [[usize; 4]; 2],
    scales: &KvScales,
) -> Result<[KvPool<E>; 2], AttnError> {
    scales.check(shapes[0][1])?;
    for (operand, d) in [(Operand::K, shapes[0][3]), (Operand::V, shapes[1][3])] {
        if d % 4 != 0 || d == 0 {
            return Err(kv_error(
                "head_dim",
                format!("an fp8 cache packs four values per word; {operand}'s head dim {d} is not a multiple of 4"),
            ));
        }
    }
    Ok([
        KvPool::Fp8(Fp8Pool::new(client, shapes[0], &scales.k)),
        KvPool::Fp8(Fp8Pool::new(client, shapes[1], &scales.v)),
    ])
}

fn check_page_size(page_size: usize) -> Result<(), AttnError> {
    if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(kv_error(
            "page_size",
            format!("{page_size} tokens; pages hold {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE} tokens"),
        ));
    }
    Ok(())
}

fn kv_error(field: &'static str, reason: String) -> AttnError {
    AttnError::KvCache { field, reason }
}

/// A new pool. Left uninitialised: the kernels read only positions below a sequence's length,
/// and those were written by [`KvCache::append`] or by the caller.
fn new_pool<E: Element>(client: &ComputeClient, shape: [usize; 4]) -> Tensor<E> {
    Tensor::empty(client, shape)
}

/// A 2-D grid of cubes of `units` units covering `elements` (the x axis stays under 65 536).
pub(crate) fn grid(elements: usize, units: u32) -> CubeCount {
    let cubes = elements.div_ceil(units as usize);
    let x = cubes.min(u16::MAX as usize);
    CubeCount::Static(x as u32, cubes.div_ceil(x) as u32, 1)
}
