//! The oracle: float64 attention on the CPU with the same semantics as the kernels, the naive
//! low-precision computation that sets the error budget, random inputs and the pass criterion.
//!
//! The semantics are written out here independently of the kernels: per (sequence, head, query,
//! key), the mask terms of [`VariantSpec::mask`], the score modifications of
//! [`VariantSpec::score`] and the variant's own expressions through their host forms
//! ([`Variant::host_mask`], [`Variant::host_score`]).

use rand::{rngs::StdRng, Rng, SeedableRng};

pub use crate::inputs::OwnedInputs;
use crate::inputs::{alibi_slopes, Inputs, Packed};
use crate::problem::Problem;
use crate::tensor::Element;
use crate::variant::{Alibi, CausalAlignment, Variant, VariantSpec};

/// O `[B, Hq, Nq, Dv]` and LSE `[B, Hq, Nq]` of the float64 reference.
#[derive(Clone, Debug)]
pub struct Reference {
    /// Output.
    pub o: Vec<f64>,
    /// Log-sum-exp; −∞ for rows that see no key (and have no sink).
    pub lse: Vec<f64>,
}

/// One sequence (batch entry or document) as the reference sees it.
#[derive(Copy, Clone, Debug)]
pub struct SeqView {
    /// Index of the sequence (`b` in expressions).
    pub index: usize,
    /// Batch index into the tensors.
    pub batch: usize,
    /// First query row in the tensor.
    pub q_off: usize,
    /// Queries.
    pub seq_q: usize,
    /// First key row in the tensor.
    pub k_off: usize,
    /// Keys that exist (key length applied).
    pub seq_k: usize,
    /// Prefix length (prefix-LM).
    pub prefix: i64,
}

/// The sequences of a call.
pub fn sequences(
    spec: &VariantSpec,
    p: &Problem,
    packed: &Packed,
    inputs: &Inputs,
) -> Vec<SeqView> {
    (0..packed.sequences)
        .map(|s| {
            let (q_off, seq_q, k_off, seq_k) = packed.sequence(spec, p, s);
            SeqView {
                index: s,
                batch: if spec.mask.documents { 0 } else { s },
                q_off,
                seq_q,
                k_off,
                seq_k,
                prefix: inputs.prefix_lengths.map_or(0, |l| l[s] as i64),
            }
        })
        .collect()
}

/// Whether query `i` of head `h` sees key `j` in sequence `s` (positions within the sequence).
pub fn visible<V: Variant>(s: &SeqView, h: usize, i: usize, j: usize, inputs: &Inputs) -> bool {
    let m = &V::SPEC.mask;
    if j >= s.seq_k {
        return false;
    }
    let (at, k) = (i as i64 + shift(&V::SPEC, s), j as i64);
    if m.causal && k > at {
        return false;
    }
    if let Some(w) = m.window {
        if w.left.is_some_and(|l| k < at - l as i64) || w.right.is_some_and(|r| k > at + r as i64) {
            return false;
        }
    }
    if m.prefix_lm && !(k < s.prefix || k <= at) {
        return false;
    }
    !m.custom || V::host_mask(s.index as i64, h as i64, i as i64, k, inputs)
}

/// Each query head's ALiBi slope (empty without ALiBi).
fn slopes_f64(spec: &VariantSpec, p: &Problem, inputs: &Inputs) -> Vec<f64> {
    match spec.score.alibi {
        Some(Alibi::Given) => inputs
            .alibi_slopes
            .unwrap_or(&[])
            .iter()
            .map(|&x| x as f64)
            .collect(),
        Some(Alibi::Geometric) => alibi_slopes(p.heads_q).iter().map(|&x| x as f64).collect(),
        None => Vec::new(),
    }
}

/// The aligned position of query 0 among the keys of sequence `s`.
fn shift(spec: &VariantSpec, s: &SeqView) -> i64 {
    match spec.mask.align {
        CausalAlignment::BottomRight => s.seq_k as i64 - s.seq_q as i64,
        CausalAlignment::TopLeft => 0,
    }
}

