//! Prefill benchmark: runs our kernels on the shapes we answer to (bf16; case 17 is case 5 in
//! f16; cases 18 and 19 are head dim 256) and writes, per shape, the inputs, our outputs and our
//! timings, for `bench/compare.py` to check against PyTorch in float64 and to time PyTorch's SDPA
//! (flash, cuDNN) and FlexAttention on the same data.
//!
//! `cargo run --release --no-default-features --features cuda --example bench -- --out DIR [--iters 10] [--only CASE]`
//!
//! The variant cases (sliding window, softcap, packed documents, ALiBi, sinks, a custom mask
//! expression) write what FlexAttention needs to build the same mask and score modification into
//! their `meta.json`.
//!
//! With `--check`, it instead runs a correctness grid on the device against the float64 reference
//! (lengths 1, 17, 128, 1000 and Nq ≠ Nk, every benchmark variant plus f16 and f32 ones, and every
//! mask and score modification with random run-time inputs, then decoding with and without a
//! sliding window; `--check-decode` runs the decode part alone; `--check-wide` the kernels with
//! 64-bit offsets and tensors of more than 2³² elements, `bench_parts/wide.rs`), so one binary
//! carries both jobs
//! to a GPU machine. `bench attn-tune …` runs the tuner (`attn_tune::main_from`) inside this
//! binary, as a program carries it. With `--first-call [--seq N] [--batch B]` it times a fresh process's first calls
//! of the Llama-3 variant (see `first_call`); with `--tuned`, each case also times the shape the
//! tuner picks beside the fallback. With `--backward`, each case also runs and times the backward
//! pass (`bench_parts/backward.rs`, compared by `bench/backward.py`). With `--decode`, it runs
//! the decode benchmark instead (`bench_parts/decode.rs`, compared by `bench/decode.py`); with
//! `--decode-step`, the host side of a steady-state decode step: per call, per planned run, per
//! graph replay (`bench_parts/decode_step.rs`); with `--decode-mixed`, a mixed step of decode
//! tokens and prompt chunks as one ragged call against two calls (`bench_parts/decode_mixed.rs`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use attn::inputs::pack;
use attn::reference::{
    attention_f64, attention_naive, error_floor, max_abs_error, random_vec, seeded_rng,
    visible_pairs, widen, OwnedInputs, Verdict,
};
use attn::{ComputeClient, Element, Problem, Tensor, Variant};
use rand::SeedableRng;

#[path = "bench_parts/backward.rs"]
mod backward;
#[path = "bench_parts/decode.rs"]
mod decode;
#[path = "bench_parts/decode_mixed.rs"]
mod decode_mixed;
#[path = "bench_parts/decode_step.rs"]
mod decode_step;
#[path = "bench_parts/wide.rs"]
mod wide;

attn::attention! {
    /// MHA, d 128.
    Mha128 { heads: mha, head_dim: 128, dtype: bf16 }
    /// MHA, d 128, causal.
    Mha128Causal { heads: mha, head_dim: 128, dtype: bf16, mask: causal }
    /// MHA, d 64.
    Mha64 { heads: mha, head_dim: 64, dtype: bf16 }
    /// GQA 4, d 128.
    Gqa4x128 { heads: gqa(group = 4), head_dim: 128, dtype: bf16 }
    /// GQA 4, d 128, causal.
    Gqa4x128Causal { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal }
    /// MQA, d 128, causal.
    Mqa128Causal { heads: mqa, head_dim: 128, dtype: bf16, mask: causal }
    /// GQA 2, d 256 (Gemma-2's heads without its softcap).
    Gqa2x256 { heads: gqa(group = 2), head_dim: 256, dtype: bf16 }
    /// GQA 2, d 256, causal.
    Gqa2x256Causal { heads: gqa(group = 2), head_dim: 256, dtype: bf16, mask: causal }
    /// f16, GQA 2, d 64, causal top-left (correctness grid only).
    Gqa2F16TopLeft { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: causal(top_left) }
    /// f32, GQA 8, d 128, causal (correctness grid only).
    Gqa8F32Causal { heads: gqa(group = 8), head_dim: 128, dtype: f32, mask: causal }

    /// Mistral: GQA 4, d 128, causal, window of 4096 keys.
    Mistral { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal & window(left = 4095) }
    /// GQA 4, d 128, causal, window of 1024 keys.
    Window1k { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal & window(left = 1023) }
    /// Gemma-2 local layers: GQA 2, d 256, causal, window 4096, softcap 50.
    Gemma2Local { heads: gqa(group = 2), head_dim: 256, dtype: bf16, mask: causal & window(left = 4095), softcap: 50.0 }
    /// Gemma-2 global layers: GQA 2, d 256, causal, softcap 50.
    Gemma2Global { heads: gqa(group = 2), head_dim: 256, dtype: bf16, mask: causal, softcap: 50.0 }
    /// Packed documents, causal within each: GQA 4, d 128.
    Packed { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal & documents }
    /// ALiBi, standard slopes, causal: MHA, d 128.
    AlibiCausal { heads: mha, head_dim: 128, dtype: bf16, mask: causal, alibi: geometric }
    /// gpt-oss local layers: GQA 8, d 64, causal, window 128, sinks.
    SinkWindow { heads: gqa(group = 8), head_dim: 64, dtype: bf16, mask: causal & window(left = 127), sinks: per_head }
    /// A custom mask: a local causal band of 256 keys plus the first 4 keys ("attention sinks" as
    /// positions, StreamingLLM).
    StreamMask { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: |b, h, q, k| q >= k && (q - k) < 256 || k < 4 }
    /// T5's relative position bias, learnable: per head a table of 32 buckets of the distance
    /// (exact below 16, log-spaced to 128), as `train_bias` declares it; Llama-3's heads.
    T5Bias {
        heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal,
        inputs: { rel: [f32; heads, 32] },
        score: |s, b, h, q, k| s + rel[h][if q - k < 16 { q - k } else { 16 + (((q - k) as f32 / 16.0).ln() * 7.69) as i32 }],
    }

    /// Correctness grid only: prefix-LM with key lengths, f16, d 64.
    PrefixKeyLengths { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: prefix_lm & key_lengths }
    /// Correctness grid only: V head dim 128 under QK head dim 192, causal, top-left window.
    Dv128Dk192 { heads: gqa(group = 2), head_dim: 192, value_dim: 128, dtype: bf16, mask: causal(top_left) & window(left = 300) }
    /// Correctness grid only: documents with a custom expression reading inputs, given ALiBi
    /// slopes, a custom score, f16, d 96.
    CustomEverything {
        heads: gqa(group = 3), head_dim: 96, dtype: f16, mask: documents & |b, h, q, k| (q - k).abs() <= limit[b] || k < keep,
        alibi: given, inputs: { limit: [i32; batch], keep: i32, tilt: [f32; heads] },
        score: |s, b, h, q, k| s * 0.5 + tilt[h] * (q as f32 / 100.0).tanh(),
    }
    /// Correctness grid only: tables by position, a document id per token read by the mask and
    /// a bias per key read by the score; GQA 2, d 128.
    DocTable {
        heads: gqa(group = 2), head_dim: 128, dtype: bf16,
        inputs: { doc: [i32; batch, seq], kb: [f32; seq] },
        mask: |b, h, q, k| doc[b][q] == doc[b][k] || k < 2,
        score: |s, b, h, q, k| s + kb[k],
    }
}

