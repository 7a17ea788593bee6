//! The decode kernel on Hopper's warpgroup tensor cores, fed by the copy engine: the cache
//! streamed at the memory's speed, whatever the number of query tokens.
//!
//! One cube per (key split, K/V head × chunk of 64 packed rows, sequence); one warpgroup (128
//! units) per cube. The packed rows are the CUDA-core kernel's ([`super`]): the (query head,
//! query token) pairs of one K/V head's group, so the group reads each K/V byte once. They are
//! the M of the warpgroup MMAs: 64 rows however few exist (a GQA-4 group's single new token
//! fills 4), which costs the tensor cores nothing the memory would notice, while 16 speculative
//! tokens of a group of 4 fill all 64 at no extra cost.
//!
//! - **Q**: the chunk's rows are read by the units once, into the prefill kernel's swizzled
//!   Q tile (rows past the group are zeros).
//! - **K/V**: unit 0 fills each step's stage with the copy engine one whole step ahead, at the
//!   start of the step before (the other stage was released during the last step), so two
//!   steps of K and V are always in flight. A contiguous cache is one box per 64 columns; a
//!   paged cache one box per page of the step (pages of at least 8 tokens that divide the step,
//!   or steps that divide the page), the page read from the block table. Boxes past the
//!   sequence's last page read its last page again; the rows past the sequence's keys are
//!   masked out of the scores and zeroed in V before the last P·V, so a cache's unwritten slots
//!   (any bits) never reach O.
//! - **fp8 caches**: the copy engine brings each step's codes, unswizzled, into two stages of
//!   words; every unit converts the step into one f16 tile per operand in the swizzled layout
//!   (`cvt.rn.f16x2.e4m3x2`, two codes at a time), V's rows past the keys as zeros, and the
//!   MMAs run in f16 with Q rounded to f16; K's scale is folded into the softmax scale, V's into
//!   the output.
//! - **Per step**: the prefill kernel's phases: `S = Q Kᵀ` ([`compute_scores()`]), the online
//!   softmax in registers with each row's own query head and token ([`RowSites`]), `P·V`
//!   ([`UnitRows::accumulate_pv`]).
//! - **Finish**: with one split, O and the LSE (sinks folded in); with several, the normalised
//!   partial output and the partial LSE for [`super::combine`], as the CUDA-core kernel writes
//!   them.
//!
//! Masks, score modifications, windows, custom masks (steps every row's head rules out are
//! skipped), ragged query counts and key splits are the CUDA-core kernel's, through the same
//! walk ([`split_walk()`]) and classification ([`classify_rows()`]).

use cubecl::prelude::*;
use cubecl::wgmma::{Major, MatrixDescriptor, Swizzle, WgmmaTileLayout};

use super::{
    classify_rows, locate_row, output_row, split_walk, Chunk, DecodeArgs, DecodeFacts,
    DecodeOutputs, DecodeRow, OutputRows,
};
use crate::hooks::{Hooks, TILE_EMPTY};
use crate::inputs::slots;
use crate::kernels::common::{Args, Ctx, RowState, RunInputs, Step};
use crate::kernels::prefill::config::{
    PrefillConfig, PANEL, STAGES, WARPGROUP_ROWS, WARPGROUP_UNITS,
};
use crate::kernels::prefill::warpgroup::mainloop::compute_scores;
use crate::kernels::prefill::warpgroup::pipeline::{
    opaque, Fetch, Pipeline, RowBox, TmaOrigin, WordVector,
};
use crate::kernels::prefill::warpgroup::softmax::{
    quad_sum, register_col, register_row, RowSites, UnitRows, UnitRowsExpand,
};

/// Everything that selects the generated code of the warpgroup decode kernel.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct DecodeWgConfig {
    /// The prefill kernel's configuration its phases run: 64 query rows (one warpgroup),
    /// `block_kv` keys per step, the head dims, the mask (key lengths on) and the score.
    pub prefill: PrefillConfig,
    /// K/V live in pages addressed through a block table.
    pub paged: bool,
    /// Several key splits: write partial results for [`super::combine`].
    pub split: bool,
    /// Each sequence has its own count of query tokens.
    pub ragged: bool,
    /// Key rows per bulk copy: the step's (contiguous), or a page's when pages are shorter.
    pub box_rows: u32,
    /// K and V are e4m3 codes with a scale per K/V head, converted to f16 in shared memory.
    pub fp8: bool,
}

