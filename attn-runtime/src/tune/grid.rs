//! Install-time tuning: a documented grid of shapes per variant, each tuned and timed.

use std::time::Instant;

use super::backward::chosen_backward;
use super::candidates::{candidates, Candidate};
use super::decode::{decode_key, decode_tuned, DecodeKey};
use super::key::TuneKey;
use super::tuner::{chosen, forward_tuned};
use super::verdict::{calls_per_sample, timed};
use crate::backward::{tuned_plans, BackwardPlan};
use crate::blueprint::Blueprint;
use crate::decode::{default_plan, DecodePlan, DecodeProblem};
use crate::inputs::{alibi_slopes, pack, Inputs};
use crate::kv_cache::KvCache;
use crate::launch::{is_cpu_emulated, launch, Lse, Output};
use crate::problem::Problem;
use crate::tensor::{ComputeClient, Element, Tensor};
use crate::variant::{DType, HeadGrouping, InputType, Variant, VariantSpec};
use crate::AttnError;

/// The shapes `attn-tune` tunes each variant on: every sequence length (queries = keys) crossed
/// with every B×H target. Each point lands in one bucket of [`TuneKey`], so calls anywhere in
/// that bucket find the answer cached.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    /// Sequence lengths (per sequence; per document for packed documents).
    pub seqs: Vec<usize>,
    /// Targets for sequences × query heads.
    pub batch_heads: Vec<usize>,
    /// Exact prefill shapes (a deployment's own, e.g. from `attn-tune tune --shapes`); when any
    /// are given they replace `seqs` × `batch_heads`.
    pub shapes: Vec<Shape>,
    /// Timed runs of the winner and of the fallback after tuning, for the report.
    pub samples: usize,
    /// Also tune the backward pass's plan at every point (for programs that train).
    pub backward: bool,
    /// Decode shapes tuned after the prefill points (a server's steady state).
    pub decode: Vec<DecodePoint>,
    /// Tokens per page of the decode points' caches (`None`: contiguous caches). A paged and a
    /// contiguous cache are tuned under different keys: tune the kind the program serves from.
    pub page_size: Option<usize>,
    /// The decode points' caches store K and V in e4m3 (tuned under their own keys, like pages).
    pub fp8: bool,
}

/// A prefill shape as a deployment states it: sequences, query heads (the K/V heads follow from
/// the variant's grouping) and tokens per sequence (per document, for packed documents).
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub struct Shape {
    /// Sequences (documents, for packed documents).
    pub batch: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Tokens per sequence.
    pub seq: usize,
}

/// One decode shape: `sequences` in the batch, each with `keys` cached tokens and `tokens` new
/// query tokens (1 for plain decoding, more for speculative drafts), at `heads_q` query heads
/// (the K/V heads follow from the variant's grouping).
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub struct DecodePoint {
    /// Sequences in the batch.
    pub sequences: usize,
    /// Query heads (`None`: 32, or the nearest multiple of the variant's group below it).
    pub heads_q: Option<usize>,
    /// Cached tokens per sequence.
    pub keys: usize,
    /// Query tokens per sequence.
    pub tokens: usize,
}

impl DecodePoint {
    /// The decode grid crossing `sequences` with `keys` at 32 query heads and one query token.
    pub fn cross(sequences: &[usize], keys: &[usize]) -> Vec<DecodePoint> {
        sequences
            .iter()
            .flat_map(|&sequences| {
                keys.iter().map(move |&keys| DecodePoint {
                    sequences,
                    heads_q: None,
                    keys,
                    tokens: 1,
                })
            })
            .collect()
    }
}

impl Grid {
    /// The default grid for the device. On a GPU: prefill at lengths 1024 and 4096 (the key's
    /// buckets up to 1024 and 1025–4096) at B×H 64, and decode of one token for 1, 16 and 64
    /// sequences over 4096 and 16384 cached tokens (for 8 K/V heads, the decode key's
    /// sequence × K/V-head buckets 16, 256 and 1024, and its length buckets 4096 and 16384).
    /// On a CPU-emulated device (llvmpipe) a small one, prefill 256 at B×H 4 only, so tuning
    /// finishes in minutes there.
    pub fn default_for(client: &ComputeClient) -> Grid {
        if is_cpu_emulated(client) {
            Grid::quick()
        } else {
            Grid {
                seqs: vec![1024, 4096],
                batch_heads: vec![64],
                shapes: Vec::new(),
                samples: 10,
                backward: false,
                decode: DecodePoint::cross(&[1, 16, 64], &[4096, 16384]),
                page_size: None,
                fp8: false,
            }
        }
    }

