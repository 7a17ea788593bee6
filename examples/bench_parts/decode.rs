//! `bench --decode`: the decode benchmark. Llama-3 shaped decoding (bf16, 32 query heads over 8
//! K/V heads, d 128, one new token; and Mistral's, the same heads under a sliding window of 4096
//! keys) against long caches, contiguous and paged, 16-bit and fp8 (e4m3), timed with the
//! default plan and a small sweep of split counts and step sizes. Writes, per case, the query,
//! our O and LSE, the page table and the timings; K and V are a pattern both sides compute from
//! the element index (`pattern`), so `bench/decode.py` rebuilds them on the GPU without multi-GB
//! files, checks our output against float64 and times PyTorch's SDPA (flash, cuDNN) and
//! FlexAttention on the same data.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use attn::decode::{check_plan, default_plan, units_plan, DecodeKernel, DecodePlan, DecodeProblem};
use attn::reference::{random_vec, seeded_rng};
use attn::{bf16, ComputeClient, Inputs, KvCache, Output, Tensor};
use rand::seq::SliceRandom;

attn::attention! {
    /// Llama-3 8B/70B attention: GQA 4, d 128, causal (bottom-right: the new tokens see the cache).
    pub Llama3Decode { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal }
    /// Mistral 7B's attention: Llama-3's heads under a sliding window of 4096 keys.
    pub MistralDecode { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal & window(left = 4095) }
    /// A sliding window of 501 keys at Llama-3's heads, for the device grid's decode checks.
    pub WindowDecode { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal & window(left = 500) }
}

/// The device grid's decode checks: a sliding window and plain causal decoding over ragged caches
/// (one longer than the window's span many times, one shorter than it), contiguous 16-bit and
/// fp8 (contiguous and in pages of 16) and paged in pages of 16 and 256 tokens, 1, 4 and 16 query tokens, each kernel's default
/// plan at its own split count and at 1 and 4 splits, against float64 (an fp8 cache's on the
/// values it stores). Returns one verdict per run.
pub fn check_decode_grid(client: &ComputeClient) -> Vec<bool> {
    let mut results = Vec::new();
    if !attn::supports::<bf16>(client) {
        println!("decode checks: bf16 unsupported here, skipped");
        return results;
    }
    for nq in [1, 4, 16] {
        results.extend(check_decode::<WindowDecode>(client, nq, false, None, 0));
        results.extend(check_decode::<Llama3Decode>(client, nq, false, None, 0));
        results.extend(check_decode::<Llama3Decode>(client, nq, true, None, 0));
        results.extend(check_decode::<Llama3Decode>(client, nq, true, Some(16), 0));
        for page in [16, 256] {
            results.extend(check_decode::<WindowDecode>(
                client,
                nq,
                false,
                Some(page),
                0,
            ));
        }
    }
    results
}

/// Decoding from pools of more than 2³² elements (64-bit offsets): Llama-3's heads over pages of
/// 16 whose sequences hold pages past the first 2³² elements of the pool, 16-bit and fp8, 1 and
/// 4 query tokens; the appends that fill them take 64-bit offsets too.
pub fn check_far_pages(client: &ComputeClient) -> Vec<bool> {
    // Pages of 16 tokens × 8 heads × 128: 2¹⁸ pages hold 2³² elements.
    const FAR: usize = 1 << 18;
    let mut results = Vec::new();
    for nq in [1, 4] {
        results.extend(check_decode::<Llama3Decode>(
            client,
            nq,
            false,
            Some(16),
            FAR,
        ));
        results.extend(check_decode::<Llama3Decode>(
            client,
            nq,
            true,
            Some(16),
            FAR,
        ));
    }
    results
}