/// The built-in modifications of a scaled score `x` (softcap, then ALiBi): what the variant's
/// own score expression receives.
fn builtin_modified(
    spec: &VariantSpec,
    x: f64,
    s: &SeqView,
    [h, i, j]: [usize; 3],
    slopes: &[f64],
) -> f64 {
    let sc = &spec.score;
    let mut x = x;
    if let Some(cap) = sc.softcap {
        x = cap * (x / cap).tanh();
    }
    if sc.alibi.is_some() {
        x -= slopes[h] * (i as i64 + shift(spec, s) - j as i64).abs() as f64;
    }
    x
}

/// The modified logit of a scaled score `x`.
fn modified<V: Variant>(
    x: f64,
    s: &SeqView,
    h: usize,
    i: usize,
    j: usize,
    slopes: &[f64],
    inputs: &Inputs,
) -> f64 {
    let x = builtin_modified(&V::SPEC, x, s, [h, i, j], slopes);
    if V::SPEC.score.custom {
        V::host_score(x, s.index as i64, h as i64, i as i64, j as i64, inputs)
    } else {
        x
    }
}

/// Query/key pairs that take part in a call (for FLOP counts). Without a custom mask every
/// head sees the same pairs, so one head is counted and multiplied.
pub fn visible_pairs<V: Variant>(p: &Problem, packed: &Packed, inputs: &Inputs) -> u64 {
    let inputs = &inputs.with_dims(p);
    let heads = if V::SPEC.mask.custom { p.heads_q } else { 1 };
    let mut pairs = 0u64;
    for s in sequences(&V::SPEC, p, packed, inputs) {
        for h in 0..heads {
            for i in 0..s.seq_q {
                pairs += (0..s.seq_k)
                    .filter(|&j| visible::<V>(&s, h, i, j, inputs))
                    .count() as u64;
            }
        }
    }
    pairs * (p.heads_q / heads) as u64
}