/// One benchmark shape: batch, query heads, K/V heads, sequence length.
struct Case {
    batch: usize,
    heads_q: usize,
    heads_kv: usize,
    seq: usize,
    run: fn(&ComputeClient, &Case, &Path, usize) -> Result<String, attn::AttnError>,
}

/// A benchmark case of one variant (16-bit: `compare.py` reads bf16 and f16 data).
const fn case<V: Variant>(batch: usize, heads_q: usize, heads_kv: usize, seq: usize) -> Case {
    Case {
        batch,
        heads_q,
        heads_kv,
        seq,
        run: run::<V>,
    }
}

fn main() {
    // The tuner as a subcommand of this binary, as a program carries it: the kernels it compiles
    // are kept under this binary's build id, so the benchmark's later processes load them.
    if std::env::args().nth(1).as_deref() == Some("attn-tune") {
        let code = attn_tune::main_from(std::env::args_os().skip(1));
        std::process::exit(i32::from(code != std::process::ExitCode::SUCCESS));
    }
    if std::env::args().any(|a| a == "--first-call") {
        // Before anything else starts the device: the client's start is part of what it times.
        return first_call();
    }
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| "bench/out".into()));
    let iters: usize = arg("--iters").map_or(10, |s| s.parse().expect("--iters N"));
    let only = arg("--only");
    if args.iter().any(|a| a == "--info") {
        describe_device(&attn::default_client());
    }
    if args.iter().any(|a| a == "--decode-step") {
        let client = attn::default_client();
        let mut ok = true;
        // `--batch B --len N` measures one shape instead.
        let shapes = match (arg("--batch"), arg("--len")) {
            (Some(b), Some(n)) => {
                vec![(b.parse().expect("--batch B"), n.parse().expect("--len N"))]
            }
            _ => vec![(64, 8192), (1, 4096)],
        };
        for (batch, len) in shapes {
            ok &= decode_step::run_decode_step(&client, batch, len);
        }
        std::process::exit(i32::from(!ok));
    }
    if args.iter().any(|a| a == "--decode-mixed") {
        let ok = decode_mixed::run_decode_mixed(&attn::default_client(), iters);
        std::process::exit(i32::from(!ok));
    }
    if args.iter().any(|a| a == "--decode") {
        let ok = decode::run_decode(&attn::default_client(), &out, iters, only.as_deref());
        std::process::exit(i32::from(!ok));
    }
    #[cfg(feature = "cuda")]
    if let Some(dir) = arg("--ptx") {
        std::process::exit(i32::from(!write_ptx(Path::new(&dir))));
    }
    if args.iter().any(|a| a == "--check-decode") {
        let results = decode::check_decode_grid(&attn::default_client());
        let failed = results.iter().filter(|p| !**p).count();
        println!("{} passed, {failed} failed", results.len() - failed);
        std::process::exit(i32::from(failed > 0));
    }
    if args.iter().any(|a| a == "--check-wide") {
        // `--small`: the forced 64-bit kernels alone, without the tensors past 2³² elements.
        let small = args.iter().any(|a| a == "--small");
        std::process::exit(i32::from(!wide::check_wide(&attn::default_client(), small)));
    }
    if args.iter().any(|a| a == "--check") {
        std::process::exit(i32::from(!check_grid(&attn::default_client())));
    }
    let cases = [
        Case {
            batch: 8,
            heads_q: 16,
            heads_kv: 16,
            seq: 2048,
            run: run::<Mha128>,
        },
        Case {
            batch: 8,
            heads_q: 16,
            heads_kv: 16,
            seq: 2048,
            run: run::<Mha128Causal>,
        },
        Case {
            batch: 2,
            heads_q: 16,
            heads_kv: 16,
            seq: 8192,
            run: run::<Mha128Causal>,
        },
        Case {
            batch: 4,
            heads_q: 32,
            heads_kv: 32,
            seq: 4096,
            run: run::<Mha64>,
        },
        Case {
            batch: 4,
            heads_q: 32,
            heads_kv: 8,
            seq: 4096,
            run: run::<Gqa4x128>,
        },
        Case {
            batch: 4,
            heads_q: 32,
            heads_kv: 8,
            seq: 4096,
            run: run::<Gqa4x128Causal>,
        },
        Case {
            batch: 4,
            heads_q: 32,
            heads_kv: 1,
            seq: 4096,
            run: run::<Mqa128Causal>,
        },
        Case {
            batch: 1,
            heads_q: 32,
            heads_kv: 8,
            seq: 16384,
            run: run::<Gqa4x128Causal>,
        },
        // The variant space (cases 8..): each against FlexAttention with the same mask and score.
        case::<Gqa4x128Causal>(2, 32, 8, 8192),
        case::<Window1k>(2, 32, 8, 8192),
        case::<Mistral>(2, 32, 8, 8192),
        case::<Gemma2Local>(2, 16, 8, 8192),
        case::<Gemma2Global>(2, 16, 8, 8192),
        case::<Packed>(1, 32, 8, 16384),
        case::<AlibiCausal>(4, 16, 16, 4096),
        case::<SinkWindow>(2, 64, 8, 8192),
        case::<StreamMask>(2, 32, 8, 8192),
        // f16 (case 17): Llama-3's shape of case 5 in the other 16-bit type.
        case::<Llama3<attn::f16>>(4, 32, 8, 4096),
        // Head dim 256 (cases 18, 19): Gemma-2's shape of case 12 without the softcap, so the SDPA
        // back ends run it too.
        case::<Gqa2x256>(2, 16, 8, 8192),
        case::<Gqa2x256Causal>(2, 16, 8, 8192),
        // A learnable table in the score (case 20): T5's relative bias on Llama-3's heads.
        case::<T5Bias>(2, 32, 8, 8192),
    ];
    std::fs::create_dir_all(&out).expect("output folder");
    let client = attn::default_client();
    let mut list = std::fs::File::create(out.join("cases.txt")).expect("cases.txt");
    for (i, case) in cases.iter().enumerate() {
        // `--only 3` or `--only 8-16` or `--only 0,8,9`.
        let selected = only.as_deref().is_none_or(|o| {
            o.split(',').any(|part| match part.split_once('-') {
                Some((a, b)) => {
                    (a.parse().unwrap_or(usize::MAX)..=b.parse().unwrap_or(0)).contains(&i)
                }
                None => part.parse::<usize>().ok() == Some(i),
            })
        });
        if !selected {
            continue;
        }
        match (case.run)(&client, case, &out, iters) {
            Ok(name) => writeln!(list, "{name}").expect("cases.txt"),
            Err(e) => {
                eprintln!("case {i}: {e}");
                std::process::exit(2);
            }
        }
    }
}

