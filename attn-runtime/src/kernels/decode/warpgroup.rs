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
use cubecl::wgmma::MatrixDescriptor;

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
use crate::kernels::prefill::warpgroup::pipeline::{opaque, Fetch, Pipeline, RowBox, TmaOrigin};
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

    /// Shared memory of one cube in bytes (the prefill kernel's at 64 query rows).
    pub const fn shared_bytes(&self) -> usize {
        self.prefill.warpgroup_shared_bytes()
    }
}

/// What the warpgroup decode kernel reads: Q, the cache's K and V described to the copy engine
/// (boxes of `box_rows` rows by 64 columns, 128-byte swizzled, over `[B, Hkv, capacity, D]` or
/// `[pages, Hkv, page_size, D]`), and the cache's device tables.
#[derive(CubeType, CubeLaunch)]
pub struct CacheMaps<E: Float> {
    /// Q, `[B, Hq, Nq, D]` (ragged: `[1, Hq, total, D]`).
    pub q: OwnedTensor<E>,
    /// The K pool.
    pub k: TensorMap<E, Tiled>,
    /// The V pool.
    pub v: TensorMap<E, Tiled>,
    /// The block table (paged caches).
    pub table: OwnedTensor<i32>,
    /// The cache's length per sequence.
    pub lengths: OwnedTensor<i32>,
    /// Ragged queries: each sequence's first row of Q, `[B + 1]` (else never read).
    pub q_offsets: OwnedTensor<i32>,
}

/// The K and V stages of the cube (both stages of each, in the prefill kernel's layout).
#[derive(CubeType)]
pub struct KvTiles<E: Float> {
    /// K's stages.
    pub k: Shared<[E]>,
    /// V's stages.
    pub v: Shared<[E]>,
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

    /// Unit 0 only: the step from key `fetch.key` into stage `stage` of K and of V, once every
    /// plane has released the stage's earlier fills.
    pub fn fill<E: Float>(
        &self,
        pipe: &Pipeline,
        tiles: &mut KvTiles<E>,
        maps: &CacheMaps<E>,
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
            pipe.k
                .copy_box::<E>(&maps.k, &mut tiles.k, origin, stage, k_box);
            pipe.v
                .copy_box::<E>(&maps.v, &mut tiles.v, origin, stage, v_box);
        }
    }
}

/// Partial (or, with one split, final) attention of a chunk of 64 packed rows over one key split,
/// on warpgroup MMAs.
#[cube(launch)]
pub fn decode_forward_wg<E: Float, M: Hooks>(
    maps: &CacheMaps<E>,
    outputs: &mut DecodeOutputs<E>,
    inputs: &RunInputs,
    args: Args,
    dargs: DecodeArgs,
    #[comptime] config: DecodeWgConfig,
) {
    let pc = comptime!(config.prefill);
    let block_kv = config.block_kv();
    let chunk = Chunk::of_cube(&maps.q_offsets, args, dargs, WARPGROUP_ROWS, config.ragged);
    let ctx = chunk.locate_sequence(&maps.lengths, inputs, args, dargs, config.facts());

    let q_tile = pc.q_tile();
    let k_tile = pc.k_tile();
    let v_tile = pc.v_tile();
    let mut q_smem = Shared::<[E]>::new_aligned_slice(q_tile.rows * q_tile.k, q_tile.alignment());
    let mut tiles = KvTiles::<E> {
        k: Shared::<[E]>::new_aligned_slice(k_tile.rows * k_tile.k, k_tile.alignment()),
        v: Shared::<[E]>::new_aligned_slice(v_tile.rows * v_tile.k, v_tile.alignment()),
    };
    let pipe = Pipeline::new(0u32, pc);
    let mut rows = UnitRows::new(&ctx, 0usize, pc);
    let sites = packed_sites(&ctx, chunk, rows.row0, inputs);
    load_packed_q::<E>(&maps.q, &mut q_smem, &ctx, chunk, pc);
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
        source.fill::<E>(&pipe, &mut tiles, maps, first, 0usize);
    }
    let q_desc = MatrixDescriptor::new(&q_smem, q_tile);
    let k_desc = MatrixDescriptor::new(&tiles.k, k_tile);
    let v_desc = MatrixDescriptor::new(&tiles.v, v_tile);

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
                    source.fill::<E>(
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
                pipe.begin_step(stage, parity);
                if step.class != TILE_EMPTY {
                    let stage_at = opaque(comptime!((stage * block_kv) as u32)) as usize;
                    let scores = compute_scores::<E>(&q_desc, &k_desc, stage_at, pc);
                    pipe.scores_done(stage);
                    let probs = rows.online_softmax::<E, M>(&scores, &sites, step, inputs, pc);
                    pipe.before_pv(stage, parity);
                    if keys.len < block_kv {
                        clear_rows_past::<E>(&mut tiles.v, keys.len, stage, pc);
                    }
                    rows.accumulate_pv::<E>(&probs, &v_desc, stage_at, pc);
                    pipe.pv_done(stage);
                } else {
                    pipe.scores_done(stage);
                    pipe.before_pv(stage, parity);
                    pipe.pv_done(stage);
                }
            }
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

/// Q: the chunk's rows into the warpgroup's swizzled Q tile (64-column panels, 16-byte chunk `c`
/// of row `r` at chunk `c ^ (r % 8)`), zeros past the group.
#[cube]
fn load_packed_q<E: Float>(
    q: &Tensor<E>,
    q_smem: &mut Shared<[E]>,
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
        let mut value = E::cast_from(0.0f32);
        if row.valid {
            value = q[seq.batch * q.stride(0)
                + row.head * q.stride(1)
                + (seq.q_off + row.token) * q.stride(2)
                + c];
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
