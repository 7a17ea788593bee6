//! The decode kernel: a few query tokens per sequence against a long K/V cache, contiguous or
//! paged, split over the keys (flash-decoding). Its one job is to read the cache at the memory's
//! speed.
//!
//! One cube per (key split, K/V head × row chunk, sequence). **GQA packing**: the cube's rows are
//! the (query head, query token) pairs of one K/V head's group (`group × Nq`, in chunks of
//! `rows`), so every K/V byte the cube reads serves the whole group: the cache is read once per
//! group, not once per query head.
//!
//! Each step covers `units` keys and reads K and V straight from memory into registers, never
//! through shared memory (an fp8 cache's as words of four e4m3 codes, decoded in registers; K's
//! scale is folded into the query rows, V's into the normaliser):
//! - **scores**: unit `u` owns key `u` of the step. It reads the key's row of K in vectors of 4
//!   and dots it with every row's Q (shared memory, f32, pre-scaled, read by all units at once, so
//!   a broadcast); the `rows` scores stay in its registers. Score modification and, on partial
//!   steps, the mask apply there.
//! - **softmax**: the rows' step maxima through shared memory (per-row partials, then one unit
//!   per row); each unit turns its scores into probabilities and keeps its own partial row sums,
//!   reduced once at the end.
//! - **P·V**: units regroup as `value_dim / 4` column lanes × key groups. A key group walks its
//!   share of the step's keys; for each key its lanes read the V row together (one coalesced row)
//!   and add `p · v` for every row into their f32 accumulators. The key groups' accumulators are
//!   summed once at the end.
//!
//! With one split the cube normalises and writes O and the LSE itself. With several, each writes
//! its normalised partial output and partial LSE in f32, and [`combine`] merges
//! them exactly; sinks join only there, once. No plane operations, no tensor cores: it runs on
//! every cubecl back end.

// `#[cube]` code: `div_ceil` has no GPU expansion, and a comptime `if` around a run-time one must
// stay separate (the outer branch disappears at expansion, the inner one is kept).
#![allow(clippy::manual_div_ceil, clippy::collapsible_if)]

pub mod combine;
pub mod warpgroup;

use cubecl::prelude::*;

use crate::hooks::{Hooks, TILE_EMPTY, TILE_FULL, TILE_PARTIAL};
use crate::kernels::common::fp8::unpack;
use crate::kernels::common::softmax::{larger, probability};
use crate::kernels::common::walk::key_range;
use crate::kernels::common::{
    mask, score, Args, BlockWalk, Ctx, F32x4, KeyRange, Lengths, RowState, RunInputs, Step,
    StepKeys,
};
use crate::variant::{MaskSpec, ScoreFlags};

/// Elements per global load of K and V, and per shared-memory read of Q: 4 (8 bytes of a 16-bit
/// type), the widest vector every back end has. Head dims are multiples of 4; the launcher checks
/// the cache's strides are too.
pub const KV_VECTOR: usize = 4;

/// One global load of K or V.
pub type KvVector<E> = Vector<E, Const<4>>;

/// A tile shape of the decode kernel: `units` keys per step, `rows` packed query rows per cube.
///
/// QKᵀ per step is `rows × units × head_dim`, P·V `rows × value_dim × units`.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct DecodeTiling {
    /// Query rows per cube: (query head of the group, query token) pairs (M of both products).
    pub rows: u32,
    /// Units per cube, and keys per step (N of QKᵀ, K of P·V).
    pub units: u32,
    /// Loads issued together per unrolled block: vectors of a K row, keys of a key group's V.
    /// More loads in flight hide more latency; more registers hold them.
    pub chunk: u32,
}

impl DecodeTiling {
    /// A stable name, used in logs and benchmark tables (`r4_u128_c8`).
    pub fn name(&self) -> String {
        format!("r{}_u{}_c{}", self.rows, self.units, self.chunk)
    }

    /// Shared memory of one cube in bytes: Q rows, scores (then probabilities), per-row partial
    /// maxima, row maxima and corrections, V key addresses (counted at 64 bits, the widest
    /// offsets a launch takes), and the final accumulator sum.
    pub const fn shared_bytes(&self, head_dim: u32, value_dim: u32) -> usize {
        let (rows, units) = (self.rows as usize, self.units as usize);
        let floats =
            rows * head_dim as usize + rows * units + units + 2 * rows + rows * value_dim as usize;
        4 * floats + 8 * units
    }
}

/// Everything that selects the generated code of the decode kernel.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct DecodeConfig {
    /// Tile shape.
    pub tiling: DecodeTiling,
    /// Head dimension of Q and K.
    pub head_dim: u32,
    /// Head dimension of V and O.
    pub value_dim: u32,
    /// The mask, with per-sequence key lengths always on (the cache lengths).
    pub mask: MaskSpec,
    /// The score modifications.
    pub score: ScoreFlags,
    /// K/V live in pages addressed through a block table (else one contiguous cache per sequence).
    pub paged: bool,
    /// Several key splits: write partial results for [`combine`].
    pub split: bool,
    /// K and V are e4m3 (four per `u32` word) with a scale per K/V head ([`crate::fp8`]).
    pub fp8: bool,
    /// Each sequence has its own count of query tokens: rows `q_offsets[b]..q_offsets[b + 1]` of
    /// a `[1, Hq, total, D]` Q (and O).
    pub ragged: bool,
}