fn write_raw<E: Element>(path: &Path, data: &[E]) {
    std::fs::write(path, E::as_bytes(data)).expect("write");
}

/// The run-time inputs of a benchmark case: documents of random lengths (seeded by the case),
/// sinks of either sign.
fn case_inputs(spec: &attn::VariantSpec, case: &Case, seed: u64) -> OwnedInputs {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut inputs = OwnedInputs::default();
    if spec.mask.documents {
        // Documents of 64 to 4096 tokens, like a packed pre-training batch.
        let mut offsets = vec![0i32];
        while (*offsets.last().expect("offsets") as usize) < case.seq {
            let len: i32 = 64 + rand::Rng::random_range(&mut rng, 0..4032);
            offsets.push((offsets.last().expect("offsets") + len).min(case.seq as i32));
        }
        inputs.q_offsets = Some(offsets.clone());
        inputs.k_offsets = Some(offsets);
    }
    if spec.score.sinks {
        inputs.sinks = Some((0..case.heads_q).map(|h| (h % 7) as f32 - 3.0).collect());
    }
    // The variant's own f32 inputs (a table of relative biases): values of either sign.
    let sequences = inputs
        .q_offsets
        .as_ref()
        .map_or(case.batch, |o| o.len() - 1);
    for decl in spec.inputs {
        let len = decl.shape.len(sequences, case.heads_q, case.seq);
        inputs
            .floats
            .push((0..len).map(|i| (i % 13) as f32 * 0.25 - 1.5).collect());
    }
    inputs
}

