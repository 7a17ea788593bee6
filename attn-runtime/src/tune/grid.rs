//! Install-time tuning: a documented grid of shapes per variant, each tuned and timed.

use std::time::Instant;

use super::candidates::{candidates, Candidate};
use super::key::TuneKey;
use super::tuner::{chosen, forward_tuned};
use crate::blueprint::Blueprint;
use crate::inputs::{alibi_slopes, pack, Inputs};
use crate::launch::{is_cpu_emulated, launch, Lse, Output};
use crate::problem::Problem;
use crate::tensor::{ComputeClient, Element, Tensor};
use crate::variant::{HeadGrouping, InputExtent, InputType, Variant, VariantSpec};
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
    /// Timed runs of the winner and of the fallback after tuning, for the report.
    pub samples: usize,
}

impl Grid {
    /// The default grid for the device: on a GPU, lengths 1024 and 4096 (the key's buckets up to
    /// 1024 and 1025–4096) at B×H 64; on a CPU-emulated device (llvmpipe) a small one, 256 at
    /// B×H 4, so tuning finishes in minutes there.
    pub fn default_for(client: &ComputeClient) -> Grid {
        if is_cpu_emulated(client) {
            Grid::quick()
        } else {
            Grid {
                seqs: vec![1024, 4096],
                batch_heads: vec![64],
                samples: 10,
            }
        }
    }

    /// The smallest useful grid: one length (256) at B×H 4.
    pub fn quick() -> Grid {
        Grid {
            seqs: vec![256],
            batch_heads: vec![4],
            samples: 2,
        }
    }

    /// The points of the grid for `spec`, in tuning order.
    pub fn points(&self, spec: &VariantSpec) -> Vec<ShapePoint> {
        let mut points = Vec::new();
        for &bh in &self.batch_heads {
            for &seq in &self.seqs {
                points.push(ShapePoint::new(spec, seq, bh));
            }
        }
        points
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
    for point in grid.points(spec) {
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
    let time = |c: Candidate| -> Result<f64, AttnError> {
        let blueprint = Blueprint::new(spec, c, &problem, &packed);
        launch::<V>(client, &blueprint, &problem, &packed, &q, &k, &v, &out)?;
        crate::sync(client)?;
        let mut ms = Vec::with_capacity(grid.samples.max(1));
        for _ in 0..grid.samples.max(1) {
            let t = Instant::now();
            launch::<V>(client, &blueprint, &problem, &packed, &q, &k, &v, &out)?;
            crate::sync(client)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    };
    let chosen_ms = time(chosen)?;
    let fallback_ms = if chosen == fallback {
        chosen_ms
    } else {
        time(fallback)?
    };
    Ok(KeyReport {
        variant: spec.name,
        point,
        key,
        chosen,
        fallback,
        candidates: list.len(),
        settle_s,
        chosen_ms,
        fallback_ms,
        keys: point.seq,
    })
}

/// A device tensor of `shape` holding a fixed pseudo-random pattern in [-1, 1] (timing does not
/// depend on the values; they only have to be finite and varied).
fn filled<E: Element>(
    client: &ComputeClient,
    shape: [usize; 4],
    seed: u64,
) -> Result<Tensor<E>, AttnError> {
    let len = shape.iter().product::<usize>();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<E> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            E::from_f64((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        })
        .collect();
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
        let extent = |e: InputExtent| match e {
            InputExtent::Scalar => 1,
            InputExtent::PerBatch => sequences,
            InputExtent::PerHead => point.heads_q,
        };
        let mut ints = Vec::new();
        let mut floats = Vec::new();
        for decl in spec.inputs {
            match decl.ty {
                InputType::I32 => ints.push(vec![16; extent(decl.extent)]),
                InputType::F32 => floats.push(vec![0.5; extent(decl.extent)]),
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
        }
    }
}