impl DecodeWgConfig {
    /// Keys per step.
    pub const fn block_kv(&self) -> usize {
        self.prefill.block_kv()
    }

    /// Copies per stage fill.
    pub const fn boxes(&self) -> usize {
        self.block_kv() / self.box_rows as usize
    }

    /// The facts [`super::locate_sequence()`] reads.
    pub const fn facts(&self) -> DecodeFacts {
        DecodeFacts {
            mask: self.prefill.mask,
            score: self.prefill.score,
            ragged: self.ragged,
        }
    }

    /// Shared memory of one cube in bytes: the prefill kernel's at 64 query rows; from an fp8
    /// cache, Q, one converted step of K and V, and two stages of their codes.
    pub const fn shared_bytes(&self) -> usize {
        if !self.fp8 {
            return self.prefill.warpgroup_shared_bytes();
        }
        let width = self.prefill.head_dim() + self.prefill.value_dim();
        (WARPGROUP_ROWS * self.prefill.head_dim() + self.block_kv() * width) * 2
            + STAGES * self.block_kv() * width
            + 3 * 1024
    }

    /// The K tile the scores read: both stages as the copy engine fills them (16-bit caches), or
    /// the one step converted from codes (fp8), `block_kv` rows K-major.
    pub const fn k_tile(&self) -> WgmmaTileLayout {
        if !self.fp8 {
            return self.prefill.k_tile();
        }
        WgmmaTileLayout {
            major: Major::K,
            swizzle: Swizzle::B128,
            rows: self.block_kv(),
            k: self.prefill.head_dim(),
        }
    }

    /// The V tile P·V reads, the same way (MN-major).
    pub const fn v_tile(&self) -> WgmmaTileLayout {
        if !self.fp8 {
            return self.prefill.v_tile();
        }
        WgmmaTileLayout {
            major: Major::MN,
            swizzle: Swizzle::B128,
            rows: self.prefill.value_dim(),
            k: self.block_kv(),
        }
    }

    /// Elements of the 16-bit stages (8, unused, from an fp8 cache).
    const fn native_len(&self, tile: WgmmaTileLayout) -> usize {
        if self.fp8 {
            8
        } else {
            tile.rows * tile.k
        }
    }

    /// 16-byte chunks of a converted step (one, unused, from a 16-bit cache).
    const fn converted_len(&self, tile: WgmmaTileLayout) -> usize {
        if self.fp8 {
            tile.rows * tile.k / 8
        } else {
            1
        }
    }

    /// Four-word vectors of both stages of codes `width` wide (one, unused, from a 16-bit cache).
    const fn codes_len(&self, width: usize) -> usize {
        if self.fp8 {
            STAGES * self.block_kv() * width / 16
        } else {
            1
        }
    }
}

/// Eight 16-bit elements: a 16-byte chunk of a swizzled tile.
pub type Chunk8<T> = Vector<T, Const<8>>;

/// What the warpgroup decode kernel reads: Q, the cache's K and V described to the copy engine
/// (boxes of `box_rows` rows by 64 columns, 128-byte swizzled, over `[B, Hkv, capacity, D]` or
/// `[pages, Hkv, page_size, D]`; from an fp8 cache, boxes of `box_rows` rows of `D / 4` words,
/// unswizzled), and the cache's device tables.
/// `T` is the element the MMAs read: the cache's (16-bit caches, `T = E`), or f16 (fp8 caches).
#[derive(CubeType, CubeLaunch)]
pub struct CacheMaps<E: Float, T: Float> {
    /// Q, `[B, Hq, Nq, D]` (ragged: `[1, Hq, total, D]`).
    pub q: OwnedTensor<E>,
    /// The K pool (16-bit caches).
    pub k: TensorMap<T, Tiled>,
    /// The V pool (16-bit caches).
    pub v: TensorMap<T, Tiled>,
    /// The K pool's codes, four a word (fp8 caches).
    pub k8: TensorMap<u32, Tiled>,
    /// The V pool's codes (fp8 caches).
    pub v8: TensorMap<u32, Tiled>,
    /// fp8 caches: K's scale per K/V head, then V's.
    pub scales: OwnedTensor<f32>,
    /// The block table (paged caches).
    pub table: OwnedTensor<i32>,
    /// The cache's length per sequence.
    pub lengths: OwnedTensor<i32>,
    /// Ragged queries: each sequence's first row of Q, `[B + 1]` (else never read).
    pub q_offsets: OwnedTensor<i32>,
}