    /// The smallest useful grid: one length (256) at B×H 4.
    pub fn quick() -> Grid {
        Grid {
            seqs: vec![256],
            batch_heads: vec![4],
            shapes: Vec::new(),
            samples: 2,
            backward: false,
            decode: Vec::new(),
            page_size: None,
            fp8: false,
        }
    }

    /// The prefill points of the grid for `spec`, in tuning order: `shapes` when given, else
    /// `seqs` × `batch_heads`. An error names a shape whose query heads the variant's grouping
    /// does not divide.
    pub fn points(&self, spec: &VariantSpec) -> Result<Vec<ShapePoint>, AttnError> {
        if !self.shapes.is_empty() {
            return self
                .shapes
                .iter()
                .map(|s| ShapePoint::exact(spec, s.batch, s.heads_q, s.seq))
                .collect();
        }
        let mut points = Vec::new();
        for &bh in &self.batch_heads {
            for &seq in &self.seqs {
                points.push(ShapePoint::new(spec, seq, bh));
            }
        }
        Ok(points)
    }
}

/// One shape of the grid.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub struct ShapePoint {
    /// Batch (documents, for packed documents).
    pub batch: usize,
    /// Query heads.
    pub heads_q: usize,
    /// K/V heads.
    pub heads_kv: usize,
    /// Queries = keys per sequence.
    pub seq: usize,
}

impl ShapePoint {
    /// The shape closest to `batch_heads` sequences × query heads with the variant's grouping
    /// (32 query heads where the target allows, 8 K/V heads for GQA).
    fn new(spec: &VariantSpec, seq: usize, batch_heads: usize) -> ShapePoint {
        let heads_q_target = batch_heads.clamp(1, 32);
        let (heads_q, heads_kv) = match spec.heads {
            HeadGrouping::Mha => (heads_q_target, heads_q_target),
            HeadGrouping::Mqa => (heads_q_target, 1),
            HeadGrouping::Gqa { group } => {
                let group = group as usize;
                let kv = (heads_q_target / group).max(1);
                (group * kv, kv)
            }
        };
        ShapePoint {
            batch: (batch_heads / heads_q).max(1),
            heads_q,
            heads_kv,
            seq,
        }
    }

    /// `batch` sequences of `seq` tokens at `heads_q` query heads, the K/V heads by the variant's
    /// grouping.
    pub fn exact(
        spec: &VariantSpec,
        batch: usize,
        heads_q: usize,
        seq: usize,
    ) -> Result<ShapePoint, AttnError> {
        let heads_kv = match spec.heads {
            HeadGrouping::Mha => heads_q,
            HeadGrouping::Mqa => 1,
            HeadGrouping::Gqa { group } => {
                let group = group as usize;
                if !heads_q.is_multiple_of(group) {
                    return Err(AttnError::Unsupported(format!(
                        "{}: {heads_q} query heads do not split into groups of {group}",
                        spec.name
                    )));
                }
                heads_q / group
            }
        };
        if batch == 0 || heads_q == 0 || seq == 0 {
            return Err(AttnError::Unsupported(format!(
                "{}: a shape needs at least one sequence, head and token ({batch}×{heads_q}, N {seq})",
                spec.name
            )));
        }
        Ok(ShapePoint {
            batch,
            heads_q,
            heads_kv,
            seq,
        })
    }

    /// `B×Hq/Hkv, N` for reports.
    pub fn describe(&self) -> String {
        format!(
            "{}×{}/{}, N {}",
            self.batch, self.heads_q, self.heads_kv, self.seq
        )
    }
}

/// What tuning one grid point found.
#[derive(Clone, Debug)]
pub struct KeyReport {
    /// The variant.
    pub variant: &'static str,
    /// Its element type.
    pub dtype: DType,
    /// The shape.
    pub point: ShapePoint,
    /// The key the shape falls in.
    pub key: TuneKey,
    /// The candidate the tuner chose.
    pub chosen: Candidate,
    /// The candidate an untuned call runs.
    pub fallback: Candidate,
    /// Candidates on this device.
    pub candidates: usize,
    /// Seconds until the key was settled: tuning (compiling and timing every candidate) on a
    /// miss, a cache lookup and one run on a hit.
    pub settle_s: f64,
    /// Median milliseconds of the chosen candidate.
    pub chosen_ms: f64,
    /// Median milliseconds of the fallback.
    pub fallback_ms: f64,
    /// Keys per sequence the times cover (per-key time = ms / keys).
    pub keys: usize,
    /// The backward pass's plan at this point, when the grid asks for it.
    pub backward: Option<BackwardReport>,
}