/// Attention with every operation rounded by `round` (identity for float64). Scores and P·V
/// accumulate in `acc_round` precision, as a GPU matmul accumulates in f32.
#[allow(clippy::too_many_arguments)]
fn attention_with<V: Variant>(
    spec: &VariantSpec,
    p: &Problem,
    packed: &Packed,
    inputs: &Inputs,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    round: &dyn Fn(f64) -> f64,
    acc_round: &dyn Fn(f64) -> f64,
) -> Reference {
    let inputs = &inputs.with_dims(p);
    let (nq, nk, d, dv) = (p.seq_q, p.seq_k, p.head_dim, p.value_dim);
    let scale = spec.softmax_scale();
    let slopes = slopes_f64(spec, p, inputs);
    let mut o = vec![0.0; p.batch * p.heads_q * nq * dv];
    let mut lse = vec![f64::NEG_INFINITY; p.batch * p.heads_q * nq];
    let mut scores = vec![0.0; nk];
    for s in sequences(spec, p, packed, inputs) {
        for h in 0..p.heads_q {
            let hk = h / p.group;
            let qb = (s.batch * p.heads_q + h) * nq * d;
            let kb = (s.batch * p.heads_kv + hk) * nk * d;
            let vb = (s.batch * p.heads_kv + hk) * nk * dv;
            for i in 0..s.seq_q {
                let qr = s.q_off + i;
                let qi = &q[qb + qr * d..qb + (qr + 1) * d];
                let mut max = f64::NEG_INFINITY;
                let scores = &mut scores[..s.seq_k];
                for (j, sc) in scores.iter_mut().enumerate() {
                    if !visible::<V>(&s, h, i, j, inputs) {
                        *sc = f64::NEG_INFINITY;
                        continue;
                    }
                    let kr = s.k_off + j;
                    let kj = &k[kb + kr * d..kb + (kr + 1) * d];
                    let dot = qi
                        .iter()
                        .zip(kj)
                        .fold(0.0, |a, (x, y)| acc_round(a + x * y));
                    let x = round(round(dot) * round(scale));
                    *sc = round(modified::<V>(x, &s, h, i, j, &slopes, inputs));
                    max = max.max(*sc);
                }
                let sink = inputs
                    .sinks
                    .filter(|_| spec.score.sinks)
                    .map(|sk| sk[h] as f64);
                if let Some(sink) = sink {
                    max = max.max(sink);
                }
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let mut sum = sink.map_or(0.0, |sink| acc_round((sink - max).exp()));
                for sc in scores.iter_mut() {
                    *sc = if *sc == f64::NEG_INFINITY {
                        0.0
                    } else {
                        acc_round((*sc - max).exp())
                    };
                    sum = acc_round(sum + *sc);
                }
                let row = (s.batch * p.heads_q + h) * nq + qr;
                lse[row] = max + sum.ln();
                let out = &mut o[row * dv..(row + 1) * dv];
                for (j, &sc) in scores.iter().enumerate() {
                    let pj = round(sc / sum);
                    if pj == 0.0 {
                        continue;
                    }
                    let kr = s.k_off + j;
                    let vj = &v[vb + kr * dv..vb + (kr + 1) * dv];
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

/// Float64 attention of variant `V`: the oracle.
pub fn attention_f64<V: Variant>(
    p: &Problem,
    packed: &Packed,
    inputs: &Inputs,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Reference {
    attention_with::<V>(&V::SPEC, p, packed, inputs, q, k, v, &|x| x, &|x| x)
}

/// The naive computation in `V`'s element type: scores, probabilities and output rounded to it,
/// sums in f32. Its error against float64 sets the kernel's error budget.
pub fn attention_naive<V: Variant>(
    p: &Problem,
    packed: &Packed,
    inputs: &Inputs,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Vec<f64> {
    attention_with::<V>(
        &V::SPEC,
        p,
        packed,
        inputs,
        q,
        k,
        v,
        &|x| V::Elem::from_f64(x).to_f64(),
        &|x| x as f32 as f64,
    )
    .o
}

/// Float64 attention of a decode call: the cache gathered into `[B, Hkv, capacity, D]` order as
/// `k` and `v`, each sequence's keys cut at its effective length (as the call packed it).
pub fn decode_f64<V: Variant>(
    call: &crate::decode::DecodeProblem,
    inputs: &Inputs,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Reference {
    let (p, packed) = (&call.problem, &call.packed);
    attention_with::<V>(&call.spec, p, packed, inputs, q, k, v, &|x| x, &|x| x)
}

/// The naive low-precision computation of a decode call (see [`attention_naive`]).
pub fn decode_naive<V: Variant>(
    call: &crate::decode::DecodeProblem,
    inputs: &Inputs,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Vec<f64> {
    let (p, packed) = (&call.problem, &call.packed);
    attention_with::<V>(
        &call.spec,
        p,
        packed,
        inputs,
        q,
        k,
        v,
        &|x| V::Elem::from_f64(x).to_f64(),
        &|x| x as f32 as f64,
    )
    .o
}

/// dQ `[B, Hq, Nq, D]`, dK `[B, Hkv, Nk, D]` and dV `[B, Hkv, Nk, Dv]` of the reference.
#[derive(Clone, Debug)]
pub struct GradsF64 {
    /// Gradient of Q.
    pub dq: Vec<f64>,
    /// Gradient of K, summed over each K/V head's query group.
    pub dk: Vec<f64>,
    /// Gradient of V, summed the same way.
    pub dv: Vec<f64>,
    /// Gradient of each head's sink logit (empty without sinks).
    pub d_sinks: Vec<f64>,
    /// Gradient of each head's given ALiBi slope (empty unless `alibi: given`).
    pub d_alibi_slopes: Vec<f64>,
    /// Gradient of each declared `f32` input, in declaration order.
    pub d_inputs: Vec<Vec<f64>>,
}

/// The derivative of the score modification at the scaled logit `x`: softcap's
/// `1 − tanh²(x / cap)`, ALiBi's 1, and the variant's own expression's (its host derivative,
/// [`Variant::host_score_grad`]) at the value it receives; with that value and that derivative.
fn modified_slope<V: Variant>(
    x: f64,
    s: &SeqView,
    [h, i, j]: [usize; 3],
    slopes: &[f64],
    inputs: &Inputs,
) -> (f64, f64, f64) {
    let sc = &V::SPEC.score;
    let softcap = sc.softcap.map_or(1.0, |cap| {
        let t = (x / cap).tanh();
        1.0 - t * t
    });
    let y = builtin_modified(&V::SPEC, x, s, [h, i, j], slopes);
    let custom = if sc.custom {
        V::host_score_grad(y, s.index as i64, h as i64, i as i64, j as i64, inputs)
    } else {
        1.0
    };
    (softcap * custom, y, custom)
}

/// How [`backward_with`] rounds: every operation by `round` (identity for float64), sums in
/// `acc_round`'s precision.
struct Rounding<'a> {
    round: &'a dyn Fn(f64) -> f64,
    acc_round: &'a dyn Fn(f64) -> f64,
}

/// The gradients of attention, rounded as `rounding` says; `D` from `stored_o` (the forward's O,
/// `[B, Hq, Nq, Dv]`) where given. Softmax probabilities are recomputed from the forward's
/// semantics (sinks in the denominator).
fn backward_with<V: Variant>(
    p: &Problem,
    packed: &Packed,
    inputs: &Inputs,
    [q, k, v, d_out]: [&[f64]; 4],
    stored_o: Option<&[f64]>,
    rounding: Rounding,
) -> GradsF64 {
    let Rounding { round, acc_round } = rounding;
    let inputs = &inputs.with_dims(p);
    let spec = &V::SPEC;
    let (nq, nk, d, dv) = (p.seq_q, p.seq_k, p.head_dim, p.value_dim);
    let scale = spec.softmax_scale();
    let slopes = slopes_f64(spec, p, inputs);
    let mut dq = vec![0.0; p.batch * p.heads_q * nq * d];
    let mut dk = vec![0.0; p.batch * p.heads_kv * nk * d];
    let mut dvv = vec![0.0; p.batch * p.heads_kv * nk * dv];
    let mut d_sinks = vec![0.0; if spec.score.sinks { p.heads_q } else { 0 }];
    let given = spec.score.alibi == Some(Alibi::Given);
    let mut d_alibi_slopes = vec![0.0; if given { p.heads_q } else { 0 }];
    // The learnable inputs' gradients (declaration index each), and which of them each table
    // read of the score expression adds to.
    let learned: Vec<usize> = (0..spec.inputs.len())
        .filter(|&i| spec.learnable(i))
        .collect();
    let positions = crate::inputs::positions(p);
    let mut d_inputs: Vec<Vec<f64>> = learned
        .iter()
        .map(|&i| {
            vec![
                0.0;
                spec.inputs[i]
                    .shape
                    .len(packed.sequences, p.heads_q, positions)
            ]
        })
        .collect();
    let read_of: Vec<Option<usize>> = spec
        .score_reads
        .iter()
        .map(|r| learned.iter().position(|&i| i == r.input as usize))
        .collect();
    for s in sequences(spec, p, packed, inputs) {
        for h in 0..p.heads_q {
            let hk = h / p.group;
            let qb = (s.batch * p.heads_q + h) * nq;
            let kb = (s.batch * p.heads_kv + hk) * nk;
            for i in 0..s.seq_q {
                let qr = qb + s.q_off + i;
                let qi = &q[qr * d..(qr + 1) * d];
                let doi = &d_out[qr * dv..(qr + 1) * dv];
                // Scores (raw scaled logit and modified), max and sum, as the forward.
                let mut raw = vec![0.0; s.seq_k];
                let mut sc = vec![f64::NEG_INFINITY; s.seq_k];
                let mut max = f64::NEG_INFINITY;
                for j in 0..s.seq_k {
                    if !visible::<V>(&s, h, i, j, inputs) {
                        continue;
                    }
                    let kr = kb + s.k_off + j;
                    let dot = qi
                        .iter()
                        .zip(&k[kr * d..(kr + 1) * d])
                        .fold(0.0, |a, (x, y)| acc_round(a + x * y));
                    raw[j] = round(dot * scale);
                    sc[j] = round(modified::<V>(raw[j], &s, h, i, j, &slopes, inputs));
                    max = max.max(sc[j]);
                }
                let sink = inputs
                    .sinks
                    .filter(|_| spec.score.sinks)
                    .map(|sk| sk[h] as f64);
                if let Some(sink) = sink {
                    max = max.max(sink);
                }
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let mut sum = sink.map_or(0.0, |sink| (sink - max).exp());
                for x in &sc {
                    if *x != f64::NEG_INFINITY {
                        sum = acc_round(sum + (x - max).exp());
                    }
                }
                let probs: Vec<f64> = sc
                    .iter()
                    .map(|&x| {
                        if x == f64::NEG_INFINITY {
                            0.0
                        } else {
                            round((x - max).exp() / sum)
                        }
                    })
                    .collect();
                // dP = dO·v, D = Σ P dP (= dO·O), dS = P (dP − D) f'.
                let dps: Vec<f64> = (0..s.seq_k)
                    .map(|j| {
                        if probs[j] == 0.0 {
                            return 0.0;
                        }
                        let vr = kb + s.k_off + j;
                        doi.iter()
                            .zip(&v[vr * dv..(vr + 1) * dv])
                            .fold(0.0, |a, (x, y)| acc_round(a + x * y))
                    })
                    .collect();
                // D = Σ P dP, or dO·O from the forward's stored O as the kernels compute it (its
                // error moves every pair's dS of the row alike, and sums over all pairs — a
                // learnable scalar's gradient — add those up).
                let delta = match stored_o {
                    Some(o) => o[qr * dv..(qr + 1) * dv]
                        .iter()
                        .zip(doi)
                        .fold(0.0, |a, (oc, g)| acc_round(a + oc * g)),
                    None => probs
                        .iter()
                        .zip(&dps)
                        .fold(0.0, |a, (pj, dp)| acc_round(a + pj * dp)),
                };
                // The sink moves O only through the normalisation: −P_sink · D.
                if let Some(sink) = sink {
                    let p_sink = round((sink - max).exp() / sum);
                    d_sinks[h] = acc_round(d_sinks[h] - p_sink * delta);
                }
                for j in 0..s.seq_k {
                    let pj = probs[j];
                    if pj == 0.0 {
                        continue;
                    }
                    let (slope, pre, custom) =
                        modified_slope::<V>(raw[j], &s, [h, i, j], &slopes, inputs);
                    let d_score = pj * (dps[j] - delta);
                    let ds = round(d_score * slope);
                    let (b, hh, qi64, kj64) = (s.index as i64, h as i64, i as i64, j as i64);
                    for (n, &decl) in learned.iter().enumerate() {
                        let shape = spec.inputs[decl].shape;
                        if shape.is_table() {
                            continue;
                        }
                        let at = if shape.per_batch {
                            s.index
                        } else if shape.per_head {
                            h
                        } else {
                            0
                        };
                        let dx = V::host_score_input_grad(pre, b, hh, qi64, kj64, inputs, decl);
                        d_inputs[n][at] = acc_round(d_inputs[n][at] + d_score * dx);
                    }
                    for (read, n) in read_of.iter().enumerate() {
                        if let Some(n) = *n {
                            let at = V::host_read_index(b, hh, qi64, kj64, inputs, read);
                            let dx = V::host_score_read_grad(pre, b, hh, qi64, kj64, inputs, read);
                            d_inputs[n][at] = acc_round(d_inputs[n][at] + d_score * dx);
                        }
                    }
                    if given {
                        let distance = (i as i64 + shift(spec, &s) - j as i64).abs() as f64;
                        d_alibi_slopes[h] =
                            acc_round(d_alibi_slopes[h] - d_score * custom * distance);
                    }
                    let kr = kb + s.k_off + j;
                    for c in 0..d {
                        dq[qr * d + c] = acc_round(dq[qr * d + c] + ds * scale * k[kr * d + c]);
                        dk[kr * d + c] = acc_round(dk[kr * d + c] + ds * scale * qi[c]);
                    }
                    for c in 0..dv {
                        dvv[kr * dv + c] = acc_round(dvv[kr * dv + c] + pj * doi[c]);
                    }
                }
            }
        }
    }
    GradsF64 {
        dq,
        dk,
        dv: dvv,
        d_sinks,
        d_alibi_slopes,
        d_inputs,
    }
}

/// Float64 gradients of variant `V` for the upstream gradient `d_out`: the oracle of the
/// backward kernels. Inputs in `[B, H, N, D]` order, contiguous.
pub fn backward_f64<V: Variant>(
    p: &Problem,
    packed: &Packed,
    inputs: &Inputs,
    qkv_do: [&[f64]; 4],
) -> GradsF64 {
    let exact = Rounding {
        round: &|x| x,
        acc_round: &|x| x,
    };
    backward_with::<V>(p, packed, inputs, qkv_do, None, exact)
}

/// The naive low-precision backward (see [`attention_naive`]): probabilities and score gradients
/// rounded to `V`'s element type, sums in f32, and `D = dO·O` from `stored_o` (the forward's O as
/// the kernels read it, `[B, Hq, Nq, Dv]` widened) where given — as FlashAttention's backward
/// computes it, so that the error the stored O brings (every pair of a row moved alike, which a
/// learnable scalar's gradient sums over the whole problem) is in the naive error too.
pub fn backward_naive<V: Variant>(
    p: &Problem,
    packed: &Packed,
    inputs: &Inputs,
    qkv_do: [&[f64]; 4],
    stored_o: Option<&[f64]>,
) -> GradsF64 {
    let low = Rounding {
        round: &|x| V::Elem::from_f64(x).to_f64(),
        acc_round: &|x| x as f32 as f64,
    };
    backward_with::<V>(p, packed, inputs, qkv_do, stored_o, low)
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

impl OwnedInputs {
    /// Random inputs for `spec` on a `[batch, heads_q, seq_q]` × `seq_k` problem: key lengths
    /// anywhere in `0..=seq_k`, document boundaries anywhere (empty and 1-token documents
    /// included; at most `max_docs` documents, which must be ≥ 1), prefixes in `0..=seq_k`, sinks
    /// and slopes of either sign (slopes positive), and the variant's own inputs (i32 in
    /// `0..64`, f32 standard normal).
    pub fn random(
        spec: &VariantSpec,
        [batch, heads_q, seq_q, seq_k]: [usize; 4],
        max_docs: usize,
        rng: &mut StdRng,
    ) -> Self {
        let mut inputs = OwnedInputs::default();
        let mut sequences = batch;
        let mut seq_k_of: Vec<usize> = vec![seq_k; batch];
        if spec.mask.documents {
            let docs = rng.random_range(1..=max_docs.max(1));
            let q_off = random_offsets(rng, docs, seq_q);
            let k_off = if seq_q == seq_k {
                q_off.clone()
            } else {
                random_offsets(rng, docs, seq_k)
            };
            seq_k_of = k_off.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
            inputs.q_offsets = Some(q_off);
            inputs.k_offsets = Some(k_off);
            sequences = docs;
        }
        if spec.mask.key_lengths {
            inputs.key_lengths = Some(
                (0..sequences)
                    .map(|s| rng.random_range(0..=seq_k_of[s] as i32))
                    .collect(),
            );
        }
        if spec.mask.prefix_lm {
            inputs.prefix_lengths = Some(
                (0..sequences)
                    .map(|_| rng.random_range(0..=seq_k as i32))
                    .collect(),
            );
        }
        if spec.score.sinks {
            inputs.sinks = Some((0..heads_q).map(|_| rng.random_range(-3.0..3.0)).collect());
        }
        if spec.score.alibi == Some(Alibi::Given) {
            inputs.alibi_slopes = Some((0..heads_q).map(|_| rng.random_range(0.0..0.5)).collect());
        }
        for decl in spec.inputs {
            let len = decl.shape.len(sequences, heads_q, seq_q.max(seq_k));
            match decl.ty {
                crate::variant::InputType::I32 => inputs
                    .ints
                    .push((0..len).map(|_| rng.random_range(0..64)).collect()),
                crate::variant::InputType::F32 => {
                    let values: Vec<f32> = random_vec(rng, len);
                    inputs.floats.push(values);
                }
            }
        }
        inputs
    }
}

/// `docs + 1` offsets from 0 to `total`, boundaries drawn at random (repeats make empty
/// documents); when there is room, one document has exactly one token.
pub fn random_offsets(rng: &mut StdRng, docs: usize, total: usize) -> Vec<i32> {
    let mut cuts: Vec<i32> = (0..docs - 1)
        .map(|_| rng.random_range(0..=total as i32))
        .collect();
    cuts.sort_unstable();
    let mut offsets = Vec::with_capacity(docs + 1);
    offsets.push(0);
    offsets.extend(cuts);
    offsets.push(total as i32);
    if docs >= 2 && total >= 2 {
        // Make the first document a single token.
        offsets[1] = 1;
        for i in 2..offsets.len() {
            offsets[i] = offsets[i].max(offsets[i - 1]);
        }
    }
    offsets
}