/// The K and V tiles of the cube: from a 16-bit cache both stages of each, in the prefill
/// kernel's layout; from an fp8 cache both stages of their codes and one step converted to f16.
/// The tiles a layout does not use hold one element or chunk.
#[derive(CubeType)]
pub struct KvTiles<T: Float> {
    /// K's stages (16-bit).
    pub k: Shared<[T]>,
    /// V's stages (16-bit).
    pub v: Shared<[T]>,
    /// K's codes, both stages (fp8).
    pub k_codes: Shared<[WordVector]>,
    /// V's codes, both stages (fp8).
    pub v_codes: Shared<[WordVector]>,
    /// The step's K converted, in the swizzled layout of [`DecodeWgConfig::k_tile`] (fp8).
    pub k_step: Shared<[Chunk8<T>]>,
    /// The step's V converted (fp8).
    pub v_step: Shared<[Chunk8<T>]>,
}

#[cube]
impl<T: Float> KvTiles<T> {
    /// The tiles of `config`'s cube.
    pub fn new(#[comptime] config: DecodeWgConfig) -> KvTiles<T> {
        let k_tile = comptime!(config.k_tile());
        let v_tile = comptime!(config.v_tile());
        let align = comptime!(k_tile.alignment());
        KvTiles::<T> {
            k: Shared::<[T]>::new_aligned_slice(config.native_len(k_tile), align),
            v: Shared::<[T]>::new_aligned_slice(config.native_len(v_tile), align),
            k_codes: Shared::<[WordVector]>::new_aligned_slice(
                config.codes_len(config.prefill.head_dim()),
                128usize,
            ),
            v_codes: Shared::<[WordVector]>::new_aligned_slice(
                config.codes_len(config.prefill.value_dim()),
                128usize,
            ),
            k_step: Shared::<[Chunk8<T>]>::new_aligned_slice(config.converted_len(k_tile), align),
            v_step: Shared::<[Chunk8<T>]>::new_aligned_slice(config.converted_len(v_tile), align),
        }
    }

    /// The descriptor of the K tile the scores read.
    pub fn k_descriptor(&self, #[comptime] config: DecodeWgConfig) -> MatrixDescriptor<T> {
        if comptime!(config.fp8) {
            MatrixDescriptor::new(&self.k_step, config.k_tile())
        } else {
            MatrixDescriptor::new(&self.k, config.k_tile())
        }
    }

    /// The descriptor of the V tile P·V reads.
    pub fn v_descriptor(&self, #[comptime] config: DecodeWgConfig) -> MatrixDescriptor<T> {
        if comptime!(config.fp8) {
            MatrixDescriptor::new(&self.v_step, config.v_tile())
        } else {
            MatrixDescriptor::new(&self.v, config.v_tile())
        }
    }

    /// fp8: every unit converts stage `stage`'s codes into the step's f16 tiles, V's rows from
    /// `keys` on as zeros (past the sequence they hold whatever the cache's unwritten slots
    /// hold, and a zero probability times a NaN is NaN); then releases the stage and makes the
    /// tiles visible to the tensor cores. The caller has made sure no MMA still reads them.
    pub fn convert(
        &mut self,
        pipe: &Pipeline,
        keys: usize,
        #[comptime] stage: usize,
        #[comptime] config: DecodeWgConfig,
    ) {
        let block_kv = config.block_kv();
        let (d, dv) = comptime!((config.prefill.head_dim(), config.prefill.value_dim()));
        convert_codes::<T>(
            &self.k_codes,
            &mut self.k_step,
            block_kv,
            stage,
            d,
            block_kv,
        );
        convert_codes::<T>(&self.v_codes, &mut self.v_step, keys, stage, dv, block_kv);
        sync_plane();
        pipe.k.release(stage);
        pipe.v.release(stage);
        sync_async_proxy_shared();
        sync_cube();
    }
}