/// The meta.json fields FlexAttention needs to build the same mask and score modification.
fn flex_meta(spec: &attn::VariantSpec, inputs: &OwnedInputs) -> String {
    let list_i = |v: &Option<Vec<i32>>| {
        v.as_ref().map_or("null".to_string(), |v| {
            format!(
                "[{}]",
                v.iter().map(i32::to_string).collect::<Vec<_>>().join(", ")
            )
        })
    };
    let list_f = |v: &Option<Vec<f32>>| {
        v.as_ref().map_or("null".to_string(), |v| {
            format!(
                "[{}]",
                v.iter().map(f32::to_string).collect::<Vec<_>>().join(", ")
            )
        })
    };
    let opt = |v: Option<u32>| v.map_or("null".to_string(), |v| v.to_string());
    let window = spec.mask.window;
    format!(
        "\"causal\": {}, \"window_left\": {}, \"window_right\": {}, \"documents\": {}, \"custom_mask\": {}, \"softcap\": {}, \"alibi\": {}, \"sinks\": {}, \"custom_score\": {}, \"table\": {}",
        spec.mask.causal,
        opt(window.and_then(|w| w.left)),
        opt(window.and_then(|w| w.right)),
        list_i(&inputs.q_offsets),
        if spec.mask.custom { format!("\"{}\"", spec.name) } else { "null".into() },
        spec.score.softcap.map_or("null".to_string(), |c| c.to_string()),
        if spec.score.alibi.is_some() { "\"geometric\"" } else { "null" },
        list_f(&inputs.sinks),
        if spec.score.custom { format!("\"{}\"", spec.name) } else { "null".into() },
        list_f(&inputs.floats.first().cloned()),
    )
}

