//! `bench --backward`: each prefill case also runs the backward pass. After the forward, a random
//! dO (seeded by the case) goes through the backward plans that run on the device (every tile of
//! the fastest family, the default of the next, the portable kernels only where nothing else
//! runs; `--plans a,b` keeps to the named ones), each timed; the fastest plan's gradients
//! are written beside the forward's files (`do.bin`, `dq.bin`, `dk.bin`, `dv.bin`,
//! same dtype and layouts as Q, K, V; `dsinks.bin` and `dtable.bin`, f32, for sinks and a
//! learnable table) with the timings in `backward.json`, for
//! `bench/backward.py` to check against float64 and time PyTorch's backward passes on the same
//! data. Last, `backward` itself runs and is timed: the plan the tuner settles on.

use std::path::Path;

use attn::reference::random_vec;
use attn::{AttnError, ComputeClient, Inputs, Output, Tensor, Variant};

use super::{device_times, sorted_median, write_raw};

/// Runs and times the backward pass of the forward's `out`, writes the gradients to `dir`.
pub fn run_backward<V: Variant>(
    client: &ComputeClient,
    qkv: [&Tensor<V::Elem>; 3],
    out: &Output<V::Elem>,
    inputs: &Inputs,
    dir: &Path,
    iters: usize,
) -> Result<(), AttnError> {
    let (mut rng, _) = attn::reference::seeded_rng(&format!("{}-backward", dir.display()));
    let o_shape = out.o.shape();
    let d_out_host: Vec<V::Elem> = random_vec(&mut rng, o_shape.iter().product());
    let d_out = Tensor::from_slice(client, &d_out_host, o_shape)?;
    // Every plan of the fastest family, the first of the next (for the record); the portable
    // kernels only where nothing else runs (seconds per call at these sizes).
    let all = attn::backward_plans(client, &V::SPEC);
    let mut plans: Vec<attn::BackwardPlan> = Vec::new();
    for plan in &all {
        let one_family = plans.iter().all(|p| p.family == plans[0].family);
        let same_family = plans.last().is_some_and(|p| p.family == plan.family);
        let take = plans.is_empty()
            || (one_family && same_family)
            || (one_family && plan.family != attn::Family::Portable);
        if take {
            plans.push(*plan);
        }
    }
    // `--plans a,b`: only the named plans, each of which must run here (to profile one kernel).
    let args: Vec<String> = std::env::args().collect();
    if let Some(named) = args.windows(2).find(|w| w[0] == "--plans").map(|w| &w[1]) {
        let names: Vec<String> = all.iter().map(|p| p.to_string()).collect();
        if let Some(unknown) = named.split(',').find(|n| !names.iter().any(|m| m == n)) {
            return Err(AttnError::Unsupported(format!(
                "{}: --plans names {unknown}, which does not run here (these do: {})",
                V::SPEC.name,
                names.join(", ")
            )));
        }
        let keep: Vec<&str> = named.split(',').collect();
        plans = all
            .iter()
            .filter(|p| keep.contains(&p.to_string().as_str()))
            .copied()
            .collect();
    }
    let mut best: Option<(attn::BackwardPlan, Vec<f64>)> = None;
    let mut per_plan = Vec::new();
    for &plan in &plans {
        let call = || attn::backward_with_plan::<V>(client, qkv, out, &d_out, inputs, plan);
        let start = std::time::Instant::now();
        call()?;
        attn::sync(client)?;
        let first_ms = start.elapsed().as_secs_f64() * 1e3;
        call()?;
        attn::sync(client)?;
        let times = device_times(client, iters, || call().map(|_| ()))?;
        let median = sorted_median(&times);
        println!("  backward {plan}: median {median:.3} ms (first call {first_ms:.0} ms)");
        per_plan.push(format!("\"{plan}\": {median:.4}"));
        if best.as_ref().is_none_or(|b| median < sorted_median(&b.1)) {
            best = Some((plan, times));
        }
    }
    let (plan, times) = best.ok_or_else(|| {
        AttnError::Unsupported(format!("{}: no backward plan runs", V::SPEC.name))
    })?;
    // What `backward` itself runs: the tuned plan (its first call tunes the key, unless the
    // policy says otherwise).
    let [q, k, v] = qkv;
    let tuned_call = || attn::backward::<V>(client, q, k, v, out, &d_out, inputs);
    let start = std::time::Instant::now();
    tuned_call()?;
    attn::sync(client)?;
    let tuned_first_ms = start.elapsed().as_secs_f64() * 1e3;
    let tuned_times = device_times(client, iters, || tuned_call().map(|_| ()))?;
    let problem = attn::problem::Problem::new(&V::SPEC, q, k, v)?;
    let packed = attn::inputs::pack(&V::SPEC, &problem, inputs)?;
    let key = attn::tune::TuneKey::of(&V::SPEC, &problem, &packed);
    let tuned_plan = attn::tune::chosen_backward::<V>(client, &key)
        .map_or_else(|| plans[0].to_string(), |p| p.to_string());
    let tuned_ms = sorted_median(&tuned_times);
    println!(
        "  backward tuned ({:?}): {tuned_plan} median {tuned_ms:.3} ms (first call, tuning included, {tuned_first_ms:.0} ms)",
        attn::tune::policy(client)
    );
    let grads = attn::backward_with_plan::<V>(client, qkv, out, &d_out, inputs, plan)?;
    write_raw(&dir.join("do.bin"), &d_out_host);
    write_raw(&dir.join("dq.bin"), &grads.dq.to_vec(client));
    write_raw(&dir.join("dk.bin"), &grads.dk.to_vec(client));
    write_raw(&dir.join("dv.bin"), &grads.dv.to_vec(client));
    if let Some(d_sinks) = &grads.d_sinks {
        write_raw(&dir.join("dsinks.bin"), &d_sinks.to_vec(client));
    }
    // A learnable table's gradient (the first learnable input), f32.
    if let Some((_, d_table)) = grads.d_inputs.first() {
        write_raw(&dir.join("dtable.bin"), &d_table.to_vec(client));
    }
    let times_json: Vec<String> = times.iter().map(|t| format!("{t:.4}")).collect();
    let median = sorted_median(&times);
    println!("  backward: {plan} median {median:.3} ms");
    let meta = format!(
        "{{\"plan\": \"{plan}\", \"default_plan\": \"{}\", \"tuned_plan\": \"{tuned_plan}\", \"tuned_ms\": {tuned_ms}, \"median_ms\": {median}, \"times_ms\": [{}], \"plans_ms\": {{{}}}}}\n",
        plans[0],
        times_json.join(", "),
        per_plan.join(", ")
    );
    std::fs::write(dir.join("backward.json"), meta).expect("backward.json");
    Ok(())
}