/// Rows of stage `stage`'s codes (`width` columns, `block_kv` rows) into the swizzled f16 tile
/// of one step (16-byte chunk `c` of row `r` of a 64-column panel at chunk `c ^ (r % 8)`), rows
/// from `keep` on as zeros. A unit takes 16 codes (one vector of four words) at a time and
/// writes two chunks; `cvt.rn.f16x2.e4m3x2` turns two codes into two f16 (every e4m3 value is
/// an f16 value).
#[cube]
fn convert_codes<T: Float>(
    codes: &Shared<[WordVector]>,
    tile: &mut Shared<[Chunk8<T>]>,
    keep: usize,
    #[comptime] stage: usize,
    #[comptime] width: usize,
    #[comptime] block_kv: usize,
) {
    let per_row = comptime!(width / 16);
    let base = comptime!(stage * block_kv * width / 16);
    for i in range_stepped(UNIT_POS as usize, block_kv * per_row, WARPGROUP_UNITS) {
        let r = i / per_row;
        let q = i % per_row;
        let words = codes[base + i];
        let live = r < keep;
        #[unroll]
        for half in 0..2usize {
            let mut pairs = WordVector::empty();
            #[unroll]
            for w in 0..2usize {
                let word = words.extract(comptime!(2 * half + w));
                let lo = e4m3x2_to_f16x2(u16::cast_from(word));
                let hi = e4m3x2_to_f16x2(u16::cast_from(word >> 16));
                pairs.insert(comptime!(2 * w), select(live, lo, 0u32));
                pairs.insert(comptime!(2 * w + 1), select(live, hi, 0u32));
            }
            let c = 2 * q + half;
            let at = ((c / 8) * block_kv + r) * 8 + ((c % 8) ^ (r % 8));
            tile[at] = Chunk8::<T>::reinterpret(pairs);
        }
    }
}

/// Two e4m3 codes (the first in the low byte) as two f16 packed in a word (the first in the
/// low half).
#[cube]
fn e4m3x2_to_f16x2(codes: u16) -> u32 {
    let pair: u32;
    gpu_asm!("cvt.rn.f16x2.e4m3x2 {}, {};", out(_) pair, in(_) codes, options(pure, nomem));
    pair
}

/// Where the cube's keys live in the cache: its sequence's row (contiguous) or block-table row
/// (paged), its K/V head, and how a step's keys fall into copies.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct CacheSource {
    /// The sequence.
    pub sequence: usize,
    /// The K/V head.
    pub kv_head: usize,
    /// Tokens per page (paged).
    pub page_size: usize,
    /// Entries per sequence in the block table (paged).
    pub max_pages: usize,
    /// The sequence's last key (boxes past it read its page).
    pub last_key: usize,
    /// The kernel's configuration.
    #[cube(comptime)]
    pub config: DecodeWgConfig,
}

#[cube]
impl CacheSource {
    /// Where the copy of the keys from `key` on starts: (sequence, head, key) in a contiguous
    /// cache; (page, head, slot) through the block table in a paged one.
    pub fn origin(&self, table: &Tensor<i32>, key: usize) -> TmaOrigin {
        let mut origin = TmaOrigin {
            batch: self.sequence,
            head: self.kv_head,
            row: key as i32,
        };
        if comptime!(self.config.paged) {
            let at = select(key < self.last_key, key, self.last_key);
            origin.batch = table[self.sequence * self.max_pages + at / self.page_size] as usize;
            origin.row = (key % self.page_size) as i32;
        }
        origin
    }

    /// Unit 0 only: the step from key `fetch.key` into stage `stage` of K and of V (or of their
    /// codes), once every plane has released the stage's earlier fills.
    pub fn fill<E: Float, T: Float>(
        &self,
        pipe: &Pipeline,
        tiles: &mut KvTiles<T>,
        maps: &CacheMaps<E, T>,
        fetch: Fetch,
        #[comptime] stage: usize,
    ) {
        let config = comptime!(self.config);
        let block_kv = config.block_kv();
        let rows = config.box_rows as usize;
        pipe.k.announce(stage, fetch.uses);
        pipe.v.announce(stage, fetch.uses);
        #[unroll]
        for i in 0..config.boxes() {
            let origin = self.origin(&maps.table, fetch.key as usize + i * rows);
            let k_box = comptime!(RowBox {
                at: stage * block_kv + i * rows,
                rows,
                lines: STAGES * block_kv,
                width: config.prefill.head_dim(),
            });
            let v_box = comptime!(RowBox {
                width: config.prefill.value_dim(),
                ..k_box
            });
            if comptime!(config.fp8) {
                let k_words = comptime!(RowBox {
                    width: config.prefill.head_dim() / 4,
                    ..k_box
                });
                let v_words = comptime!(RowBox {
                    width: config.prefill.value_dim() / 4,
                    ..k_box
                });
                pipe.k
                    .copy_words(&maps.k8, &mut tiles.k_codes, origin, stage, k_words);
                pipe.v
                    .copy_words(&maps.v8, &mut tiles.v_codes, origin, stage, v_words);
            } else {
                pipe.k
                    .copy_box::<T>(&maps.k, &mut tiles.k, origin, stage, k_box);
                pipe.v
                    .copy_box::<T>(&maps.v, &mut tiles.v, origin, stage, v_box);
            }
        }
    }
}