/// Runs one case, writes its folder, and returns the folder's name.
fn run<V: Variant>(
    client: &ComputeClient,
    case: &Case,
    out: &Path,
    iters: usize,
) -> Result<String, attn::AttnError> {
    let spec = V::SPEC;
    let (d, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let mask = spec.mask.describe();
    let name = format!(
        "b{}_h{}-{}_n{}_d{}_{}{}{}",
        case.batch,
        case.heads_q,
        case.heads_kv,
        case.seq,
        d,
        mask.replace(['(', ')', ',', '+', '·'], "_"),
        if spec.score.flags().modifies_scores() || spec.score.sinks {
            format!("_{}", spec.name)
        } else {
            String::new()
        },
        if spec.dtype == attn::DType::BF16 {
            String::new()
        } else {
            format!("_{}", spec.dtype.name())
        }
    );
    let (mut rng, seed) = seeded_rng(&name);
    let q_shape = [case.batch, case.heads_q, case.seq, d];
    let k_shape = [case.batch, case.heads_kv, case.seq, d];
    let v_shape = [case.batch, case.heads_kv, case.seq, dv];
    let qh: Vec<V::Elem> = random_vec(&mut rng, q_shape.iter().product());
    let kh: Vec<V::Elem> = random_vec(&mut rng, k_shape.iter().product());
    let vh: Vec<V::Elem> = random_vec(&mut rng, v_shape.iter().product());
    let q = Tensor::from_slice(client, &qh, q_shape)?;
    let k = Tensor::from_slice(client, &kh, k_shape)?;
    let v = Tensor::from_slice(client, &vh, v_shape)?;
    let owned = case_inputs(&spec, case, seed);
    let inputs = owned.view();
    let problem = Problem::new(&spec, &q, &k, &v)?;
    let packed = pack(&spec, &problem, &inputs)?;
    let default_tiling = attn::select_tiling(client, &spec)?;
    let tilings = if std::env::args().any(|a| a == "--all-tiles") {
        attn::runnable_tilings(client, &spec)
    } else if std::env::args().any(|a| a == "--tuned") {
        // The tuned call settles the key (tuning on a miss); then the winner and the fallback are
        // timed side by side.
        let start = Instant::now();
        attn::forward::<V>(client, &q, &k, &v, &inputs)?;
        attn::sync(client)?;
        let key = attn::tune::TuneKey::of(&spec, &problem, &packed);
        let winner = attn::tune::chosen::<V>(client, &key).map_or(default_tiling, |c| c.tiling);
        println!(
            "  tuned: {} (fallback {}), settled in {:.2} s",
            winner.name(),
            default_tiling.name(),
            start.elapsed().as_secs_f64()
        );
        if winner == default_tiling {
            vec![default_tiling]
        } else {
            vec![default_tiling, winner]
        }
    } else {
        vec![default_tiling]
    };
    let out_buffers = attn::Output {
        o: Tensor::empty(client, problem.out_shape()),
        lse: attn::Lse::empty(client, problem.lse_shape()),
    };
    // Per tile shape: warm-up (compiles the kernel), then `iters` timed calls; the fastest shape's
    // times and outputs are reported.
    let mut best: Option<(attn::Tiling, Vec<f64>, f64)> = None;
    let mut per_tile = Vec::new();
    for &tiling in &tilings {
        let start = Instant::now();
        attn::forward_with_tiling::<V>(client, &q, &k, &v, &inputs, tiling, &out_buffers)?;
        attn::sync(client)?;
        let first_ms = start.elapsed().as_secs_f64() * 1e3;
        for _ in 0..2 {
            attn::forward_with_tiling::<V>(client, &q, &k, &v, &inputs, tiling, &out_buffers)?;
        }
        attn::sync(client)?;
        let times = device_times(client, iters, || {
            attn::forward_with_tiling::<V>(client, &q, &k, &v, &inputs, tiling, &out_buffers)
        })?;
        let median = sorted_median(&times);
        per_tile.push(format!("\"{}\": {median:.4}", tiling.name()));
        println!(
            "  {} {:?}: median {median:.3} ms",
            tiling.name(),
            family(client, &spec, tiling)
        );
        if best.as_ref().is_none_or(|b| median < sorted_median(&b.1)) {
            best = Some((tiling, times, first_ms));
        }
    }
    let (tiling, times, first_ms) = best.expect("at least one tile shape");
    let latency_ms = call_latency(client, iters, || {
        attn::forward_with_tiling::<V>(client, &q, &k, &v, &inputs, tiling, &out_buffers)
    })?;
    // The reported outputs come from the fastest shape.
    attn::forward_with_tiling::<V>(client, &q, &k, &v, &inputs, tiling, &out_buffers)?;
    attn::sync(client)?;
    let result = out_buffers;
    let median = sorted_median(&times);
    let pairs = visible_pairs::<V>(&problem, &packed, &inputs);
    let flops = 2.0 * pairs as f64 * (d + dv) as f64;
    println!(
        "{name}: {} tile {} ({:?}): median {median:.3} ms, {:.1} TFLOP/s (call with sync {latency_ms:.3} ms; first call {first_ms:.0} ms)",
        spec.name,
        tiling.name(),
        family(client, &spec, tiling),
        flops / median / 1e9
    );

    let dir = out.join(&name);
    std::fs::create_dir_all(&dir).expect("case folder");
    write_raw(&dir.join("q.bin"), &qh);
    write_raw(&dir.join("k.bin"), &kh);
    write_raw(&dir.join("v.bin"), &vh);
    write_raw(&dir.join("o.bin"), &result.o.to_vec(client));
    write_raw(&dir.join("lse.bin"), &result.lse.to_vec(client));
    let times_json: Vec<String> = times.iter().map(|t| format!("{t:.4}")).collect();
    let simple = if spec.mask.window.is_none()
        && !spec.mask.documents
        && !spec.mask.custom
        && spec.score == attn::ScoreSpec::NONE
    {
        if spec.mask.causal {
            "causal"
        } else {
            "none"
        }
    } else {
        "variant"
    };
    let meta = format!(
        "{{\"case\": \"{name}\", \"variant\": \"{}\", \"batch\": {}, \"heads_q\": {}, \"heads_kv\": {}, \"seq_q\": {}, \"seq_k\": {}, \"head_dim\": {d}, \"value_dim\": {dv}, \"dtype\": \"{}\", \"mask\": \"{simple}\", \"mask_terms\": \"{mask}\", {}, \"pairs\": {pairs}, \"causal_alignment\": \"bottom_right\", \"scale\": {}, \"tile\": \"{}\", \"iters\": {iters}, \"default_tile\": \"{}\", \"tiles_ms\": {{{}}}, \"times_ms\": [{}], \"median_ms\": {median}, \"call_latency_ms\": {latency_ms}, \"first_call_ms\": {first_ms}, \"seed\": {seed}, \"device\": \"{}\"}}\n",
        spec.name,
        case.batch,
        case.heads_q,
        case.heads_kv,
        case.seq,
        case.seq,
        spec.dtype.name(),
        flex_meta(&spec, &owned),
        spec.softmax_scale(),
        tiling.name(),
        default_tiling.name(),
        per_tile.join(", "),
        times_json.join(", "),
        client.name()
    );
    std::fs::write(dir.join("meta.json"), meta).expect("meta.json");
    if std::env::args().any(|a| a == "--backward") {
        backward::run_backward::<V>(client, [&q, &k, &v], &result, &inputs, &dir, iters)?;
    }
    Ok(name)
}

/// Runs `V` once on random inputs (and random run-time inputs) and compares with float64;
/// prints one line, returns pass.
fn check_one<V: Variant>(client: &ComputeClient, shape: [usize; 5]) -> bool {
    check_layout::<V>(client, shape, false)
}

/// [`check_one`] with Q, K and V optionally laid out `[batch, seq, heads, head_dim]` (the layout of
/// most model code, viewed without a copy). Checks the tuned call, then every tile shape the
/// warpgroup kernel runs on this device, each against float64.
fn check_layout<V: Variant>(
    client: &ComputeClient,
    [b, hq, hkv, nq, nk]: [usize; 5],
    bnhd: bool,
) -> bool {
    let spec = V::SPEC;
    let (d, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let label = format!(
        "{} B{b} H{hq}/{hkv} Nq{nq} Nk{nk}{}",
        spec.name,
        if bnhd { " BNHD" } else { "" }
    );
    let (mut rng, _) = seeded_rng(&label);
    let (qs, ks, vs) = ([b, hq, nq, d], [b, hkv, nk, d], [b, hkv, nk, dv]);
    let qh: Vec<V::Elem> = random_vec(&mut rng, qs.iter().product());
    let kh: Vec<V::Elem> = random_vec(&mut rng, ks.iter().product());
    let vh: Vec<V::Elem> = random_vec(&mut rng, vs.iter().product());
    let owned = OwnedInputs::random(&spec, [b, hq, nq, nk], 6, &mut rng);
    let inputs = owned.view();
    let upload = |data: &[V::Elem], [b, h, n, d]: [usize; 4]| {
        if bnhd {
            // The same logical tensor, stored as [b, n, h, d].
            let mut stored = vec![data[0]; data.len()];
            for (i, &x) in data.iter().enumerate() {
                let (bi, hi, ni, di) = (i / (h * n * d), i / (n * d) % h, i / d % n, i % d);
                stored[((bi * n + ni) * h + hi) * d + di] = x;
            }
            Tensor::from_slice_bnhd(client, &stored, [b, n, h, d]).expect("fills its shape")
        } else {
            Tensor::from_slice(client, data, [b, h, n, d]).expect("fills its shape")
        }
    };
    let (q, k, v) = (upload(&qh, qs), upload(&kh, ks), upload(&vh, vs));
    let (problem, packed) = match Problem::new(&spec, &q, &k, &v)
        .and_then(|problem| Ok((problem, pack(&spec, &problem, &inputs)?)))
    {
        Ok(r) => r,
        Err(e) => {
            println!("{label}: FAIL: {e}");
            return false;
        }
    };
    let (qf, kf, vf) = (widen(&qh), widen(&kh), widen(&vh));
    let reference = attention_f64::<V>(&problem, &packed, &inputs, &qf, &kf, &vf);
    let naive = attention_naive::<V>(&problem, &packed, &inputs, &qf, &kf, &vf);
    let verify = |what: &str, out: Result<attn::Output<V::Elem>, attn::AttnError>| {
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                println!("{label} {what}: FAIL: {e}");
                return false;
            }
        };
        let o = widen(&out.o.to_vec(client));
        let verdict = Verdict::new(&o, &reference.o, &naive, error_floor::<V::Elem>());
        let lse: Vec<f64> = out.lse.to_vec(client).into_iter().map(f64::from).collect();
        let lse_error = max_abs_error(&lse, &reference.lse);
        let pass = verdict.passed() && lse_error <= 2e-3;
        println!(
            "{label} {what}: max|O-f64| {:.2e} (naive {:.2e}, bound {:.2e}), max|LSE-f64| {lse_error:.2e}: {}",
            verdict.kernel_error,
            verdict.naive_error,
            verdict.bound,
            if pass { "ok" } else { "FAIL" }
        );
        pass
    };
    let mut pass = verify("tuned", attn::forward::<V>(client, &q, &k, &v, &inputs));
    for tiling in attn::runnable_tilings(client, &spec) {
        if family(client, &spec, tiling) != Some(attn::blueprint::Family::Warpgroup) {
            continue;
        }
        // Poisoned, so an unwritten element fails.
        let poison = |shape: [usize; 4]| {
            let nan = vec![<V::Elem as Element>::from_f64(f64::NAN); shape.iter().product()];
            Tensor::from_slice(client, &nan, shape).expect("fills its shape")
        };
        let lse_shape = problem.lse_shape();
        let out = attn::Output {
            o: poison(problem.out_shape()),
            lse: attn::Lse {
                tensor: Tensor::from_slice(
                    client,
                    &vec![f32::NAN; lse_shape.iter().product()],
                    [lse_shape[0], lse_shape[1], lse_shape[2], 1],
                )
                .expect("fills its shape"),
            },
        };
        let result = attn::forward_with_tiling::<V>(client, &q, &k, &v, &inputs, tiling, &out)
            .and_then(|()| attn::sync(client))
            .map(|()| out);
        pass &= verify(&format!("wg {}", tiling.name()), result);
    }
    pass
}