/// What tuning the backward plan of one grid point found.
#[derive(Clone, Debug)]
pub struct BackwardReport {
    /// The plan that runs for the key.
    pub chosen: BackwardPlan,
    /// The plan an untuned call runs.
    pub fallback: BackwardPlan,
    /// Plans the tuner chose among.
    pub plans: usize,
    /// Seconds until the key was settled (as [`KeyReport::settle_s`]).
    pub settle_s: f64,
    /// Median milliseconds of the chosen plan.
    pub chosen_ms: f64,
    /// Median milliseconds of the fallback.
    pub fallback_ms: f64,
}

/// Tunes `V` on every point of `grid` (see [`Grid`]), calling `progress` after each point.
pub fn tune_variant<V: Variant>(
    client: &ComputeClient,
    grid: &Grid,
    progress: &mut dyn FnMut(&KeyReport),
) -> Result<Vec<KeyReport>, AttnError> {
    let spec = &V::SPEC;
    let list = candidates(client, spec, true)?;
    let mut reports = Vec::new();
    for point in grid.points(spec)? {
        let report = tune_point::<V>(client, grid, point, &list)?;
        progress(&report);
        reports.push(report);
    }
    Ok(reports)
}

fn tune_point<V: Variant>(
    client: &ComputeClient,
    grid: &Grid,
    point: ShapePoint,
    list: &[Candidate],
) -> Result<KeyReport, AttnError> {
    let spec = &V::SPEC;
    let documents = spec.mask.documents;
    // Packed documents: `batch` documents of `seq` tokens each, in one sequence.
    let (batch, seq) = if documents {
        (1, point.batch * point.seq)
    } else {
        (point.batch, point.seq)
    };
    let q = filled::<V::Elem>(
        client,
        [batch, point.heads_q, seq, spec.head_dim as usize],
        1,
    )?;
    let k = filled::<V::Elem>(
        client,
        [batch, point.heads_kv, seq, spec.head_dim as usize],
        2,
    )?;
    let v = filled::<V::Elem>(
        client,
        [batch, point.heads_kv, seq, spec.value_dim as usize],
        3,
    )?;
    let owned = TypicalInputs::new(spec, point);
    let inputs = owned.view();
    let problem = Problem::new(spec, &q, &k, &v)?;
    let packed = pack(spec, &problem, &inputs)?;
    let key = TuneKey::of(spec, &problem, &packed);
    let out = Output {
        o: Tensor::empty(client, problem.out_shape()),
        lse: Lse::empty(client, problem.lse_shape()),
    };
    let start = Instant::now();
    forward_tuned::<V>(client, &problem, packed.clone(), &q, &k, &v, &out)?;
    crate::sync(client)?;
    let settle_s = start.elapsed().as_secs_f64();
    let fallback = list[0];
    let chosen = chosen::<V>(client, &key).unwrap_or(fallback);
    let (chosen_ms, fallback_ms) = time_both(chosen, fallback, |c| {
        let blueprint = Blueprint::new(spec, c, &problem, &packed);
        median_ms(client, grid.samples, || {
            launch::<V>(client, &blueprint, &problem, &packed, &q, &k, &v, &out)
        })
    })?;
    let backward = if grid.backward {
        let d_out = filled::<V::Elem>(client, problem.out_shape(), 4)?;
        let forwarded = Forwarded {
            qkv: [&q, &k, &v],
            out: &out,
        };
        Some(tune_backward::<V>(
            client, grid, forwarded, &d_out, &inputs, &key,
        )?)
    } else {
        None
    };
    Ok(KeyReport {
        variant: spec.name,
        dtype: spec.dtype,
        point,
        key,
        chosen,
        fallback,
        candidates: list.len(),
        settle_s,
        chosen_ms,
        fallback_ms,
        keys: point.seq,
        backward,
    })
}

/// A forward pass the backward is tuned on: its operands and its output.
struct Forwarded<'a, E: Element> {
    qkv: [&'a Tensor<E>; 3],
    out: &'a Output<E>,
}

