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
//! through shared memory:
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
//! its normalised partial output and partial LSE in f32, and [`crate::kernels::combine`] merges
//! them exactly; sinks join only there, once. No plane operations, no tensor cores: it runs on
//! every cubecl back end.

// `#[cube]` code: `div_ceil` has no GPU expansion, and a comptime `if` around a run-time one must
// stay separate (the outer branch disappears at expansion, the inner one is kept).
#![allow(
    clippy::manual_div_ceil,
    clippy::collapsible_if,
    clippy::too_many_arguments
)]

use cubecl::prelude::*;

use crate::hooks::{Hooks, TILE_EMPTY, TILE_FULL, TILE_PARTIAL};
use crate::kernels::mask::{
    classify_step, finish_state, key_range, key_visible, locate_sequence, modify_score, step_keys,
    BlockWalk, KeyRange, SequenceSpan, StepKeys,
};
use crate::kernels::prefill::{PrefillArgs, RowState};
use crate::variant::{MaskSpec, ScoreFlags};

/// Elements per global load of K and V, and per shared-memory read of Q: 4 (8 bytes of a 16-bit
/// type), the widest vector every back end has. Head dims are multiples of 4; the launcher checks
/// the cache's strides are too.
pub const KV_VECTOR: usize = 4;

/// One global load of K or V.
pub type KvVector<E> = Vector<E, Const<4>>;