/// Partial (or, with one split, final) attention of a chunk of 64 packed rows over one key split,
/// on warpgroup MMAs in `T` (the cache's element, or f16 for an fp8 cache: Q rounded to f16, K's
/// scale folded into the softmax scale and V's into the output).
#[cube(launch, address_type = "dynamic")]
pub fn decode_forward_wg<E: Float, T: Float, M: Hooks>(
    maps: &CacheMaps<E, T>,
    outputs: &mut DecodeOutputs<E>,
    inputs: &RunInputs,
    args: Args,
    dargs: DecodeArgs,
    #[comptime] config: DecodeWgConfig,
) {
    let pc = comptime!(config.prefill);
    let block_kv = config.block_kv();
    let chunk = Chunk::of_cube(&maps.q_offsets, args, dargs, WARPGROUP_ROWS, config.ragged);
    let mut ctx = chunk.locate_sequence(&maps.lengths, inputs, args, dargs, config.facts());
    let mut v_scale = 1.0f32.runtime();
    if comptime!(config.fp8) {
        ctx.args.scale *= maps.scales[ctx.site.kv_head];
        v_scale = maps.scales[maps.scales.len() / 2 + ctx.site.kv_head];
    }

    let q_tile = pc.q_tile();
    let mut q_smem = Shared::<[T]>::new_aligned_slice(q_tile.rows * q_tile.k, q_tile.alignment());
    let mut tiles = KvTiles::<T>::new(config);
    let pipe = if comptime!(config.fp8) {
        Pipeline::of_words(pc)
    } else {
        Pipeline::new(0u32, pc)
    };
    let mut rows = UnitRows::new(&ctx, 0usize, pc);
    let sites = packed_sites(&ctx, chunk, rows.row0, inputs);
    load_packed_q::<E, T>(&maps.q, &mut q_smem, &ctx, chunk, pc);
    sync_async_proxy_shared();
    sync_cube();

    let walk = split_walk(&ctx, chunk, block_kv);
    let steps = walk.end_step - walk.first_step;
    let source = CacheSource {
        sequence: ctx.site.index as usize,
        kv_head: ctx.site.kv_head,
        page_size: dargs.page_size as usize,
        max_pages: dargs.max_pages as usize,
        last_key: select(ctx.site.seq_k > 0, ctx.site.seq_k - 1, 0),
        config,
    };
    if UNIT_POS == 0 && steps > 0 {
        let first = Fetch {
            key: (walk.first_step * block_kv) as i32,
            uses: 0,
            has_next: true,
        };
        source.fill::<E, T>(&pipe, &mut tiles, maps, first, 0usize);
    }
    let q_desc = MatrixDescriptor::new(&q_smem, q_tile);
    let k_desc = tiles.k_descriptor(config);
    let v_desc = tiles.v_descriptor(config);

    // The walk in pairs of steps, one per stage, unrolled, as the prefill kernel's; every step
    // passes the same hand-offs, computing or not.
    for pair in 0..(steps + STAGES - 1) / STAGES {
        #[unroll]
        for stage in 0..STAGES {
            let index = pair * STAGES + stage;
            if index < steps {
                let parity = (pair % 2) as u32;
                // The next step goes into the other stage now, a whole step ahead: the tiles it
                // held were released during the last step.
                if UNIT_POS == 0 && index + 1 < steps {
                    let next = Fetch {
                        key: ((walk.first_step + index + 1) * block_kv) as i32,
                        uses: (index + 1) / STAGES,
                        has_next: true,
                    };
                    source.fill::<E, T>(
                        &pipe,
                        &mut tiles,
                        maps,
                        next,
                        comptime!((stage + 1) % STAGES),
                    );
                }
                let keys = walk.keys(walk.first_step + index, block_kv);
                let step = Step {
                    keys,
                    class: classify_rows::<M>(&ctx, walk, keys, chunk, inputs),
                };
                if comptime!(config.fp8) {
                    pipe.k.wait(stage, parity);
                    pipe.v.wait(stage, parity);
                    // Every unit has waited for its own MMAs of the last step: none reads the
                    // converted tiles any more.
                    sync_cube();
                    if step.class != TILE_EMPTY {
                        tiles.convert(&pipe, keys.len, stage, config);
                        let scores = compute_scores::<T>(&q_desc, &k_desc, 0usize, pc);
                        let probs = rows.online_softmax::<T, M>(&scores, &sites, step, inputs, pc);
                        rows.accumulate_pv::<T>(&probs, &v_desc, 0usize, pc);
                    } else {
                        sync_plane();
                        pipe.k.release(stage);
                        pipe.v.release(stage);
                    }
                } else {
                    pipe.begin_step(stage, parity);
                    if step.class != TILE_EMPTY {
                        let stage_at = opaque(comptime!((stage * block_kv) as u32)) as usize;
                        let scores = compute_scores::<T>(&q_desc, &k_desc, stage_at, pc);
                        pipe.scores_done(stage);
                        let probs = rows.online_softmax::<T, M>(&scores, &sites, step, inputs, pc);
                        pipe.before_pv(stage, parity);
                        if keys.len < block_kv {
                            clear_rows_past::<T>(&mut tiles.v, keys.len, stage, pc);
                        }
                        rows.accumulate_pv::<T>(&probs, &v_desc, stage_at, pc);
                        pipe.pv_done(stage);
                    } else {
                        pipe.scores_done(stage);
                        pipe.before_pv(stage, parity);
                        pipe.pv_done(stage);
                    }
                }
            }
        }
    }

    if comptime!(config.fp8) {
        #[unroll]
        for i in 0..pc.value_dim() / 2 {
            rows.out[i] *= v_scale;
        }
    }
    rows.finish_decode::<E>(outputs, &sites, chunk, inputs, config);
}

