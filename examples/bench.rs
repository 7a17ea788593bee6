//! Prefill benchmark: runs our kernels on the shapes we answer to (bf16) and writes, per shape,
//! the inputs, our outputs and our timings, for `bench/compare.py` to check against PyTorch in
//! float64 and to time PyTorch's SDPA (flash, cuDNN) and FlexAttention on the same data.
//!
//! `cargo run --release --no-default-features --features cuda --example bench -- --out DIR [--iters 10] [--only CASE]`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use attn::reference::{random_vec, seeded_rng};
use attn::{bf16, ComputeClient, Element, MaskKind, Problem, Tensor, Variant};

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
}

/// One benchmark shape: batch, query heads, K/V heads, sequence length.
struct Case {
    batch: usize,
    heads_q: usize,
    heads_kv: usize,
    seq: usize,
    run: fn(&ComputeClient, &Case, &Path, usize) -> Result<String, attn::AttnError>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone());
    let out = PathBuf::from(arg("--out").unwrap_or_else(|| "bench/out".into()));
    let iters: usize = arg("--iters").map_or(10, |s| s.parse().expect("--iters N"));
    let only = arg("--only");
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
    ];
    std::fs::create_dir_all(&out).expect("output folder");
    let client = attn::default_client();
    let mut list = std::fs::File::create(out.join("cases.txt")).expect("cases.txt");
    for (i, case) in cases.iter().enumerate() {
        if only
            .as_deref()
            .is_some_and(|o| o.parse::<usize>().ok() != Some(i))
        {
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

/// Runs one case, writes its folder, and returns the folder's name.
fn run<V: Variant<Elem = bf16>>(
    client: &ComputeClient,
    case: &Case,
    out: &Path,
    iters: usize,
) -> Result<String, attn::AttnError> {
    let spec = V::SPEC;
    let d = spec.head_dim as usize;
    let mask = match spec.mask {
        MaskKind::None => "none",
        MaskKind::Causal(_) => "causal",
    };
    let name = format!(
        "b{}_h{}-{}_n{}_d{}_{}",
        case.batch, case.heads_q, case.heads_kv, case.seq, d, mask
    );
    let (mut rng, seed) = seeded_rng(&name);
    let q_shape = [case.batch, case.heads_q, case.seq, d];
    let kv_shape = [case.batch, case.heads_kv, case.seq, d];
    let qh: Vec<bf16> = random_vec(&mut rng, q_shape.iter().product());
    let kh: Vec<bf16> = random_vec(&mut rng, kv_shape.iter().product());
    let vh: Vec<bf16> = random_vec(&mut rng, kv_shape.iter().product());
    let q = Tensor::from_slice(client, &qh, q_shape);
    let k = Tensor::from_slice(client, &kh, kv_shape);
    let v = Tensor::from_slice(client, &vh, kv_shape);
    let problem = Problem::new(&spec, &q, &k, &v)?;
    let tiling = attn::select_tiling(client, &spec)?;

    // Warm-up: compiles the kernel and settles clocks.
    let start = Instant::now();
    let mut result = attn::forward::<V>(client, &q, &k, &v)?;
    attn::sync(client)?;
    let first_ms = start.elapsed().as_secs_f64() * 1e3;
    for _ in 0..2 {
        result = attn::forward::<V>(client, &q, &k, &v)?;
    }
    attn::sync(client)?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        result = attn::forward::<V>(client, &q, &k, &v)?;
        attn::sync(client)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let flops = 4.0
        * (case.batch * case.heads_q) as f64
        * problem.attended_pairs(spec.mask) as f64
        * d as f64;
    println!(
        "{name}: {} tile {}: median {median:.3} ms, {:.1} TFLOP/s (first call {first_ms:.0} ms)",
        spec.name,
        tiling.name(),
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
    let meta = format!(
        "{{\"case\": \"{name}\", \"variant\": \"{}\", \"batch\": {}, \"heads_q\": {}, \"heads_kv\": {}, \"seq_q\": {}, \"seq_k\": {}, \"head_dim\": {d}, \"dtype\": \"bf16\", \"mask\": \"{mask}\", \"causal_alignment\": \"bottom_right\", \"scale\": {}, \"tile\": \"{}\", \"iters\": {iters}, \"times_ms\": [{}], \"median_ms\": {median}, \"first_call_ms\": {first_ms}, \"seed\": {seed}, \"device\": \"{}\"}}\n",
        spec.name,
        case.batch,
        case.heads_q,
        case.heads_kv,
        case.seq,
        case.seq,
        spec.softmax_scale(),
        tiling.name(),
        times_json.join(", "),
        client.name()
    );
    std::fs::write(dir.join("meta.json"), meta).expect("meta.json");
    Ok(name)
}