impl DecodeConfig {
    /// Rows per cube (M).
    pub const fn rows(&self) -> usize {
        self.tiling.rows as usize
    }

    /// Units per cube.
    pub const fn units(&self) -> usize {
        self.tiling.units as usize
    }

    /// Keys per step: one per unit.
    pub const fn block_kv(&self) -> usize {
        self.units()
    }

    /// Units per row in the partial row maxima.
    pub const fn row_lanes(&self) -> usize {
        self.units() / self.rows()
    }

    /// Column lanes of P·V: each accumulates 4 output columns of every row.
    pub const fn col_lanes(&self) -> usize {
        self.value_dim() / KV_VECTOR
    }

    /// Key groups of P·V: each walks its share of the step's keys.
    pub const fn key_groups(&self) -> usize {
        self.units() / self.col_lanes()
    }

    /// Keys of a step each key group walks.
    pub const fn keys_per_group(&self) -> usize {
        self.units().div_ceil(self.key_groups())
    }

    /// Head dimension of Q and K (K of QKᵀ).
    pub const fn head_dim(&self) -> usize {
        self.head_dim as usize
    }

    /// K vectors (and V keys) per unrolled block of loads.
    pub const fn chunk(&self) -> usize {
        self.tiling.chunk as usize
    }

    /// Head dimension of V and O (N of P·V).
    pub const fn value_dim(&self) -> usize {
        self.value_dim as usize
    }

    /// Offsets in the f32 shared array: scores `[rows][units]`, partial maxima `[units]`, row
    /// maxima `[rows]`, corrections `[rows]`, the output sum `[rows][value_dim]`, and the length.
    pub const fn layout(&self) -> [usize; 6] {
        let scores = 0;
        let partial = scores + self.rows() * self.units();
        let max = partial + self.units();
        let corr = max + self.rows();
        let out = corr + self.rows();
        [
            scores,
            partial,
            max,
            corr,
            out,
            out + self.rows() * self.value_dim(),
        ]
    }
}

/// What the decode kernel reads: the query tokens and the cache, contiguous (`[B, Hkv, N, D]`)
/// or paged (`[pages, Hkv, page_size, D]` through the block table `[B, max_pages]`).
#[derive(CubeType, CubeLaunch)]
pub struct DecodeOperands<E: Float> {
    /// Q, `[B, Hq, Nq, D]`.
    pub q: OwnedTensor<E>,
    /// The K cache, in vectors of 4.
    pub k: OwnedTensor<KvVector<E>>,
    /// The V cache, in vectors of 4.
    pub v: OwnedTensor<KvVector<E>>,
    /// An fp8 cache's K, in words of four e4m3 values (else never read).
    pub k8: OwnedTensor<u32>,
    /// An fp8 cache's V, in words.
    pub v8: OwnedTensor<u32>,
    /// An fp8 cache's scales, `[2 · Hkv]`: K's per head, then V's.
    pub scales: OwnedTensor<f32>,
    /// The block table (paged caches).
    pub table: OwnedTensor<i32>,
    /// The cache's length per sequence, `[B]` (device-resident: appends advance it on the device).
    pub lengths: OwnedTensor<i32>,
    /// Ragged queries: each sequence's first row of Q, `[B + 1]` (else never read).
    pub q_offsets: OwnedTensor<i32>,
}

/// What the decode kernel writes: O and the LSE with one split; the partial LSE (in `lse`) and
/// the partial outputs with several.
#[derive(CubeType, CubeLaunch)]
pub struct DecodeOutputs<E: Float> {
    /// O, `[B, Hq, Nq, Dv]`.
    pub o: OwnedTensor<E>,
    /// The LSE, or the partial LSEs `[rows, splits]`.
    pub lse: OwnedTensor<f32>,
    /// The partial outputs `[rows, splits, Dv]` (f32).
    pub part_o: OwnedTensor<f32>,
}

/// Run-time scalars of a decode launch besides [`Args`].
#[derive(CubeType, CubeLaunch, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct DecodeArgs {
    /// Query tokens per sequence (ragged: the most of any sequence).
    pub queries: u32,
    /// Rows of one K/V head: group × query tokens (ragged: the most of any sequence).
    pub group_rows: u32,
    /// Tokens per page (paged caches).
    pub page_size: u32,
    /// Entries per sequence in the block table.
    pub max_pages: u32,
    /// Keys each sequence can hold: lengths past it are cut to it.
    pub capacity: u32,
}

/// The cube's chunk of packed rows: rows `first..=last` of its K/V head's `group_rows`.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Chunk {
    /// First row.
    pub first: usize,
    /// Last row that exists.
    pub last: usize,
    /// The K/V head.
    pub kv_head: usize,
    /// Query tokens of the cube's sequence.
    pub queries: usize,
    /// The sequence's first row of Q (ragged; else 0).
    pub first_query: usize,
    /// Rows of the K/V head.
    pub group_rows: usize,
}

