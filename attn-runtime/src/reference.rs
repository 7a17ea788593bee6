//! The oracle: float64 attention on the CPU with the same semantics as the kernels, the naive
//! low-precision computation that sets the error budget, random inputs and the pass criterion.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::problem::Problem;
use crate::tensor::Element;
use crate::variant::{CausalAlignment, MaskKind, VariantSpec};

/// O `[B, Hq, Nq, D]` and LSE `[B, Hq, Nq]` of the float64 reference.
#[derive(Clone, Debug)]
pub struct Reference {
    /// Output.
    pub o: Vec<f64>,
    /// Log-sum-exp; −∞ for rows that see no key.
    pub lse: Vec<f64>,
}

/// Whether query `i` sees key `j` under `mask` for lengths `nq`, `nk`.
pub fn visible(mask: MaskKind, i: usize, j: usize, nq: usize, nk: usize) -> bool {
    match mask {
        MaskKind::None => true,
        MaskKind::Causal(CausalAlignment::BottomRight) => {
            (j as i64) <= i as i64 + nk as i64 - nq as i64
        }
        MaskKind::Causal(CausalAlignment::TopLeft) => j <= i,
    }
}

/// Attention with every operation rounded by `round` (identity for float64). Scores and P·V
/// accumulate in `acc_round` precision, as a GPU matmul accumulates in f32.
fn attention_with(
    spec: &VariantSpec,
    p: &Problem,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    round: &dyn Fn(f64) -> f64,
    acc_round: &dyn Fn(f64) -> f64,
) -> Reference {
    let (nq, nk, d) = (p.seq_q, p.seq_k, p.head_dim);
    let scale = spec.softmax_scale();
    let mut o = vec![0.0; p.batch * p.heads_q * nq * d];
    let mut lse = vec![f64::NEG_INFINITY; p.batch * p.heads_q * nq];
    let mut scores = vec![0.0; nk];
    for b in 0..p.batch {
        for h in 0..p.heads_q {
            let hk = h / p.group;
            let qb = (b * p.heads_q + h) * nq * d;
            let kb = (b * p.heads_kv + hk) * nk * d;
            for i in 0..nq {
                let qi = &q[qb + i * d..qb + (i + 1) * d];
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    if !visible(spec.mask, i, j, nq, nk) {
                        *s = f64::NEG_INFINITY;
                        continue;
                    }
                    let kj = &k[kb + j * d..kb + (j + 1) * d];
                    let dot = qi
                        .iter()
                        .zip(kj)
                        .fold(0.0, |a, (x, y)| acc_round(a + x * y));
                    *s = round(round(dot) * round(scale));
                    max = max.max(*s);
                }
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = if *s == f64::NEG_INFINITY {
                        0.0
                    } else {
                        acc_round((*s - max).exp())
                    };
                    sum = acc_round(sum + *s);
                }
                let row = (b * p.heads_q + h) * nq + i;
                lse[row] = max + sum.ln();
                let out = &mut o[row * d..(row + 1) * d];
                for (j, &s) in scores.iter().enumerate() {
                    let pj = round(s / sum);
                    if pj == 0.0 {
                        continue;
                    }
                    let vj = &v[kb + j * d..kb + (j + 1) * d];
                    for (oc, vc) in out.iter_mut().zip(vj) {
                        *oc = acc_round(*oc + pj * vc);
                    }
                }
                for oc in out.iter_mut() {
                    *oc = round(*oc);
                }
            }
        }
    }
    Reference { o, lse }
}

/// Float64 attention: the oracle.
pub fn attention_f64(
    spec: &VariantSpec,
    p: &Problem,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Reference {
    attention_with(spec, p, q, k, v, &|x| x, &|x| x)
}

/// The naive computation in `E`: scores, probabilities and output rounded to `E`, sums in f32.
/// Its error against float64 sets the kernel's error budget.
pub fn attention_naive<E: Element>(
    spec: &VariantSpec,
    p: &Problem,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Vec<f64> {
    attention_with(spec, p, q, k, v, &|x| E::from_f64(x).to_f64(), &|x| {
        x as f32 as f64
    })
    .o
}

/// Widens a tensor to f64.
pub fn widen<E: Element>(data: &[E]) -> Vec<f64> {
    data.iter().map(|&x| Element::to_f64(x)).collect()
}

/// A random generator with a fresh seed, or `ATTN_SEED` when set; the seed is printed so a
/// failure can be replayed.
pub fn seeded_rng(label: &str) -> (StdRng, u64) {
    let seed = std::env::var("ATTN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(fresh_seed);
    println!("{label}: seed {seed} (replay with ATTN_SEED={seed})");
    (StdRng::seed_from_u64(seed), seed)
}

/// A seed that differs from run to run: the clock's nanoseconds mixed with the process id.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = nanos ^ (u64::from(std::process::id()) << 32);
    // splitmix64 finaliser, so nearby clock values give unrelated seeds.
    let mut z = mixed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` values of a standard normal distribution, rounded to `E` (never all zeros).
pub fn random_vec<E: Element>(rng: &mut StdRng, len: usize) -> Vec<E> {
    (0..len)
        .map(|_| {
            // Box–Muller: no extra dependency for a normal distribution.
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random::<f64>();
            E::from_f64((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos())
        })
        .collect()
}

/// The largest absolute difference between two equally long slices (NaN counts as infinite; equal
/// infinities, such as the −∞ LSE of a row that sees no key, count as no difference).
pub fn max_abs_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x == y {
                return 0.0;
            }
            let e = (x - y).abs();
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

/// The verdict of comparing a kernel's output with the reference, FlashAttention's way.
#[derive(Clone, Copy, Debug)]
pub struct Verdict {
    /// max |kernel − float64|.
    pub kernel_error: f64,
    /// max |naive low-precision − float64|.
    pub naive_error: f64,
    /// The bound: 2 × naive_error + floor.
    pub bound: f64,
}

impl Verdict {
    /// Compares `kernel` with `reference`, given the naive computation's output `naive`.
    pub fn new(kernel: &[f64], reference: &[f64], naive: &[f64], floor: f64) -> Self {
        let kernel_error = max_abs_error(kernel, reference);
        let naive_error = max_abs_error(naive, reference);
        Self {
            kernel_error,
            naive_error,
            bound: 2.0 * naive_error + floor,
        }
    }

    /// Whether the kernel is within the bound.
    pub fn passed(&self) -> bool {
        self.kernel_error <= self.bound
    }
}

/// The absolute error floor for element type `E`: a few units in the last place at magnitude 1.
pub fn error_floor<E: Element>() -> f64 {
    match E::DTYPE {
        crate::variant::DType::F32 => 1e-5,
        crate::variant::DType::F16 => 2e-3,
        crate::variant::DType::BF16 => 1.6e-2,
    }
}