/// One cell of the grid: `nq` query tokens against a contiguous cache (16-bit or `fp8`) or one
/// paged in pages of `page` tokens, with the default plan, the CUDA-core kernel's default plan,
/// and each at 1 and 4 splits. A paged pool starts with `skip` pages no sequence holds, so the
/// sequences' pages lie past them.
fn check_decode<V: attn::Variant<Elem = bf16>>(
    client: &ComputeClient,
    nq: usize,
    fp8: bool,
    page: Option<usize>,
    skip: usize,
) -> Vec<bool> {
    use attn::reference::{decode_f64, decode_naive, error_floor, widen, Verdict};
    let lengths = [3001usize, 777, 40];
    let (batch, heads_kv, d) = (lengths.len(), HEADS_KV, D);
    let capacity = lengths[0] + 3;
    let stored = match (fp8, page) {
        (true, Some(p)) => format!(" fp8 pages of {p}"),
        (true, None) => " fp8".to_string(),
        (false, Some(p)) => format!(" pages of {p}"),
        (false, None) => String::new(),
    };
    let far = if skip > 0 {
        format!(" past {skip} pages")
    } else {
        String::new()
    };
    let label = format!(
        "decode {} Nq{nq} lengths {lengths:?}{stored}{far}",
        V::SPEC.name
    );
    let (mut rng, _) = seeded_rng(&label);
    // Normal random values: scales mapping 4.5 to 448 saturate almost none.
    let scales = attn::fp8::KvScales::for_range(heads_kv, 4.5, 4.5);
    let paged = |page_size: usize| {
        let max_pages = capacity.div_ceil(page_size);
        attn::PagedLayout {
            batch,
            heads_kv,
            head_dim: d,
            value_dim: d,
            page_size,
            pages: skip + batch * max_pages,
            max_pages,
        }
    };
    let mut cache = match page {
        Some(page_size) if fp8 => KvCache::<bf16>::paged_fp8(client, paged(page_size), &scales),
        None if fp8 => {
            KvCache::<bf16>::contiguous_fp8(client, [batch, heads_kv, capacity], d, d, &scales)
        }
        Some(page_size) => KvCache::<bf16>::paged(client, paged(page_size)),
        None => KvCache::<bf16>::contiguous(client, batch, heads_kv, capacity, d, d),
    }
    .expect("a cache");
    if skip > 0 {
        let max_pages = cache.capacity() / page.unwrap_or(1);
        for b in 0..batch {
            let first = skip + b * max_pages;
            let pages: Vec<i32> = (first..first + max_pages).map(|p| p as i32).collect();
            cache.set_pages(b, &pages).expect("free pages");
        }
    }
    // Whole pages: the reference lays the tokens out over the cache's own capacity.
    let capacity = cache.capacity();
    let n = lengths[0];
    let kn: Vec<bf16> = random_vec(&mut rng, batch * heads_kv * n * d);
    let vn: Vec<bf16> = random_vec(&mut rng, batch * heads_kv * n * d);
    let upload =
        |h: &[bf16]| Tensor::from_slice(client, h, [batch, heads_kv, n, d]).expect("shape");
    cache
        .append(client, &upload(&kn), &upload(&vn), Some(&lengths))
        .expect("room");
    // The same tokens on the host, `[B, Hkv, capacity, D]`, as the cache stores them.
    let held = |x: bf16, scale: f32| {
        if fp8 {
            attn::fp8::decode(attn::fp8::encode(x.to_f32() * (1.0 / scale))) * scale
        } else {
            x.to_f32()
        }
    };
    let host = |new: &[bf16], scales: &[f32]| {
        let mut h = vec![0.0; batch * heads_kv * capacity * d];
        for (b, &len) in lengths.iter().enumerate() {
            for (kv, &scale) in scales.iter().enumerate() {
                for t in 0..len {
                    let src = ((b * heads_kv + kv) * n + t) * d;
                    let dst = ((b * heads_kv + kv) * capacity + t) * d;
                    for c in 0..d {
                        h[dst + c] = f64::from(held(new[src + c], scale));
                    }
                }
            }
        }
        h
    };
    let (kh, vh) = (host(&kn, &scales.k), host(&vn, &scales.v));
    let qh: Vec<bf16> = random_vec(&mut rng, batch * HEADS_Q * nq * d);
    let q = Tensor::from_slice(client, &qh, [batch, HEADS_Q, nq, d]).expect("shape");
    let inputs = Inputs::default();
    let call = DecodeProblem::new::<V>(&q, &cache, &inputs).expect("a valid call");
    let qf = widen(&qh);
    let reference = decode_f64::<V>(&call, &inputs, &qf, &kh, &vh);
    let naive = decode_naive::<V>(&call, &inputs, &qf, &kh, &vh);
    let base = default_plan(client, &call).expect("a plan");
    let units = units_plan(client, &call).expect("a plan");
    let mut plans = Vec::new();
    for base in [base, units] {
        for splits in [base.splits, 1, 4] {
            let plan = DecodePlan { splits, ..base };
            if !plans.contains(&plan) && check_plan(client, &call, plan).is_ok() {
                plans.push(plan);
            }
        }
    }
    let mut results = Vec::new();
    for plan in plans {
        // Poisoned with NaN: an element the kernels do not write fails the check.
        let shape = call.problem.out_shape();
        let out = Output {
            o: Tensor::from_slice(client, &vec![bf16::NAN; shape.iter().product()], shape)
                .expect("shape"),
            lse: attn::Lse {
                tensor: Tensor::from_slice(
                    client,
                    &vec![f32::NAN; shape[0] * shape[1] * shape[2]],
                    [shape[0], shape[1], shape[2], 1],
                )
                .expect("shape"),
            },
        };
        let ran = attn::decode_with_plan::<V>(client, &q, &cache, &inputs, plan, &out);
        let passed = ran.is_ok() && {
            let o = widen(&out.o.to_vec(client));
            let written = o.iter().all(|x| !x.is_nan());
            let v = Verdict::new(&o, &reference.o, &naive, error_floor::<bf16>());
            println!(
                "{label} {}: max|O-f64| {:.2e} (naive {:.2e}, bound {:.2e}): {}",
                plan.name(),
                v.kernel_error,
                v.naive_error,
                v.bound,
                if v.passed() && written {
                    "ok"
                } else {
                    "FAILED"
                }
            );
            v.passed() && written
        };
        results.push(passed);
    }
    results
}