#[cube]
impl Chunk {
    /// The cube's chunk of `rows` packed rows (the grid's y: K/V head × chunk), and its sequence's
    /// query tokens (its own count when `ragged`). The grid covers the most rows of any sequence;
    /// a cube past its own sequence's rows ends here.
    pub fn of_cube(
        q_offsets: &Tensor<i32>,
        args: Args,
        dargs: DecodeArgs,
        #[comptime] rows: usize,
        #[comptime] ragged: bool,
    ) -> Chunk {
        let chunks = (dargs.group_rows as usize + rows - 1) / rows;
        let first_row = (CUBE_POS_Y as usize % chunks) * rows;
        let queries = SequenceQueries::of(q_offsets, dargs, ragged);
        let group_rows = queries.count * args.group as usize;
        if first_row >= group_rows {
            terminate!();
        }
        Chunk {
            first: first_row,
            last: select(first_row + rows < group_rows, first_row + rows, group_rows) - 1,
            kv_head: CUBE_POS_Y as usize / chunks,
            queries: queries.count,
            first_query: queries.first,
            group_rows,
        }
    }

    /// The cube's context: its sequence (see [`locate_sequence()`]) at its first row's head.
    pub fn locate_sequence(
        &self,
        lengths: &Tensor<i32>,
        inputs: &RunInputs,
        args: Args,
        dargs: DecodeArgs,
        #[comptime] facts: DecodeFacts,
    ) -> Ctx {
        let at = SequenceAt {
            capacity: dargs.capacity as usize,
            head: locate_row(self.first, self.kv_head, *self, args).head,
            queries: SequenceQueries {
                first: self.first_query,
                count: self.queries,
            },
        };
        locate_sequence(lengths, inputs, args, at, facts)
    }
}

/// Where a unit's row sits: its query head and token, and whether it exists.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct DecodeRow {
    /// Query head.
    pub head: usize,
    /// Query token (position among the query tokens).
    pub token: usize,
    /// Whether the row exists (the last chunk can be short).
    pub valid: bool,
}

/// Where a cache row starts, in elements: strides of its pool's page (or sequence), head and
/// token. An fp8 pool's strides count words of four elements.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct PoolStrides {
    /// Per page (paged) or sequence (contiguous).
    pub page: usize,
    /// Per K/V head.
    pub head: usize,
    /// Per token.
    pub token: usize,
}

#[cube]
impl PoolStrides {
    /// A pool's: `native`'s (elements), or `words`' (four elements each) for an fp8 cache.
    pub fn of<E: Float>(
        native: &Tensor<KvVector<E>>,
        words: &Tensor<u32>,
        #[comptime] fp8: bool,
    ) -> PoolStrides {
        let mut page = native.stride(0);
        let mut head = native.stride(1);
        let mut token = native.stride(2);
        if comptime!(fp8) {
            page = words.stride(0) * KV_VECTOR;
            head = words.stride(1) * KV_VECTOR;
            token = words.stride(2) * KV_VECTOR;
        }
        PoolStrides { page, head, token }
    }

    /// Where token `slot` of head `head` in page (or sequence) `page` starts.
    pub fn at(&self, page: usize, head: usize, slot: usize) -> usize {
        page * self.page + head * self.head + slot * self.token
    }
}

/// Partial (or, with one split, final) attention of a chunk of packed rows over one key split.
#[cube(launch, address_type = "dynamic")]
pub fn decode_forward<E: Float, M: Hooks>(
    ops: &DecodeOperands<E>,
    outputs: &mut DecodeOutputs<E>,
    inputs: &RunInputs,
    args: Args,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) {
    let units = config.units();
    let chunk = Chunk::of_cube(&ops.q_offsets, args, dargs, config.rows(), config.ragged);
    let ctx = chunk.locate_sequence(&ops.lengths, inputs, args, dargs, config.facts());

    let mut unit = DecodeUnit::new(&ctx, chunk, inputs, config);
    // An fp8 cache's K scale goes into Q, its V scale into the normaliser.
    let mut k_scale = 1.0f32.runtime();
    if comptime!(config.fp8) {
        k_scale = ops.scales[chunk.kv_head];
        unit.v_scale = ops.scales[ops.scales.len() / 2 + chunk.kv_head];
    }
    unit.load_q_rows::<E>(&ops.q, &ctx, chunk, k_scale, config);

    let walk = split_walk(&ctx, chunk, config.block_kv());
    for index in walk.first_step..walk.end_step {
        let keys = walk.keys(index, units);
        let step = Step {
            keys,
            class: classify_rows::<M>(&ctx, walk, keys, chunk, inputs),
        };
        if step.class != TILE_EMPTY {
            // The previous step's P·V has read every probability and key address.
            sync_cube();
            let k_base = unit.key_address::<E>(ops, &ctx, keys, dargs, config);
            let at = UnitKey { step, k_base };
            unit.key_scores::<E, M>(ops, at, &ctx, inputs, config);
            unit.row_maxima(&ctx, config);
            unit.probabilities(&ctx, config);
            sync_cube();
            unit.accumulate_pv::<E>(ops, keys.len, config);
        }
    }

    unit.finish::<E>(outputs, &ctx, chunk, inputs, config);
}

/// Row `row`'s index among O's `[B, Hq, Nq]` rows (ragged: `[1, Hq, total]`; `o_rows` is `[Hq,
/// Nq]`), as the LSE and the splits' partials are laid out and the combine step reads them.
#[cube]
pub fn output_row(o_rows: OutputRows, ctx: &Ctx, row: DecodeRow) -> usize {
    let seq = ctx.site;
    (seq.batch * o_rows.heads + row.head) * o_rows.tokens + seq.q_off + row.token
}