/// Four f32 values: a piece of a Q row in shared memory.
type F32x4 = Vector<f32, Const<4>>;

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
    /// maxima, row maxima and corrections, V key addresses, and the final accumulator sum.
    pub const fn shared_bytes(&self, head_dim: u32, value_dim: u32) -> usize {
        let (rows, units) = (self.rows as usize, self.units as usize);
        let floats =
            rows * head_dim as usize + rows * units + units + 2 * rows + rows * value_dim as usize;
        4 * floats + 4 * units
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
    /// Several key splits: write partial results for [`crate::kernels::combine`].
    pub split: bool,
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

/// Run-time scalars of a decode launch besides [`PrefillArgs`].
#[derive(CubeType, CubeLaunch, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct DecodeArgs {
    /// Query tokens per sequence.
    pub queries: u32,
    /// Rows of one K/V head: group × query tokens.
    pub group_rows: u32,
    /// Tokens per page (paged caches).
    pub page_size: u32,
    /// Entries per sequence in the block table.
    pub max_pages: u32,
    /// Keys per split (a multiple of `units`).
    pub keys_per_split: u32,
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

/// Partial (or, with one split, final) attention of a chunk of packed rows over one key split.
#[cube(launch)]
pub fn decode_forward<E: Float, M: Hooks>(
    q: &Tensor<E>,
    k: &Tensor<KvVector<E>>,
    v: &Tensor<KvVector<E>>,
    table: &Tensor<i32>,
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    part_o: &mut Tensor<f32>,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) {
    let rows = config.rows();
    let units = config.units();
    let [_, _, max_at, corr_at, _, smem_len] = config.layout();

    let group_rows = dargs.group_rows as usize;
    let chunks = (group_rows + rows - 1) / rows;
    let kv_head = CUBE_POS_Y as usize / chunks;
    let first_row = (CUBE_POS_Y as usize % chunks) * rows;
    let last_row = select(first_row + rows < group_rows, first_row + rows, group_rows) - 1;
    let unit = UNIT_POS as usize;
    let seq = locate_sequence(
        CUBE_POS_Z as usize,
        locate_row(first_row, kv_head, args, dargs).head,
        q.shape(2),
        0,
        ints,
        floats,
        args,
        config.mask,
        config.score,
    );

    let mut smem = Shared::<[f32]>::new_slice(smem_len);
    let mut q_rows = Shared::<[F32x4]>::new_slice(rows * config.head_dim() / KV_VECTOR);
    let mut v_bases = Shared::<[u32]>::new_slice(units);
    load_q_rows::<E>(q, &mut q_rows, seq, first_row, kv_head, args, dargs, config);
    if unit < rows {
        smem[max_at + unit] = -1.0e30f32;
    }

    let walk = split_walk(seq, first_row, last_row, args, dargs, config);
    let rows_facts = row_facts(seq, first_row, kv_head, floats, args, dargs, config);
    let mut scores = Array::<f32>::new(rows);
    let mut row_sums = Array::<f32>::new(rows);
    let mut corrections = Array::<f32>::new(rows);
    let mut acc = Array::<f32>::new(rows * KV_VECTOR);
    #[unroll]
    for r in 0..rows {
        row_sums[r] = 0.0;
    }
    #[unroll]
    for i in 0..rows * KV_VECTOR {
        acc[i] = 0.0;
    }

    for step in walk.first_step..walk.end_step {
        let keys = step_keys(walk, step, units);
        let class = classify_rows::<M>(
            seq, walk, keys, first_row, last_row, kv_head, ints, floats, args, dargs, config,
        );
        if class != TILE_EMPTY {
            // The previous step's P·V has read every probability and key address.
            sync_cube();
            let k_base = key_address(k, v, table, &mut v_bases, seq, kv_head, keys, dargs, config);
            key_scores::<E, M>(
                k,
                &q_rows,
                &mut scores,
                k_base,
                seq,
                &rows_facts,
                keys,
                class,
                ints,
                floats,
                args,
                config,
            );
            let [scores_at, _, _, _, _, _] = config.layout();
            #[unroll]
            for r in 0..rows {
                smem[scores_at + r * units + unit] = scores[r];
            }
            sync_cube();
            row_maxima(&mut smem, config);
            sync_cube();
            #[unroll]
            for r in 0..rows {
                corrections[r] = smem[corr_at + r];
            }
            probabilities(&mut smem, &scores, &mut row_sums, &corrections, config);
            sync_cube();
            accumulate_pv::<E>(v, &smem, &v_bases, &mut acc, &corrections, keys.len, config);
        }
    }

    finish::<E>(
        out,
        lse,
        part_o,
        &mut smem,
        &acc,
        &row_sums,
        seq,
        first_row,
        kv_head,
        q.shape(1),
        floats,
        args,
        dargs,
        config,
    );
}

/// The chunk's rows, worked out once per cube instead of per step: query head and token of each
/// row, its ALiBi slope (0 without ALiBi), and how many of the rows exist.
#[derive(CubeType)]
struct RowFacts {
    /// Query head per row.
    heads: Array<u32>,
    /// Query token per row.
    tokens: Array<u32>,
    /// ALiBi slope per row.
    slopes: Array<f32>,
    /// Rows that exist (the last chunk of a group can be short).
    valid: u32,
}

/// Work out the chunk's [`RowFacts`].
#[cube]
fn row_facts(
    seq: SequenceSpan,
    first_row: usize,
    kv_head: usize,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) -> RowFacts {
    let rows = config.rows();
    let mut heads = Array::<u32>::new(rows);
    let mut tokens = Array::<u32>::new(rows);
    let mut slopes = Array::<f32>::new(rows);
    #[unroll]
    for r in 0..rows {
        let row = locate_row(first_row + r, kv_head, args, dargs);
        heads[r] = row.head as u32;
        tokens[r] = row.token as u32;
        let mut slope = seq.slope;
        if comptime!(config.score.alibi) {
            let at = crate::inputs::slots::ALIBI_SLOPES as usize * args.slot_len as usize;
            slope = floats[at + row.head];
        }
        slopes[r] = slope;
    }
    let group_rows = dargs.group_rows as usize;
    let valid = select(first_row < group_rows, group_rows - first_row, 0);
    RowFacts {
        heads,
        tokens,
        slopes,
        valid: valid as u32,
    }
}

/// Locate the row: packed row `r` of K/V head `kv_head` is query head `kv_head·group + r / Nq`,
/// token `r % Nq`. A row past the group clamps to the last one (it computes, but writes nothing).
#[cube]
fn locate_row(r: usize, kv_head: usize, args: PrefillArgs, dargs: DecodeArgs) -> DecodeRow {
    let group_rows = dargs.group_rows as usize;
    let valid = r < group_rows;
    let at = select(valid, r, group_rows - 1);
    let queries = dargs.queries as usize;
    DecodeRow {
        head: kv_head * args.group as usize + at / queries,
        token: at % queries,
        valid,
    }
}

/// The walk of this cube's split: the keys its rows can see (mask terms in closed form, the key
/// length), cut to the split's `keys_per_split` keys, in steps of `block_kv`.
#[cube]
fn split_walk(
    seq: SequenceSpan,
    first_row: usize,
    last_row: usize,
    args: PrefillArgs,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) -> BlockWalk {
    let queries = dargs.queries as usize;
    // The chunk's tokens: a contiguous run inside one head, else every token.
    let mut q_first = 0usize.runtime();
    let mut q_last = queries - 1;
    if first_row / queries == last_row / queries {
        q_first = first_row % queries;
        q_last = last_row % queries;
    }
    let range = key_range(seq, q_first, q_last, args, config.mask);
    let split_start = CUBE_POS_X as usize * dargs.keys_per_split as usize;
    let split_end = split_start + dargs.keys_per_split as usize;
    let end = select(range.end < split_end, range.end, split_end);
    let start = select(range.start > split_start, range.start, split_start);
    let block_kv = config.block_kv();
    // Split starts are multiples of `block_kv`, so a split's steps never reach into another's;
    // a split past the row's keys walks no step at all.
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
fn classify_rows<M: Hooks>(
    seq: SequenceSpan,
    walk: BlockWalk,
    keys: StepKeys,
    first_row: usize,
    last_row: usize,
    kv_head: usize,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) -> u32 {
    let first = locate_row(first_row, kv_head, args, dargs);
    let mut class =
        classify_step::<M>(seq, first.head, walk, keys, ints, floats, args, config.mask);
    if comptime!(config.mask.custom) {
        let last = locate_row(last_row, kv_head, args, dargs);
        let mut lowest = class;
        let mut highest = class;
        for head in first.head + 1..last.head + 1 {
            let c = classify_step::<M>(seq, head, walk, keys, ints, floats, args, config.mask);
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

/// Load Q: the chunk's rows into shared memory as f32 vectors, pre-multiplied by the softmax
/// scale; rows past the group are 0.
#[cube]
fn load_q_rows<E: Float>(
    q: &Tensor<E>,
    q_rows: &mut Shared<[F32x4]>,
    seq: SequenceSpan,
    first_row: usize,
    kv_head: usize,
    args: PrefillArgs,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) {
    let per_row = config.head_dim() / KV_VECTOR;
    for i in range_stepped(UNIT_POS as usize, config.rows() * per_row, config.units()) {
        let row = locate_row(first_row + i / per_row, kv_head, args, dargs);
        let mut value = F32x4::new(0.0);
        if row.valid {
            let at = seq.batch * q.stride(0)
                + row.head * q.stride(1)
                + row.token * q.stride(2)
                + (i % per_row) * KV_VECTOR;
            #[unroll]
            for e in 0..KV_VECTOR {
                value.insert(e, f32::cast_from(q[at + e]) * args.scale);
            }
        }
        q_rows[i] = value;
    }
}

/// Key address: where this unit's key starts in K (returned) and in V (into shared memory, for
/// P·V), through one block-table lookup for a paged cache. Units past the step get 0 (unused).
#[cube]
fn key_address<E: Float>(
    k: &Tensor<KvVector<E>>,
    v: &Tensor<KvVector<E>>,
    table: &Tensor<i32>,
    v_bases: &mut Shared<[u32]>,
    seq: SequenceSpan,
    kv_head: usize,
    keys: StepKeys,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) -> usize {
    let j = UNIT_POS as usize;
    let mut k_at = 0usize.runtime();
    let mut v_at = 0usize.runtime();
    if j < keys.len {
        let key = keys.start + j;
        k_at = seq.batch * k.stride(0) + kv_head * k.stride(1) + key * k.stride(2);
        v_at = seq.batch * v.stride(0) + kv_head * v.stride(1) + key * v.stride(2);
        if comptime!(config.paged) {
            let page_size = dargs.page_size as usize;
            let page = table[seq.batch * dargs.max_pages as usize + key / page_size] as usize;
            let slot = key % page_size;
            k_at = page * k.stride(0) + kv_head * k.stride(1) + slot * k.stride(2);
            v_at = page * v.stride(0) + kv_head * v.stride(1) + slot * v.stride(2);
        }
    }
    v_bases[j] = v_at as u32;
    k_at
}

/// Scores: this unit's key against every row, in registers. The K row is read in blocks of
/// `chunk` vectors, each block's loads issued together; Q comes from shared memory (the same
/// address for every unit: a broadcast). Score modification and, on partial steps, the mask
/// apply; keys past the step and rows past the group score −1e30 (masked).
#[cube]
fn key_scores<E: Float, M: Hooks>(
    k: &Tensor<KvVector<E>>,
    q_rows: &Shared<[F32x4]>,
    scores: &mut Array<f32>,
    k_base: usize,
    seq: SequenceSpan,
    rows_facts: &RowFacts,
    keys: StepKeys,
    class: u32,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: DecodeConfig,
) {
    let rows = config.rows();
    let per_row = config.head_dim() / KV_VECTOR;
    let j = UNIT_POS as usize;
    let present = j < keys.len;
    #[unroll]
    for r in 0..rows {
        scores[r] = 0.0;
    }
    let chunk = config.chunk();
    let mut k_vectors = Array::<KvVector<E>>::new(chunk);
    for block in 0..(per_row + chunk - 1) / chunk {
        #[unroll]
        for i in 0..chunk {
            let c = block * chunk + i;
            let mut x = KvVector::<E>::new(E::cast_from(0.0f32));
            if present && c < per_row {
                x = k[k_base / KV_VECTOR + c];
            }
            k_vectors[i] = x;
        }
        #[unroll]
        for i in 0..chunk {
            let c = block * chunk + i;
            if c < per_row {
                add_products(scores, F32x4::cast_from(k_vectors[i]), q_rows, c, config);
            }
        }
    }
    let key = (keys.start + j) as i32;
    #[unroll]
    for r in 0..rows {
        let head = rows_facts.heads[r] as usize;
        let token = rows_facts.tokens[r] as i32;
        let mut s = scores[r];
        if comptime!(config.score.modifies_scores()) {
            let mut row_seq = seq;
            row_seq.slope = rows_facts.slopes[r];
            s = modify_score::<M>(
                s,
                row_seq,
                head,
                token,
                key,
                ints,
                floats,
                args,
                config.score,
            );
        }
        let mut visible = present && (r as u32) < rows_facts.valid;
        if comptime!(!config.mask.is_none()) {
            if class == TILE_PARTIAL {
                visible = visible
                    && key_visible::<M>(seq, head, token, key, ints, floats, args, config.mask);
            }
        }
        scores[r] = select(visible, s, -1.0e30f32);
    }
}

/// Scores += K vector `c` (as f32) · every row's Q vector `c`.
#[cube]
fn add_products(
    scores: &mut Array<f32>,
    kf: F32x4,
    q_rows: &Shared<[F32x4]>,
    c: usize,
    #[comptime] config: DecodeConfig,
) {
    let per_row = config.head_dim() / KV_VECTOR;
    #[unroll]
    for r in 0..config.rows() {
        let qv = q_rows[r * per_row + c];
        let mut dot = scores[r];
        #[unroll]
        for e in 0..KV_VECTOR {
            dot += kf.extract(e) * qv.extract(e);
        }
        scores[r] = dot;
    }
}

/// Row maxima: per row, `row_lanes` partial maxima over the scores, then one unit per row folds
/// them into the running max and writes the new max and the correction `exp(old − new)`.
#[cube]
fn row_maxima(smem: &mut Shared<[f32]>, #[comptime] config: DecodeConfig) {
    let rows = config.rows();
    let units = config.units();
    let lanes = config.row_lanes();
    let [scores_at, partial_at, max_at, corr_at, _, _] = config.layout();
    let unit = UNIT_POS as usize;
    let r = unit / lanes;
    let lane = unit % lanes;
    let mut m = (-1.0e30f32).runtime();
    #[unroll]
    for i in 0..units / lanes {
        let s = smem[scores_at + r * units + lane + i * lanes];
        m = select(s > m, s, m);
    }
    smem[partial_at + unit] = m;
    sync_cube();
    if unit < rows {
        let mut step_max = (-1.0e30f32).runtime();
        #[unroll]
        for l in 0..lanes {
            let p = smem[partial_at + unit * lanes + l];
            step_max = select(p > step_max, p, step_max);
        }
        let old = smem[max_at + unit];
        let new = select(step_max > old, step_max, old);
        smem[max_at + unit] = new;
        smem[corr_at + unit] = (old - new).exp();
    }
}

/// Probabilities: this unit's scores become `exp(s − max)` (0 where masked), written over its
/// scores for P·V; its partial row sums are rescaled and grow.
#[cube]
fn probabilities(
    smem: &mut Shared<[f32]>,
    scores: &Array<f32>,
    row_sums: &mut Array<f32>,
    corrections: &Array<f32>,
    #[comptime] config: DecodeConfig,
) {
    let units = config.units();
    let [scores_at, _, max_at, _, _, _] = config.layout();
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..config.rows() {
        let s = scores[r];
        let p = select(s > -5.0e29f32, (s - smem[max_at + r]).exp(), 0.0f32);
        row_sums[r] = row_sums[r] * corrections[r] + p;
        smem[scores_at + r * units + unit] = p;
    }
}

/// P·V: rescale this unit's accumulators (4 columns of every row) and add its key group's share of
/// the step: per key, the group's lanes read the V row together, in blocks of `chunk` keys whose
/// loads are issued together.
#[cube]
fn accumulate_pv<E: Float>(
    v: &Tensor<KvVector<E>>,
    smem: &Shared<[f32]>,
    v_bases: &Shared<[u32]>,
    acc: &mut Array<f32>,
    corrections: &Array<f32>,
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
            acc[r * KV_VECTOR + e] *= corrections[r];
        }
    }
    // Units past the last whole key group (value dims that do not divide the units) idle here.
    if group < config.key_groups() {
        let chunk = config.chunk();
        let mut v_vectors = Array::<KvVector<E>>::new(chunk);
        for block in 0..(per_group + chunk - 1) / chunk {
            #[unroll]
            for i in 0..chunk {
                let j = group * per_group + block * chunk + i;
                let mut x = KvVector::<E>::new(E::cast_from(0.0f32));
                if j < kv_len && block * chunk + i < per_group {
                    x = v[v_bases[j] as usize / KV_VECTOR + lane];
                }
                v_vectors[i] = x;
            }
            #[unroll]
            for i in 0..chunk {
                let j = group * per_group + block * chunk + i;
                if j < kv_len && block * chunk + i < per_group {
                    add_pv(acc, F32x4::cast_from(v_vectors[i]), smem, j, config);
                }
            }
        }
    }
}

/// Accumulators += every row's probability of key `j` × this unit's 4 columns of its V row.
#[cube]
fn add_pv(
    acc: &mut Array<f32>,
    vf: F32x4,
    smem: &Shared<[f32]>,
    j: usize,
    #[comptime] config: DecodeConfig,
) {
    let units = config.units();
    let [scores_at, _, _, _, _, _] = config.layout();
    #[unroll]
    for r in 0..config.rows() {
        let p = smem[scores_at + r * units + j];
        #[unroll]
        for e in 0..KV_VECTOR {
            acc[r * KV_VECTOR + e] += p * vf.extract(e);
        }
    }
}

/// Finish: sum the key groups' accumulators and the units' row sums through shared memory; then,
/// with one split, normalise (sinks folded in) and write O and the LSE; with several, write the
/// normalised partial output and the partial LSE (−∞ for a split that saw no key).
#[cube]
fn finish<E: Float>(
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    part_o: &mut Tensor<f32>,
    smem: &mut Shared<[f32]>,
    acc: &Array<f32>,
    row_sums: &Array<f32>,
    seq: SequenceSpan,
    first_row: usize,
    kv_head: usize,
    heads_q: usize,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) {
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
        smem[scores_at + r * units + unit] = row_sums[r];
    }
    // Key group by key group, the accumulators add up in shared memory.
    for g in 0..config.key_groups() {
        if group == g {
            #[unroll]
            for r in 0..rows {
                #[unroll]
                for e in 0..KV_VECTOR {
                    let at = out_at + r * value_dim + lane * KV_VECTOR + e;
                    let mut sum = acc[r * KV_VECTOR + e];
                    if g > 0 {
                        sum += smem[at];
                    }
                    smem[at] = sum;
                }
            }
        }
        sync_cube();
    }
    // One unit per row: the row sum, the LSE and the normaliser.
    if unit < rows {
        let mut sum = 0.0f32.runtime();
        for u in 0..units {
            sum += smem[scores_at + unit * units + u];
        }
        let mut state = RowState {
            max: smem[max_at + unit],
            sum,
        };
        let row = locate_row(first_row + unit, kv_head, args, dargs);
        let row_index = (seq.batch * heads_q + row.head) * dargs.queries as usize + row.token;
        let mut factor = 1.0f32.runtime();
        if comptime!(!config.split) {
            factor = finish_state(&mut state, row.head, floats, args, config.score);
        }
        let seen = state.sum > 0.0;
        // The normaliser goes where the row sums were; the LSE is written right away.
        smem[scores_at + unit * units] = select(seen, factor / state.sum, 0.0f32);
        let value = select(seen, state.max + state.sum.ln(), args.neg_inf);
        if row.valid {
            if comptime!(config.split) {
                lse[row_index * CUBE_COUNT_X as usize + CUBE_POS_X as usize] = value;
            } else {
                lse[row_index] = value;
            }
        }
    }
    sync_cube();
    // Every unit writes whole rows' columns: element `i` of the chunk's `rows × value_dim`.
    for i in range_stepped(unit, rows * value_dim, units) {
        let r = i / value_dim;
        let c = i % value_dim;
        let row = locate_row(first_row + r, kv_head, args, dargs);
        if row.valid {
            let o = smem[out_at + i] * smem[scores_at + r * units];
            let row_index = (seq.batch * heads_q + row.head) * dargs.queries as usize + row.token;
            if comptime!(config.split) {
                let part = row_index * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
                part_o[part * value_dim + c] = o;
            } else {
                let at = seq.batch * out.stride(0)
                    + row.head * out.stride(1)
                    + row.token * out.stride(2);
                out[at + c] = E::cast_from(o);
            }
        }
    }
}