/// Compiles the warpgroup kernel of the benchmark's variants at every tile shape it runs (sm_90a,
/// no GPU needed) into `dir/<variant>_<tile>.ptx`; returns whether every one compiled.
#[cfg(feature = "cuda")]
fn write_ptx(dir: &Path) -> bool {
    fn one<V: Variant>(dir: &Path) -> bool {
        let mut ok = true;
        for tiling in V::SPEC.tilings {
            if tiling.block_q % 64 != 0 || tiling.block_kv < 64 {
                continue;
            }
            let path = dir.join(format!("{}_{}.ptx", V::SPEC.name, tiling.name()));
            match attn::codegen::warpgroup_ptx::<V>(*tiling) {
                Ok(ptx) => std::fs::write(&path, ptx).expect("write the PTX"),
                Err(e) => {
                    println!("{}: FAIL: {e}", path.display());
                    ok = false;
                }
            }
        }
        ok
    }
    std::fs::create_dir_all(dir).expect("PTX folder");
    // The warpgroup decode kernel, from 16-bit and fp8 caches, contiguous and paged.
    let mut decode_ok = true;
    for (fp8, page) in [
        (false, None),
        (false, Some(16)),
        (true, None),
        (true, Some(16)),
    ] {
        let name = format!(
            "decode_llama3{}{}.ptx",
            if fp8 { "_fp8" } else { "" },
            page.map_or(String::new(), |p| format!("_pages{p}"))
        );
        let path = dir.join(name);
        match attn::codegen::decode_warpgroup_ptx::<decode::Llama3Decode>(64, page, fp8) {
            Ok(ptx) => std::fs::write(&path, ptx).expect("write the PTX"),
            Err(e) => {
                println!("{}: FAIL: {e}", path.display());
                decode_ok = false;
            }
        }
    }
    decode_ok
        & one::<Mha128>(dir)
        & one::<Mha128Causal>(dir)
        & one::<Mha64>(dir)
        & one::<Gqa4x128Causal>(dir)
        & one::<Window1k>(dir)
        & one::<Gqa2F16TopLeft>(dir)
        & one::<Gemma2Global>(dir)
        & one::<Gqa2x256Causal>(dir)
        & one::<Dv128Dk192>(dir)
}