/// O's heads and query tokens per batch entry.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct OutputRows {
    /// Query heads.
    pub heads: usize,
    /// Query tokens (ragged: of every sequence).
    pub tokens: usize,
}

/// The cube's sequence's query tokens: where its first one is among Q's rows, and how many.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct SequenceQueries {
    /// Its first row of Q (0 unless ragged: Q's batch entry is the sequence then).
    pub first: usize,
    /// Its query tokens.
    pub count: usize,
}

#[cube]
impl SequenceQueries {
    /// The cube's sequence's: the launch's count, or its own from the offsets when ragged.
    pub fn of(
        q_offsets: &Tensor<i32>,
        dargs: DecodeArgs,
        #[comptime] ragged: bool,
    ) -> SequenceQueries {
        let mut first = 0usize.runtime();
        let mut count = dargs.queries as usize;
        if comptime!(ragged) {
            let b = CUBE_POS_Z as usize;
            first = q_offsets[b] as usize;
            count = q_offsets[b + 1] as usize - first;
        }
        SequenceQueries { first, count }
    }
}

/// What a decode kernel was compiled for, as [`locate_sequence()`] reads it.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct DecodeFacts {
    /// The mask, with per-sequence key lengths always on.
    pub mask: MaskSpec,
    /// The score modifications.
    pub score: ScoreFlags,
    /// Each sequence has its own count of query tokens.
    pub ragged: bool,
}

impl DecodeConfig {
    /// The facts [`locate_sequence()`] reads.
    pub const fn facts(&self) -> DecodeFacts {
        DecodeFacts {
            mask: self.mask,
            score: self.score,
            ragged: self.ragged,
        }
    }
}

/// The cube's sequence as the mask sees it: its keys are the cache's length from the device
/// (cut to the capacity), and further cut by the variant's own key lengths where it declares them;
/// its queries are its own count, the last tokens of the sequence. Ragged, its rows of Q and O
/// start at `queries.first` of batch entry 0 (`site.q_off`, `site.batch`); the cache is read at
/// `site.index`, the sequence, either way.
#[cube]
pub fn locate_sequence(
    lengths: &Tensor<i32>,
    inputs: &RunInputs,
    args: Args,
    at: SequenceAt,
    #[comptime] facts: DecodeFacts,
) -> Ctx {
    let sequence = CUBE_POS_Z as usize;
    let stored = lengths[sequence];
    let capacity = at.capacity;
    let mut cached = 0usize.runtime();
    if stored > 0 {
        cached = select((stored as usize) < capacity, stored as usize, capacity);
    }
    let queries = at.queries;
    let lengths = Lengths {
        sequence,
        head: at.head,
        q_total: queries.count,
        k_total: cached,
    };
    let mut ctx = Ctx::locate(lengths, inputs, args, facts.mask, facts.score);
    if comptime!(facts.ragged) {
        ctx.site.batch = 0;
        ctx.site.q_off = queries.first;
    }
    // The variant's own key length (where it declares one) replaced the cache's: the smaller wins.
    ctx.keys_at_most(cached)
}

/// Which sequence's queries a cube serves, and its first row's query head.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct SequenceAt {
    /// Keys each sequence can hold: lengths past it are cut to it.
    pub capacity: usize,
    /// The query head of the cube's first row.
    pub head: usize,
    /// The sequence's query tokens.
    pub queries: SequenceQueries,
}

/// Locate the row: packed row `r` of K/V head `kv_head` is query head `kv_head·group + r / Nq`,
/// token `r % Nq`. A row past the group clamps to the last one (it computes, but writes nothing).
#[cube]
pub fn locate_row(r: usize, kv_head: usize, chunk: Chunk, args: Args) -> DecodeRow {
    let valid = r < chunk.group_rows;
    let at = select(valid, r, chunk.group_rows - 1);
    DecodeRow {
        head: kv_head * args.group as usize + at / chunk.queries,
        token: at % chunk.queries,
        valid,
    }
}

/// The walk of this cube's split: the keys its rows can see (mask terms in closed form, the key
/// length), cut to the split's share of them: the launch's splits (the grid's x) divide the
/// sequence's own visible keys, counted from the step of the first of them, in whole steps of
/// `block_kv`.
#[cube]
pub fn split_walk(ctx: &Ctx, chunk: Chunk, #[comptime] block_kv: usize) -> BlockWalk {
    let queries = chunk.queries;
    // The chunk's tokens: a contiguous run inside one head, else every token.
    let mut q_first = 0usize.runtime();
    let mut q_last = queries - 1;
    if chunk.first / queries == chunk.last / queries {
        q_first = chunk.first % queries;
        q_last = chunk.last % queries;
    }
    let range = key_range(ctx, q_first, q_last);
    // Under a window the splits divide the visible keys from the step holding the first of them
    // (the window's keys are spread over every split); without one the keys start at 0 and the
    // kernel is the same as before windows were split. Split starts are multiples of
    // `block_kv`, so a split's steps never reach into another's; a split past the row's keys
    // walks no step at all.
    // Each sequence's splits divide its own keys (a ragged batch's short sequences are spread
    // over every split too), in whole steps.
    let mut origin = 0usize.runtime();
    if comptime!(ctx.mask.has_left()) {
        origin = range.start / block_kv * block_kv;
    }
    let span = select(range.end > origin, range.end - origin, 0);
    let splits = CUBE_COUNT_X as usize;
    let steps = (span + block_kv - 1) / block_kv;
    let steps_per_split = select(steps > splits, (steps + splits - 1) / splits, 1);
    let keys_per_split = steps_per_split * block_kv;
    let split_start = origin + CUBE_POS_X as usize * keys_per_split;
    let split_end = split_start + keys_per_split;
    let end = select(range.end < split_end, range.end, split_end);
    let start = select(range.start > split_start, range.start, split_start);
    let first_step = start / block_kv;
    let end_step = select(start < end, (end + block_kv - 1) / block_kv, first_step);
    BlockWalk {
        q_first,
        q_last,
        range: KeyRange { start, end },
        first_step,
        end_step,
    }
}

