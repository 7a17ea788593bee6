//! Decoding against K/V caches, checked against the float64 reference on random inputs (fresh
//! seed per run, printed): ragged cache lengths (1, 7, 1000, 3001 and random ones), page sizes
//! from 16 to 256 and contiguous caches, page tables in random order, key splits from one to
//! many, group sizes 1, 4, 6, 8 and MQA, 1–16 query tokens and chunked prefill, the whole
//! variant space composed; appends land where the block table says; the merge of two results is
//! the result over the union of their keys; bad input is a typed error. Outputs are poisoned with
//! NaN first, so an element the kernels failed to write fails the check.

use attn::decode::{check_plan, default_plan, DecodePlan, DecodeProblem};
use attn::fp8::KvScales;
use attn::reference::{
    decode_f64, decode_naive, error_floor, max_abs_error, random_vec, seeded_rng, widen,
    OwnedInputs, Verdict,
};
use attn::{
    AttnError, ComputeClient, DecodeKernel, DecodeTiling, Element, Fp8Pool, Inputs, KvCache, Lse,
    Output, PageTable, PagedLayout, Tensor, Variant,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

attn::attention! {
    /// Llama-3 style in small: GQA 4, causal, f32.
    Gqa4Causal { heads: gqa(group = 4), head_dim: 64, dtype: f32, mask: causal }
    /// MHA, no mask, f16.
    MhaF16 { heads: mha, head_dim: 64, dtype: f16 }
    /// GQA 8, d 128, causal, f16.
    Gqa8F16 { heads: gqa(group = 8), head_dim: 128, dtype: f16, mask: causal }
    /// MQA with a softcap, f32.
    MqaSoftcap { heads: mqa, head_dim: 64, dtype: f32, mask: causal, softcap: 30.0 }
    /// Every kind of term at once: window, own key lengths, a custom mask, ALiBi and sinks.
    Composed {
        heads: gqa(group = 2), head_dim: 64, dtype: f32,
        mask: causal & window(left = 300) & key_lengths & |b, h, q, k| (k % 7) != 3 || h == 1,
        alibi: geometric, sinks: per_head,
    }
    /// Mistral's sliding window in small: GQA 2, causal, the last 101 keys, f32.
    SlidingWindow { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal & window(left = 100) }
    /// A two-sided window without causal (keys after a token are visible too), f32.
    TwoSided { heads: mha, head_dim: 64, dtype: f32, mask: window(left = 50, right = 20) }
    /// No mask, for merging results over disjoint keys.
    Plain { heads: gqa(group = 4), head_dim: 64, dtype: f32 }
    /// bf16 (checked where the back end has it).
    Bf16 { heads: gqa(group = 4), head_dim: 64, dtype: bf16, mask: causal }
    /// Packed documents: no cache can serve them.
    Docs { heads: mha, head_dim: 64, dtype: f32, mask: causal & documents }
}

fn client() -> ComputeClient {
    attn::default_client()
}

/// How a test cache stores its tokens.
#[derive(Clone, Copy, Debug)]
enum Storage {
    /// Pages of this many tokens, handed out in a random order.
    Paged(usize),
    /// One `[B, Hkv, capacity, D]` tensor.
    Contiguous,
    /// Pages of e4m3 values ([`test_scales`]).
    PagedFp8(usize),
    /// One e4m3 tensor.
    ContiguousFp8,
}

/// fp8 scales for random normal values: head 0's K and V map 1 to 448, so about a third of
/// their values saturate; the others' map 4 to 8 to 448, so few or none do.
fn test_scales(rng: &mut StdRng, heads_kv: usize) -> KvScales {
    let mut pick = |h: usize| {
        if h == 0 {
            1.0 / 448.0
        } else {
            rng.random_range(4.0..8.0f32) / 448.0
        }
    };
    KvScales {
        k: (0..heads_kv).map(&mut pick).collect(),
        v: (0..heads_kv).map(&mut pick).collect(),
    }
}

/// A cache filled through `append` in ragged chunks, and the same tokens on the host in
/// `[B, Hkv, capacity, D]` order (f64) for the reference: as the cache holds them (an fp8
/// cache's through the host's encoder) and as they were appended.
struct Filled<E> {
    cache: KvCache<E>,
    k: Vec<f64>,
    v: Vec<f64>,
    appended_k: Vec<f64>,
    appended_v: Vec<f64>,
}

/// Builds a cache holding `lengths[b]` random tokens per sequence, appended in 1–3 ragged chunks.
#[allow(clippy::too_many_arguments)]
fn fill<E: Element>(
    client: &ComputeClient,
    rng: &mut StdRng,
    storage: Storage,
    heads_kv: usize,
    d: usize,
    dv: usize,
    lengths: &[usize],
) -> Filled<E> {
    let batch = lengths.len();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let cache = match storage {
        Storage::Paged(page_size) | Storage::PagedFp8(page_size) => {
            let per_seq: Vec<usize> = lengths.iter().map(|l| l.div_ceil(page_size)).collect();
            let pages = per_seq.iter().sum::<usize>() + 3;
            let layout = PagedLayout {
                batch,
                heads_kv,
                head_dim: d,
                value_dim: dv,
                page_size,
                pages,
                max_pages: longest.div_ceil(page_size) + 1,
            };
            let mut cache = match storage {
                Storage::PagedFp8(_) => {
                    KvCache::<E>::paged_fp8(client, layout, &test_scales(rng, heads_kv))
                }
                _ => KvCache::<E>::paged(client, layout),
            }
            .expect("a valid layout");
            let mut order: Vec<i32> = (0..pages as i32).collect();
            order.shuffle(rng);
            let mut next = order.into_iter();
            for (seq, &n) in per_seq.iter().enumerate() {
                let pages: Vec<i32> = next.by_ref().take(n).collect();
                cache.set_pages(seq, &pages).expect("free pages");
            }
            cache
        }
        Storage::Contiguous => {
            KvCache::<E>::contiguous(client, batch, heads_kv, longest + 5, d, dv).expect("a cache")
        }
        Storage::ContiguousFp8 => KvCache::<E>::contiguous_fp8(
            client,
            [batch, heads_kv, longest + 5],
            d,
            dv,
            &test_scales(rng, heads_kv),
        )
        .expect("a cache"),
    };
    let capacity = cache.capacity();
    let mut filled = Filled {
        cache,
        k: vec![0.0; batch * heads_kv * capacity * d],
        v: vec![0.0; batch * heads_kv * capacity * dv],
        appended_k: vec![0.0; batch * heads_kv * capacity * d],
        appended_v: vec![0.0; batch * heads_kv * capacity * dv],
    };
    let chunks = rng.random_range(1..=3usize);
    for chunk in 0..chunks {
        let remaining: Vec<usize> = lengths
            .iter()
            .zip(filled.cache.lengths())
            .map(|(want, have)| want - have)
            .collect();
        let most = remaining.iter().copied().max().unwrap_or(0);
        let n = if chunk + 1 == chunks {
            most
        } else {
            rng.random_range(0..=most)
        };
        if n == 0 {
            continue;
        }
        let counts: Vec<usize> = remaining.iter().map(|&r| r.min(n)).collect();
        append_random(client, rng, &mut filled, n, &counts);
    }
    assert_eq!(filled.cache.lengths(), lengths);
    filled
}

/// Appends `n` random tokens' K and V, sequence `b` taking its first `counts[b]` (one `append`
/// call), to the cache and to its host copy.
fn append_random<E: Element>(
    client: &ComputeClient,
    rng: &mut StdRng,
    filled: &mut Filled<E>,
    n: usize,
    counts: &[usize],
) {
    let cache = &mut filled.cache;
    let (batch, heads_kv, capacity) = (cache.batch(), cache.heads_kv(), cache.capacity());
    let (d, dv) = (cache.k().shape()[3], cache.v().shape()[3]);
    let knew: Vec<E> = random_vec(rng, batch * heads_kv * n * d);
    let vnew: Vec<E> = random_vec(rng, batch * heads_kv * n * dv);
    let starts = cache.lengths().to_vec();
    let k_t = Tensor::from_slice(client, &knew, [batch, heads_kv, n, d]).expect("shape");
    let v_t = Tensor::from_slice(client, &vnew, [batch, heads_kv, n, dv]).expect("shape");
    let all = counts.iter().all(|&c| c == n);
    cache
        .append(client, &k_t, &v_t, (!all).then_some(counts))
        .expect("room in the cache");
    // What the cache holds of value `x` of head `h`: itself, or its e4m3 code read back.
    let stored = |pool: &attn::KvPool<E>, h: usize, x: f64| match pool.fp8() {
        Some(p) => {
            let scale = p.scales()[h];
            let code = attn::fp8::encode(x as f32 * (1.0 / scale));
            (attn::fp8::decode(code) * scale) as f64
        }
        None => x,
    };
    for b in 0..batch {
        for h in 0..heads_kv {
            for t in 0..counts[b] {
                let pos = starts[b] + t;
                for (host, appended, new, w, pool) in [
                    (&mut filled.k, &mut filled.appended_k, &knew, d, cache.k()),
                    (&mut filled.v, &mut filled.appended_v, &vnew, dv, cache.v()),
                ] {
                    let src = ((b * heads_kv + h) * n + t) * w;
                    let dst = ((b * heads_kv + h) * capacity + pos) * w;
                    for c in 0..w {
                        let x = new[src + c].to_f64();
                        appended[dst + c] = x;
                        host[dst + c] = stored(pool, h, x);
                    }
                }
            }
        }
    }
}

/// Runs `V` for `nq` random query tokens per sequence against `filled` (with `plan`, or the
/// default one) and checks O and the LSE against float64. Returns the output.
#[allow(clippy::too_many_arguments)]
fn check_decode<V: Variant>(
    client: &ComputeClient,
    rng: &mut StdRng,
    filled: &Filled<V::Elem>,
    heads_q: usize,
    nq: usize,
    plan: Option<DecodePlan>,
    inputs: &OwnedInputs,
    label: &str,
) -> Output<V::Elem> {
    let spec = V::SPEC;
    let d = spec.head_dim as usize;
    let batch = filled.cache.batch();
    let q_shape = [batch, heads_q, nq, d];
    let qh: Vec<V::Elem> = random_vec(rng, q_shape.iter().product());
    let q = Tensor::from_slice(client, &qh, q_shape).expect("shape");
    let run_inputs = inputs.view();
    let call = DecodeProblem::new::<V>(&q, &filled.cache, &run_inputs).expect("a valid call");
    let plan = plan.unwrap_or_else(|| default_plan(client, &call).expect("a plan"));
    let label = format!("{label} {} Hq{heads_q} Nq{nq} {}", spec.name, plan.name());
    let out = poisoned::<V::Elem>(client, call.problem.out_shape());
    attn::decode_with_plan::<V>(client, &q, &filled.cache, &run_inputs, plan, &out)
        .expect("launch");

    verify::<V>(client, &call, &run_inputs, &qh, filled, &out, &label);
    out
}

/// Checks a decode call's output (O and the LSE) against float64.
fn verify<V: Variant>(
    client: &ComputeClient,
    call: &DecodeProblem,
    run_inputs: &Inputs,
    qh: &[V::Elem],
    filled: &Filled<V::Elem>,
    out: &Output<V::Elem>,
    label: &str,
) {
    let dv = V::SPEC.value_dim as usize;
    let qf = widen(qh);
    let reference = decode_f64::<V>(call, run_inputs, &qf, &filled.k, &filled.v);
    let naive = decode_naive::<V>(call, run_inputs, &qf, &filled.k, &filled.v);
    let o = widen(&out.o.to_vec(client));
    assert!(
        o.iter().all(|x| !x.is_nan()),
        "{label}: an output element was not written (NaN poison left)"
    );
    let verdict = Verdict::new(&o, &reference.o, &naive, error_floor::<V::Elem>());
    let worst_row = (0..o.len() / dv)
        .max_by(|&a, &b| {
            let err = |r: usize| {
                max_abs_error(&o[r * dv..(r + 1) * dv], &reference.o[r * dv..(r + 1) * dv])
            };
            err(a).total_cmp(&err(b))
        })
        .unwrap_or(0);
    assert!(
        verdict.passed(),
        "{label}: max |O − f64| = {:.3e} > bound {:.3e} (naive: {:.3e}); worst row {worst_row} of [B, Hq, Nq] = {:?}, lengths {:?}",
        verdict.kernel_error,
        verdict.bound,
        verdict.naive_error,
        call.problem.lse_shape(),
        filled.cache.lengths()
    );
    let lse: Vec<f64> = out.lse.to_vec(client).into_iter().map(f64::from).collect();
    for (i, (&got, &want)) in lse.iter().zip(&reference.lse).enumerate() {
        if want == f64::NEG_INFINITY {
            assert_eq!(got, f64::NEG_INFINITY, "{label}: LSE row {i} sees no key");
            assert!(
                o[i * dv..(i + 1) * dv].iter().all(|&x| x == 0.0),
                "{label}: O row {i} sees no key, so must be 0"
            );
        }
    }
    let lse_error = max_abs_error(&lse, &reference.lse);
    assert!(
        lse_error <= 2e-3,
        "{label}: max |LSE − f64| = {lse_error:.3e}"
    );
    println!(
        "{label}: max |O − f64| {:.2e} (bound {:.2e}), max |LSE − f64| {lse_error:.2e}",
        verdict.kernel_error, verdict.bound
    );
}

/// Output buffers full of NaN.
fn poisoned<E: Element>(client: &ComputeClient, shape: [usize; 4]) -> Output<E> {
    let o = vec![E::from_f64(f64::NAN); shape.iter().product()];
    let lse = vec![f32::NAN; shape[0] * shape[1] * shape[2]];
    Output {
        o: Tensor::from_slice(client, &o, shape).expect("shape"),
        lse: Lse {
            tensor: Tensor::from_slice(client, &lse, [shape[0], shape[1], shape[2], 1])
                .expect("shape"),
        },
    }
}

/// Ragged lengths: the fixed ones, or random ones with a 1 among them.
fn ragged(rng: &mut StdRng, batch: usize, most: usize) -> Vec<usize> {
    let mut lengths: Vec<usize> = (0..batch).map(|_| rng.random_range(1..=most)).collect();
    lengths[0] = 1;
    lengths.shuffle(rng);
    lengths
}

#[test]
fn ragged_lengths_at_every_page_size() {
    let client = client();
    let (mut rng, _) = seeded_rng("ragged_lengths_at_every_page_size");
    let lengths = [1, 7, 1000, 3001];
    let mut storages = vec![Storage::Contiguous];
    storages.extend([16, 17, 32, 64, 100, 128, 256].map(Storage::Paged));
    storages.push(Storage::Paged(rng.random_range(16..=256)));
    for storage in storages {
        let filled = fill::<f32>(&client, &mut rng, storage, 2, 64, 64, &lengths);
        check_decode::<Gqa4Causal>(
            &client,
            &mut rng,
            &filled,
            8,
            1,
            None,
            &OwnedInputs::default(),
            &format!("{storage:?}"),
        );
    }
}

#[test]
fn splits_from_one_to_many_agree() {
    let client = client();
    let (mut rng, _) = seeded_rng("splits_from_one_to_many_agree");
    let lengths = ragged(&mut rng, 3, 2500);
    let filled = fill::<f32>(&client, &mut rng, Storage::Paged(32), 2, 64, 64, &lengths);
    let q = Tensor::<f32>::empty(&client, [3, 8, 2, 64]);
    let call = DecodeProblem::new::<Gqa4Causal>(&q, &filled.cache, &Inputs::default()).unwrap();
    let base = default_plan(&client, &call).unwrap();
    let mut checked = 0;
    for splits in [1, 2, 3, 7, 16, 40, 100] {
        let plan = DecodePlan { splits, ..base };
        if let Err(e) = check_plan(&client, &call, plan) {
            // llvmpipe's loop limit rules out too few splits over long sequences.
            println!("splits {splits}: {e}");
            continue;
        }
        check_decode::<Gqa4Causal>(
            &client,
            &mut rng,
            &filled,
            8,
            2,
            Some(plan),
            &OwnedInputs::default(),
            "splits",
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} split counts ran");
}

/// Under a sliding window the splits divide the window's keys, from the step of each sequence's
/// first visible key: every split count gives the reference answer over ragged lengths (some
/// shorter than the window), one and several query tokens, paged and contiguous caches.
#[test]
fn a_window_spreads_over_every_split() {
    let client = client();
    let (mut rng, _) = seeded_rng("a_window_spreads_over_every_split");
    let mut lengths = ragged(&mut rng, 3, 1800);
    lengths[0] = rng.random_range(8..60);
    lengths[2] = 1800;
    let none = OwnedInputs::default();
    for (storage, nq) in [(Storage::Paged(32), 1), (Storage::Contiguous, 5)] {
        let filled = fill::<f32>(&client, &mut rng, storage, 2, 64, 64, &lengths);
        let q = Tensor::<f32>::empty(&client, [3, 4, nq, 64]);
        let call = DecodeProblem::new::<SlidingWindow>(&q, &filled.cache, &none.view()).unwrap();
        assert_eq!(
            call.keys_seen(),
            100 + nq,
            "the window's span and the tokens"
        );
        assert_eq!(
            call.split_span(64),
            100 + nq + 63,
            "plus a step's alignment"
        );
        let base = default_plan(&client, &call).unwrap();
        for splits in [1, 2, 4, 8] {
            let plan = DecodePlan { splits, ..base };
            check_decode::<SlidingWindow>(
                &client,
                &mut rng,
                &filled,
                4,
                nq,
                Some(plan),
                &none,
                "window",
            );
        }
    }
    let filled = fill::<f32>(&client, &mut rng, Storage::Paged(16), 3, 64, 64, &lengths);
    let q = Tensor::<f32>::empty(&client, [3, 3, 2, 64]);
    let call = DecodeProblem::new::<TwoSided>(&q, &filled.cache, &none.view()).unwrap();
    assert_eq!(call.keys_seen(), 50 + 20 + 2);
    let base = default_plan(&client, &call).unwrap();
    for splits in [1, 3, 4] {
        let plan = DecodePlan { splits, ..base };
        check_decode::<TwoSided>(&client, &mut rng, &filled, 3, 2, Some(plan), &none, "band");
    }
    // Without a window the splits still divide the longest length.
    let q = Tensor::<f32>::empty(&client, [3, 12, 1, 64]);
    let call = DecodeProblem::new::<Gqa4Causal>(&q, &filled.cache, &none.view()).unwrap();
    assert_eq!(call.keys_seen(), 1800);
    assert_eq!(call.split_span(64), 1800);
}

#[test]
fn group_sizes_and_mqa() {
    let client = client();
    let (mut rng, _) = seeded_rng("group_sizes_and_mqa");
    let none = OwnedInputs::default();
    let lengths = ragged(&mut rng, 3, 1500);
    if attn::supports::<attn::f16>(&client) {
        let filled = fill(&client, &mut rng, Storage::Paged(64), 4, 64, 64, &lengths);
        check_decode::<MhaF16>(&client, &mut rng, &filled, 4, 1, None, &none, "group 1");
        let filled = fill(&client, &mut rng, Storage::Paged(16), 2, 128, 128, &lengths);
        check_decode::<Gqa8F16>(&client, &mut rng, &filled, 16, 1, None, &none, "group 8");
    }
    let filled = fill(&client, &mut rng, Storage::Contiguous, 1, 64, 64, &lengths);
    check_decode::<MqaSoftcap>(&client, &mut rng, &filled, 6, 1, None, &none, "mqa 6");
    let filled = fill(&client, &mut rng, Storage::Paged(48), 1, 64, 64, &lengths);
    check_decode::<MqaSoftcap>(&client, &mut rng, &filled, 24, 3, None, &none, "mqa 24");
}

#[test]
fn speculative_tokens_and_chunked_prefill() {
    let client = client();
    let (mut rng, _) = seeded_rng("speculative_tokens_and_chunked_prefill");
    let lengths = ragged(&mut rng, 2, 900);
    // Every sequence holds at least the query tokens (they are its last positions).
    let lengths: Vec<usize> = lengths.into_iter().map(|l| l.max(40)).collect();
    let filled = fill::<f32>(&client, &mut rng, Storage::Paged(16), 2, 64, 64, &lengths);
    let none = OwnedInputs::default();
    for nq in [1, rng.random_range(2..=15), 16, 40] {
        check_decode::<Gqa4Causal>(&client, &mut rng, &filled, 8, nq, None, &none, "tokens");
    }
}

#[test]
fn composed_variant_with_inputs() {
    let client = client();
    let (mut rng, _) = seeded_rng("composed_variant_with_inputs");
    let lengths = ragged(&mut rng, 3, 2000);
    check_composed::<Composed>(&client, &mut rng, &lengths, "composed");
}

/// `V` (a [`Composed`] twin) with random key lengths and sinks, paged (pages of 32) and
/// contiguous, 3 query tokens, the default plan at its split count and four times it.
fn check_composed<V: Variant>(
    client: &ComputeClient,
    rng: &mut StdRng,
    lengths: &[usize],
    label: &str,
) {
    for storage in [Storage::Paged(32), Storage::Contiguous] {
        let filled = fill::<V::Elem>(client, rng, storage, 2, 64, 64, lengths);
        let heads_q = 4;
        let inputs = OwnedInputs {
            key_lengths: Some(
                lengths
                    .iter()
                    .map(|&l| rng.random_range(0..=l as i32))
                    .collect(),
            ),
            sinks: Some((0..heads_q).map(|_| rng.random_range(-3.0..3.0)).collect()),
            ..OwnedInputs::default()
        };
        let q = Tensor::<V::Elem>::empty(client, [3, heads_q, 3, 64]);
        let call = DecodeProblem::new::<V>(&q, &filled.cache, &inputs.view()).unwrap();
        let base = default_plan(client, &call).unwrap();
        for splits in [base.splits, base.splits.max(1) * 4] {
            let plan = DecodePlan { splits, ..base };
            check_decode::<V>(client, rng, &filled, heads_q, 3, Some(plan), &inputs, label);
        }
    }
}

/// Every stored position of an fp8 cache holds the host encoder's value of what was appended
/// (bit for bit, through the block table where paged).
fn check_stored<E: Element>(client: &ComputeClient, filled: &Filled<E>, label: &str) {
    let cache = &filled.cache;
    let (heads_kv, capacity) = (cache.heads_kv(), cache.capacity());
    for (name, pool, host) in [("K", cache.k(), &filled.k), ("V", cache.v(), &filled.v)] {
        let fp8 = pool.fp8().expect("an fp8 cache");
        let values = fp8.to_values(client);
        let [_, _, rows, w] = fp8.shape();
        let mut compared = 0;
        for (b, &len) in cache.lengths().iter().enumerate() {
            for pos in 0..len {
                let (row, slot) = match (cache.block_table(), cache.page_size()) {
                    (Some(table), Some(page_size)) => {
                        let max_pages = table.len() / cache.batch();
                        (
                            table[b * max_pages + pos / page_size] as usize,
                            pos % page_size,
                        )
                    }
                    _ => (b, pos),
                };
                for h in 0..heads_kv {
                    let at = ((row * heads_kv + h) * rows + slot) * w;
                    let want = ((b * heads_kv + h) * capacity + pos) * w;
                    for c in 0..w {
                        assert_eq!(
                            values[at + c] as f64,
                            host[want + c],
                            "{label}: {name} of sequence {b}, position {pos}, head {h}, column {c}"
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 0, "{label}: nothing stored");
    }
}

/// Runs `V` for `nq` random query tokens per sequence against an fp8 cache: O and the LSE
/// against float64 over the values the cache holds (the kernel's own error), and the error
/// against float64 over the values appended (the format's), printed.
fn check_fp8<V: Variant>(
    client: &ComputeClient,
    rng: &mut StdRng,
    filled: &Filled<V::Elem>,
    [heads_q, nq]: [usize; 2],
    plan: Option<DecodePlan>,
    label: &str,
) {
    check_stored(client, filled, label);
    let d = V::SPEC.head_dim as usize;
    let q_shape = [filled.cache.batch(), heads_q, nq, d];
    let qh: Vec<V::Elem> = random_vec(rng, q_shape.iter().product());
    let q = Tensor::from_slice(client, &qh, q_shape).expect("shape");
    let inputs = Inputs::default();
    let call = DecodeProblem::new::<V>(&q, &filled.cache, &inputs).expect("a valid call");
    let plan = plan.unwrap_or_else(|| default_plan(client, &call).expect("a plan"));
    let label = format!(
        "{label} {} Hq{heads_q} Nq{nq} {}",
        V::SPEC.name,
        plan.name()
    );
    let out = poisoned::<V::Elem>(client, call.problem.out_shape());
    attn::decode_with_plan::<V>(client, &q, &filled.cache, &inputs, plan, &out).expect("launch");
    verify::<V>(client, &call, &inputs, &qh, filled, &out, &label);
    let appended = decode_f64::<V>(
        &call,
        &inputs,
        &widen(&qh),
        &filled.appended_k,
        &filled.appended_v,
    );
    let o = widen(&out.o.to_vec(client));
    let dv = V::SPEC.value_dim as usize;
    // Head 0's scales saturate a third of its values: its rows apart from the others'.
    let heads_kv = filled.cache.heads_kv();
    let group = heads_q / heads_kv;
    let (mut saturated, mut others) = (0.0f64, 0.0f64);
    for (r, (got, want)) in o.chunks(dv).zip(appended.o.chunks(dv)).enumerate() {
        let head = (r / nq) % heads_q;
        let err = max_abs_error(got, want);
        if head / group == 0 {
            saturated = saturated.max(err);
        } else {
            others = others.max(err);
        }
    }
    println!(
        "{label}: against the values appended: max |O − f64| {others:.2e} (K/V heads 1..), {saturated:.2e} (head 0, saturating)"
    );
}

/// fp8 (e4m3) caches, contiguous and paged at several page sizes, f32 and f16, 1 and 4 query
/// tokens, one split and several: the stored bytes are the host encoder's, including values
/// that saturate, and decoding reads them as float64 does.
#[test]
fn fp8_caches() {
    let client = client();
    let (mut rng, _) = seeded_rng("fp8_caches");
    let lengths = ragged(&mut rng, 3, 900);
    let mut storages = vec![Storage::ContiguousFp8, Storage::PagedFp8(16)];
    storages.push(Storage::PagedFp8(rng.random_range(17..=256)));
    for storage in storages {
        let filled = fill::<f32>(&client, &mut rng, storage, 2, 64, 64, &lengths);
        for plan in [
            None,
            Some(plan_with_splits::<Gqa4Causal>(&client, &filled, 8, 5)),
        ] {
            check_fp8::<Gqa4Causal>(
                &client,
                &mut rng,
                &filled,
                [8, 1],
                plan,
                &format!("{storage:?}"),
            );
        }
    }
    let filled = fill::<attn::f16>(
        &client,
        &mut rng,
        Storage::PagedFp8(64),
        2,
        128,
        128,
        &lengths,
    );
    check_fp8::<Gqa8F16>(&client, &mut rng, &filled, [16, 4], None, "PagedFp8(64)");
}

/// fp8 pools an engine filled itself: the codes and tables of caches filled through appends,
/// wrapped again with `Fp8Pool::from_codes` and `KvCache::from_*_parts_fp8`, decode to the same
/// bits, take further appends as the originals do, and bad parts are typed errors.
#[test]
fn fp8_pools_from_their_parts() {
    let client = client();
    let (mut rng, _) = seeded_rng("fp8_pools_from_their_parts");
    let lengths = ragged(&mut rng, 3, 400);
    for storage in [Storage::PagedFp8(32), Storage::ContiguousFp8] {
        let mut filled = fill::<f32>(&client, &mut rng, storage, 2, 64, 64, &lengths);
        let cache = &mut filled.cache;
        let pool = |p: &attn::KvPool<f32>| {
            let p = p.fp8().expect("an fp8 pool");
            Fp8Pool::from_codes(&client, &p.to_bytes(&client), p.shape(), p.scales())
                .expect("valid codes")
        };
        let pools = [pool(cache.k()), pool(cache.v())];
        let mut rebuilt = match cache.block_table() {
            Some(table) => KvCache::from_paged_parts_fp8(
                &client,
                pools,
                PageTable {
                    page_size: cache.page_size().expect("paged"),
                    block_table: table.to_vec(),
                    max_pages: table.len() / cache.batch(),
                },
                cache.lengths().to_vec(),
            ),
            None => KvCache::from_contiguous_parts_fp8(&client, pools, cache.lengths().to_vec()),
        }
        .expect("valid parts");
        assert!(rebuilt.is_fp8());
        let (batch, heads_kv) = (cache.batch(), cache.heads_kv());
        let q_shape = [batch, 8, 1, 64];
        let none = Inputs::default();
        // Decode, then append a token to both (encoded with the pools' scales) and decode again.
        for round in 0..2 {
            if round == 1 {
                let shape = [batch, heads_kv, 1, 64];
                let kh: Vec<f32> = random_vec(&mut rng, shape.iter().product());
                let vh: Vec<f32> = random_vec(&mut rng, shape.iter().product());
                let (kt, vt) = (
                    Tensor::from_slice(&client, &kh, shape).unwrap(),
                    Tensor::from_slice(&client, &vh, shape).unwrap(),
                );
                cache.append(&client, &kt, &vt, None).expect("room");
                rebuilt.append(&client, &kt, &vt, None).expect("room");
            }
            let qh: Vec<f32> = random_vec(&mut rng, q_shape.iter().product());
            let q = Tensor::from_slice(&client, &qh, q_shape).unwrap();
            let a = attn::decode::<Gqa4Causal>(&client, &q, cache, &none).expect("decode");
            let b = attn::decode::<Gqa4Causal>(&client, &q, &rebuilt, &none).expect("decode");
            assert_eq!(
                a.o.to_vec(&client),
                b.o.to_vec(&client),
                "{storage:?}, round {round}: a cache rebuilt from its parts decodes to other bits"
            );
        }
    }
    // Bad parts, before anything is uploaded or launched.
    let scales = [0.5f32, 0.25];
    let codes = vec![0u8; 2 * 2 * 16 * 64];
    expect_field(
        Fp8Pool::from_codes(&client, &codes[1..], [2, 2, 16, 64], &scales),
        "codes",
    );
    expect_field(
        Fp8Pool::from_codes(&client, &codes[..2 * 2 * 16 * 62], [2, 2, 16, 62], &scales),
        "head_dim",
    );
    expect_field(
        Fp8Pool::from_codes(&client, &codes, [2, 2, 16, 64], &[0.5]),
        "scales",
    );
    expect_field(
        Fp8Pool::from_codes(&client, &codes, [2, 2, 16, 64], &[0.5, -1.0]),
        "scales",
    );
    let k = Fp8Pool::from_codes(&client, &codes, [2, 2, 16, 64], &scales).unwrap();
    let v = Fp8Pool::from_codes(&client, &codes[..2 * 2 * 8 * 64], [2, 2, 8, 64], &scales).unwrap();
    expect_field(
        KvCache::<f32>::from_contiguous_parts_fp8(&client, [k.clone(), v], vec![3, 3]),
        "pages",
    );
    let table = PageTable {
        page_size: 16,
        block_table: vec![0, 5],
        max_pages: 1,
    };
    expect_field(
        KvCache::<f32>::from_paged_parts_fp8(&client, [k.clone(), k], table, vec![3, 3]),
        "block_table",
    );
}

/// A ragged batch in one call: each sequence its own count of query tokens (none, one, a
/// speculative draft, a prompt chunk past 16), rows cut from one `[1, Hq, total, D]` Q by
/// offsets, against paged and contiguous caches, one split and several, causal and a sliding
/// window; every sequence's rows against float64 of a call of its own count.
#[test]
fn ragged_query_counts_in_one_call() {
    let client = client();
    let (mut rng, _) = seeded_rng("ragged_query_counts_in_one_call");
    let lengths = [300, 1, 500, 77, rng.random_range(40..200)];
    let counts = [1, 0, 40, 16, rng.random_range(2..8)];
    for storage in [Storage::Paged(32), Storage::Contiguous] {
        let filled = fill::<f32>(&client, &mut rng, storage, 2, 64, 64, &lengths);
        let label = format!("{storage:?}");
        check_ragged::<Gqa4Causal>(&client, &mut rng, &filled, &counts, &label);
        if matches!(storage, Storage::Paged(_)) {
            check_ragged::<SlidingWindow>(&client, &mut rng, &filled, &counts, &label);
        }
    }
}

attn::attention! {
    /// [`Composed`] in f16: on Hopper, the warpgroup kernel.
    ComposedF16 {
        heads: gqa(group = 2), head_dim: 64, dtype: f16,
        mask: causal & window(left = 300) & key_lengths & |b, h, q, k| (k % 7) != 3 || h == 1,
        alibi: geometric, sinks: per_head,
    }
    /// Llama-3's heads in small, f16: GQA 4, d 128, causal.
    Gqa4F16 { heads: gqa(group = 4), head_dim: 128, dtype: f16, mask: causal }
}

/// 16-bit decoding as the default plan runs it (on Hopper: the warpgroup kernel): every term of
/// the variant space, 1, 5, 16 and 40 query tokens, ragged query counts with prompt chunks,
/// paged (pages of 16, 32 and 256 tokens) and contiguous caches, the default split count and
/// more, against float64.
#[test]
fn sixteen_bit_decoding_on_the_default_kernel() {
    let client = client();
    if !attn::supports::<attn::f16>(&client) {
        println!("f16 is not supported on this device; skipped");
        return;
    }
    let (mut rng, _) = seeded_rng("sixteen_bit_decoding_on_the_default_kernel");
    let lengths = ragged(&mut rng, 3, 1500);
    let lengths: Vec<usize> = lengths.into_iter().map(|l| l.max(40)).collect();
    let none = OwnedInputs::default();
    let cells: [(Storage, &[usize]); 3] = [
        (Storage::Paged(16), &[1, 16, 40]),
        (Storage::Paged(256), &[5]),
        (Storage::Contiguous, &[1, 16]),
    ];
    for (storage, counts) in cells {
        let filled = fill::<attn::f16>(&client, &mut rng, storage, 2, 128, 128, &lengths);
        let label = format!("{storage:?}");
        for &nq in counts {
            check_decode::<Gqa4F16>(&client, &mut rng, &filled, 8, nq, None, &none, &label);
        }
        if !matches!(storage, Storage::Paged(256)) {
            check_ragged::<Gqa4F16>(&client, &mut rng, &filled, &[1, 40, 16], &label);
        }
    }
    check_composed::<ComposedF16>(&client, &mut rng, &lengths, "composed f16");
}

/// Runs `V` on random ragged queries (`counts[b]` tokens of sequence `b`) with the tuned call
/// and with 3 splits, and checks each sequence's rows.
fn check_ragged<V: Variant>(
    client: &ComputeClient,
    rng: &mut StdRng,
    filled: &Filled<V::Elem>,
    counts: &[usize],
    label: &str,
) {
    let cache = &filled.cache;
    let group = match V::SPEC.heads {
        attn::HeadGrouping::Gqa { group } => group as usize,
        _ => 1,
    };
    let (heads_q, d) = (group * cache.heads_kv(), V::SPEC.head_dim as usize);
    let mut offsets = vec![0];
    for c in counts {
        offsets.push(offsets.last().unwrap() + c);
    }
    let total = offsets[counts.len()];
    let qh: Vec<V::Elem> = random_vec(rng, heads_q * total * d);
    let q = Tensor::from_slice(client, &qh, [1, heads_q, total, d]).unwrap();
    let none = Inputs::default();
    let call = DecodeProblem::ragged::<V>(&q, &offsets, cache, &none).expect("a valid call");
    let tuned = attn::decode_ragged::<V>(client, &q, &offsets, cache, &none).expect("launch");
    // Into the caller's buffers: the same tuned call, the same bits; a wrong buffer is refused.
    let into = poisoned::<V::Elem>(client, [1, heads_q, total, d]);
    attn::decode_ragged_into::<V>(client, &q, &offsets, cache, &none, &into).expect("launch");
    assert_eq!(
        into.o.to_vec(client),
        tuned.o.to_vec(client),
        "{label}: decode_ragged_into gives other bits than decode_ragged"
    );
    let wrong = poisoned::<V::Elem>(client, [1, heads_q, total + 1, d]);
    assert!(
        attn::decode_ragged_into::<V>(client, &q, &offsets, cache, &none, &wrong).is_err(),
        "{label}: an output of the wrong shape is refused"
    );
    let default = default_plan(client, &call).unwrap();
    let split = DecodePlan {
        splits: 3,
        ..default
    };
    let pinned = poisoned::<V::Elem>(client, [1, heads_q, total, d]);
    attn::decode::decode_call_with_plan::<V>(client, &call, &q, cache, split, &pinned)
        .expect("launch");
    for (how, out) in [("tuned", &tuned), ("3 splits", &pinned)] {
        verify_ragged::<V>(
            client,
            filled,
            &qh,
            &offsets,
            out,
            &format!("{label} {how}"),
        );
    }
    // Packed tokens as a framework holds them, `[total, Hq, D]` (a `[1, N, H, D]` view): the same
    // rows, so the same bits.
    let mut token_major = qh.clone();
    for h in 0..heads_q {
        for t in 0..total {
            let (from, to) = ((h * total + t) * d, (t * heads_q + h) * d);
            token_major[to..to + d].copy_from_slice(&qh[from..from + d]);
        }
    }
    let q_nhd = Tensor::from_slice_bnhd(client, &token_major, [1, total, heads_q, d]).unwrap();
    let strided = poisoned::<V::Elem>(client, [1, heads_q, total, d]);
    let call_nhd = DecodeProblem::ragged::<V>(&q_nhd, &offsets, cache, &none).expect("a call");
    attn::decode::decode_call_with_plan::<V>(client, &call_nhd, &q_nhd, cache, split, &strided)
        .expect("launch");
    assert_eq!(
        strided.o.to_vec(client),
        pinned.o.to_vec(client),
        "{label}: Q as [total, Hq, D] gives other bits than [Hq, total, D]"
    );
    // Offsets that cannot cut Q are refused before anything runs.
    let n = counts.len();
    let mut short = offsets.clone();
    short.pop();
    let mut late = offsets.clone();
    late[0] = 1;
    let mut falling = offsets.clone();
    falling[2] = falling[1] + 1;
    falling[1] = falling[2] + 1;
    let mut past = offsets.clone();
    past[n] += 1;
    for bad in [short, late, falling, past] {
        match DecodeProblem::ragged::<V>(&q, &bad, cache, &none) {
            Err(AttnError::Input {
                input: "q_offsets", ..
            }) => {}
            other => panic!("{label}: offsets {bad:?} gave {other:?}"),
        }
    }
    let two = Tensor::<V::Elem>::empty(client, [2, heads_q, total, d]);
    assert!(matches!(
        DecodeProblem::ragged::<V>(&two, &offsets, cache, &none),
        Err(AttnError::DimMismatch { .. })
    ));
}

/// Checks a ragged call's output: each sequence's rows of O and the LSE (cut by `offsets` from
/// `[1, Hq, total, ·]`) against float64 of a call of its own count of tokens, `qh` its queries.
fn verify_ragged<V: Variant>(
    client: &ComputeClient,
    filled: &Filled<V::Elem>,
    qh: &[V::Elem],
    offsets: &[usize],
    out: &Output<V::Elem>,
    label: &str,
) {
    let cache = &filled.cache;
    let none = Inputs::default();
    let [_, heads_q, total, d] = out.o.shape();
    let o = widen(&out.o.to_vec(client));
    let lse: Vec<f64> = out.lse.to_vec(client).into_iter().map(f64::from).collect();
    let (mut got, mut want, mut naive) = (Vec::new(), Vec::new(), Vec::new());
    let (mut got_lse, mut want_lse) = (Vec::new(), Vec::new());
    for b in 0..cache.batch() {
        let n = offsets[b + 1] - offsets[b];
        if n == 0 {
            continue;
        }
        // Sequence b's rows as a call of n tokens per sequence would take them.
        let shape = [cache.batch(), heads_q, n, d];
        let q_rect = Tensor::<V::Elem>::empty(client, shape);
        let rect = DecodeProblem::new::<V>(&q_rect, cache, &none).expect("a call");
        let mut qf = vec![0.0; shape.iter().product()];
        for h in 0..heads_q {
            for t in 0..n {
                let from = (h * total + offsets[b] + t) * d;
                let to = ((b * heads_q + h) * n + t) * d;
                for c in 0..d {
                    qf[to + c] = qh[from + c].to_f64();
                }
            }
        }
        let reference = decode_f64::<V>(&rect, &none, &qf, &filled.k, &filled.v);
        let low = decode_naive::<V>(&rect, &none, &qf, &filled.k, &filled.v);
        for h in 0..heads_q {
            for t in 0..n {
                let at = (h * total + offsets[b] + t) * d;
                let row = (b * heads_q + h) * n + t;
                assert!(
                    o[at..at + d].iter().all(|x| !x.is_nan()),
                    "{label}: O of sequence {b}, head {h}, token {t} not written"
                );
                got.extend_from_slice(&o[at..at + d]);
                want.extend_from_slice(&reference.o[row * d..(row + 1) * d]);
                naive.extend_from_slice(&low[row * d..(row + 1) * d]);
                got_lse.push(lse[h * total + offsets[b] + t]);
                want_lse.push(reference.lse[row]);
            }
        }
    }
    let verdict = Verdict::new(&got, &want, &naive, error_floor::<V::Elem>());
    let lse_error = max_abs_error(&got_lse, &want_lse);
    println!(
        "{label} {}: max |O − f64| {:.2e} (bound {:.2e}), max |LSE − f64| {lse_error:.2e}",
        V::SPEC.name,
        verdict.kernel_error,
        verdict.bound
    );
    assert!(
        verdict.passed(),
        "{label} {}: max |O − f64| = {:.3e} > bound {:.3e}",
        V::SPEC.name,
        verdict.kernel_error,
        verdict.bound
    );
    // The LSE is f32 in every element type; its logits come from rounded Q and K.
    let lse_bound = if V::SPEC.dtype == attn::DType::F32 {
        2e-3
    } else {
        2e-2
    };
    assert!(
        lse_error <= lse_bound,
        "{label}: max |LSE − f64| = {lse_error:.3e}"
    );
}

/// A ragged step planned once (`DecodeStep::ragged`) runs each round's offsets over the same rows
/// — set on the device in place — as the cache grows, run directly and replayed from a graph,
/// each round against float64; offsets it was not planned for are refused.
#[test]
fn a_ragged_step_takes_new_offsets_each_round() {
    let client = client();
    let (mut rng, _) = seeded_rng("a_ragged_step_takes_new_offsets_each_round");
    let rng = &mut rng;
    let lengths = [rng.random_range(100..300), 40, 90];
    let mut filled = fill::<f32>(&client, rng, Storage::Paged(16), 2, 64, 64, &lengths);
    let (heads_q, total, d) = (8, 24, 64);
    let q = Tensor::<f32>::from_slice(
        &client,
        &random_vec(rng, heads_q * total * d),
        [1, heads_q, total, d],
    )
    .unwrap();
    let none = Inputs::default();
    let first = [0, 1, 17, 24];
    let step = attn::DecodeStep::<Gqa4Causal>::ragged(&client, &q, &first, &filled.cache, &none)
        .expect("a ragged step");
    let out = poisoned::<f32>(&client, [1, heads_q, total, d]);
    let rounds: [[usize; 4]; 4] = [
        [0, 8, 16, 24],
        [0, 0, 12, 24],
        [0, 16, 16, 24],
        [0, 3, 10, 24],
    ];
    let graph = step
        .capture(&client, &q, &filled.cache, &out)
        .expect("the GPU-less back end records graphs");
    for (round, offsets) in rounds.iter().enumerate() {
        append_random(&client, rng, &mut filled, 2, &[2, 1, 0]);
        let qh: Vec<f32> = random_vec(rng, heads_q * total * d);
        q.write(&client, &qh).unwrap();
        step.set_offsets(&client, offsets)
            .expect("offsets within the plan");
        out.o
            .write(&client, &vec![f32::NAN; heads_q * total * d])
            .unwrap();
        if round % 2 == 0 {
            step.run(&client, &q, &filled.cache, &out).expect("a run");
        } else {
            unsafe { graph.replay() }.expect("a replay");
        }
        let label = format!(
            "round {round}, offsets {offsets:?}, lengths {:?}",
            filled.cache.lengths()
        );
        verify_ragged::<Gqa4Causal>(&client, &filled, &qh, offsets, &out, &label);
    }
    // More tokens for one sequence than planned, other rows, another step's kind: refused.
    for bad in [[0, 0, 0, 24], [0, 1, 2, 20]] {
        assert!(matches!(
            step.set_offsets(&client, &bad),
            Err(AttnError::Input {
                input: "q_offsets",
                ..
            })
        ));
    }
    let rect_q = Tensor::<f32>::empty(&client, [3, heads_q, 1, d]);
    let rect = attn::DecodeStep::<Gqa4Causal>::new(&client, &rect_q, &filled.cache, &none).unwrap();
    assert!(matches!(
        rect.set_offsets(&client, &first),
        Err(AttnError::Unsupported(_))
    ));
}

/// The kernels' e4m3 arithmetic at every code, with scales of 1: appended K holds each tie
/// between neighbouring codes (to the even one), values past 448, infinities and −0, and its
/// bytes must be the host encoder's; appended V holds every code's value, and sequences of one
/// token return their V row as O, so the decode kernel must read every code (subnormals and
/// ±448 included) exactly as the host decoder does.
#[test]
fn fp8_codes_through_append_and_decode() {
    let client = client();
    let (mut rng, _) = seeded_rng("fp8_codes_through_append_and_decode");
    let (batch, d) = (4, 64);
    let decode_byte = attn::fp8::decode;
    let mut v_values: Vec<f32> = (0..=255u8)
        .filter(|b| b & 0x7F != 0x7F)
        .map(decode_byte)
        .collect();
    v_values.extend([1000.0, -1e-9]);
    let mut k_values: Vec<f32> = (0..0x7Eu8)
        .flat_map(|b| {
            let tie = (decode_byte(b) + decode_byte(b + 1)) / 2.0;
            [tie, -tie]
        })
        .collect();
    k_values.extend([f32::INFINITY, f32::NEG_INFINITY, 1e-30, -0.0]);
    assert_eq!((v_values.len(), k_values.len()), (batch * d, batch * d));
    // Shuffled, so no code sits at a fixed column.
    v_values.shuffle(&mut rng);
    k_values.shuffle(&mut rng);
    let mut cache = KvCache::<f32>::contiguous_fp8(
        &client,
        [batch, 1, 3],
        d,
        d,
        &KvScales::uniform(1, 1.0, 1.0),
    )
    .expect("a cache");
    let upload = |values: &[f32]| Tensor::from_slice(&client, values, [batch, 1, 1, d]).unwrap();
    cache
        .append(&client, &upload(&k_values), &upload(&v_values), None)
        .expect("room");
    let stored = |pool: &attn::KvPool<f32>| pool.fp8().unwrap().to_bytes(&client);
    for (name, bytes, values) in [
        ("K", stored(cache.k()), &k_values),
        ("V", stored(cache.v()), &v_values),
    ] {
        for b in 0..batch {
            for c in 0..d {
                let x = values[b * d + c];
                assert_eq!(
                    bytes[b * 3 * d + c],
                    attn::fp8::encode(x),
                    "{name}: {x} (sequence {b}, column {c})"
                );
            }
        }
    }
    let q_host: Vec<f32> = random_vec(&mut rng, batch * 4 * d);
    let q = Tensor::from_slice(&client, &q_host, [batch, 4, 1, d]).unwrap();
    let out = poisoned::<f32>(&client, [batch, 4, 1, d]);
    let call = DecodeProblem::new::<Gqa4Causal>(&q, &cache, &Inputs::default()).unwrap();
    let plan = default_plan(&client, &call).unwrap();
    attn::decode_with_plan::<Gqa4Causal>(&client, &q, &cache, &Inputs::default(), plan, &out)
        .expect("launch");
    let o = out.o.to_vec(&client);
    for b in 0..batch {
        for h in 0..4 {
            for c in 0..d {
                let want = decode_byte(attn::fp8::encode(v_values[b * d + c]));
                let got = o[(b * 4 + h) * d + c];
                // Equal as values: the sum that forms O starts at +0, so −0 comes out as +0.
                assert!(
                    got == want,
                    "O of sequence {b}, head {h}, column {c}: {got}, but V holds {want}"
                );
            }
        }
    }
}

/// The default plan for one query token of `heads_q` heads against `filled`, with `splits` key
/// splits.
fn plan_with_splits<V: Variant>(
    client: &ComputeClient,
    filled: &Filled<V::Elem>,
    heads_q: usize,
    splits: usize,
) -> DecodePlan {
    let d = V::SPEC.head_dim as usize;
    let q = Tensor::<V::Elem>::empty(client, [filled.cache.batch(), heads_q, 1, d]);
    let call = DecodeProblem::new::<V>(&q, &filled.cache, &Inputs::default()).expect("a call");
    DecodePlan {
        splits,
        ..default_plan(client, &call).expect("a plan")
    }
}

#[test]
fn bf16_where_supported() {
    let client = client();
    if !attn::supports::<attn::bf16>(&client) {
        // A cache of a type the device lacks refuses appends before anything launches.
        let mut cache = KvCache::<attn::bf16>::contiguous(&client, 1, 1, 8, 64, 64).unwrap();
        let new = Tensor::<attn::bf16>::empty(&client, [1, 1, 2, 64]);
        let refused = cache.append(&client, &new, &new, None);
        assert!(
            matches!(refused, Err(AttnError::Unsupported(_))),
            "expected unsupported, got {refused:?}"
        );
        println!("bf16 is not supported on this device; skipped");
        return;
    }
    let (mut rng, _) = seeded_rng("bf16_where_supported");
    let lengths = ragged(&mut rng, 2, 1000);
    let filled = fill(&client, &mut rng, Storage::Paged(128), 2, 64, 64, &lengths);
    check_decode::<Bf16>(
        &client,
        &mut rng,
        &filled,
        8,
        1,
        None,
        &OwnedInputs::default(),
        "bf16",
    );
}

#[test]
fn merge_of_disjoint_keys_is_the_whole() {
    let client = client();
    let (mut rng, _) = seeded_rng("merge_of_disjoint_keys_is_the_whole");
    let batch = 3;
    let (heads_kv, heads_q, d) = (2, 8, 64);
    let prefix = [0, rng.random_range(1..300), rng.random_range(300..900)];
    let suffix = [rng.random_range(1..400), rng.random_range(1..400), 0];
    let whole: Vec<usize> = prefix.iter().zip(&suffix).map(|(a, b)| a + b).collect();
    let filled_whole = fill::<f32>(
        &client,
        &mut rng,
        Storage::Paged(16),
        heads_kv,
        d,
        d,
        &whole,
    );
    // The two parts hold exactly the whole cache's tokens, split at the prefix length.
    let cap = filled_whole.cache.capacity();
    let part = |from: &dyn Fn(usize) -> usize, lens: &[usize]| {
        let longest = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut k = vec![0f32; batch * heads_kv * longest * d];
        let mut v = k.clone();
        for (b, &len) in lens.iter().enumerate() {
            for h in 0..heads_kv {
                for t in 0..len {
                    let src = ((b * heads_kv + h) * cap + from(b) + t) * d;
                    let dst = ((b * heads_kv + h) * longest + t) * d;
                    for c in 0..d {
                        k[dst + c] = filled_whole.k[src + c] as f32;
                        v[dst + c] = filled_whole.v[src + c] as f32;
                    }
                }
            }
        }
        let shape = [batch, heads_kv, longest, d];
        KvCache::from_contiguous_parts(
            Tensor::from_slice(&client, &k, shape).unwrap(),
            Tensor::from_slice(&client, &v, shape).unwrap(),
            lens.to_vec(),
        )
        .unwrap()
    };
    let a = part(&|_| 0, &prefix);
    let b = part(&|b| prefix[b], &suffix);
    let qh: Vec<f32> = random_vec(&mut rng, batch * heads_q * d);
    let q = Tensor::from_slice(&client, &qh, [batch, heads_q, 1, d]).unwrap();
    let none = Inputs::default();
    let out_a = attn::decode::<Plain>(&client, &q, &a, &none).unwrap();
    let out_b = attn::decode::<Plain>(&client, &q, &b, &none).unwrap();
    let merged = attn::merge(&client, &out_a, &out_b).unwrap();

    let call = DecodeProblem::new::<Plain>(&q, &filled_whole.cache, &none).unwrap();
    let qf = widen(&qh);
    let reference = decode_f64::<Plain>(&call, &none, &qf, &filled_whole.k, &filled_whole.v);
    let naive = decode_naive::<Plain>(&call, &none, &qf, &filled_whole.k, &filled_whole.v);
    let o = widen(&merged.o.to_vec(&client));
    let verdict = Verdict::new(&o, &reference.o, &naive, error_floor::<f32>());
    assert!(
        verdict.passed(),
        "merged: max |O − f64| = {:.3e} > bound {:.3e}",
        verdict.kernel_error,
        verdict.bound
    );
    let lse: Vec<f64> = merged
        .lse
        .to_vec(&client)
        .into_iter()
        .map(f64::from)
        .collect();
    let lse_error = max_abs_error(&lse, &reference.lse);
    assert!(
        lse_error <= 1e-4,
        "merged: max |LSE − f64| = {lse_error:.3e}"
    );
    // A part that saw nothing (sequence 0's prefix, sequence 2's suffix) carries LSE −∞.
    let lse_a = out_a.lse.to_vec(&client);
    assert!(lse_a[..heads_q].iter().all(|&x| x == f32::NEG_INFINITY));
    println!(
        "merge: max |O − f64| {:.2e}, max |LSE − f64| {lse_error:.2e}",
        verdict.kernel_error
    );
}

#[test]
fn appends_land_where_the_block_table_says() {
    let client = client();
    let (mut rng, _) = seeded_rng("appends_land_where_the_block_table_says");
    let page_size = rng.random_range(16..=40);
    let lengths = ragged(&mut rng, 3, 200);
    let (heads_kv, d) = (2, 64);
    let filled = fill::<f32>(
        &client,
        &mut rng,
        Storage::Paged(page_size),
        heads_kv,
        d,
        d,
        &lengths,
    );
    let pool = filled
        .cache
        .k()
        .native()
        .expect("a native cache")
        .to_vec(&client);
    let table = filled.cache.block_table().unwrap();
    let max_pages = table.len() / lengths.len();
    let cap = filled.cache.capacity();
    for (b, &len) in lengths.iter().enumerate() {
        for pos in 0..len {
            let page = table[b * max_pages + pos / page_size];
            assert!(page >= 0, "sequence {b} position {pos} has no page");
            for h in 0..heads_kv {
                let at = ((page as usize * heads_kv + h) * page_size + pos % page_size) * d;
                let want = ((b * heads_kv + h) * cap + pos) * d;
                for c in 0..d {
                    assert_eq!(
                        pool[at + c] as f64,
                        filled.k[want + c],
                        "seq {b} pos {pos} head {h} col {c}"
                    );
                }
            }
        }
    }
    // Released pages go back to the pool and are handed out again.
    let mut cache = filled.cache;
    let before = cache.free_pages();
    let held = lengths[0].div_ceil(page_size);
    cache.release(0).unwrap();
    assert_eq!(cache.free_pages(), before + held);
    assert_eq!(cache.lengths()[0], 0);
}

/// `result` is an [`AttnError::KvCache`] naming `field`.
fn expect_field<T: std::fmt::Debug>(result: Result<T, AttnError>, field: &str) {
    match result {
        Err(AttnError::KvCache { field: found, .. }) if found == field => {}
        other => panic!("expected a kv cache error about {field}, got {other:?}"),
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let client = client();
    let layout = PagedLayout {
        batch: 2,
        heads_kv: 2,
        head_dim: 64,
        value_dim: 64,
        page_size: 16,
        pages: 4,
        max_pages: 2,
    };
    for page_size in [0, 8, 15, 257, 1024] {
        expect_field(
            KvCache::<f32>::paged(
                &client,
                PagedLayout {
                    page_size,
                    ..layout
                },
            ),
            "page_size",
        );
    }
    let pool = |pages| Tensor::<f32>::empty(&client, [pages, 2, 16, 64]);
    // A block table pointing past the pool.
    expect_field(
        KvCache::from_paged_parts(pool(4), pool(4), 16, vec![0, 4, 1, -1], 2, vec![20, 3]),
        "block_table",
    );
    // A page held twice.
    expect_field(
        KvCache::from_paged_parts(pool(4), pool(4), 16, vec![0, 1, 1, -1], 2, vec![20, 3]),
        "block_table",
    );
    // Lengths longer than the table allows, or than the pages given.
    expect_field(
        KvCache::from_paged_parts(pool(4), pool(4), 16, vec![0, 1, 2, -1], 2, vec![33, 3]),
        "lengths",
    );
    expect_field(
        KvCache::from_paged_parts(pool(4), pool(4), 16, vec![0, -1, 2, -1], 2, vec![20, 3]),
        "block_table",
    );
    // Pools whose pages are not the page size, and K/V pools that disagree.
    expect_field(
        KvCache::from_paged_parts(pool(4), pool(4), 32, vec![0, 1, 2, 3], 2, vec![0, 0]),
        "page_size",
    );
    expect_field(
        KvCache::from_paged_parts(pool(4), pool(3), 16, vec![0, 1, 2, 3], 2, vec![0, 0]),
        "pages",
    );

    // Appends: more tokens than the table can hold, more pages than the pool has.
    let mut cache = KvCache::<f32>::paged(&client, layout).unwrap();
    let new = |n| Tensor::<f32>::empty(&client, [2, 2, n, 64]);
    expect_field(cache.append(&client, &new(33), &new(33), None), "lengths");
    let mut small = KvCache::<f32>::paged(&client, PagedLayout { pages: 3, ..layout }).unwrap();
    expect_field(small.append(&client, &new(20), &new(20), None), "pages");
    assert_eq!(small.lengths(), [0, 0], "a refused append changes nothing");
    expect_field(
        cache.append(&client, &new(4), &new(4), Some(&[5, 1])),
        "append",
    );
    let narrow = Tensor::<f32>::empty(&client, [2, 2, 4, 32]);
    expect_field(cache.append(&client, &narrow, &new(4), None), "append");
    // Pages of another sequence cannot be given out.
    cache.append(&client, &new(4), &new(4), None).unwrap();
    let held = cache.block_table().unwrap()[0];
    expect_field(cache.set_pages(1, &[held]), "block_table");

    // Calls: wrong head dim, wrong batch, wrong grouping, key lengths past the cache, documents.
    let q = |shape| Tensor::<f32>::empty(&client, shape);
    let none = Inputs::default();
    for shape in [[2, 8, 1, 32], [3, 8, 1, 64], [2, 6, 1, 64]] {
        let err = attn::decode::<Gqa4Causal>(&client, &q(shape), &cache, &none).unwrap_err();
        assert!(
            matches!(
                err,
                AttnError::DimMismatch { .. } | AttnError::HeadGrouping { .. }
            ),
            "{shape:?}: {err}"
        );
    }
    let too_long = [5, 0];
    let inputs = Inputs {
        key_lengths: Some(&too_long),
        sinks: Some(&[0.0; 4]),
        ..Inputs::default()
    };
    match attn::decode::<Composed>(&client, &q([2, 4, 1, 64]), &cache, &inputs) {
        Err(AttnError::Input {
            input: "key_lengths",
            ..
        }) => {}
        other => panic!("expected a key_lengths error, got {other:?}"),
    }
    match attn::decode::<Docs>(&client, &q([2, 2, 1, 64]), &cache, &none) {
        Err(AttnError::Unsupported(_)) => {}
        other => panic!("expected unsupported, got {other:?}"),
    }
    // A plan the device cannot run.
    let call = DecodeProblem::new::<Gqa4Causal>(&q([2, 8, 1, 64]), &cache, &none).unwrap();
    let plan = DecodePlan {
        kernel: DecodeKernel::Units(DecodeTiling {
            rows: 4,
            units: 1 << 20,
            chunk: 8,
        }),
        splits: 1,
    };
    assert!(matches!(
        check_plan(&client, &call, plan),
        Err(AttnError::Unsupported(_))
    ));
    // The warpgroup kernel on a device without warpgroup MMAs (or an f32 variant): refused by the
    // check, and by a call before anything launches.
    let warpgroup = DecodePlan {
        kernel: DecodeKernel::Warpgroup { block_kv: 128 },
        splits: 1,
    };
    assert!(matches!(
        check_plan(&client, &call, warpgroup),
        Err(AttnError::Unsupported(_))
    ));
    let untouched = poisoned::<f32>(&client, [2, 8, 1, 64]);
    assert!(matches!(
        attn::decode_with_plan::<Gqa4Causal>(
            &client,
            &q([2, 8, 1, 64]),
            &cache,
            &none,
            warpgroup,
            &untouched
        ),
        Err(AttnError::Unsupported(_))
    ));
    assert!(untouched.o.to_vec(&client).iter().all(|x| x.is_nan()));
    let out = poisoned::<f32>(&client, [2, 8, 1, 64]);
    assert!(attn::decode_with_plan::<Gqa4Causal>(
        &client,
        &q([2, 8, 1, 64]),
        &cache,
        &none,
        plan,
        &out
    )
    .is_err());
    // fp8 caches: head dims packed in fours, one positive finite scale per head for K and V; a
    // step planned for a 16-bit cache refuses an fp8 one of the same shape.
    let scales = KvScales::uniform(2, 0.01, 0.02);
    expect_field(
        KvCache::<f32>::contiguous_fp8(&client, [2, 2, 8], 62, 64, &scales),
        "head_dim",
    );
    expect_field(
        KvCache::<f32>::contiguous_fp8(&client, [2, 3, 8], 64, 64, &scales),
        "scales",
    );
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut wrong = scales.clone();
        wrong.v[1] = bad;
        expect_field(
            KvCache::<f32>::contiguous_fp8(&client, [2, 2, 8], 64, 64, &wrong),
            "scales",
        );
    }
    let fp8_layout = PagedLayout {
        batch: 2,
        heads_kv: 2,
        head_dim: 64,
        value_dim: 64,
        page_size: 8,
        pages: 4,
        max_pages: 2,
    };
    expect_field(
        KvCache::<f32>::paged_fp8(&client, fp8_layout, &scales),
        "page_size",
    );
    let native = KvCache::<f32>::contiguous(&client, 2, 2, 40, 64, 64).unwrap();
    let mut fp8 = KvCache::<f32>::contiguous_fp8(&client, [2, 2, 40], 64, 64, &scales).unwrap();
    let new_tokens = Tensor::from_slice(&client, &[0.5f32; 2 * 2 * 3 * 64], [2, 2, 3, 64]).unwrap();
    fp8.append(&client, &new_tokens, &new_tokens, None).unwrap();
    let step =
        attn::DecodeStep::<Gqa4Causal>::new(&client, &q([2, 8, 1, 64]), &native, &none).unwrap();
    let out = poisoned::<f32>(&client, [2, 8, 1, 64]);
    match step.run(&client, &q([2, 8, 1, 64]), &fp8, &out) {
        Err(AttnError::Unsupported(m)) => assert!(m.contains("fp8"), "{m}"),
        other => panic!("expected the step to refuse an fp8 cache, got {other:?}"),
    }
}

/// One decode step planned once serves the cache as it grows: appends of one count and ragged
/// ones, a truncated sequence and a released one (host-side changes the step picks up from the
/// cache's device copies), each run checked against float64; a query or a cache of another shape
/// is a typed error. (That a run allocates nothing is shown on the GPU, where a CUDA graph capture
/// of it would fail otherwise: `bench --decode-step`.)
fn a_planned_step_follows<V: Variant>(
    client: &ComputeClient,
    rng: &mut StdRng,
    storage: Storage,
    (heads_q, heads_kv): (usize, usize),
    inputs: &OwnedInputs,
) {
    let spec = V::SPEC;
    let (d, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let lengths = [rng.random_range(300..700), 9, rng.random_range(40..200)];
    let mut filled = fill::<V::Elem>(client, rng, storage, heads_kv, d, dv, &lengths);
    let nq = 1;
    let q_shape = [lengths.len(), heads_q, nq, d];
    let run_inputs = inputs.view();
    let empty = Tensor::<V::Elem>::empty(client, q_shape);
    let call = DecodeProblem::new::<V>(&empty, &filled.cache, &run_inputs).expect("a call");
    let plan = DecodePlan {
        splits: 4,
        ..default_plan(client, &call).expect("a plan")
    };
    let step = attn::DecodeStep::<V>::with_plan(client, &empty, &filled.cache, &run_inputs, plan)
        .expect("a step");
    let out = poisoned::<V::Elem>(client, call.problem.out_shape());
    for round in 0..5 {
        match round {
            0 => {}
            // One token each.
            1 | 3 => append_random(client, rng, &mut filled, 1, &[1, 1, 1]),
            // Ragged: two, none, one.
            2 => append_random(client, rng, &mut filled, 2, &[2, 0, 1]),
            // A rejected draft: the longest sequence cut back; the shortest one released.
            _ => {
                let len = filled.cache.lengths()[0];
                filled.cache.truncate(0, len - 3).expect("a shorter length");
                filled.cache.release(1).expect("a sequence");
            }
        }
        let qh: Vec<V::Elem> = random_vec(rng, q_shape.iter().product());
        let q = Tensor::from_slice(client, &qh, q_shape).expect("shape");
        step.run(client, &q, &filled.cache, &out).expect("a run");
        // The reference: the variant's own key lengths cut to the cache's, as the kernel does.
        let mut now = inputs.clone();
        if let Some(own) = &mut now.key_lengths {
            for (own, &len) in own.iter_mut().zip(filled.cache.lengths()) {
                *own = (*own).min(len as i32);
            }
        }
        let now = now.view();
        let call = DecodeProblem::new::<V>(&q, &filled.cache, &now).expect("a call");
        let label = format!(
            "planned step, round {round}, {storage:?}, lengths {:?}, {}",
            filled.cache.lengths(),
            spec.name
        );
        verify::<V>(client, &call, &now, &qh, &filled, &out, &label);
    }

    // Another shape of queries, or another cache: refused before anything launches.
    let wrong_q = Tensor::<V::Elem>::empty(client, [3, heads_q, 2, d]);
    let err = step.run(client, &wrong_q, &filled.cache, &out).unwrap_err();
    assert!(
        matches!(err, AttnError::Unsupported(ref m) if m.contains("planned for")),
        "{err}"
    );
    let other = fill::<V::Elem>(client, rng, Storage::Paged(64), heads_kv, d, dv, &[5, 5, 5]);
    let q = Tensor::<V::Elem>::empty(client, q_shape);
    let err = step.run(client, &q, &other.cache, &out).unwrap_err();
    assert!(
        matches!(err, AttnError::Unsupported(ref m) if m.contains("planned for")),
        "{err}"
    );
}

#[test]
fn a_planned_step_follows_the_cache_as_it_grows() {
    let client = client();
    let (mut rng, _) = seeded_rng("a_planned_step_follows_the_cache_as_it_grows");
    a_planned_step_follows::<Gqa4Causal>(
        &client,
        &mut rng,
        Storage::Paged(16),
        (8, 2),
        &OwnedInputs::default(),
    );
    // The variant's own key lengths (given once, when planned) cut the cache's: the smaller wins.
    let composed = OwnedInputs {
        key_lengths: Some(vec![250, 9, 30]),
        sinks: Some(vec![0.5, -1.0, 2.0, 0.0]),
        ..Default::default()
    };
    a_planned_step_follows::<Composed>(&client, &mut rng, Storage::Contiguous, (4, 2), &composed);
    // An fp8 cache: the step reads the codes its appends encode.
    a_planned_step_follows::<Gqa4Causal>(
        &client,
        &mut rng,
        Storage::ContiguousFp8,
        (8, 2),
        &OwnedInputs::default(),
    );
}

/// A planned step recorded into a graph replays against the cache as it grows: appends between
/// replays (one token each, then ragged), a truncated sequence picked up through the next append,
/// new queries written into the recorded query buffer; every replay checked against float64. A
/// 16-bit cache and an fp8 one (its appends encoded outside the graph, read inside it).
#[test]
fn a_captured_step_replays_as_the_cache_grows() {
    let client = client();
    let (mut rng, _) = seeded_rng("a_captured_step_replays_as_the_cache_grows");
    for storage in [Storage::Paged(16), Storage::PagedFp8(16)] {
        captured_step_replays(&client, &mut rng, storage);
    }
}

fn captured_step_replays(client: &ComputeClient, rng: &mut StdRng, storage: Storage) {
    let client = client.clone();
    let lengths = [rng.random_range(200..600), 17, rng.random_range(30..120)];
    let mut filled = fill::<f32>(&client, rng, storage, 2, 64, 64, &lengths);
    let q_shape = [3, 8, 1, 64];
    let none = OwnedInputs::default();
    let q = Tensor::<f32>::from_slice(&client, &random_vec(rng, 3 * 8 * 64), q_shape).unwrap();
    let call = DecodeProblem::new::<Gqa4Causal>(&q, &filled.cache, &none.view()).unwrap();
    let plan = DecodePlan {
        splits: 4,
        ..default_plan(&client, &call).unwrap()
    };
    let step =
        attn::DecodeStep::<Gqa4Causal>::with_plan(&client, &q, &filled.cache, &none.view(), plan)
            .unwrap();
    let out = poisoned::<f32>(&client, call.problem.out_shape());
    let graph = step
        .capture(&client, &q, &filled.cache, &out)
        .expect("the GPU-less back end records graphs");
    for round in 0..4 {
        match round {
            0 | 1 => append_random(&client, rng, &mut filled, 1, &[1, 1, 1]),
            2 => append_random(&client, rng, &mut filled, 3, &[3, 1, 0]),
            _ => {
                let len = filled.cache.lengths()[0];
                filled.cache.truncate(0, len - 2).unwrap();
                append_random(&client, rng, &mut filled, 1, &[1, 0, 1]);
            }
        }
        let qh: Vec<f32> = random_vec(rng, 3 * 8 * 64);
        q.write(&client, &qh).unwrap();
        // Poisoned again, so a replay that writes nothing fails.
        out.o.write(&client, &vec![f32::NAN; 3 * 8 * 64]).unwrap();
        unsafe { graph.replay() }.expect("a replay");
        let call = DecodeProblem::new::<Gqa4Causal>(&q, &filled.cache, &none.view()).unwrap();
        let label = format!(
            "{storage:?} replay {round}, lengths {:?}",
            filled.cache.lengths()
        );
        verify::<Gqa4Causal>(&client, &call, &none.view(), &qh, &filled, &out, &label);
    }
}

/// A prompt's pages shared by several sequences (parallel samples of one prompt): each decodes
/// its shared prefix and its own suffix (float64), the pool hands out pages only for the
/// suffixes, a shared page is read-only, and it returns to the pool with its last holder.
#[test]
fn a_shared_prefix_is_read_by_every_sequence_that_shares_it() {
    let client = client();
    let (mut rng, _) = seeded_rng("a_shared_prefix_is_read_by_every_sequence_that_shares_it");
    let rng = &mut rng;
    let (heads_kv, d, page) = (2, 64, 16);
    let mut filled = fill::<f32>(
        &client,
        rng,
        Storage::Paged(page),
        heads_kv,
        d,
        d,
        &[70, 0, 0],
    );
    let free_before = filled.cache.free_pages();
    filled.cache.share_prefix(0, 1, 64).unwrap();
    filled.cache.share_prefix(0, 2, 32).unwrap();
    assert_eq!(filled.cache.lengths(), [70, 64, 32]);
    assert_eq!(filled.cache.free_pages(), free_before, "shared, not copied");
    // The host copy: sequences 1 and 2 see sequence 0's first tokens.
    let capacity = filled.cache.capacity();
    for (b, tokens) in [(1, 64), (2, 32)] {
        for (host, w) in [(&mut filled.k, d), (&mut filled.v, d)] {
            for h in 0..heads_kv {
                let src = h * capacity * w;
                let dst = ((b * heads_kv + h) * capacity) * w;
                for i in 0..tokens * w {
                    host[dst + i] = host[src + i];
                }
            }
        }
    }
    // Refusals: part of a page, a sequence that holds tokens, itself; an append into a shared
    // page (after cutting a sequence back inside its shared prefix).
    let err = |r: Result<(), AttnError>| match r {
        Err(AttnError::KvCache { field, reason }) => format!("{field}: {reason}"),
        other => panic!("expected a KvCache error, got {other:?}"),
    };
    assert!(err(filled.cache.share_prefix(0, 2, 40)).contains("whole pages"));
    assert!(err(filled.cache.share_prefix(0, 1, 16)).contains("release it first"));
    assert!(err(filled.cache.share_prefix(1, 1, 16)).contains("itself"));
    filled.cache.truncate(2, 20).unwrap();
    let one = Tensor::<f32>::empty(&client, [3, heads_kv, 1, d]);
    let refused = err(filled.cache.append(&client, &one, &one, Some(&[0, 0, 1])));
    assert!(refused.contains("read-only"), "{refused}");
    assert_eq!(
        filled.cache.lengths(),
        [70, 64, 20],
        "a refused append changes nothing"
    );
    filled.cache.release(2).unwrap();
    filled.cache.share_prefix(0, 2, 32).unwrap();

    // Each sequence's own tokens: into pages of its own.
    append_random(&client, rng, &mut filled, 9, &[5, 9, 3]);
    assert_eq!(filled.cache.lengths(), [75, 73, 35]);
    check_shared(
        &client,
        rng,
        &filled,
        "three sequences, two prefixes shared",
    );
    // The prefix outlives the sequence it came from: of sequence 0's five pages only its last
    // (its own) returns to the pool; the shared ones go with their last holder.
    let free = filled.cache.free_pages();
    filled.cache.release(0).unwrap();
    assert_eq!(filled.cache.free_pages(), free + 1);
    check_shared(&client, rng, &filled, "after the first holder's release");
    filled.cache.release(1).unwrap();
    assert_eq!(
        filled.cache.free_pages(),
        free + 1 + 3,
        "pages 2, 3 and its own"
    );
    filled.cache.release(2).unwrap();
    assert_eq!(
        filled.cache.free_pages(),
        filled.cache.k().shape()[0],
        "all"
    );
    // A table that shares a page at the same entry of two rows (a common prefix) is accepted.
    let pool = |pages| Tensor::<f32>::empty(&client, [pages, heads_kv, page, d]);
    let shared =
        KvCache::from_paged_parts(pool(4), pool(4), page, vec![0, 1, 0, 2], 2, vec![20, 30])
            .unwrap();
    assert_eq!(shared.free_pages(), 1);
}

/// Decodes one token per sequence of `filled` and checks it against float64.
fn check_shared(client: &ComputeClient, rng: &mut StdRng, filled: &Filled<f32>, label: &str) {
    let none = OwnedInputs::default();
    check_decode::<Gqa4Causal>(client, rng, filled, 8, 1, None, &none, label);
}
