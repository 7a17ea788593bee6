//! The decode kernel: a few query tokens per sequence against a long K/V cache, contiguous or
//! paged, split over the keys (flash-decoding).
//!
//! One cube per (key split, K/V head × row chunk, sequence). **GQA packing**: the cube's rows are
//! the (query head, query token) pairs of one K/V head's group (`group × Nq`, in chunks of
//! `rows`), so every K/V byte a cube loads serves the whole group, and is read from memory once
//! per group rather than once per query head.
//!
//! Units are laid out as `rows × lanes`: unit `u` owns row `u / lanes`; in the scores its keys are
//! `lane, lane + lanes, …` of the step, in P·V its output columns are `lane, lane + lanes, …`. So
//! the row's online-softmax state (running max and sum, f32) lives in the registers of its lanes,
//! identical in each, and its output accumulator is spread over them. Per step of `block_kv` keys:
//! the keys' cache addresses (one page-table lookup per key), K and V staged in shared memory as
//! f32, scores in registers (score modification and mask applied), the row max and sum through
//! shared memory, probabilities through shared memory for P·V.
//!
//! With one split the cube normalises and writes O and the LSE itself. With several, each writes
//! its normalised partial output and partial LSE in f32, and [`crate::kernels::combine`] merges
//! them exactly; sinks join only there, once.
//!
//! Like the portable prefill kernel, this uses no plane operations and no tensor cores, so it runs
//! on every cubecl back end.

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

/// Elements per global load of K and V: 4 (8 bytes in 16-bit types), the widest vector every back
/// end has. Head dims are multiples of 4; the launcher checks the cache's strides are too.
pub const KV_VECTOR: usize = 4;

/// One global load of K or V.
pub type KvVector<E> = Vector<E, Const<4>>;

/// A tile shape of the decode kernel.
///
/// QKᵀ per step is `rows × block_kv × head_dim`, P·V `rows × value_dim × block_kv`.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct DecodeTiling {
    /// Query rows per cube: (query head of the group, query token) pairs (M of both products).
    pub rows: u32,
    /// Keys per step (N of QKᵀ, K of P·V).
    pub block_kv: u32,
    /// Units per cube; `units / rows` lanes serve each row.
    pub units: u32,
}

impl DecodeTiling {
    /// A stable name, used in logs and benchmark tables (`r4_kv64_u128`).
    pub fn name(&self) -> String {
        format!("r{}_kv{}_u{}", self.rows, self.block_kv, self.units)
    }