/// Classify a step for every query head of the chunk: empty only if empty for all, full only if
/// full for all. Without a custom mask the class does not depend on the head: one call.
#[cube]
pub fn classify_rows<M: Hooks>(
    ctx: &Ctx,
    walk: BlockWalk,
    keys: StepKeys,
    chunk: Chunk,
    inputs: &RunInputs,
) -> u32 {
    let mut class = mask::classify::<M>(ctx, walk, keys, inputs);
    if comptime!(ctx.mask.custom) {
        let first = ctx.site.head;
        let last = locate_row(chunk.last, ctx.site.kv_head, chunk, ctx.args);
        let mut lowest = class;
        let mut highest = class;
        for head in first + 1..last.head + 1 {
            let head_ctx = ctx.with_head(head, ctx.site.slope);
            let c = mask::classify::<M>(&head_ctx, walk, keys, inputs);
            lowest = select(c < lowest, c, lowest);
            highest = select(c > highest, c, highest);
        }
        class = TILE_PARTIAL;
        if highest == TILE_EMPTY {
            class = TILE_EMPTY;
        }
        if lowest == TILE_FULL {
            class = TILE_FULL;
        }
    }
    class
}

/// The chunk's rows, worked out once per cube instead of per step: query head and token of each
/// row, its ALiBi slope (0 without ALiBi), and how many of the rows exist.
#[derive(CubeType)]
pub struct RowFacts {
    /// Query head per row.
    heads: Array<u32>,
    /// Query token per row.
    tokens: Array<u32>,
    /// ALiBi slope per row.
    slopes: Array<f32>,
    /// Rows that exist (the last chunk of a group can be short).
    valid: u32,
}

/// One unit's state and the cube's shared memory: the chunk's Q rows (f32, pre-scaled), the
/// scores and softmax scratch, the V key addresses of the step; in registers, the unit's scores
/// of its key for every row, its partial row sums, the step's corrections and its P·V
/// accumulators (4 columns of every row).
#[derive(CubeType)]
pub struct DecodeUnit {
    /// The chunk's rows.
    facts: RowFacts,
    /// Q rows in shared memory.
    q_rows: Shared<[F32x4]>,
    /// V row address per key of the step.
    v_bases: Shared<[usize]>,
    /// The f32 scratch ([`DecodeConfig::layout`]).
    smem: Shared<[f32]>,
    /// This unit's key's scores, one per row.
    scores: Array<f32>,
    /// Partial row sums.
    row_sums: Array<f32>,
    /// The step's correction per row.
    corrections: Array<f32>,
    /// P·V accumulators.
    acc: Array<f32>,
    /// An fp8 cache's V scale for the cube's K/V head (1 otherwise).
    v_scale: f32,
}

/// This unit's key of a step: the step, and where the key starts in K.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct UnitKey {
    /// The step.
    pub step: Step,
    /// Where the unit's key starts in K (0 past the step).
    pub k_base: usize,
}

#[cube]
impl DecodeUnit {
    /// The unit's state at the start of the walk, and the chunk's [`RowFacts`].
    pub fn new(
        ctx: &Ctx,
        chunk: Chunk,
        inputs: &RunInputs,
        #[comptime] config: DecodeConfig,
    ) -> DecodeUnit {
        let rows = config.rows();
        let units = config.units();
        let [_, _, max_at, _, _, smem_len] = config.layout();
        let mut smem = Shared::<[f32]>::new_slice(smem_len);
        let q_rows = Shared::<[F32x4]>::new_slice(rows * config.head_dim() / KV_VECTOR);
        let v_bases = Shared::<[usize]>::new_slice(units);
        let mut heads = Array::<u32>::new(rows);
        let mut tokens = Array::<u32>::new(rows);
        let mut slopes = Array::<f32>::new(rows);
        #[unroll]
        for r in 0..rows {
            let row = locate_row(chunk.first + r, ctx.site.kv_head, chunk, ctx.args);
            heads[r] = row.head as u32;
            tokens[r] = row.token as u32;
            let mut slope = ctx.site.slope;
            if comptime!(config.score.alibi) {
                let at = crate::inputs::slots::ALIBI_SLOPES as usize * inputs.slot_len as usize;
                slope = inputs.floats[at + row.head];
            }
            slopes[r] = slope;
        }
        let valid = select(
            chunk.first < chunk.group_rows,
            chunk.group_rows - chunk.first,
            0,
        );
        if (UNIT_POS as usize) < rows {
            smem[max_at + UNIT_POS as usize] = ctx.masked();
        }
        let mut row_sums = Array::<f32>::new(rows);
        let corrections = Array::<f32>::new(rows);
        let mut acc = Array::<f32>::new(rows * KV_VECTOR);
        #[unroll]
        for r in 0..rows {
            row_sums[r] = 0.0;
        }
        #[unroll]
        for i in 0..rows * KV_VECTOR {
            acc[i] = 0.0;
        }
        DecodeUnit {
            facts: RowFacts {
                heads,
                tokens,
                slopes,
                valid: valid as u32,
            },
            q_rows,
            v_bases,
            smem,
            scores: Array::<f32>::new(rows),
            row_sums,
            corrections,
            acc,
            v_scale: 1.0f32.runtime(),
        }
    }