/// Tunes the backward plan of one grid point (the forward's output, a fixed dO) and times the
/// plan that runs against the default one.
fn tune_backward<V: Variant>(
    client: &ComputeClient,
    grid: &Grid,
    forwarded: Forwarded<'_, V::Elem>,
    d_out: &Tensor<V::Elem>,
    inputs: &Inputs,
    key: &TuneKey,
) -> Result<BackwardReport, AttnError> {
    let Forwarded { qkv, out } = forwarded;
    let [q, k, v] = qkv;
    let plans = tuned_plans(client, &V::SPEC, true);
    let fallback = *plans.first().ok_or_else(|| {
        AttnError::Unsupported(format!("{}: no backward plan runs", V::SPEC.name))
    })?;
    let start = Instant::now();
    crate::backward::backward::<V>(client, q, k, v, out, d_out, inputs)?;
    crate::sync(client)?;
    let settle_s = start.elapsed().as_secs_f64();
    let chosen = chosen_backward::<V>(client, key).unwrap_or(fallback);
    let (chosen_ms, fallback_ms) = time_both(chosen, fallback, |plan| {
        median_ms(client, grid.samples, || {
            crate::backward::backward_with_plan::<V>(client, qkv, out, d_out, inputs, plan)
                .map(drop)
        })
    })?;
    Ok(BackwardReport {
        chosen,
        fallback,
        plans: plans.len(),
        settle_s,
        chosen_ms,
        fallback_ms,
    })
}

/// What tuning one decode shape found.
#[derive(Clone, Debug)]
pub struct DecodeReport {
    /// The variant.
    pub variant: &'static str,
    /// Its element type.
    pub dtype: DType,
    /// The shape: sequences, heads, cached tokens per sequence (`seq`).
    pub point: ShapePoint,
    /// Query tokens per sequence.
    pub tokens: usize,
    /// Tokens per page, for a paged cache.
    pub page_size: Option<usize>,
    /// Whether the cache stores K and V in e4m3.
    pub fp8: bool,
    /// The key the shape falls in.
    pub key: DecodeKey,
    /// The plan that runs for the key.
    pub chosen: DecodePlan,
    /// The plan an untuned call runs (the heuristic's).
    pub fallback: DecodePlan,
    /// Seconds until the key was settled (as [`KeyReport::settle_s`]).
    pub settle_s: f64,
    /// Median milliseconds of the chosen plan.
    pub chosen_ms: f64,
    /// Median milliseconds of the fallback.
    pub fallback_ms: f64,
}