    /// Shared memory of one cube in bytes: K (padded rows), V, probabilities, Q, the two
    /// reduction arrays and the key addresses.
    pub const fn shared_bytes(&self, head_dim: u32, value_dim: u32) -> usize {
        let (rows, kv) = (self.rows as usize, self.block_kv as usize);
        let floats = kv * (head_dim as usize + 1)
            + kv * value_dim as usize
            + rows * kv
            + rows * head_dim as usize
            + 2 * self.units as usize;
        4 * floats + 4 * 2 * kv
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

    /// Keys per step.
    pub const fn block_kv(&self) -> usize {
        self.tiling.block_kv as usize
    }

    /// Units per cube.
    pub const fn units(&self) -> usize {
        self.tiling.units as usize
    }

    /// Lanes per row.
    pub const fn lanes(&self) -> usize {
        self.units() / self.rows()
    }

    /// Keys of a step each lane scores.
    pub const fn keys_per_lane(&self) -> usize {
        self.block_kv().div_ceil(self.lanes())
    }

    /// Output columns each lane accumulates.
    pub const fn cols_per_lane(&self) -> usize {
        (self.value_dim as usize).div_ceil(self.lanes())
    }

    /// Head dimension of Q and K (K of QKᵀ).
    pub const fn head_dim(&self) -> usize {
        self.head_dim as usize
    }

    /// Head dimension of V and O (N of P·V).
    pub const fn value_dim(&self) -> usize {
        self.value_dim as usize
    }

    /// Row stride of the K tile in shared memory: one float of padding, so lanes reading the same
    /// column of consecutive keys hit different banks.
    pub const fn k_stride(&self) -> usize {
        self.head_dim() + 1
    }

    /// Offsets in the f32 shared array: K tile, V tile, probabilities, Q rows, row maxima, row
    /// sums, and the length.
    pub const fn layout(&self) -> [usize; 7] {
        let k = 0;
        let v = k + self.block_kv() * self.k_stride();
        let p = v + self.block_kv() * self.value_dim();
        let q = p + self.rows() * self.block_kv();
        let max = q + self.rows() * self.head_dim();
        let sum = max + self.units();
        [k, v, p, q, max, sum, sum + self.units()]
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
    /// Keys per split (a multiple of `block_kv`).
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
    let lanes = config.lanes();
    let block_kv = config.block_kv();
    let [_, _, _, _, max_at, sum_at, smem_len] = config.layout();

    let group_rows = dargs.group_rows as usize;
    let chunks = (group_rows + rows - 1) / rows;
    let kv_head = CUBE_POS_Y as usize / chunks;
    let first_row = (CUBE_POS_Y as usize % chunks) * rows;
    let last_row = select(first_row + rows < group_rows, first_row + rows, group_rows) - 1;
    let unit = UNIT_POS as usize;
    let lane = unit % lanes;
    let row = locate_row(first_row + unit / lanes, kv_head, args, dargs);
    let seq = locate_sequence(
        CUBE_POS_Z as usize,
        row.head,
        q.shape(2),
        0,
        ints,
        floats,
        args,
        config.mask,
        config.score,
    );

    let mut smem = Shared::<[f32]>::new_slice(smem_len);
    let mut bases = Shared::<[u32]>::new_slice(2 * block_kv);
    load_q_rows::<E>(q, &mut smem, seq, first_row, kv_head, args, dargs, config);

    let walk = split_walk(seq, first_row, last_row, args, dargs, config);
    let mut scores = Array::<f32>::new(config.keys_per_lane());
    let mut acc = Array::<f32>::new(config.cols_per_lane());
    #[unroll]
    for c in 0..config.cols_per_lane() {
        acc[c] = 0.0;
    }
    let mut state = RowState {
        max: -1.0e30f32,
        sum: 0.0f32,
    };

    for step in walk.first_step..walk.end_step {
        let keys = step_keys(walk, step, block_kv);
        let class = classify_rows::<M>(
            seq, walk, keys, first_row, last_row, kv_head, ints, floats, args, dargs, config,
        );
        if class != TILE_EMPTY {
            sync_cube();
            key_addresses(
                k, v, table, &mut bases, seq, kv_head, keys.start, keys.len, dargs, config,
            );
            sync_cube();
            load_kv_tiles::<E>(k, v, &bases, &mut smem, keys.len, config);
            sync_cube();
            row_scores::<M>(
                &smem,
                &mut scores,
                seq,
                row,
                lane,
                keys.start,
                keys.len,
                class,
                ints,
                floats,
                args,
                config,
            );
            let mut step_max = (-1.0e30f32).runtime();
            #[unroll]
            for i in 0..config.keys_per_lane() {
                step_max = select(scores[i] > step_max, scores[i], step_max);
            }
            smem[max_at + unit] = step_max;
            sync_cube();
            let correction =
                online_softmax_step(&mut smem, &mut scores, &mut state, unit, lane, config);
            sync_cube();
            accumulate_pv(&smem, &mut acc, correction, unit, lane, config);
            let row_sum = row_reduce_sum(&smem, sum_at, unit, lanes);
            state.sum = state.sum * correction + row_sum;
        }
    }

    if row.valid {
        write_result::<E>(
            out,
            lse,
            part_o,
            &acc,
            state,
            seq,
            row,
            lane,
            q.shape(1),
            floats,
            args,
            dargs,
            config,
        );
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

/// Load Q: the chunk's rows into shared memory as f32, pre-multiplied by the softmax scale; rows
/// past the group are 0.
#[cube]
fn load_q_rows<E: Float>(
    q: &Tensor<E>,
    smem: &mut Shared<[f32]>,
    seq: SequenceSpan,
    first_row: usize,
    kv_head: usize,
    args: PrefillArgs,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) {
    let head_dim = config.head_dim();
    let q_at = config.layout()[3];
    for i in range_stepped(UNIT_POS as usize, config.rows() * head_dim, config.units()) {
        let row = locate_row(first_row + i / head_dim, kv_head, args, dargs);
        let mut value = 0.0f32.runtime();
        if row.valid {
            let at = seq.batch * q.stride(0) + row.head * q.stride(1) + row.token * q.stride(2);
            value = f32::cast_from(q[at + i % head_dim]) * args.scale;
        }
        smem[q_at + i] = value;
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

/// Key addresses: where each key of the step starts in K and in V (one block-table lookup per
/// key for a paged cache), so the tile loads below are plain offsets.
#[cube]
fn key_addresses<E: Float>(
    k: &Tensor<KvVector<E>>,
    v: &Tensor<KvVector<E>>,
    table: &Tensor<i32>,
    bases: &mut Shared<[u32]>,
    seq: SequenceSpan,
    kv_head: usize,
    kv_start: usize,
    kv_len: usize,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) {
    let block_kv = config.block_kv();
    for j in range_stepped(UNIT_POS as usize, kv_len, config.units()) {
        let key = kv_start + j;
        let mut k_at = seq.batch * k.stride(0) + kv_head * k.stride(1) + key * k.stride(2);
        let mut v_at = seq.batch * v.stride(0) + kv_head * v.stride(1) + key * v.stride(2);
        if comptime!(config.paged) {
            let page_size = dargs.page_size as usize;
            let page = table[seq.batch * dargs.max_pages as usize + key / page_size] as usize;
            let slot = key % page_size;
            k_at = page * k.stride(0) + kv_head * k.stride(1) + slot * k.stride(2);
            v_at = page * v.stride(0) + kv_head * v.stride(1) + slot * v.stride(2);
        }
        bases[j] = k_at as u32;
        bases[block_kv + j] = v_at as u32;
    }
}

/// Load K/V: the step's keys into shared memory as f32 (K rows padded); keys past `kv_len` are 0.
/// Loads are vectors of [`KV_VECTOR`] elements in an unrolled loop, so each unit has all its loads
/// in flight before the first store.
#[cube]
fn load_kv_tiles<E: Float>(
    k: &Tensor<KvVector<E>>,
    v: &Tensor<KvVector<E>>,
    bases: &Shared<[u32]>,
    smem: &mut Shared<[f32]>,
    kv_len: usize,
    #[comptime] config: DecodeConfig,
) {
    let block_kv = config.block_kv();
    let [k_at, v_at, _, _, _, _, _] = config.layout();
    load_tile::<E>(k, bases, 0, smem, k_at, config.k_stride(), config.head_dim(), kv_len, config);
    load_tile::<E>(v, bases, block_kv, smem, v_at, config.value_dim(), config.value_dim(), kv_len, config);
}

/// One `block_kv × width` tile from `src` (key `j` at element `bases[base_at + j]`) into shared
/// memory at `offset` with row stride `stride`.
#[cube]
fn load_tile<E: Float>(
    src: &Tensor<KvVector<E>>,
    bases: &Shared<[u32]>,
    base_at: usize,
    smem: &mut Shared<[f32]>,
    offset: usize,
    #[comptime] stride: usize,
    #[comptime] width: usize,
    kv_len: usize,
    #[comptime] config: DecodeConfig,
) {
    let per_row = width / KV_VECTOR;
    let vectors = config.block_kv() * per_row;
    let units = config.units();
    #[unroll]
    for t in 0..(vectors + units - 1) / units {
        let i = t * units + UNIT_POS as usize;
        if comptime!((t + 1) * units > vectors) {
            if i < vectors {
                load_vector::<E>(src, bases, base_at, smem, offset, stride, per_row, i, kv_len);
            }
        } else {
            load_vector::<E>(src, bases, base_at, smem, offset, stride, per_row, i, kv_len);
        }
    }
}

/// Vector `i` of a tile: row `i / per_row`, columns from `(i % per_row) · 4`.
#[cube]
fn load_vector<E: Float>(
    src: &Tensor<KvVector<E>>,
    bases: &Shared<[u32]>,
    base_at: usize,
    smem: &mut Shared<[f32]>,
    offset: usize,
    #[comptime] stride: usize,
    #[comptime] per_row: usize,
    i: usize,
    kv_len: usize,
) {
    let j = i / per_row;
    let c = (i % per_row) * KV_VECTOR;
    let mut x = KvVector::<E>::new(E::cast_from(0.0f32));
    if j < kv_len {
        x = src[(bases[base_at + j] as usize + c) / KV_VECTOR];
    }
    let at = offset + j * stride + c;
    #[unroll]
    for e in 0..KV_VECTOR {
        smem[at + e] = f32::cast_from(x.extract(e));
    }
}

/// Scores: this lane's keys of the step against its row, in registers; score modification
/// applied, and on a partial step the mask. Keys past the step, and rows past the group, score
/// −1e30 (masked).
#[cube]
fn row_scores<M: Hooks>(
    smem: &Shared<[f32]>,
    scores: &mut Array<f32>,
    seq: SequenceSpan,
    row: DecodeRow,
    lane: usize,
    kv_start: usize,
    kv_len: usize,
    class: u32,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: DecodeConfig,
) {
    let lanes = config.lanes();
    let head_dim = config.head_dim();
    let [k_at, _, _, q_at, _, _, _] = config.layout();
    let q_row = q_at + (UNIT_POS as usize / lanes) * head_dim;
    #[unroll]
    for i in 0..config.keys_per_lane() {
        scores[i] = 0.0;
    }
    #[unroll]
    for c in 0..head_dim {
        let qc = smem[q_row + c];
        #[unroll]
        for i in 0..config.keys_per_lane() {
            let j = lane + i * lanes;
            if comptime!(config.keys_per_lane() * config.lanes() > config.block_kv()) {
                if j < config.block_kv() {
                    scores[i] += qc * smem[k_at + j * config.k_stride() + c];
                }
            } else {
                scores[i] += qc * smem[k_at + j * config.k_stride() + c];
            }
        }
    }
    #[unroll]
    for i in 0..config.keys_per_lane() {
        let j = lane + i * lanes;
        let key = (kv_start + j) as i32;
        let mut s = scores[i];
        if comptime!(config.score.modifies_scores()) {
            s = modify_score::<M>(
                s,
                seq,
                row.head,
                row.token as i32,
                key,
                ints,
                floats,
                args,
                config.score,
            );
        }
        let mut visible = j < kv_len && row.valid;
        if comptime!(!config.mask.is_none()) {
            if class == TILE_PARTIAL {
                visible = visible
                    && key_visible::<M>(
                        seq,
                        row.head,
                        row.token as i32,
                        key,
                        ints,
                        floats,
                        args,
                        config.mask,
                    );
            }
        }
        scores[i] = select(visible, s, -1.0e30f32);
    }
}

/// Online softmax: the row's step max from its lanes' maxima, the new running max, this lane's
/// probabilities (into shared memory for P·V) and their sum (into shared memory for the row sum).
/// Returns the factor that rescales the old accumulator and sum.
#[cube]
fn online_softmax_step(
    smem: &mut Shared<[f32]>,
    scores: &mut Array<f32>,
    state: &mut RowState,
    unit: usize,
    lane: usize,
    #[comptime] config: DecodeConfig,
) -> f32 {
    let lanes = config.lanes();
    let [_, _, p_at, _, max_at, sum_at, _] = config.layout();
    let row_first = unit - lane;
    let mut step_max = (-1.0e30f32).runtime();
    #[unroll]
    for l in 0..lanes {
        let m = smem[max_at + row_first + l];
        step_max = select(m > step_max, m, step_max);
    }
    let new_max = select(step_max > state.max, step_max, state.max);
    let correction = (state.max - new_max).exp();
    state.max = new_max;
    let p_row = p_at + (unit / lanes) * config.block_kv();
    let mut sum = 0.0f32.runtime();
    #[unroll]
    for i in 0..config.keys_per_lane() {
        let s = scores[i];
        let p = select(s > -5.0e29f32, (s - new_max).exp(), 0.0f32);
        let j = lane + i * lanes;
        if comptime!(config.keys_per_lane() * config.lanes() > config.block_kv()) {
            if j < config.block_kv() {
                smem[p_row + j] = p;
            }
        } else {
            smem[p_row + j] = p;
        }
        sum += p;
    }
    smem[sum_at + unit] = sum;
    correction
}

/// P·V: rescale this lane's output columns and add the step's probabilities times V.
#[cube]
fn accumulate_pv(
    smem: &Shared<[f32]>,
    acc: &mut Array<f32>,
    correction: f32,
    unit: usize,
    lane: usize,
    #[comptime] config: DecodeConfig,
) {
    let lanes = config.lanes();
    let value_dim = config.value_dim();
    let [_, v_at, p_at, _, _, _, _] = config.layout();
    let p_row = p_at + (unit / lanes) * config.block_kv();
    #[unroll]
    for i in 0..config.cols_per_lane() {
        acc[i] *= correction;
    }
    // Over the whole step: past `kv_len`, P is 0 and V is 0, and a comptime trip count unrolls.
    #[unroll]
    for j in 0..config.block_kv() {
        let p = smem[p_row + j];
        let v_row = v_at + j * value_dim;
        #[unroll]
        for i in 0..config.cols_per_lane() {
            let c = lane + i * lanes;
            if comptime!(config.cols_per_lane() * config.lanes() > config.value_dim()) {
                if c < value_dim {
                    acc[i] += p * smem[v_row + c];
                }
            } else {
                acc[i] += p * smem[v_row + c];
            }
        }
    }
}

/// The sum of one row's lane partials at `offset`.
#[cube]
fn row_reduce_sum(
    smem: &Shared<[f32]>,
    offset: usize,
    unit: usize,
    #[comptime] lanes: usize,
) -> f32 {
    let row_first = unit - unit % lanes;
    let mut sum = 0.0f32.runtime();
    #[unroll]
    for l in 0..lanes {
        sum += smem[offset + row_first + l];
    }
    sum
}

/// Finish: with one split, normalise (sinks folded in) and write O and the LSE; with several,
/// write the normalised partial output and the partial LSE (−∞ for a split that saw no key).
#[cube]
fn write_result<E: Float>(
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    part_o: &mut Tensor<f32>,
    acc: &Array<f32>,
    state: RowState,
    seq: SequenceSpan,
    row: DecodeRow,
    lane: usize,
    heads_q: usize,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    dargs: DecodeArgs,
    #[comptime] config: DecodeConfig,
) {
    let lanes = config.lanes();
    let value_dim = config.value_dim();
    let mut state = state;
    // Row index in `[B, Hq, Nq]` order.
    let row_index = (seq.batch * heads_q + row.head) * dargs.queries as usize + row.token;
    if comptime!(config.split) {
        let splits = CUBE_COUNT_X as usize;
        let part = row_index * splits + CUBE_POS_X as usize;
        let seen = state.sum > 0.0;
        let inv = select(seen, 1.0 / state.sum, 0.0f32);
        #[unroll]
        for i in 0..config.cols_per_lane() {
            let c = lane + i * lanes;
            if c < value_dim {
                part_o[part * value_dim + c] = acc[i] * inv;
            }
        }
        if lane == 0 {
            lse[part] = select(seen, state.max + state.sum.ln(), args.neg_inf);
        }
    } else {
        let factor = finish_state(&mut state, row.head, floats, args, config.score);
        let seen = state.sum > 0.0;
        let inv = select(seen, factor / state.sum, 0.0f32);
        let base = seq.batch * out.stride(0) + row.head * out.stride(1) + row.token * out.stride(2);
        #[unroll]
        for i in 0..config.cols_per_lane() {
            let c = lane + i * lanes;
            if c < value_dim {
                out[base + c] = E::cast_from(acc[i] * inv);
            }
        }
        if lane == 0 {
            lse[row_index] = select(seen, state.max + state.sum.ln(), args.neg_inf);
        }
    }
}