    /// Load Q: the chunk's rows into shared memory as f32 vectors, pre-multiplied by the softmax
    /// scale and `k_scale` (an fp8 cache's K scale, else 1); rows past the group are 0.
    pub fn load_q_rows<E: Float>(
        &mut self,
        q: &Tensor<E>,
        ctx: &Ctx,
        chunk: Chunk,
        k_scale: f32,
        #[comptime] config: DecodeConfig,
    ) {
        let seq = ctx.site;
        let factor = ctx.args.scale * k_scale;
        let per_row = config.head_dim() / KV_VECTOR;
        for i in range_stepped(UNIT_POS as usize, config.rows() * per_row, config.units()) {
            let row = locate_row(chunk.first + i / per_row, seq.kv_head, chunk, ctx.args);
            let mut value = F32x4::new(0.0);
            if row.valid {
                let at = seq.batch * q.stride(0)
                    + row.head * q.stride(1)
                    + (seq.q_off + row.token) * q.stride(2)
                    + (i % per_row) * KV_VECTOR;
                #[unroll]
                for e in 0..KV_VECTOR {
                    value.insert(e, f32::cast_from(q[at + e]) * factor);
                }
            }
            self.q_rows[i] = value;
        }
    }

    /// Key address: where this unit's key starts in K (returned) and in V (into shared memory,
    /// for P·V), through one block-table lookup for a paged cache. Units past the step get 0
    /// (unused).
    pub fn key_address<E: Float>(
        &mut self,
        ops: &DecodeOperands<E>,
        ctx: &Ctx,
        keys: StepKeys,
        dargs: DecodeArgs,
        #[comptime] config: DecodeConfig,
    ) -> usize {
        let seq = ctx.site;
        let kv_head = seq.kv_head;
        let j = UNIT_POS as usize;
        let mut k_at = 0usize.runtime();
        let mut v_at = 0usize.runtime();
        if j < keys.len {
            let key = keys.start + j;
            let ks = PoolStrides::of(&ops.k, &ops.k8, config.fp8);
            let vs = PoolStrides::of(&ops.v, &ops.v8, config.fp8);
            // The cache's row is the sequence's (Q's batch entry is 0 when ragged).
            let sequence = seq.index as usize;
            let mut row = sequence;
            let mut slot = key;
            if comptime!(config.paged) {
                let page_size = dargs.page_size as usize;
                row = ops.table[sequence * dargs.max_pages as usize + key / page_size] as usize;
                slot = key % page_size;
            }
            k_at = ks.at(row, kv_head, slot);
            v_at = vs.at(row, kv_head, slot);
        }
        self.v_bases[j] = v_at;
        k_at
    }

    /// Scores: this unit's key against every row, in registers, then into shared memory. The K
    /// row is read in blocks of `chunk` vectors, each block's loads issued together; Q comes from
    /// shared memory (the same address for every unit: a broadcast). Score modification and, on
    /// partial steps, the mask apply; keys past the step and rows past the group score −∞.
    pub fn key_scores<E: Float, M: Hooks>(
        &mut self,
        ops: &DecodeOperands<E>,
        at: UnitKey,
        ctx: &Ctx,
        inputs: &RunInputs,
        #[comptime] config: DecodeConfig,
    ) {
        let step = at.step;
        let keys = step.keys;
        let rows = config.rows();
        let per_row = config.head_dim() / KV_VECTOR;
        let j = UNIT_POS as usize;
        let present = j < keys.len;
        #[unroll]
        for r in 0..rows {
            self.scores[r] = 0.0;
        }
        let chunk = config.chunk();
        if comptime!(config.fp8) {
            let mut words = Array::<u32>::new(chunk);
            for block in 0..(per_row + chunk - 1) / chunk {
                #[unroll]
                for i in 0..chunk {
                    let c = block * chunk + i;
                    let mut x = 0u32.runtime();
                    if present && c < per_row {
                        x = ops.k8[at.k_base / KV_VECTOR + c];
                    }
                    words[i] = x;
                }
                #[unroll]
                for i in 0..chunk {
                    let c = block * chunk + i;
                    if c < per_row {
                        self.add_products(unpack(words[i]), c, config);
                    }
                }
            }
        } else {
            let mut k_vectors = Array::<KvVector<E>>::new(chunk);
            for block in 0..(per_row + chunk - 1) / chunk {
                #[unroll]
                for i in 0..chunk {
                    let c = block * chunk + i;
                    let mut x = KvVector::<E>::new(E::cast_from(0.0f32));
                    if present && c < per_row {
                        x = ops.k[at.k_base / KV_VECTOR + c];
                    }
                    k_vectors[i] = x;
                }
                #[unroll]
                for i in 0..chunk {
                    let c = block * chunk + i;
                    if c < per_row {
                        self.add_products(F32x4::cast_from(k_vectors[i]), c, config);
                    }
                }
            }
        }
        let key = (keys.start + j) as i32;
        #[unroll]
        for r in 0..rows {
            let token = self.facts.tokens[r] as i32;
            let mut s = self.scores[r];
            if comptime!(config.score.modifies_scores()) {
                let row_ctx = ctx.with_head(self.facts.heads[r] as usize, self.facts.slopes[r]);
                s = score::modify::<M>(s, &row_ctx, token, key, inputs);
            }
            let mut visible = present && (r as u32) < self.facts.valid;
            if comptime!(!config.mask.is_none()) {
                if step.partial() {
                    let row_ctx = ctx.with_head(self.facts.heads[r] as usize, self.facts.slopes[r]);
                    visible = visible && mask::visible::<M>(&row_ctx, token, key, inputs);
                }
            }
            self.scores[r] = select(visible, s, ctx.masked());
        }
        let [scores_at, _, _, _, _, _] = config.layout();
        let units = config.units();
        #[unroll]
        for r in 0..rows {
            self.smem[scores_at + r * units + j] = self.scores[r];
        }
        sync_cube();
    }

