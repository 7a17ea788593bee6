//! `bench --check-wide`: the kernels with 64-bit offsets, which a launch takes once one of its
//! buffers holds more than 2³² elements. First tensors that really are that large: Mistral's
//! prefill over a million tokens (Q and O of 32 heads × d 128 hold 4.3·10⁹ elements each),
//! checked against float64 on sampled rows at both ends and across the 2³²-th element, and
//! decoding from pools of more than 2³² elements; then the kernels' 64-bit form on small
//! problems (forced with `attn::launch::wide_offsets`), forward, backward and decode against
//! float64. `--small` runs the second part alone.

use std::time::Instant;

use attn::inputs::pack;
use attn::reference::{
    attention_f64, attention_naive, backward_f64, backward_naive, error_floor, max_abs_error,
    random_vec, seeded_rng, widen, OwnedInputs, Verdict,
};
use attn::{bf16, ComputeClient, Inputs, Problem, Tensor, Variant};

use super::decode;
use super::{check_one, AlibiCausal, Gqa4x128Causal, Mistral, Packed};

/// Runs the check (`small`: without the tensors past 2³² elements); returns whether every run
/// passed.
pub fn check_wide(client: &ComputeClient, small: bool) -> bool {
    let props = client.properties();
    if !props.supports_address(attn::cubecl::prelude::AddressType::U64) {
        println!("wide: this back end has no 64-bit offsets");
        return false;
    }
    let mut results = Vec::new();
    // The tensors past 2³² elements first: the capability itself.
    if !small {
        results.push(cost_of_wide_offsets(client));
        results.push(huge_prefill(client));
        results.extend(decode::check_far_pages(client));
    }
    attn::launch::wide_offsets(true);
    for (nq, nk) in [(17, 1000), (777, 777)] {
        results.push(check_one::<Gqa4x128Causal>(client, [2, 8, 2, nq, nk]));
        results.push(check_one::<Mistral>(client, [1, 8, 2, nq, nk]));
        results.push(check_one::<Packed>(client, [1, 8, 2, nq, nk]));
    }
    for (nq, nk) in [(333, 333), (1000, 257)] {
        results.push(check_backward::<Gqa4x128Causal>(client, [1, 8, 2, nq, nk]));
        results.push(check_backward::<AlibiCausal>(client, [1, 4, 4, nq, nk]));
    }
    results.extend(decode::check_decode_grid(client));
    attn::launch::wide_offsets(false);
    let failed = results.iter().filter(|p| !**p).count();
    println!("wide: {} passed, {failed} failed", results.len() - failed);
    failed == 0
}

