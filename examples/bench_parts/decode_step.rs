//! `bench --decode-step`: the host side of a steady-state decode step, Llama-3 shaped (bf16, 32/8
//! heads, d 128, one token per sequence) against a paged cache of 16-token pages with room to
//! grow. Times what a serving loop pays per step on the host (enqueue only, no sync; averaged
//! over many calls): `decode_into` (checks, plan lookup, uploads and workspace per call),
//! `DecodeStep::run` (planned once), a replay of the step captured as a CUDA graph, and an append
//! of one token. Then the device time of a step each way (synced, median), and a check that the
//! graph's replay gives the same bits as a run after appends.

use std::time::Instant;

use attn::decode::{default_plan, DecodeProblem};
use attn::reference::{random_vec, seeded_rng};
use attn::{bf16, ComputeClient, DecodeStep, Inputs, KvCache, Lse, Output, PagedLayout, Tensor};

use crate::decode::{Llama3Decode, D, HEADS_KV, HEADS_Q};

/// Runs the measurement for `batch` sequences of `len` cached tokens; false if a check failed.
pub fn run_decode_step(client: &ComputeClient, batch: usize, len: usize) -> bool {
    match measure(client, batch, len) {
        Ok(ok) => ok,
        Err(e) => {
            println!("decode step B {batch} × {len}: failed: {e}");
            false
        }
    }
}

fn measure(client: &ComputeClient, batch: usize, len: usize) -> Result<bool, attn::AttnError> {
    const PAGE: usize = 16;
    const CALLS: usize = 200;
    let (mut rng, _) = seeded_rng("decode_step");
    let room = len + 2 * CALLS + 64;
    let per_seq = room.div_ceil(PAGE);
    let mut cache = KvCache::<bf16>::paged(
        client,
        PagedLayout {
            batch,
            heads_kv: HEADS_KV,
            head_dim: D,
            value_dim: D,
            page_size: PAGE,
            pages: batch * per_seq,
            max_pages: per_seq,
        },
    )?;
    // Every sequence gets its pages up front, so appends hand out none.
    for s in 0..batch {
        let pages: Vec<i32> = (0..per_seq).map(|j| (s * per_seq + j) as i32).collect();
        cache.set_pages(s, &pages)?;
    }
    let token = |rng: &mut _| -> Result<Tensor<bf16>, attn::AttnError> {
        Tensor::from_slice(
            client,
            &random_vec::<bf16>(rng, batch * HEADS_KV * D),
            [batch, HEADS_KV, 1, D],
        )
    };
    let (k1, v1) = (token(&mut rng)?, token(&mut rng)?);
    // The prompt: `len` tokens in chunks.
    let chunk = 1024.min(len);
    let (kc, vc) = {
        let shape = [batch, HEADS_KV, chunk, D];
        let n = shape.iter().product();
        (
            Tensor::from_slice(client, &random_vec::<bf16>(&mut rng, n), shape)?,
            Tensor::from_slice(client, &random_vec::<bf16>(&mut rng, n), shape)?,
        )
    };
    while cache.lengths()[0] + chunk <= len {
        cache.append(client, &kc, &vc, None)?;
    }
    while cache.lengths()[0] < len {
        cache.append(client, &k1, &v1, None)?;
    }
    let q_shape = [batch, HEADS_Q, 1, D];
    let q = Tensor::from_slice(
        client,
        &random_vec::<bf16>(&mut rng, q_shape.iter().product()),
        q_shape,
    )?;
    let out = || Output::<bf16> {
        o: Tensor::empty(client, [batch, HEADS_Q, 1, D]),
        lse: Lse::empty(client, [batch, HEADS_Q, 1]),
    };
    let (out_call, out_step, out_graph) = (out(), out(), out());
    let none = Inputs::default();
    let call = DecodeProblem::new::<Llama3Decode>(&q, &cache, &none)?;
    let plan = default_plan(client, &call)?;
    let step = DecodeStep::<Llama3Decode>::with_plan(client, &q, &cache, &none, plan)?;
    // Warm: compiles every kernel; `decode_into` runs the same plan (tuning off).
    attn::tune::set_policy(attn::tune::Policy::Fallback);
    attn::decode_into::<Llama3Decode>(client, &q, &cache, &none, &out_call)?;
    step.run(client, &q, &cache, &out_step)?;
    attn::sync(client)?;
    let graph = step.capture(client, &q, &cache, &out_graph);
    attn::sync(client)?;

    // Host side: enqueue `CALLS` calls, then one sync (not counted).
    let host_us = |f: &mut dyn FnMut() -> Result<(), attn::AttnError>| {
        let start = Instant::now();
        for _ in 0..CALLS {
            f()?;
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / CALLS as f64;
        attn::sync(client)?;
        Ok::<f64, attn::AttnError>(us)
    };
    let into_us =
        host_us(&mut || attn::decode_into::<Llama3Decode>(client, &q, &cache, &none, &out_call))?;
    let run_us = host_us(&mut || step.run(client, &q, &cache, &out_step))?;
    let replay_us = match &graph {
        Ok(g) => Some(host_us(&mut || {
            unsafe { g.replay() }.map_err(|e| attn::AttnError::Launch(format!("{e:?}")))
        })?),
        Err(e) => {
            println!("decode step: graph capture failed: {e}");
            None
        }
    };
    let start = Instant::now();
    for _ in 0..CALLS {
        cache.append(client, &k1, &v1, None)?;
    }
    let append_us = start.elapsed().as_secs_f64() * 1e6 / CALLS as f64;
    attn::sync(client)?;

    // Device time per step (synced, median of 20).
    let device_ms = |f: &mut dyn FnMut() -> Result<(), attn::AttnError>| {
        let mut times = Vec::new();
        for _ in 0..20 {
            attn::sync(client)?;
            let start = Instant::now();
            f()?;
            attn::sync(client)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok::<f64, attn::AttnError>(times[times.len() / 2])
    };
    let into_ms =
        device_ms(&mut || attn::decode_into::<Llama3Decode>(client, &q, &cache, &none, &out_call))?;
    let run_ms = device_ms(&mut || step.run(client, &q, &cache, &out_step))?;
    let mut ok = true;
    let replay_ms = match &graph {
        Ok(g) => {
            let ms = device_ms(&mut || {
                unsafe { g.replay() }.map_err(|e| attn::AttnError::Launch(format!("{e:?}")))
            })?;
            // After the appends, the replay reads the grown cache: the same bits as a run.
            let same = out_graph.o.to_vec(client) == out_step.o.to_vec(client)
                && out_graph.lse.to_vec(client) == out_step.lse.to_vec(client);
            let also = out_call.o.to_vec(client) == out_step.o.to_vec(client);
            println!(
                "decode step: replay after {CALLS} appends (lengths {}) equals a run bit for bit: {same}; decode_into equals it: {also}",
                cache.lengths()[0]
            );
            ok &= same && also;
            Some(ms)
        }
        Err(_) => {
            ok = false;
            None
        }
    };
    let fmt = |x: Option<f64>, unit: &str| x.map_or("-".into(), |v| format!("{v:.2} {unit}"));
    println!(
        "decode step B {batch} × {len} ({}, plan {}): host per call: decode_into {into_us:.2} µs, DecodeStep::run {run_us:.2} µs, graph replay {}, append of one token {append_us:.2} µs; device per step: decode_into {into_ms:.4} ms, run {run_ms:.4} ms, replay {}",
        client.properties().identity.name,
        plan.name(),
        fmt(replay_us, "µs"),
        fmt(replay_ms.map(|m| m * 1e3), "µs"),
    );
    Ok(ok)
}