/// The device correctness grid; returns whether every case passed.
fn check_grid(client: &ComputeClient) -> bool {
    let mut results = Vec::new();
    for nq in [1, 17, 128, 1000] {
        for nk in [1, 17, 128, 1000] {
            results.push(check_one::<Mha128Causal>(client, [2, 2, 2, nq, nk]));
            results.push(check_one::<Gqa2F16TopLeft>(client, [2, 4, 2, nq, nk]));
        }
    }
    results.push(check_one::<Mha128>(client, [2, 3, 3, 300, 777]));
    results.push(check_one::<Mha64>(client, [1, 4, 4, 1000, 1000]));
    results.push(check_one::<Gqa4x128>(client, [2, 8, 2, 129, 1000]));
    results.push(check_one::<Gqa4x128Causal>(client, [1, 8, 2, 1000, 333]));
    results.push(check_one::<Mqa128Causal>(client, [2, 5, 1, 77, 1000]));
    results.push(check_one::<Gqa2x256>(client, [1, 4, 2, 333, 777]));
    results.push(check_one::<Gqa2x256Causal>(client, [2, 4, 2, 1000, 1000]));
    results.push(check_one::<Gqa8F32Causal>(client, [1, 16, 2, 513, 513]));
    results.push(check_layout::<Gqa4x128Causal>(
        client,
        [2, 8, 2, 333, 1000],
        true,
    ));
    results.push(check_layout::<Mha64>(client, [1, 4, 4, 1000, 1000], true));
    for (nq, nk) in [(1, 1), (17, 1000), (1000, 17), (777, 777)] {
        results.push(check_one::<Mistral>(client, [1, 8, 2, nq, nk]));
        results.push(check_one::<Window1k>(client, [2, 4, 1, nq, nk]));
        results.push(check_one::<Gemma2Local>(client, [1, 4, 2, nq, nk]));
        results.push(check_one::<Gemma2Global>(client, [1, 4, 2, nq, nk]));
        results.push(check_one::<Packed>(client, [1, 8, 2, nq, nk]));
        results.push(check_one::<AlibiCausal>(client, [2, 6, 6, nq, nk]));
        results.push(check_one::<SinkWindow>(client, [2, 16, 2, nq, nk]));
        results.push(check_one::<StreamMask>(client, [1, 8, 2, nq, nk]));
        results.push(check_one::<PrefixKeyLengths>(client, [3, 4, 2, nq, nk]));
        results.push(check_one::<Dv128Dk192>(client, [1, 4, 2, nq, nk]));
        results.push(check_one::<CustomEverything>(client, [1, 6, 2, nq, nk]));
        results.push(check_one::<T5Bias>(client, [2, 8, 2, nq, nk]));
        results.push(check_one::<DocTable>(client, [2, 4, 2, nq, nk]));
    }
    results.extend(decode::check_decode_grid(client));
    let failed = results.iter().filter(|p| !**p).count();
    println!("{} passed, {failed} failed", results.len() - failed);
    failed == 0
}

/// Prints what the launcher bases its choices on: plane sizes, shared memory, tensor-core forms.
fn describe_device(client: &ComputeClient) {
    let props = client.properties();
    let hw = &props.hardware;
    println!(
        "device {:?}: plane {}..{}, {} units/cube, {} B shared/cube",
        props.identity.name,
        hw.plane_size_min,
        hw.plane_size_max,
        hw.max_units_per_cube,
        hw.max_shared_memory_size
    );
    let mut forms: Vec<String> = client
        .features()
        .matmul
        .cmma
        .iter()
        .map(|c| format!("{c:?}"))
        .collect();
    forms.sort();
    println!("cmma forms: {}", forms.join("; "));
    for tiling in attn::runnable_tilings(client, &Mha128::SPEC) {
        println!(
            "Mha128 {}: {:?}",
            tiling.name(),
            family(client, &Mha128::SPEC, tiling)
        );
    }
}