/// Every backward plan of `V` on one random problem, dQ, dK and dV against float64.
fn check_backward<V: Variant>(client: &ComputeClient, [b, hq, hkv, nq, nk]: [usize; 5]) -> bool {
    let spec = V::SPEC;
    let (d, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let label = format!("backward {} B{b} H{hq}/{hkv} Nq{nq} Nk{nk}", spec.name);
    let (mut rng, _) = seeded_rng(&label);
    let shapes = [
        [b, hq, nq, d],
        [b, hkv, nk, d],
        [b, hkv, nk, dv],
        [b, hq, nq, dv],
    ];
    let host: Vec<Vec<V::Elem>> = shapes
        .iter()
        .map(|s| random_vec(&mut rng, s.iter().product()))
        .collect();
    let owned = OwnedInputs::random(&spec, [b, hq, nq, nk], 4, &mut rng);
    let inputs = owned.view();
    let up: Vec<Tensor<V::Elem>> = host
        .iter()
        .zip(shapes)
        .map(|(h, s)| Tensor::from_slice(client, h, s).expect("fills its shape"))
        .collect();
    let (q, k, v, d_out) = (&up[0], &up[1], &up[2], &up[3]);
    let ran = attn::forward::<V>(client, q, k, v, &inputs).and_then(|out| {
        let problem = Problem::new(&spec, q, k, v)?;
        Ok((out, problem, pack(&spec, &problem, &inputs)?))
    });
    let (out, problem, packed) = match ran {
        Ok(r) => r,
        Err(e) => {
            println!("{label}: FAIL: {e}");
            return false;
        }
    };
    let wide: Vec<Vec<f64>> = host.iter().map(|h| widen(h)).collect();
    let qkv_do = [&wide[0][..], &wide[1][..], &wide[2][..], &wide[3][..]];
    let reference = backward_f64::<V>(&problem, &packed, &inputs, qkv_do);
    let stored_o = widen(&out.o.to_vec(client));
    let naive = backward_naive::<V>(&problem, &packed, &inputs, qkv_do, Some(&stored_o));
    let mut pass = true;
    for plan in attn::backward_plans(client, &spec) {
        let grads =
            match attn::backward_with_plan::<V>(client, [q, k, v], &out, d_out, &inputs, plan) {
                Ok(g) => g,
                Err(e) => {
                    println!("{label} {plan}: FAIL: {e}");
                    pass = false;
                    continue;
                }
            };
        for (name, got, want, low) in [
            ("dQ", &grads.dq, &reference.dq, &naive.dq),
            ("dK", &grads.dk, &reference.dk, &naive.dk),
            ("dV", &grads.dv, &reference.dv, &naive.dv),
        ] {
            let got = widen(&got.to_vec(client));
            let verdict = Verdict::new(&got, want, low, error_floor::<V::Elem>());
            let ok = verdict.passed() && got.iter().all(|x| x.is_finite());
            println!(
                "{label} {plan}: {name}: max|kernel-f64| {:.2e} (naive {:.2e}, bound {:.2e}): {}",
                verdict.kernel_error,
                verdict.naive_error,
                verdict.bound,
                if ok { "ok" } else { "FAIL" }
            );
            pass &= ok;
        }
    }
    pass
}

/// Mistral's forward at 2¹⁸ tokens with 32-bit offsets and with 64-bit ones, the same inputs:
/// what the wide form costs (best of 5 calls each, each with a sync).
fn cost_of_wide_offsets(client: &ComputeClient) -> bool {
    let [hq, hkv, d] = HEADS;
    let n = 1 << 18;
    let make =
        |heads, salt| Tensor::from_slice(client, &hashed(heads * n * d, salt), [1, heads, n, d]);
    let (q, k, v) = match make(hq, 1).and_then(|q| Ok((q, make(hkv, 2)?, make(hkv, 3)?))) {
        Ok(t) => t,
        Err(e) => {
            println!("widths: FAIL: {e}");
            return false;
        }
    };
    let mut best = [0.0; 2];
    let mut outs = Vec::new();
    for (w, wide) in [false, true].into_iter().enumerate() {
        attn::launch::wide_offsets(wide);
        let ran = best_of(client, [&q, &k, &v], 5);
        attn::launch::wide_offsets(false);
        match ran {
            Ok((o, ms)) => {
                best[w] = ms;
                outs.push(o.o.to_vec(client));
            }
            Err(e) => {
                println!("widths: FAIL: {e}");
                return false;
            }
        }
    }
    let (a, b) = (widen(&outs[0]), widen(&outs[1]));
    let apart = max_abs_error(&a, &b);
    // The same arithmetic in both: at most the rounding of a differently scheduled sum.
    let pass = apart <= error_floor::<bf16>();
    println!(
        "widths: {} B1 H{hq}/{hkv} N{n}: 32-bit offsets {:.3} ms, 64-bit {:.3} ms ({:.2}x); max|O32-O64| {apart:.2e}: {}",
        Mistral::SPEC.name,
        best[0],
        best[1],
        best[1] / best[0],
        if pass { "ok" } else { "FAIL" }
    );
    pass
}

/// Mistral's forward on Q, K and V `calls` times, each call followed by a sync: the last output
/// and the fastest call's wall time in ms.
fn best_of(
    client: &ComputeClient,
    [q, k, v]: [&Tensor<bf16>; 3],
    calls: usize,
) -> Result<(attn::Output<bf16>, f64), attn::AttnError> {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..calls {
        let start = Instant::now();
        let o = attn::forward::<Mistral>(client, q, k, v, &Inputs::default())?;
        attn::sync(client)?;
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
        out = Some(o);
    }
    Ok((out.expect("at least one call"), best))
}

/// Query heads, K/V heads and head dim of the large prefill (Mistral 7B's).
const HEADS: [usize; 3] = [32, 8, 128];
/// Its length: 32 × 1 049 603 × 128 elements of Q and O, past 2³² = 4 294 967 296.
const HUGE_LEN: usize = (1 << 20) + 1027;

/// Mistral's forward over [`HUGE_LEN`] tokens, timed, its output checked against float64 on
/// sampled rows of whole K/V groups: the first rows, the last, and those around Q's 2³²-th
/// element (in the last head).
fn huge_prefill(client: &ComputeClient) -> bool {
    let [hq, hkv, d] = HEADS;
    let n = HUGE_LEN;
    let label = format!(
        "prefill {} B1 H{hq}/{hkv} N{n} (Q, O: {} elements)",
        Mistral::SPEC.name,
        hq * n * d
    );
    let started = Instant::now();
    let q_host = hashed(hq * n * d, 1);
    let k_host = hashed(hkv * n * d, 2);
    let v_host = hashed(hkv * n * d, 3);
    let upload = |h: &[bf16], heads| Tensor::from_slice(client, h, [1, heads, n, d]);
    let tensors =
        upload(&q_host, hq).and_then(|q| Ok((q, upload(&k_host, hkv)?, upload(&v_host, hkv)?)));
    let (q, k, v) = match tensors {
        Ok(t) => t,
        Err(e) => {
            println!("{label}: FAIL: {e}");
            return false;
        }
    };
    println!(
        "{label}: inputs made and uploaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (out, ms) = match best_of(client, [&q, &k, &v], 3) {
        Ok(r) => r,
        Err(e) => {
            println!("{label}: FAIL: {e}");
            return false;
        }
    };
    println!("{label}: forward {ms:.1} ms (best of 3 calls, each with a sync)");
    let o_host = out.o.to_vec(client);
    let lse_host = out.lse.to_vec(client);
    // The rows holding Q's element 2³²: the last head's row `boundary`.
    let boundary = ((1usize << 32) / d) - (hq - 1) * n;
    let mut pass = true;
    for (group, first, rows) in [
        (0, 0, 3),
        (hkv - 1, n - 3, 3),
        (hkv - 1, boundary - 2, 4),
        (3, n / 2, 2),
    ] {
        let check = SampledRows {
            group,
            first,
            rows,
            n,
        };
        pass &= check.run(&q_host, &k_host, &v_host, &o_host, &lse_host);
    }
    pass
}

/// Rows `first..first + rows` of every query head of K/V head `group`, with the keys they can see
/// (Mistral's window), as a problem of their own: aligned bottom-right like the whole one, so the
/// same mask.
struct SampledRows {
    group: usize,
    first: usize,
    rows: usize,
    n: usize,
}

impl SampledRows {
    fn run(&self, q: &[bf16], k: &[bf16], v: &[bf16], o: &[bf16], lse: &[f32]) -> bool {
        let [hq, hkv, d] = HEADS;
        let g = hq / hkv;
        let end = self.first + self.rows;
        let window = 4096;
        let keys_from = end.saturating_sub(window + self.rows);
        let nk = end - keys_from;
        let at = |h: usize, row: usize| (h * self.n + row) * d;
        let mut qs = Vec::new();
        let (mut os, mut lses) = (Vec::new(), Vec::new());
        for h in self.group * g..(self.group + 1) * g {
            qs.extend_from_slice(&q[at(h, self.first)..at(h, end)]);
            os.extend(widen(&o[at(h, self.first)..at(h, end)]));
            lses.extend(
                lse[h * self.n + self.first..h * self.n + end]
                    .iter()
                    .map(|&x| f64::from(x)),
            );
        }
        let ks = &k[at(self.group, keys_from)..at(self.group, end)];
        let vs = &v[at(self.group, keys_from)..at(self.group, end)];
        let problem = Problem {
            batch: 1,
            heads_q: g,
            heads_kv: 1,
            group: g,
            seq_q: self.rows,
            seq_k: nk,
            head_dim: d,
            value_dim: d,
        };
        let inputs = Inputs::default();
        let packed = pack(&Mistral::SPEC, &problem, &inputs).expect("no inputs");
        let (qf, kf, vf) = (widen(&qs), widen(ks), widen(vs));
        let reference = attention_f64::<Mistral>(&problem, &packed, &inputs, &qf, &kf, &vf);
        let naive = attention_naive::<Mistral>(&problem, &packed, &inputs, &qf, &kf, &vf);
        let verdict = Verdict::new(&os, &reference.o, &naive, error_floor::<bf16>());
        let lse_error = max_abs_error(&lses, &reference.lse);
        let pass = verdict.passed() && lse_error <= 2e-3;
        println!(
            "  rows {}..{end} of heads {}..{} ({nk} keys from {keys_from}; Q elements from {}): max|O-f64| {:.2e} (naive {:.2e}, bound {:.2e}), max|LSE-f64| {lse_error:.2e}: {}",
            self.first,
            self.group * g,
            (self.group + 1) * g,
            at(self.group * g, self.first),
            verdict.kernel_error,
            verdict.naive_error,
            verdict.bound,
            if pass { "ok" } else { "FAIL" }
        );
        pass
    }
}

/// `len` values uniform in [−1, 1) from a hash of the element index (salted per tensor), made on
/// every core: billions of them take seconds.
fn hashed(len: usize, salt: u32) -> Vec<bf16> {
    let mut data = vec![bf16::ZERO; len];
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let chunk = len.div_ceil(threads);
    std::thread::scope(|s| {
        for (c, part) in data.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                for (i, x) in part.iter_mut().enumerate() {
                    *x = decode::pattern((c * chunk + i) as u64, salt);
                }
            });
        }
    });
    data
}