/// The contexts of a unit's two packed rows: each row's query head (and its ALiBi slope), and its
/// query token as its position.
#[cube]
fn packed_sites(ctx: &Ctx, chunk: Chunk, row0: usize, inputs: &RunInputs) -> RowSites {
    let top = locate_row(chunk.first + row0, ctx.site.kv_head, chunk, ctx.args);
    let bottom = locate_row(chunk.first + row0 + 8, ctx.site.kv_head, chunk, ctx.args);
    RowSites {
        top: row_context(ctx, top, inputs),
        bottom: row_context(ctx, bottom, inputs),
        top_at: top.token as i32,
        bottom_at: bottom.token as i32,
    }
}

/// The cube's context for packed row `row`: its query head, with that head's ALiBi slope.
#[cube]
fn row_context(ctx: &Ctx, row: DecodeRow, inputs: &RunInputs) -> Ctx {
    let mut slope = ctx.site.slope;
    if comptime!(ctx.score.alibi) {
        let at = slots::ALIBI_SLOPES as usize * inputs.slot_len as usize;
        slope = inputs.floats[at + row.head];
    }
    ctx.with_head(row.head, slope)
}

/// Q: the chunk's rows into the warpgroup's swizzled Q tile in the MMAs' element (64-column
/// panels, 16-byte chunk `c` of row `r` at chunk `c ^ (r % 8)`), zeros past the group.
#[cube]
fn load_packed_q<E: Float, T: Float>(
    q: &Tensor<E>,
    q_smem: &mut Shared<[T]>,
    ctx: &Ctx,
    chunk: Chunk,
    #[comptime] config: PrefillConfig,
) {
    let seq = ctx.site;
    let width = config.head_dim();
    for i in range_stepped(UNIT_POS as usize, WARPGROUP_ROWS * width, WARPGROUP_UNITS) {
        let r = i / width;
        let c = i % width;
        let row = locate_row(chunk.first + r, seq.kv_head, chunk, ctx.args);
        let mut value = T::cast_from(0.0f32);
        if row.valid {
            value = T::cast_from(
                q[seq.batch * q.stride(0)
                    + row.head * q.stride(1)
                    + (seq.q_off + row.token) * q.stride(2)
                    + c],
            );
        }
        let at =
            ((c / PANEL) * WARPGROUP_ROWS + r) * PANEL + (((c % PANEL) / 8) ^ (r % 8)) * 8 + c % 8;
        q_smem[at] = value;
    }
}

