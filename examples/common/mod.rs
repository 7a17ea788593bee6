//! Shared by the examples: random inputs, one timed run, a check against the float64 reference.

use std::time::Instant;

use attn::inputs::pack;
use attn::reference::{
    attention_f64, attention_naive, error_floor, random_vec, seeded_rng, visible_pairs, widen,
    Verdict,
};
use attn::{AttnError, ComputeClient, Element, Inputs, Problem, Tensor, Variant};

/// A problem size: batch, query heads, K/V heads, query length, key length.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub seq_q: usize,
    pub seq_k: usize,
}

impl Shape {
    /// `--seq N` (both lengths) and `--batch B` from the command line override the defaults.
    #[allow(dead_code)]
    pub fn with_args(mut self) -> Self {
        let args: Vec<String> = std::env::args().collect();
        for pair in args.windows(2) {
            let value = || pair[1].parse().expect("a positive integer");
            match pair[0].as_str() {
                "--seq" => (self.seq_q, self.seq_k) = (value(), value()),
                "--batch" => self.batch = value(),
                _ => {}
            }
        }
        self
    }
}

/// Runs `V` on random inputs of `shape` with run-time `inputs`, times a warm call, checks against
/// float64; returns whether the check passed.
pub fn run_and_check<V: Variant>(
    client: &ComputeClient,
    shape: Shape,
    inputs: &Inputs,
) -> Result<bool, AttnError> {
    let spec = V::SPEC;
    let (d, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let (mut rng, _) = seeded_rng(spec.name);
    let q_shape = [shape.batch, shape.heads_q, shape.seq_q, d];
    let k_shape = [shape.batch, shape.heads_kv, shape.seq_k, d];
    let v_shape = [shape.batch, shape.heads_kv, shape.seq_k, dv];
    let q_host: Vec<V::Elem> = random_vec(&mut rng, q_shape.iter().product());
    let k_host: Vec<V::Elem> = random_vec(&mut rng, k_shape.iter().product());
    let v_host: Vec<V::Elem> = random_vec(&mut rng, v_shape.iter().product());
    let q = Tensor::from_slice(client, &q_host, q_shape)?;
    let k = Tensor::from_slice(client, &k_host, k_shape)?;
    let v = Tensor::from_slice(client, &v_host, v_shape)?;

    let start = Instant::now();
    let out = attn::forward::<V>(client, &q, &k, &v, inputs)?;
    attn::sync(client)?;
    let first = start.elapsed();
    let start = Instant::now();
    let out_warm = attn::forward::<V>(client, &q, &k, &v, inputs)?;
    attn::sync(client)?;
    let warm = start.elapsed();
    drop(out_warm);

    let problem = Problem::new(&spec, &q, &k, &v)?;
    let packed = pack(&spec, &problem, inputs)?;
    let (qf, kf, vf) = (widen(&q_host), widen(&k_host), widen(&v_host));
    let reference = attention_f64::<V>(&problem, &packed, inputs, &qf, &kf, &vf);
    let naive = attention_naive::<V>(&problem, &packed, inputs, &qf, &kf, &vf);
    let o = widen(&out.o.to_vec(client));
    let verdict = Verdict::new(&o, &reference.o, &naive, error_floor::<V::Elem>());
    let lse: Vec<f64> = out.lse.to_vec(client).into_iter().map(f64::from).collect();
    let lse_error = attn::reference::max_abs_error(&lse, &reference.lse);

    // The shape the calls ran: the tuner's pick for this key, else the fallback.
    let key = attn::tune::TuneKey::of(&spec, &problem, &packed);
    let tiling = attn::tune::chosen::<V>(client, &key)
        .map(|c| c.tiling)
        .unwrap_or(attn::select_tiling(client, &spec)?);
    let pairs = visible_pairs::<V>(&problem, &packed, inputs) as f64;
    let flops = 2.0 * pairs * (d + dv) as f64;
    println!(
        "{}: B {} Hq/Hkv {}/{} Nq {} Nk {} D {} {} mask {}, tile {}",
        spec.name,
        shape.batch,
        shape.heads_q,
        shape.heads_kv,
        shape.seq_q,
        shape.seq_k,
        d,
        <V::Elem as Element>::DTYPE.name(),
        spec.mask.describe(),
        tiling.name()
    );
    println!(
        "  time: first call {:.1} ms (includes kernel compilation, and tuning on a GPU's first call of a key), warm call {:.2} ms ({:.1} GFLOP/s)",
        first.as_secs_f64() * 1e3,
        warm.as_secs_f64() * 1e3,
        flops / warm.as_secs_f64() / 1e9
    );
    println!(
        "  max |O − float64| = {:.3e} (naive {} computation: {:.3e}; bound {:.3e}); max |LSE − float64| = {:.3e}",
        verdict.kernel_error,
        <V::Elem as Element>::DTYPE.name(),
        verdict.naive_error,
        verdict.bound,
        lse_error
    );
    let passed = verdict.passed() && lse_error <= 1e-3;
    println!("  {}", if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}

/// Exits with status 1 when a check failed, printing the error when the call was refused.
pub fn finish(result: Result<bool, AttnError>) {
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