    /// Scores += K vector `c` (as f32) · every row's Q vector `c`.
    fn add_products(&mut self, kf: F32x4, c: usize, #[comptime] config: DecodeConfig) {
        let per_row = config.head_dim() / KV_VECTOR;
        #[unroll]
        for r in 0..config.rows() {
            let qv = self.q_rows[r * per_row + c];
            let mut dot = self.scores[r];
            #[unroll]
            for e in 0..KV_VECTOR {
                dot += kf.extract(e) * qv.extract(e);
            }
            self.scores[r] = dot;
        }
    }

    /// Row maxima: per row, `row_lanes` partial maxima over the scores, then one unit per row
    /// folds them into the running max and writes the new max and the correction
    /// `exp(old − new)`; every unit then reads the corrections.
    pub fn row_maxima(&mut self, ctx: &Ctx, #[comptime] config: DecodeConfig) {
        let rows = config.rows();
        let units = config.units();
        let lanes = config.row_lanes();
        let [scores_at, partial_at, max_at, corr_at, _, _] = config.layout();
        let unit = UNIT_POS as usize;
        let r = unit / lanes;
        let lane = unit % lanes;
        let mut m = ctx.masked();
        #[unroll]
        for i in 0..units / lanes {
            m = larger(self.smem[scores_at + r * units + lane + i * lanes], m);
        }
        self.smem[partial_at + unit] = m;
        sync_cube();
        if unit < rows {
            let mut step_max = ctx.masked();
            #[unroll]
            for l in 0..lanes {
                step_max = larger(self.smem[partial_at + unit * lanes + l], step_max);
            }
            let old = self.smem[max_at + unit];
            let new = larger(step_max, old);
            self.smem[max_at + unit] = new;
            self.smem[corr_at + unit] = (old - RowState::base(new, ctx)).exp();
        }
        sync_cube();
        #[unroll]
        for r in 0..rows {
            self.corrections[r] = self.smem[corr_at + r];
        }
    }

    /// Probabilities: this unit's scores become `exp(s − max)` (0 where masked), written over its
    /// scores for P·V; its partial row sums are rescaled and grow.
    pub fn probabilities(&mut self, ctx: &Ctx, #[comptime] config: DecodeConfig) {
        let units = config.units();
        let [scores_at, _, max_at, _, _, _] = config.layout();
        let unit = UNIT_POS as usize;
        #[unroll]
        for r in 0..config.rows() {
            let p = probability(self.scores[r], self.smem[max_at + r], ctx);
            self.row_sums[r] = self.row_sums[r] * self.corrections[r] + p;
            self.smem[scores_at + r * units + unit] = p;
        }
    }

    /// P·V: rescale this unit's accumulators (4 columns of every row) and add its key group's
    /// share of the step: per key, the group's lanes read the V row together, in blocks of
    /// `chunk` keys whose loads are issued together.
    pub fn accumulate_pv<E: Float>(
        &mut self,
        ops: &DecodeOperands<E>,
        kv_len: usize,
        #[comptime] config: DecodeConfig,
    ) {
        let rows = config.rows();
        let per_group = config.keys_per_group();
        let unit = UNIT_POS as usize;
        let lane = unit % config.col_lanes();
        let group = unit / config.col_lanes();
        #[unroll]
        for r in 0..rows {
            #[unroll]
            for e in 0..KV_VECTOR {
                self.acc[r * KV_VECTOR + e] *= self.corrections[r];
            }
        }
        // Units past the last whole key group (value dims that do not divide the units) idle here.
        if group < config.key_groups() {
            let chunk = config.chunk();
            if comptime!(config.fp8) {
                let mut words = Array::<u32>::new(chunk);
                for block in 0..(per_group + chunk - 1) / chunk {
                    #[unroll]
                    for i in 0..chunk {
                        let j = group * per_group + block * chunk + i;
                        let mut x = 0u32.runtime();
                        if j < kv_len && block * chunk + i < per_group {
                            x = ops.v8[self.v_bases[j] / KV_VECTOR + lane];
                        }
                        words[i] = x;
                    }
                    #[unroll]
                    for i in 0..chunk {
                        let j = group * per_group + block * chunk + i;
                        if j < kv_len && block * chunk + i < per_group {
                            self.add_pv(unpack(words[i]), j, config);
                        }
                    }
                }
            } else {
                let mut v_vectors = Array::<KvVector<E>>::new(chunk);
                for block in 0..(per_group + chunk - 1) / chunk {
                    #[unroll]
                    for i in 0..chunk {
                        let j = group * per_group + block * chunk + i;
                        let mut x = KvVector::<E>::new(E::cast_from(0.0f32));
                        if j < kv_len && block * chunk + i < per_group {
                            x = ops.v[self.v_bases[j] / KV_VECTOR + lane];
                        }
                        v_vectors[i] = x;
                    }
                    #[unroll]
                    for i in 0..chunk {
                        let j = group * per_group + block * chunk + i;
                        if j < kv_len && block * chunk + i < per_group {
                            self.add_pv(F32x4::cast_from(v_vectors[i]), j, config);
                        }
                    }
                }
            }
        }
    }