/// Tunes `V`'s decode plan on every decode point of `grid`, calling `progress` after each point.
/// A variant that cannot decode (packed documents) has no decode points.
pub fn tune_decode_variant<V: Variant>(
    client: &ComputeClient,
    grid: &Grid,
    progress: &mut dyn FnMut(&DecodeReport),
) -> Result<Vec<DecodeReport>, AttnError> {
    let mut reports = Vec::new();
    if V::SPEC.mask.documents {
        return Ok(reports);
    }
    for &point in &grid.decode {
        let Some(report) = tune_decode_point::<V>(client, grid, point)? else {
            continue;
        };
        progress(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// Tunes one decode point; `None` (with a warning) for a point whose cache holds more elements
/// than one tensor may (a grid's largest shapes at many K/V heads).
fn tune_decode_point<V: Variant>(
    client: &ComputeClient,
    grid: &Grid,
    at: DecodePoint,
) -> Result<Option<DecodeReport>, AttnError> {
    let spec = &V::SPEC;
    if at.tokens == 0 {
        return Err(AttnError::Unsupported(format!(
            "{}: a decode point needs at least one query token",
            spec.name
        )));
    }
    let heads_q = match at.heads_q {
        Some(heads_q) => heads_q,
        None => ShapePoint::new(spec, at.keys, 32).heads_q,
    };
    let point = ShapePoint::exact(spec, at.sequences, heads_q, at.keys)?;
    let (d, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let page = grid.page_size.unwrap_or(1);
    let elements = point.batch * point.heads_kv * point.seq.div_ceil(page) * page * d.max(dv);
    if elements > u32::MAX as usize {
        tracing::warn!(
            variant = spec.name,
            shape = %point.describe(),
            elements,
            "attn-tune: decode point skipped: its cache would hold more elements than one tensor may ({})",
            u32::MAX
        );
        return Ok(None);
    }
    let cache = filled_cache::<V::Elem>(client, point, [d, dv], grid)?;
    let q = filled::<V::Elem>(client, [point.batch, point.heads_q, at.tokens, d], 1)?;
    let owned = TypicalInputs::new(spec, point);
    let inputs = owned.view();
    let call = DecodeProblem::new::<V>(&q, &cache, &inputs)?;
    let fallback = default_plan(client, &call)?;
    let key = decode_key::<V>(client, &call, &cache);
    let out = Output {
        o: Tensor::empty(client, call.problem.out_shape()),
        lse: Lse::empty(client, call.problem.lse_shape()),
    };
    let start = Instant::now();
    let chosen = decode_tuned::<V>(client, call, &q, &cache, &out)?;
    crate::sync(client)?;
    let settle_s = start.elapsed().as_secs_f64();
    let (chosen_ms, fallback_ms) = time_both(chosen, fallback, |plan| {
        median_ms(client, grid.samples, || {
            crate::decode::decode_with_plan::<V>(client, &q, &cache, &inputs, plan, &out)
        })
    })?;
    Ok(Some(DecodeReport {
        variant: spec.name,
        dtype: spec.dtype,
        point,
        tokens: at.tokens,
        page_size: grid.page_size,
        fp8: grid.fp8,
        key,
        chosen,
        fallback,
        settle_s,
        chosen_ms,
        fallback_ms,
    }))
}

/// A cache of `point.batch` sequences, each holding `point.seq` tokens of a fixed pattern:
/// contiguous, or paged with the grid's page size (sequences' pages interleaved in the pool, as
/// a server's allocator leaves them); in e4m3 where the grid says so.
fn filled_cache<E: Element>(
    client: &ComputeClient,
    point: ShapePoint,
    [d, dv]: [usize; 2],
    grid: &Grid,
) -> Result<KvCache<E>, AttnError> {
    let lengths = vec![point.seq; point.batch];
    if grid.fp8 {
        return filled_fp8_cache(client, point, [d, dv], grid.page_size);
    }
    let Some(page) = grid.page_size else {
        let k = filled::<E>(client, [point.batch, point.heads_kv, point.seq, d], 2)?;
        let v = filled::<E>(client, [point.batch, point.heads_kv, point.seq, dv], 3)?;
        return KvCache::from_contiguous_parts(k, v, lengths);
    };
    let max_pages = point.seq.div_ceil(page.max(1));
    let pages = point.batch * max_pages;
    let k = filled::<E>(client, [pages, point.heads_kv, page, d], 2)?;
    let v = filled::<E>(client, [pages, point.heads_kv, page, dv], 3)?;
    // Page j of sequence b is pool page j × batch + b.
    let table = (0..point.batch)
        .flat_map(|b| (0..max_pages).map(move |j| (j * point.batch + b) as i32))
        .collect();
    KvCache::from_paged_parts(k, v, page, table, max_pages, lengths)
}

/// [`filled_cache`] in e4m3: the pattern appended through the cache's encoder (scales mapping
/// its values, below 1 in magnitude, onto e4m3's range).
fn filled_fp8_cache<E: Element>(
    client: &ComputeClient,
    point: ShapePoint,
    [d, dv]: [usize; 2],
    page_size: Option<usize>,
) -> Result<KvCache<E>, AttnError> {
    let scales = crate::fp8::KvScales::for_range(point.heads_kv, 1.0, 1.0);
    let shape = [point.batch, point.heads_kv, point.seq];
    let mut cache = match page_size {
        None => KvCache::contiguous_fp8(client, shape, d, dv, &scales)?,
        Some(page) => {
            let max_pages = point.seq.div_ceil(page.max(1));
            let layout = crate::kv_cache::PagedLayout {
                batch: point.batch,
                heads_kv: point.heads_kv,
                head_dim: d,
                value_dim: dv,
                page_size: page,
                pages: point.batch * max_pages,
                max_pages,
            };
            KvCache::paged_fp8(client, layout, &scales)?
        }
    };
    let k = filled::<E>(client, [point.batch, point.heads_kv, point.seq, d], 2)?;
    let v = filled::<E>(client, [point.batch, point.heads_kv, point.seq, dv], 3)?;
    cache.append(client, &k, &v, None)?;
    Ok(cache)
}

/// The medians of the chosen and the fallback (the fallback not timed again when it is the
/// chosen one), for the report.
fn time_both<P: Copy + PartialEq>(
    chosen: P,
    fallback: P,
    mut time: impl FnMut(P) -> Result<f64, AttnError>,
) -> Result<(f64, f64), AttnError> {
    let chosen_ms = time(chosen)?;
    let fallback_ms = if chosen == fallback {
        chosen_ms
    } else {
        time(fallback)?
    };
    Ok((chosen_ms, fallback_ms))
}

/// Median milliseconds per call of `run` over `samples` samples, each as the verdicts take them
/// (back-to-back calls spanning [`super::verdict::SAMPLE_SPAN_S`], then a sync), after one untimed
/// call that sizes them: the report's re-timing measures what the verdict measured.
fn median_ms(
    client: &ComputeClient,
    samples: usize,
    mut run: impl FnMut() -> Result<(), AttnError>,
) -> Result<f64, AttnError> {
    let calls = calls_per_sample(timed(client, 1, &mut run)?);
    let mut ms = Vec::with_capacity(samples.max(1));
    for _ in 0..samples.max(1) {
        ms.push(timed(client, calls, &mut run)? * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// A device tensor of `shape` holding a fixed pseudo-random pattern in [-1, 1] (timing does not
/// depend on the values; they only have to be finite and varied): a block of 4099 values (a prime,
/// so rows do not line up with it) repeated, which fills a cache of gigabytes at copy speed.
fn filled<E: Element>(
    client: &ComputeClient,
    shape: [usize; 4],
    seed: u64,
) -> Result<Tensor<E>, AttnError> {
    const BLOCK: usize = 4099;
    let len = shape.iter().product::<usize>();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let block: Vec<E> = (0..BLOCK.min(len))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            E::from_f64((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        })
        .collect();
    let mut data: Vec<E> = Vec::with_capacity(len);
    while data.len() < len {
        let take = block.len().min(len - data.len());
        data.extend_from_slice(&block[..take]);
    }
    Tensor::from_slice(client, &data, shape)
}

/// Typical run-time inputs for a grid point: full key lengths, documents of equal length, a
/// prefix of a quarter of the sequence, zero sinks, standard slopes, and the variant's own inputs
/// at 16 (i32) and 0.5 (f32).
struct TypicalInputs {
    key_lengths: Vec<i32>,
    offsets: Vec<i32>,
    prefix_lengths: Vec<i32>,
    per_head: Vec<f32>,
    slopes: Vec<f32>,
    ints: Vec<Vec<i32>>,
    floats: Vec<Vec<f32>>,
    spec: VariantSpec,
}

impl TypicalInputs {
    fn new(spec: &VariantSpec, point: ShapePoint) -> Self {
        let sequences = point.batch;
        let extent =
            |shape: crate::variant::InputShape| shape.len(sequences, point.heads_q, point.seq);
        let mut ints = Vec::new();
        let mut floats = Vec::new();
        for decl in spec.inputs {
            match decl.ty {
                InputType::I32 => ints.push(vec![16; extent(decl.shape)]),
                InputType::F32 => floats.push(vec![0.5; extent(decl.shape)]),
            }
        }
        TypicalInputs {
            key_lengths: vec![point.seq as i32; sequences],
            offsets: (0..=sequences).map(|i| (i * point.seq) as i32).collect(),
            prefix_lengths: vec![(point.seq / 4) as i32; sequences],
            per_head: vec![0.0; point.heads_q],
            slopes: alibi_slopes(point.heads_q),
            ints,
            floats,
            spec: *spec,
        }
    }

    fn view(&self) -> Inputs<'_> {
        let mask = &self.spec.mask;
        let score = &self.spec.score;
        Inputs {
            key_lengths: mask.key_lengths.then_some(&self.key_lengths[..]),
            q_offsets: mask.documents.then_some(&self.offsets[..]),
            k_offsets: mask.documents.then_some(&self.offsets[..]),
            prefix_lengths: mask.prefix_lm.then_some(&self.prefix_lengths[..]),
            sinks: score.sinks.then_some(&self.per_head[..]),
            alibi_slopes: (score.alibi == Some(crate::variant::Alibi::Given))
                .then_some(&self.slopes[..]),
            ints: self.ints.iter().map(|v| &v[..]).collect(),
            floats: self.floats.iter().map(|v| &v[..]).collect(),
            dims: (0, 0),
        }
    }
}
