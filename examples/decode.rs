//! Llama-3 generation against a paged K/V cache: a prompt per sequence (ragged lengths) appended
//! to the cache and attended by chunked prefill, then decoding steps that each append one token's
//! K/V and attend the whole cache; the last step is checked against float64. The decoding step is
//! planned once (`DecodeStep`) and recorded as a graph (a CUDA graph on CUDA) that every step
//! replays after its append, its queries written into the recorded buffer.
//!
//! `cargo run --release --example decode [-- --batch 4 --prompt 700 --steps 8 --page 16]`
//!
//! Runs in bf16 where the back end supports it (CUDA), else in f16.

use std::time::Instant;

use attn::decode::DecodeProblem;
use attn::reference::{
    decode_f64, decode_naive, error_floor, random_vec, seeded_rng, widen, Verdict,
};
use attn::{
    AttnError, ComputeClient, DecodeStep, Element, Inputs, KvCache, Lse, Output, PagedLayout,
    Tensor, Variant,
};
use rand::Rng;

include!("variants/llama3.rs");

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .map_or(default, |w| w[1].parse().expect("a positive integer"))
}

fn main() {
    let client = attn::default_client();
    let result = if attn::supports::<attn::bf16>(&client) {
        generate::<Llama3>(&client)
    } else {
        println!("bf16 is not supported on this back end; running the f16 variant");
        generate::<Llama3<attn::f16>>(&client)
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

fn generate<V: Variant>(client: &ComputeClient) -> Result<bool, AttnError> {
    let (batch, prompt, steps, page) = (
        arg("--batch", 4),
        arg("--prompt", 700),
        arg("--steps", 8),
        arg("--page", 16),
    );
    let (heads_q, heads_kv, d) = (32, 8, V::SPEC.head_dim as usize);
    let (mut rng, _) = seeded_rng("decode example");
    // Ragged prompts: between a quarter of `--prompt` and all of it.
    let prompts: Vec<usize> = (0..batch)
        .map(|_| rng.random_range(prompt / 4 + 1..=prompt))
        .collect();
    let longest = prompts.iter().max().copied().unwrap_or(1) + steps;
    let mut cache = KvCache::<V::Elem>::paged(
        client,
        PagedLayout {
            batch,
            heads_kv,
            head_dim: d,
            value_dim: d,
            page_size: page,
            pages: batch * longest.div_ceil(page),
            max_pages: longest.div_ceil(page),
        },
    )?;
    // The cache's contents on the host, [B, Hkv, capacity, D], for the reference.
    let capacity = cache.capacity();
    let mut k_host = vec![0.0; batch * heads_kv * capacity * d];
    let mut v_host = k_host.clone();
    let mut append = |cache: &mut KvCache<V::Elem>,
                      rng: &mut rand::rngs::StdRng,
                      n: usize,
                      counts: &[usize]|
     -> Result<(), AttnError> {
        let starts = cache.lengths().to_vec();
        let k: Vec<V::Elem> = random_vec(rng, batch * heads_kv * n * d);
        let v: Vec<V::Elem> = random_vec(rng, batch * heads_kv * n * d);
        let shape = [batch, heads_kv, n, d];
        cache.append(
            client,
            &Tensor::from_slice(client, &k, shape)?,
            &Tensor::from_slice(client, &v, shape)?,
            Some(counts),
        )?;
        for b in 0..batch {
            for h in 0..heads_kv {
                for t in 0..counts[b] {
                    let src = ((b * heads_kv + h) * n + t) * d;
                    let dst = ((b * heads_kv + h) * capacity + starts[b] + t) * d;
                    for c in 0..d {
                        k_host[dst + c] = k[src + c].to_f64();
                        v_host[dst + c] = v[src + c].to_f64();
                    }
                }
            }
        }
        Ok(())
    };

    // Prefill: every prompt's K/V into the cache, then its queries against it (chunked prefill:
    // the shortest prompt's length of queries per sequence, the last positions of each).
    let start = Instant::now();
    append(&mut cache, &mut rng, longest - steps, &prompts)?;
    let chunk = *prompts.iter().min().expect("a sequence");
    let q: Vec<V::Elem> = random_vec(&mut rng, batch * heads_q * chunk * d);
    let q = Tensor::from_slice(client, &q, [batch, heads_q, chunk, d])?;
    attn::decode::<V>(client, &q, &cache, &Inputs::default())?;
    attn::sync(client)?;
    println!("prefill: prompts {prompts:?}, {chunk} queries each against the paged cache (page {page}): {:.1} ms", start.elapsed().as_secs_f64() * 1e3);

    // Decoding: one token per sequence per step, through one planned step replayed as a graph.
    let shape = [batch, heads_q, 1, d];
    let mut q_host: Vec<V::Elem> = random_vec(&mut rng, batch * heads_q * d);
    let q = Tensor::from_slice(client, &q_host, shape)?;
    let out = Output {
        o: Tensor::empty(client, [batch, heads_q, 1, d]),
        lse: Lse::empty(client, [batch, heads_q, 1]),
    };
    let step = DecodeStep::<V>::new(client, &q, &cache, &Inputs::default())?;
    let graph = match step.capture(client, &q, &cache, &out) {
        Ok(graph) => Some(graph),
        Err(e) => {
            println!("no graph on this back end ({e}); running the step instead");
            None
        }
    };
    for s in 0..steps {
        append(&mut cache, &mut rng, 1, &vec![1; batch])?;
        q_host = random_vec(&mut rng, batch * heads_q * d);
        q.write(client, &q_host)?;
        let start = Instant::now();
        match &graph {
            Some(graph) => unsafe { graph.replay() }
                .map_err(|e| AttnError::Launch(format!("graph replay: {e:?}")))?,
            None => step.run(client, &q, &cache, &out)?,
        }
        attn::sync(client)?;
        if s + 1 == steps {
            println!(
                "step {s} ({}, plan {}): lengths {:?}: {:.2} ms",
                if graph.is_some() {
                    "graph replay"
                } else {
                    "run"
                },
                step.plan().name(),
                cache.lengths(),
                start.elapsed().as_secs_f64() * 1e3
            );
        }
    }
    if steps == 0 {
        return Ok(true);
    }
    let call = DecodeProblem::new::<V>(&q, &cache, &Inputs::default())?;
    let qf = widen(&q_host);
    let reference = decode_f64::<V>(&call, &Inputs::default(), &qf, &k_host, &v_host);
    let naive = decode_naive::<V>(&call, &Inputs::default(), &qf, &k_host, &v_host);
    let o = widen(&out.o.to_vec(client));
    let verdict = Verdict::new(&o, &reference.o, &naive, error_floor::<V::Elem>());
    let lse: Vec<f64> = out.lse.to_vec(client).into_iter().map(f64::from).collect();
    let lse_error = attn::reference::max_abs_error(&lse, &reference.lse);
    println!(
        "{} decode, B {batch} Hq/Hkv {heads_q}/{heads_kv} D {d} {}: max |O − float64| = {:.3e} (bound {:.3e}); max |LSE − float64| = {lse_error:.3e}",
        V::SPEC.name,
        <V::Elem as Element>::DTYPE.name(),
        verdict.kernel_error,
        verdict.bound
    );
    let passed = verdict.passed() && lse_error <= 1e-3;
    println!("  {}", if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}