    /// Accumulators += every row's probability of key `j` × this unit's 4 columns of its V row.
    fn add_pv(&mut self, vf: F32x4, j: usize, #[comptime] config: DecodeConfig) {
        let units = config.units();
        let [scores_at, _, _, _, _, _] = config.layout();
        #[unroll]
        for r in 0..config.rows() {
            let p = self.smem[scores_at + r * units + j];
            #[unroll]
            for e in 0..KV_VECTOR {
                self.acc[r * KV_VECTOR + e] += p * vf.extract(e);
            }
        }
    }

    /// Finish: sum the key groups' accumulators and the units' row sums through shared memory;
    /// then, with one split, normalise (sinks folded in) and write O and the LSE; with several,
    /// write the normalised partial output and the partial LSE (−∞ for a split that saw no key).
    pub fn finish<E: Float>(
        &mut self,
        outputs: &mut DecodeOutputs<E>,
        ctx: &Ctx,
        chunk: Chunk,
        inputs: &RunInputs,
        #[comptime] config: DecodeConfig,
    ) {
        let seq = ctx.site;
        let o_rows = OutputRows {
            heads: outputs.o.shape(1),
            tokens: outputs.o.shape(2),
        };
        let rows = config.rows();
        let units = config.units();
        let value_dim = config.value_dim();
        let [scores_at, _, max_at, _, out_at, _] = config.layout();
        let unit = UNIT_POS as usize;
        let lane = unit % config.col_lanes();
        let group = unit / config.col_lanes();
        sync_cube();
        #[unroll]
        for r in 0..rows {
            self.smem[scores_at + r * units + unit] = self.row_sums[r];
        }
        // Key group by key group, the accumulators add up in shared memory.
        for g in 0..config.key_groups() {
            if group == g {
                #[unroll]
                for r in 0..rows {
                    #[unroll]
                    for e in 0..KV_VECTOR {
                        let at = out_at + r * value_dim + lane * KV_VECTOR + e;
                        let mut sum = self.acc[r * KV_VECTOR + e];
                        if g > 0 {
                            sum += self.smem[at];
                        }
                        self.smem[at] = sum;
                    }
                }
            }
            sync_cube();
        }
        // One unit per row: the row sum, the LSE and the normaliser.
        if unit < rows {
            let mut sum = 0.0f32.runtime();
            for u in 0..units {
                sum += self.smem[scores_at + unit * units + u];
            }
            let mut state = RowState {
                max: self.smem[max_at + unit],
                sum,
            };
            let row = locate_row(chunk.first + unit, seq.kv_head, chunk, ctx.args);
            let row_index = output_row(o_rows, ctx, row);
            let mut factor = 1.0f32.runtime();
            if comptime!(!config.split) {
                let row_ctx = ctx.with_head(row.head, ctx.site.slope);
                factor = state.fold_sink(&row_ctx, inputs);
            }
            // The normaliser (times an fp8 cache's V scale) goes where the row sums were; the LSE
            // is written right away.
            let mut normaliser = state.normaliser(factor);
            if comptime!(config.fp8) {
                normaliser *= self.v_scale;
            }
            self.smem[scores_at + unit * units] = normaliser;
            let value = state.lse(ctx);
            if row.valid {
                if comptime!(config.split) {
                    outputs.lse[row_index * CUBE_COUNT_X as usize + CUBE_POS_X as usize] = value;
                } else {
                    outputs.lse[row_index] = value;
                }
            }
        }
        sync_cube();
        // Every unit writes whole rows' columns: element `i` of the chunk's `rows × value_dim`.
        for i in range_stepped(unit, rows * value_dim, units) {
            let r = i / value_dim;
            let c = i % value_dim;
            let row = locate_row(chunk.first + r, seq.kv_head, chunk, ctx.args);
            if row.valid {
                let o = self.smem[out_at + i] * self.smem[scores_at + r * units];
                let row_index = output_row(o_rows, ctx, row);
                if comptime!(config.split) {
                    let part = row_index * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
                    outputs.part_o[part * value_dim + c] = o;
                } else {
                    let at = seq.batch * outputs.o.stride(0)
                        + row.head * outputs.o.stride(1)
                        + (seq.q_off + row.token) * outputs.o.stride(2);
                    outputs.o[at + c] = E::cast_from(o);
                }
            }
        }
    }
}