/// One decode shape.
#[derive(Clone, Copy)]
struct DecodeCase {
    batch: usize,
    keys: usize,
    queries: usize,
    /// `None`: contiguous cache; `Some(p)`: pages of `p` tokens in a shuffled order.
    page_size: Option<usize>,
    /// Mistral's sliding window (4096 keys) instead of plain causal.
    window: bool,
    /// K and V in e4m3 ([`FP8_SCALE`]), appended through the cache's encoder.
    fp8: bool,
}

/// The fp8 cases' scale for K and V: a power of two, so `1 / scale` is exact and the pattern's
/// values (below 1 in magnitude) map below 256 without saturating; `bench/decode.py` quantizes
/// with PyTorch's e4m3 to rebuild the same values.
pub const FP8_SCALE: f32 = 1.0 / 256.0;

pub const HEADS_Q: usize = 32;
pub const HEADS_KV: usize = 8;
pub const D: usize = 128;

/// Element `i` of the K (`salt` 1) or V (`salt` 2) pattern: a hash of the index, uniform in
/// [−1, 1) with 24 bits, rounded to bf16. `bench/decode.py` computes the same.
pub fn pattern(i: u64, salt: u32) -> bf16 {
    let mut h = (i as u32).wrapping_mul(0x9E37_79B1)
        ^ (((i >> 32) as u32).wrapping_mul(0x85EB_CA77))
        ^ salt.wrapping_mul(0xC2B2_AE3D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    let unit = (h >> 8) as f32 / 16_777_216.0;
    bf16::from_f32(unit * 2.0 - 1.0)
}

/// Runs the decode cases; returns false when one failed to run.
pub fn run_decode(client: &ComputeClient, out: &Path, iters: usize, only: Option<&str>) -> bool {
    let cases = [
        DecodeCase {
            batch: 64,
            keys: 8192,
            queries: 1,
            page_size: None,
            window: false,
            fp8: false,
        },
        DecodeCase {
            batch: 8,
            keys: 32768,
            queries: 1,
            page_size: None,
            window: false,
            fp8: false,
        },
        DecodeCase {
            batch: 1,
            keys: 131072,
            queries: 1,
            page_size: None,
            window: false,
            fp8: false,
        },
        DecodeCase {
            batch: 64,
            keys: 8192,
            queries: 1,
            page_size: Some(16),
            window: false,
            fp8: false,
        },
        DecodeCase {
            batch: 8,
            keys: 32768,
            queries: 1,
            page_size: Some(128),
            window: false,
            fp8: false,
        },
        DecodeCase {
            batch: 64,
            keys: 8192,
            queries: 4,
            page_size: Some(64),
            window: false,
            fp8: false,
        },
        // Mistral: the window reads 4096 of each sequence's keys, wherever the cache ends.
        DecodeCase {
            batch: 16,
            keys: 16384,
            queries: 1,
            page_size: None,
            window: true,
            fp8: false,
        },
        DecodeCase {
            batch: 4,
            keys: 65536,
            queries: 1,
            page_size: Some(64),
            window: true,
            fp8: false,
        },
        // Llama-3 against an fp8 cache: half the bytes of the first and fourth cases.
        DecodeCase {
            batch: 64,
            keys: 8192,
            queries: 1,
            page_size: None,
            window: false,
            fp8: true,
        },
        DecodeCase {
            batch: 64,
            keys: 8192,
            queries: 1,
            page_size: Some(16),
            window: false,
            fp8: true,
        },
        // Speculative decoding: 16 draft tokens per sequence, 64 rows per K/V head.
        DecodeCase {
            batch: 64,
            keys: 8192,
            queries: 16,
            page_size: Some(64),
            window: false,
            fp8: false,
        },
    ];
    std::fs::create_dir_all(out).expect("output folder");
    let mut list = std::fs::File::create(out.join("cases.txt")).expect("cases.txt");
    let mut ok = true;
    // On a CPU-emulated device, a smoke run: the same cases, 512 times smaller.
    let shrink = attn::launch::is_cpu_emulated(client);
    for (i, case) in cases.iter().enumerate() {
        if only.is_some_and(|o| !o.split(',').any(|p| p.parse::<usize>().ok() == Some(i))) {
            continue;
        }
        let small;
        let case = if shrink {
            small = DecodeCase {
                batch: case.batch.div_ceil(8),
                keys: case.keys / 64,
                ..*case
            };
            &small
        } else {
            case
        };
        let ran = if case.window {
            run_case::<MistralDecode>(client, case, out, iters)
        } else {
            run_case::<Llama3Decode>(client, case, out, iters)
        };
        match ran {
            Ok(name) => writeln!(list, "{name}").expect("cases.txt"),
            Err(e) => {
                eprintln!("decode case {i}: {e}");
                ok = false;
            }
        }
    }
    ok
}

fn run_case<V: attn::Variant<Elem = bf16>>(
    client: &ComputeClient,
    case: &DecodeCase,
    out: &Path,
    iters: usize,
) -> Result<String, attn::AttnError> {
    let (b, n, nq) = (case.batch, case.keys, case.queries);
    let storage = case
        .page_size
        .map_or("contig".to_string(), |p| format!("page{p}"));
    let window = V::SPEC.mask.window.and_then(|w| w.left);
    let masking = window.map_or(String::new(), |w| format!("_w{}", w + 1));
    let stored = if case.fp8 { "_fp8" } else { "" };
    let name = format!("decode_b{b}_h{HEADS_Q}-{HEADS_KV}_n{n}_q{nq}_{storage}{masking}{stored}");
    let (mut rng, seed) = seeded_rng(&name);
    let started = Instant::now();
    // K and V in [B, Hkv, N, D] order from the pattern.
    let logical = |salt| -> Vec<bf16> {
        (0..(b * HEADS_KV * n * D) as u64)
            .map(|i| pattern(i, salt))
            .collect()
    };
    let (kh, vh) = (logical(1), logical(2));
    let mut table: Vec<i32> = Vec::new();
    let cache = match case.page_size {
        _ if case.fp8 => {
            let (cache, order) = fp8_cache(client, case, [&kh, &vh], &mut rng)?;
            table = order;
            cache
        }
        None => {
            let shape = [b, HEADS_KV, n, D];
            KvCache::from_contiguous_parts(
                Tensor::from_slice(client, &kh, shape)?,
                Tensor::from_slice(client, &vh, shape)?,
                vec![n; b],
            )?
        }
        Some(p) => {
            // Pages in a shuffled order: sequence s's page j holds its tokens j·p .. (j+1)·p.
            let per_seq = n.div_ceil(p);
            let pages = b * per_seq;
            let mut order: Vec<i32> = (0..pages as i32).collect();
            order.shuffle(&mut rng);
            table = order.clone();
            let mut kp = vec![bf16::from_f32(0.0); pages * HEADS_KV * p * D];
            let mut vp = kp.clone();
            for s in 0..b {
                for j in 0..per_seq {
                    let page = order[s * per_seq + j] as usize;
                    for h in 0..HEADS_KV {
                        for t in 0..p.min(n - j * p) {
                            let src = ((s * HEADS_KV + h) * n + j * p + t) * D;
                            let dst = ((page * HEADS_KV + h) * p + t) * D;
                            kp[dst..dst + D].copy_from_slice(&kh[src..src + D]);
                            vp[dst..dst + D].copy_from_slice(&vh[src..src + D]);
                        }
                    }
                }
            }
            let shape = [pages, HEADS_KV, p, D];
            KvCache::from_paged_parts(
                Tensor::from_slice(client, &kp, shape)?,
                Tensor::from_slice(client, &vp, shape)?,
                p,
                order,
                per_seq,
                vec![n; b],
            )?
        }
    };
    drop((kh, vh));
    let q_shape = [b, HEADS_Q, nq, D];
    let qh: Vec<bf16> = random_vec(&mut rng, q_shape.iter().product());
    let q = Tensor::from_slice(client, &qh, q_shape)?;
    let none = Inputs::default();
    let call = DecodeProblem::new::<V>(&q, &cache, &none)?;
    println!(
        "{name}: data ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The default plan, then a sweep around it: split counts, 128 or 64 units (keys per step), and
    // 8, 16 or 32 loads issued together.
    let default = default_plan(client, &call)?;
    let mut plans = vec![default];
    let mut candidates = Vec::new();
    // `BENCH_DECODE_SWEEP=short`: the CUDA-core kernel's default tile alone.
    let short = std::env::var("BENCH_DECODE_SWEEP").is_ok_and(|v| v == "short");
    if let DecodeKernel::Units(base) = units_plan(client, &call)?.kernel {
        let (units, chunks): (&[u32], &[u32]) = if short {
            (&[base.units], &[base.chunk])
        } else {
            (&[base.units, 64], &[8, 16, 32])
        };
        for splits in [1, 2, 4, 8, 16, 33, 66, 132, 264] {
            for &units in units {
                for &chunk in chunks {
                    candidates.push(DecodePlan {
                        splits,
                        kernel: DecodeKernel::Units(attn::DecodeTiling {
                            units,
                            chunk,
                            ..base
                        }),
                    });
                }
            }
        }
    }
    // The warpgroup kernel where the device has it (its check refuses it elsewhere).
    for splits in [1, 2, 4, 8, 16, 32, 64, 128] {
        for block_kv in [64, 128] {
            candidates.push(DecodePlan {
                splits,
                kernel: DecodeKernel::Warpgroup { block_kv },
            });
        }
    }
    for plan in candidates {
        if !plans.contains(&plan) && check_plan(client, &call, plan).is_ok() {
            plans.push(plan);
        }
    }
    let out_buffers = Output {
        o: Tensor::empty(client, call.problem.out_shape()),
        lse: attn::Lse::empty(client, call.problem.lse_shape()),
    };
    let mut timed = Vec::new();
    for &plan in &plans {
        // Timed as the anchors are: calls queued back to back, each between device events.
        let time = |count: usize| {
            super::device_times(client, count, || {
                attn::decode_with_plan::<V>(client, &q, &cache, &none, plan, &out_buffers)
            })
        };
        time(3)?; // warm-up: compiles
        let mut times = time(iters)?;
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!("  {}: median {median:.4} ms", plan.name());
        timed.push((plan, median, times));
    }
    // The tuned call: the first one tunes this key (timing the tuner's choices) and stores the
    // winner; then it is timed like the plans above (it allocates its output on every call).
    let start = Instant::now();
    let tuned_out = attn::decode::<V>(client, &q, &cache, &none)?;
    attn::sync(client)?;
    let tuning_s = start.elapsed().as_secs_f64();
    drop(tuned_out);
    let mut tuned_times = super::device_times(client, iters, || {
        attn::decode::<V>(client, &q, &cache, &none).map(drop)
    })?;
    tuned_times.sort_by(f64::total_cmp);
    let tuned_ms = tuned_times[tuned_times.len() / 2];
    println!(
        "  tuned decode: first call (tunes the key) {tuning_s:.2} s, then median {tuned_ms:.4} ms"
    );
    // The bytes of K and V the call must read: each sequence's visible keys.
    let keys_read = call.keys_seen();
    let element_bytes = if case.fp8 { 1 } else { 2 };
    let bytes = (b * HEADS_KV * keys_read * 2 * D * element_bytes) as f64;
    let best = timed
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("a plan")
        .clone();
    let default_ms = timed[0].1;
    println!(
        "{name}: default {} {default_ms:.4} ms ({:.2} TB/s); best {} {:.4} ms ({:.2} TB/s)",
        default.name(),
        bytes / default_ms / 1e9,
        best.0.name(),
        best.1,
        bytes / best.1 / 1e9
    );
    // The outputs written out come from the default plan.
    attn::decode_with_plan::<V>(client, &q, &cache, &none, default, &out_buffers)?;
    attn::sync(client)?;
    let dir = out.join(&name);
    std::fs::create_dir_all(&dir).expect("case folder");
    super::write_raw(&dir.join("q.bin"), &qh);
    super::write_raw(&dir.join("o.bin"), &out_buffers.o.to_vec(client));
    super::write_raw(&dir.join("lse.bin"), &out_buffers.lse.to_vec(client));
    let plans_json: Vec<String> = timed
        .iter()
        .map(|(p, ms, _)| format!("\"{}\": {ms:.5}", p.name()))
        .collect();
    let times_json: Vec<String> = timed[0].2.iter().map(|t| format!("{t:.5}")).collect();
    let meta = format!(
        "{{\"case\": \"{name}\", \"batch\": {b}, \"heads_q\": {HEADS_Q}, \"heads_kv\": {HEADS_KV}, \"keys\": {n}, \"keys_read\": {keys_read}, \"window_left\": {}, \"queries\": {nq}, \"head_dim\": {D}, \"page_size\": {}, \"fp8_scale\": {}, \"table\": {:?}, \"scale\": {}, \"default_plan\": \"{}\", \"default_ms\": {default_ms}, \"times_ms\": [{}],  \"best_plan\": \"{}\", \"best_ms\": {}, \"tuned_ms\": {tuned_ms}, \"tuning_s\": {tuning_s}, \"plans_ms\": {{{}}}, \"iters\": {iters}, \"seed\": {seed}, \"device\": \"{}\"}}\n",
        window.map_or("null".to_string(), |w| w.to_string()),
        case.page_size.map_or("null".to_string(), |p| p.to_string()),
        if case.fp8 {
            FP8_SCALE.to_string()
        } else {
            "null".to_string()
        },
        table,
        V::SPEC.softmax_scale(),
        default.name(),
        times_json.join(", "),
        best.0.name(),
        best.1,
        plans_json.join(", "),
        client.name()
    );
    std::fs::write(dir.join("meta.json"), meta).expect("meta.json");
    Ok(name)
}

/// An fp8 cache holding the case's K and V, appended through the cache's encoder (pages handed
/// out in a shuffled order first, where paged), and its block table (empty when contiguous).
fn fp8_cache(
    client: &ComputeClient,
    case: &DecodeCase,
    [kh, vh]: [&[bf16]; 2],
    rng: &mut rand::rngs::StdRng,
) -> Result<(KvCache<bf16>, Vec<i32>), attn::AttnError> {
    let (b, n) = (case.batch, case.keys);
    let scales = attn::fp8::KvScales::uniform(HEADS_KV, FP8_SCALE, FP8_SCALE);
    let mut table = Vec::new();
    let mut cache = match case.page_size {
        None => KvCache::contiguous_fp8(client, [b, HEADS_KV, n], D, D, &scales)?,
        Some(p) => {
            let per_seq = n.div_ceil(p);
            let layout = attn::PagedLayout {
                batch: b,
                heads_kv: HEADS_KV,
                head_dim: D,
                value_dim: D,
                page_size: p,
                pages: b * per_seq,
                max_pages: per_seq,
            };
            let mut cache = KvCache::paged_fp8(client, layout, &scales)?;
            table = (0..(b * per_seq) as i32).collect();
            table.shuffle(rng);
            for s in 0..b {
                cache.set_pages(s, &table[s * per_seq..(s + 1) * per_seq])?;
            }
            cache
        }
    };
    let shape = [b, HEADS_KV, n, D];
    cache.append(
        client,
        &Tensor::from_slice(client, kh, shape)?,
        &Tensor::from_slice(client, vh, shape)?,
        None,
    )?;
    Ok((cache, table))
}