/// V rows `len..block_kv` of stage `stage` set to zero before the step's P·V: past the
/// sequence's keys they hold whatever the cache's unwritten slots (or the repeated last page)
/// hold, and a zero probability times a NaN is NaN. Units' writes, made visible to the tensor
/// cores before any unit goes on.
#[cube]
fn clear_rows_past<E: Float>(
    v: &mut Shared<[E]>,
    len: usize,
    #[comptime] stage: usize,
    #[comptime] config: PrefillConfig,
) {
    let block_kv = config.block_kv();
    let lines = STAGES * block_kv;
    let per_panel = (block_kv - len) * PANEL;
    let panels = config.value_dim() / PANEL;
    for i in range_stepped(UNIT_POS as usize, per_panel * panels, WARPGROUP_UNITS) {
        let p = i / per_panel;
        v[(p * lines + stage * block_kv + len) * PANEL + i % per_panel] = E::cast_from(0.0f32);
    }
    sync_async_proxy_shared();
    sync_cube();
}

#[cube]
impl UnitRows {
    /// The finish of a decode cube: join each row's sum across its four units; with one split,
    /// fold in the sink, normalise and write O and the LSE; with several, the normalised partial
    /// output and the partial LSE (−∞ for a split that saw no key), where [`super::combine`]
    /// reads them. Rows past the group write nothing.
    pub fn finish_decode<E: Float>(
        &self,
        outputs: &mut DecodeOutputs<E>,
        sites: &RowSites,
        chunk: Chunk,
        inputs: &RunInputs,
        #[comptime] config: DecodeWgConfig,
    ) {
        let ctx = sites.top;
        let seq = ctx.site;
        // The maxima are in the logits' own units (see `online_softmax`).
        let mut unit = 1.0f32.runtime();
        if comptime!(!config.prefill.score.modifies_scores()) {
            unit = ctx.args.scale;
        }
        let mut top_state = RowState {
            max: self.top.max * unit,
            sum: quad_sum(self.top.sum),
        };
        let mut bottom_state = RowState {
            max: self.bottom.max * unit,
            sum: quad_sum(self.bottom.sum),
        };
        let mut top_factor = 1.0f32.runtime();
        let mut bottom_factor = 1.0f32.runtime();
        if comptime!(!config.split) {
            top_factor = top_state.fold_sink(&sites.top, inputs);
            bottom_factor = bottom_state.fold_sink(&sites.bottom, inputs);
        }
        let top_inv = top_state.normaliser(top_factor);
        let bottom_inv = bottom_state.normaliser(bottom_factor);
        let top = locate_row(chunk.first + self.row0, seq.kv_head, chunk, ctx.args);
        let bottom = locate_row(chunk.first + self.row0 + 8, seq.kv_head, chunk, ctx.args);
        let o_rows = OutputRows {
            heads: outputs.o.shape(1),
            tokens: outputs.o.shape(2),
        };
        let top_index = output_row(o_rows, &ctx, top);
        let bottom_index = output_row(o_rows, &ctx, bottom);
        let value_dim = config.prefill.value_dim();
        let splits = CUBE_COUNT_X as usize;
        let split = CUBE_POS_X as usize;
        #[unroll]
        for nth in 0..value_dim / 2 {
            let c = self.col0 + register_col(nth);
            let is_top = register_row(nth) == 0;
            let row = select(is_top, top.valid, bottom.valid);
            let index = select(is_top, top_index, bottom_index);
            let o = self.out[nth] * select(is_top, top_inv, bottom_inv);
            if row {
                if comptime!(config.split) {
                    outputs.part_o[(index * splits + split) * value_dim + c] = o;
                } else {
                    let head = select(is_top, top.head, bottom.head);
                    let token = select(is_top, top.token, bottom.token);
                    let at = seq.batch * outputs.o.stride(0)
                        + head * outputs.o.stride(1)
                        + (seq.q_off + token) * outputs.o.stride(2);
                    outputs.o[at + c] = E::cast_from(o);
                }
            }
        }
        if self.col0 == 0 {
            let mut top_at = top_index;
            let mut bottom_at = bottom_index;
            if comptime!(config.split) {
                top_at = top_index * splits + split;
                bottom_at = bottom_index * splits + split;
            }
            if top.valid {
                outputs.lse[top_at] = top_state.lse(&ctx);
            }
            if bottom.valid {
                outputs.lse[bottom_at] = bottom_state.lse(&ctx);
            }
        }
    }
}