/// Per-call GPU times in ms, measured as the anchors are (`compare.py`'s `time_cuda`): `iters`
/// calls queued back to back, each between two events the device stamps as its queue reaches
/// them, read back after the last. The host's launch work overlaps the previous call's kernel,
/// as it does in a serving loop; a call's own latency with a sync after it is `call_latency`.
fn device_times(
    client: &ComputeClient,
    iters: usize,
    call: impl Fn() -> Result<(), attn::AttnError> + Send + Sync,
) -> Result<Vec<f64>, attn::AttnError> {
    let failed = |e: &dyn std::fmt::Debug| attn::AttnError::Launch(format!("profiling: {e:?}"));
    let mut windows = Vec::with_capacity(iters);
    for _ in 0..iters {
        let (result, window) = client
            .profile(&call, "timed call")
            .map_err(|e| failed(&e))?;
        result?;
        windows.push(window);
    }
    windows
        .into_iter()
        .map(|w| {
            let ticks = attn::cubecl::future::block_on(w.resolve());
            ticks
                .map(|t| t.duration().as_secs_f64() * 1e3)
                .ok_or_else(|| failed(&"a window carried no measurement"))
        })
        .collect()
}

/// The median wall-clock time of one call followed by a sync, in ms: what a caller that waits
/// for each result sees, launch work and the sync's round trip included.
fn call_latency(
    client: &ComputeClient,
    iters: usize,
    call: impl Fn() -> Result<(), attn::AttnError>,
) -> Result<f64, attn::AttnError> {
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        call()?;
        attn::sync(client)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(sorted_median(&times))
}

fn sorted_median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

// ---- `--first-call`: time to first kernel in a fresh process --------------------------------

include!("variants/llama3.rs");

/// What a fresh process pays for its first `forward` (client, tuned-shape lookup or tuning,
/// kernel compilation or the compiled-kernel cache), its second, and a call after the sequence
/// length changes inside the same key bucket. Run it once with an empty cache folder
/// (`ATTN_CACHE_DIR`) and once after tuning.
fn first_call() {
    let started = Instant::now();
    let client = attn::default_client();
    let client_ms = started.elapsed().as_secs_f64() * 1e3;
    if attn::supports::<attn::bf16>(&client) {
        first_call_of::<Llama3>(&client, started, client_ms);
    } else {
        first_call_of::<Llama3<attn::f16>>(&client, started, client_ms);
    }
}

fn first_call_arg(name: &str) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].parse().expect("a number"))
}

/// A `[B, H, N, D]` tensor with a fixed pattern (the values do not matter for timing).
fn pattern_tensor<E: Element>(
    client: &attn::ComputeClient,
    shape: [usize; 4],
    salt: usize,
) -> Tensor<E> {
    let len = shape.iter().product::<usize>();
    let data: Vec<E> = (0..len)
        .map(|i| E::from_f64((((i * 7919 + salt * 104_729) % 2001) as f64 - 1000.0) / 1000.0))
        .collect();
    Tensor::from_slice(client, &data, shape).expect("shape")
}

fn first_calls<V: Variant>(client: &attn::ComputeClient, batch: usize, seq: usize) -> (f64, f64) {
    let q = pattern_tensor::<V::Elem>(client, [batch, 32, seq, 128], 1);
    let k = pattern_tensor::<V::Elem>(client, [batch, 8, seq, 128], 2);
    let v = pattern_tensor::<V::Elem>(client, [batch, 8, seq, 128], 3);
    attn::sync(client).expect("upload");
    let call = || {
        let start = Instant::now();
        attn::forward::<V>(client, &q, &k, &v, &attn::Inputs::default()).expect("forward");
        attn::sync(client).expect("run");
        start.elapsed().as_secs_f64() * 1e3
    };
    let first = call();
    let again = call();
    (first, again)
}

fn first_call_of<V: Variant>(client: &attn::ComputeClient, started: Instant, client_ms: f64) {
    let seq = first_call_arg("--seq").unwrap_or(4096);
    let batch = first_call_arg("--batch").unwrap_or(2);
    let (first, steady) = first_calls::<V>(client, batch, seq);
    // A new length inside the same bucket (the key's buckets are powers of four).
    let (changed, _) = first_calls::<V>(client, batch, seq - seq / 8 - 3);
    println!(
        "first_call: variant {} on {}, B {batch}, N {seq}: client {client_ms:.0} ms, first forward {first:.1} ms, second {steady:.1} ms, after a length change to {} {changed:.1} ms, process total {:.0} ms",
        V::SPEC.name,
        client.properties().identity.name,
        seq - seq / 8 - 3,
        started.elapsed().as_secs_f64() * 1e3
    );
}

/// The kernel family that runs `tiling` for `spec` on this device (operands the copy engine
/// reads), if any.
fn family(
    client: &ComputeClient,
    spec: &attn::VariantSpec,
    tiling: attn::Tiling,
) -> Option<attn::blueprint::Family> {
    attn::blueprint::family_for(client, spec, tiling, true).ok()
}
