//! Numerics: every variant family against the float64 reference on random inputs (fresh seed per
//! run, printed), over odd lengths, Nq ≠ Nk, batch > 1, group sizes 1, 2, 4, 8 and MQA, causal and
//! not, f32 and f16 (and bf16 where the back end has it). Outputs are poisoned with NaN before each
//! run, so an element the kernel failed to write fails the check.
//!
//! The variant space (sliding windows, key lengths, packed documents, prefix-LM, custom mask and
//! score expressions, softcap, ALiBi, sinks, head dims 64–256, V dim ≠ QK dim) is checked by
//! property tests: random shapes (lengths not divisible by any tile, length 1 included) and random
//! run-time inputs (empty and one-token documents included), fresh each run.

use attn::inputs::pack;
use attn::reference::{
    attention_f64, attention_naive, error_floor, max_abs_error, random_vec, seeded_rng, widen,
    OwnedInputs, Verdict,
};
use attn::{ComputeClient, Element, Lse, Output, Problem, Tensor, Tiling, Variant};
use rand::Rng;

attn::attention! {
    /// MHA, no mask, f32.
    MhaF32 { heads: mha, head_dim: 64, dtype: f32 }
    /// MHA, causal (bottom-right), f32.
    MhaCausalF32 { heads: mha, head_dim: 64, dtype: f32, mask: causal }
    /// MHA, no mask, f16.
    MhaF16 { heads: mha, head_dim: 64, dtype: f16 }
    /// MHA, causal (bottom-right), f16.
    MhaCausalF16 { heads: mha, head_dim: 64, dtype: f16, mask: causal }
    /// MHA, causal top-left, f32.
    MhaTopLeftF32 { heads: mha, head_dim: 64, dtype: f32, mask: causal(top_left) }
    /// GQA 2, d 128, f32, causal.
    Gqa2F32 { heads: gqa(group = 2), head_dim: 128, dtype: f32, mask: causal }
    /// GQA 4, d 128, f16.
    Gqa4F16 { heads: gqa(group = 4), head_dim: 128, dtype: f16 }
    /// GQA 4, d 128, f16, causal.
    Gqa4CausalF16 { heads: gqa(group = 4), head_dim: 128, dtype: f16, mask: causal }
    /// GQA 8, d 128, f32.
    Gqa8F32 { heads: gqa(group = 8), head_dim: 128, dtype: f32 }
    /// GQA 5 (a group size that is not a power of two), d 64, f16, causal.
    Gqa5F16 { heads: gqa(group = 5), head_dim: 64, dtype: f16, mask: causal }
    /// MQA, d 128, f32, causal.
    MqaCausalF32 { heads: mqa, head_dim: 128, dtype: f32, mask: causal }
    /// MQA, d 64, f16.
    MqaF16 { heads: mqa, head_dim: 64, dtype: f16 }
    /// MHA in bf16 (checked where the back end supports bf16).
    MhaBf16 { heads: mha, head_dim: 64, dtype: bf16, mask: causal }
    /// One declaration in three element types (bf16 by default), with a score expression their
    /// hooks share.
    Paired { heads: gqa(group = 2), head_dim: 64, dtype: bf16 | f16 | f32, mask: causal, score: |s, b, h, q, k| s * 0.75 }
    /// Several tile candidates, to check each gives the same answer.
    Tiled { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal, tiles: [64 x 32, 32 x 16, 16 x 8, 128 x 32, 1 x 1] }
}

fn client() -> ComputeClient {
    attn::default_client()
}

/// How inputs are laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// `[B, H, N, D]`.
    Bhnd,
    /// `[B, N, H, D]`, viewed through strides.
    Bnhd,
}

/// Uploads `[B, H, N, D]`-ordered host data in the given layout.
fn upload<E: Element>(
    client: &ComputeClient,
    data: &[E],
    shape: [usize; 4],
    layout: Layout,
) -> Tensor<E> {
    match layout {
        Layout::Bhnd => Tensor::from_slice(client, data, shape).expect("fills its shape"),
        Layout::Bnhd => {
            let [b, h, n, d] = shape;
            let mut t = vec![data[0]; data.len()];
            for ib in 0..b {
                for ih in 0..h {
                    for i in 0..n {
                        let src = ((ib * h + ih) * n + i) * d;
                        let dst = ((ib * n + i) * h + ih) * d;
                        t[dst..dst + d].copy_from_slice(&data[src..src + d]);
                    }
                }
            }
            Tensor::from_slice_bnhd(client, &t, [b, n, h, d]).expect("fills its shape")
        }
    }
}

/// Runs `V` on one random problem with one tiling and checks O and LSE against float64.
fn check_with<V: Variant>(
    client: &ComputeClient,
    dims: [usize; 5],
    layout: Layout,
    tiling: Tiling,
) {
    check_inputs::<V>(client, dims, layout, tiling, |_, _| OwnedInputs::default());
}

/// Runs `V` on one random problem with one tiling and run-time inputs made by `inputs` (from the
/// case's generator), and checks O and LSE against float64.
fn check_inputs<V: Variant>(
    client: &ComputeClient,
    dims: [usize; 5],
    layout: Layout,
    tiling: Tiling,
    inputs: impl FnOnce(&mut rand::rngs::StdRng, [usize; 4]) -> OwnedInputs,
) {
    check_run::<V>(client, dims, layout, Some(tiling), inputs);
}

/// [`check_inputs`] with a given tile shape, or (`None`) through the tuned `forward`, which picks
/// its shape through the tuner (timing every candidate in scratch buffers on a miss).
fn check_run<V: Variant>(
    client: &ComputeClient,
    [batch, heads_q, heads_kv, seq_q, seq_k]: [usize; 5],
    layout: Layout,
    tiling: Option<Tiling>,
    inputs: impl FnOnce(&mut rand::rngs::StdRng, [usize; 4]) -> OwnedInputs,
) {
    let spec = V::SPEC;
    let (d, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let label = format!(
        "{} B{batch} H{heads_q}/{heads_kv} Nq{seq_q} Nk{seq_k} {layout:?} {}",
        spec.name,
        tiling.map_or("tuned".to_string(), |t| t.name())
    );
    let (mut rng, _) = seeded_rng(&label);
    let q_shape = [batch, heads_q, seq_q, d];
    let k_shape = [batch, heads_kv, seq_k, d];
    let v_shape = [batch, heads_kv, seq_k, dv];
    let qh: Vec<V::Elem> = random_vec(&mut rng, q_shape.iter().product());
    let kh: Vec<V::Elem> = random_vec(&mut rng, k_shape.iter().product());
    let vh: Vec<V::Elem> = random_vec(&mut rng, v_shape.iter().product());
    let owned = inputs(&mut rng, [batch, heads_q, seq_q, seq_k]);
    let run_inputs = owned.view();
    let q = upload(client, &qh, q_shape, layout);
    let k = upload(client, &kh, k_shape, layout);
    let v = upload(client, &vh, v_shape, layout);

    let problem = Problem::new(&spec, &q, &k, &v).expect("valid problem");
    let packed = pack(&spec, &problem, &run_inputs).expect("valid inputs");
    let poison_o = vec![V::Elem::from_f64(f64::NAN); problem.out_shape().iter().product()];
    let lse_shape = problem.lse_shape();
    let poison_lse = vec![f32::NAN; lse_shape.iter().product()];
    let out = Output {
        o: Tensor::from_slice(client, &poison_o, problem.out_shape()).expect("fills its shape"),
        lse: Lse {
            tensor: Tensor::from_slice(
                client,
                &poison_lse,
                [lse_shape[0], lse_shape[1], lse_shape[2], 1],
            )
            .expect("fills its shape"),
        },
    };
    let out = match tiling {
        Some(tiling) => {
            attn::forward_with_tiling::<V>(client, &q, &k, &v, &run_inputs, tiling, &out)
                .expect("launch");
            out
        }
        None => attn::forward::<V>(client, &q, &k, &v, &run_inputs).expect("tuned launch"),
    };

    let (qf, kf, vf) = (widen(&qh), widen(&kh), widen(&vh));
    let reference = attention_f64::<V>(&problem, &packed, &run_inputs, &qf, &kf, &vf);
    let naive = attention_naive::<V>(&problem, &packed, &run_inputs, &qf, &kf, &vf);
    let o = widen(&out.o.to_vec(client));
    assert!(
        o.iter().all(|x| !x.is_nan()),
        "{label}: an output element was not written (NaN poison left)"
    );
    let verdict = Verdict::new(&o, &reference.o, &naive, error_floor::<V::Elem>());
    assert!(
        verdict.passed(),
        "{label}: max |O − f64| = {:.3e} > bound {:.3e} (naive {}: {:.3e})",
        verdict.kernel_error,
        verdict.bound,
        <V::Elem as Element>::DTYPE.name(),
        verdict.naive_error
    );

    let lse: Vec<f64> = out.lse.to_vec(client).into_iter().map(f64::from).collect();
    for (i, (&got, &want)) in lse.iter().zip(&reference.lse).enumerate() {
        if want == f64::NEG_INFINITY {
            assert_eq!(
                got,
                f64::NEG_INFINITY,
                "{label}: LSE row {i} sees no key, so must be −∞"
            );
            let row = &o[i * dv..(i + 1) * dv];
            assert!(
                row.iter().all(|&x| x == 0.0),
                "{label}: O row {i} sees no key, so must be 0"
            );
        }
    }
    let lse_error = max_abs_error(&lse, &reference.lse);
    assert!(
        lse_error <= 2e-3,
        "{label}: max |LSE − f64| = {lse_error:.3e}"
    );
}

fn check<V: Variant>(client: &ComputeClient, dims: [usize; 5]) {
    let tiling = attn::select_tiling(client, &V::SPEC).expect("a runnable tiling");
    check_with::<V>(client, dims, Layout::Bhnd, tiling);
}

const LENGTHS: [usize; 4] = [1, 17, 128, 1000];

/// Every (Nq, Nk) pair of the length grid, batch 2, two heads.
fn length_grid<V: Variant>() {
    let client = client();
    if !attn::supports::<V::Elem>(&client) {
        println!(
            "{}: {} unsupported on this back end, skipped",
            V::SPEC.name,
            V::SPEC.dtype.name()
        );
        return;
    }
    for nq in LENGTHS {
        for nk in LENGTHS {
            check::<V>(&client, [2, 2, 2, nq, nk]);
        }
    }
}

#[test]
fn mha_f32_length_grid() {
    length_grid::<MhaF32>();
}

#[test]
fn mha_causal_f32_length_grid() {
    length_grid::<MhaCausalF32>();
}

#[test]
fn mha_f16_length_grid() {
    length_grid::<MhaF16>();
}

#[test]
fn mha_causal_f16_length_grid() {
    length_grid::<MhaCausalF16>();
}

#[test]
fn causal_top_left() {
    let client = client();
    for (nq, nk) in [(17, 17), (128, 17), (17, 128), (100, 257)] {
        check::<MhaTopLeftF32>(&client, [1, 3, 3, nq, nk]);
    }
}

#[test]
fn group_sizes_and_mqa() {
    let client = client();
    check::<Gqa2F32>(&client, [2, 4, 2, 129, 300]);
    check::<Gqa2F32>(&client, [1, 2, 1, 300, 129]);
    check::<Gqa4F16>(&client, [2, 8, 2, 17, 1000]);
    check::<Gqa4CausalF16>(&client, [1, 4, 1, 200, 200]);
    check::<Gqa8F32>(&client, [1, 16, 2, 65, 33]);
    check::<Gqa5F16>(&client, [2, 10, 2, 45, 70]);
    check::<MqaCausalF32>(&client, [2, 5, 1, 77, 150]);
    check::<MqaF16>(&client, [1, 7, 1, 1, 1000]);
}

#[test]
fn bnhd_layout_through_strides() {
    let client = client();
    let tiling = attn::select_tiling(&client, &Gqa4F16::SPEC).unwrap();
    check_with::<Gqa4F16>(&client, [2, 8, 2, 33, 90], Layout::Bnhd, tiling);
    let tiling = attn::select_tiling(&client, &MhaCausalF32::SPEC).unwrap();
    check_with::<MhaCausalF32>(&client, [1, 3, 3, 50, 61], Layout::Bnhd, tiling);
}

/// A declaration with several element types: each is its own variant (its own spec, tuning key
/// and registration) over the same expressions, and the inherent launchers pick the element type
/// from the tensors.
#[test]
fn one_declaration_runs_in_each_declared_dtype() {
    use attn::DType;
    assert_eq!(
        <Paired as Variant>::SPEC.dtype,
        DType::BF16,
        "the first is the default"
    );
    assert_eq!(<Paired<attn::f16> as Variant>::SPEC.dtype, DType::F16);
    assert_eq!(<Paired<f32> as Variant>::SPEC.dtype, DType::F32);
    let registered = attn::tune::registered()
        .iter()
        .filter(|r| r.spec.name == "Paired")
        .count();
    assert_eq!(registered, 3, "one registration per element type");

    let client = client();
    check::<Paired<f32>>(&client, [1, 4, 2, 33, 70]);
    check::<Paired<attn::f16>>(&client, [2, 4, 2, 17, 17]);
    if attn::supports::<attn::bf16>(&client) {
        check::<Paired>(&client, [1, 4, 2, 40, 40]);
    }
    // `Paired::forward` on f16 tensors is `Paired<f16>`'s.
    let (mut rng, _seed) = seeded_rng("paired");
    let shape = [1, 2, 19, 64];
    let kv = [1, 1, 19, 64];
    let [q, k, v] = [shape, kv, kv].map(|s| {
        let data: Vec<attn::f16> = random_vec(&mut rng, s.iter().product());
        Tensor::from_slice(&client, &data, s).expect("fills its shape")
    });
    let by_method = Paired::forward(&client, &q, &k, &v).expect("runs");
    let by_type =
        attn::forward::<Paired<attn::f16>>(&client, &q, &k, &v, &Default::default()).expect("runs");
    assert_eq!(by_method.o.to_vec(&client), by_type.o.to_vec(&client));
    // Code generic over the element type, as a model written once for both back ends is.
    fn attend<E: Element>(c: &ComputeClient, qkv: [&Tensor<E>; 3]) -> Output<E>
    where
        Paired<E>: Variant<Elem = E>,
    {
        Paired::<E>::forward(c, qkv[0], qkv[1], qkv[2]).expect("runs")
    }
    let generic = attend(&client, [&q, &k, &v]);
    assert_eq!(generic.o.to_vec(&client), by_type.o.to_vec(&client));
}

/// Bottom-right causal with Nq > Nk: the first Nq − Nk rows see no key.
#[test]
fn fully_masked_rows_are_zero_with_negative_infinite_lse() {
    let client = client();
    check::<MhaCausalF32>(&client, [1, 2, 2, 40, 9]);
    check::<MqaCausalF32>(&client, [1, 3, 1, 33, 1]);
}

/// Every runnable tile candidate gives the reference answer (the tuner relies on this).
#[test]
fn every_tile_candidate_matches_the_reference() {
    let client = client();
    for tiling in attn::runnable_tilings(&client, &Tiled::SPEC) {
        check_with::<Tiled>(&client, [1, 4, 2, 70, 45], Layout::Bhnd, tiling);
    }
}

#[test]
fn bf16_where_supported() {
    length_grid::<MhaBf16>();
}

/// A long, odd length: 3001 queries against 3001 keys (188 K/V steps), causal.
#[test]
fn long_odd_length() {
    let client = client();
    check::<MhaCausalF32>(&client, [1, 1, 1, 3001, 3001]);
}

#[test]
fn a_second_length_needs_no_new_declaration() {
    // Sequence lengths are run-time values: the same variant serves every length.
    let client = client();
    for n in [3, 31, 257] {
        check::<MhaCausalF32>(&client, [1, 1, 1, n, n]);
    }
}

// ---------------------------------------------------------------------------------------------
// The variant space
// ---------------------------------------------------------------------------------------------

attn::attention! {
    /// Mistral-like: GQA 2, causal, window of 24 keys, f32.
    WindowCausal { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal & window(left = 23) }
    /// A two-sided window without causal (bidirectional local attention), f16.
    WindowBoth { heads: mha, head_dim: 64, dtype: f16, mask: window(left = 9, right = 30) }
    /// Key lengths (padding), f32.
    KeyLengths { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: key_lengths }
    /// Causal with key lengths, top-left, f16.
    KeyLengthsCausal { heads: mha, head_dim: 64, dtype: f16, mask: causal(top_left) & key_lengths }
    /// Packed documents, causal within each, f16.
    Documents { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: causal & documents }
    /// Packed documents, bidirectional within each, f32.
    DocumentsFull { heads: mha, head_dim: 64, dtype: f32, mask: documents }
    /// Prefix-LM, f32.
    PrefixLm { heads: mha, head_dim: 64, dtype: f32, mask: prefix_lm }
    /// The custom mask: a causal band of 32 keys plus the first 4 keys; f32.
    CustomBand { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: |b, h, q, k| q >= k && (q - k) < 32 || k < 4 }
    /// A custom mask whose live steps have gaps inside the causal range: a band of 40 keys, the
    /// first 3 keys, and every key for the rows from 300 on; f16, so the warpgroup kernels run it
    /// where the device has them (their walk fetches only the live steps).
    SparseBand { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: |b, h, q, k| q >= k && ((q - k) < 40 || k < 3 || q >= 300) }
    /// A custom mask reading a per-batch input and a scalar, with `%` (not boundable: every tile
    /// is partial); f16.
    CustomInputs {
        heads: mha, head_dim: 64, dtype: f16,
        inputs: { limit: [i32; batch], stride: i32 },
        mask: |b, h, q, k| (k <= limit[b] && (q + k) % (stride + 2) != 1) || k == q,
    }
    /// Gemma-2-like: softcap with causal, f32.
    Softcap { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal, softcap: 5.0 }
    /// ALiBi with the standard slopes, f16.
    AlibiGeometric { heads: mha, head_dim: 64, dtype: f16, mask: causal, alibi: geometric }
    /// ALiBi with given slopes, no mask (bidirectional distances), f32.
    AlibiGiven { heads: gqa(group = 2), head_dim: 64, dtype: f32, alibi: given }
    /// A relative-position bias as a score expression, per-head tensor input, f32.
    RelativeBias {
        heads: mha, head_dim: 64, dtype: f32, mask: causal,
        inputs: { bias: [f32; heads] },
        score: |s, b, h, q, k| s + bias[h] * ((q - k).min(16) as f32) / 16.0 - if k == 0 { 1.0 } else { 0.0 },
    }
    /// T5's relative bias: a table of 32 buckets per head, read at the bucket of `q − k`
    /// (exact below 8, log-spaced above); f16.
    T5Bias {
        heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: causal,
        inputs: { rel: [f32; heads, 32] },
        score: |s, b, h, q, k| s + rel[h][if q - k < 8 { q - k } else { 8 + (((q - k) as f32 / 8.0).ln() * 6.0) as i32 }],
    }
    /// Tables by position: a document id per token of each sequence (the mask), a bias per
    /// key, and a table of 4 per sequence and head read at a computed index; f32.
    Tables {
        heads: mha, head_dim: 64, dtype: f32,
        inputs: { doc: [i32; batch, seq], kb: [f32; seq], w: [f32; batch, heads, 4] },
        mask: |b, h, q, k| doc[b][q] == doc[b][k] || k == 0,
        score: |s, b, h, q, k| s + kb[k] + w[b][h][(q + k) % 4],
    }
    /// Sinks with a window, f16.
    Sinks { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: causal & window(left = 15), sinks: per_head }
    /// Sinks without any mask, f32.
    SinksOnly { heads: mha, head_dim: 64, dtype: f32, sinks: per_head }
    /// Sinks with key lengths, f32 (rows without keys).
    KeyLengthsSinks { heads: mha, head_dim: 64, dtype: f32, mask: key_lengths, sinks: per_head }
    /// Head dim 96, f16.
    HeadDim96 { heads: gqa(group = 2), head_dim: 96, dtype: f16, mask: causal }
    /// Head dim 192 with V dim 128 (DeepSeek-style), f32.
    Dk192Dv128 { heads: mha, head_dim: 192, value_dim: 128, dtype: f32, mask: causal }
    /// Head dim 256, f16, softcap.
    HeadDim256 { heads: mqa, head_dim: 256, dtype: f16, softcap: 30.0 }
    /// Everything at once: documents, window, custom mask, custom score, ALiBi, sinks, f32.
    Everything {
        heads: gqa(group = 3), head_dim: 64, dtype: f32,
        mask: documents & window(left = 40) & |b, h, q, k| (q - k).abs() <= limit[b] || k < 2,
        alibi: given, sinks: per_head, softcap: 8.0,
        inputs: { limit: [i32; batch], tilt: [f32; heads] },
        score: |s, b, h, q, k| s * 0.5 + tilt[h] * (q as f32 / 50.0).tanh(),
    }
}

/// Property test: `cases` random problems of `V` (fresh shapes each run: lengths 1..=max_len,
/// rarely divisible by a tile; batch 1..=3 or packed documents), random run-time inputs.
fn property<V: Variant>(cases: usize, max_len: usize, heads_kv: usize) {
    let client = client();
    if !attn::supports::<V::Elem>(&client) {
        println!(
            "{}: {} unsupported here, skipped",
            V::SPEC.name,
            V::SPEC.dtype.name()
        );
        return;
    }
    let spec = V::SPEC;
    let (mut rng, _) = seeded_rng(&format!("{} shapes", spec.name));
    let group = match spec.heads {
        attn::HeadGrouping::Mha => 1,
        attn::HeadGrouping::Gqa { group } => group as usize,
        attn::HeadGrouping::Mqa => 3,
    };
    let heads_kv = if spec.heads == attn::HeadGrouping::Mqa {
        1
    } else {
        heads_kv
    };
    let tiling = attn::select_tiling(&client, &spec).expect("a runnable tiling");
    for case in 0..cases {
        // The first case is the smallest possible problem.
        let (seq_q, seq_k) = if case == 0 {
            (1, 1)
        } else {
            let seq_q = rng.random_range(1..=max_len);
            let seq_k = if spec.mask.documents || rng.random_bool(0.5) {
                seq_q
            } else {
                rng.random_range(1..=max_len)
            };
            (seq_q, seq_k)
        };
        let batch = if spec.mask.documents {
            1
        } else {
            rng.random_range(1..=3)
        };
        check_inputs::<V>(
            &client,
            [batch, heads_kv * group, heads_kv, seq_q, seq_k],
            Layout::Bhnd,
            tiling,
            |rng, dims| OwnedInputs::random(&spec, dims, 6, rng),
        );
    }
}

#[test]
fn sliding_windows() {
    property::<WindowCausal>(6, 300, 2);
    property::<WindowBoth>(5, 300, 2);
}

#[test]
fn key_lengths() {
    property::<KeyLengths>(6, 300, 1);
    property::<KeyLengthsCausal>(5, 300, 2);
}

#[test]
fn packed_documents() {
    property::<Documents>(8, 400, 2);
    property::<DocumentsFull>(5, 300, 2);
}

#[test]
fn prefix_lm() {
    property::<PrefixLm>(6, 300, 2);
}

#[test]
fn custom_masks() {
    property::<CustomBand>(6, 400, 1);
    property::<CustomInputs>(5, 300, 2);
}

#[test]
fn score_modifications() {
    property::<Softcap>(4, 300, 1);
    property::<AlibiGeometric>(4, 300, 3);
    property::<AlibiGiven>(4, 300, 2);
    property::<RelativeBias>(4, 300, 2);
}

#[test]
fn tables() {
    property::<T5Bias>(4, 300, 2);
    property::<Tables>(4, 200, 2);
}

#[test]
fn sinks() {
    property::<Sinks>(5, 300, 2);
    property::<SinksOnly>(4, 200, 2);
}

#[test]
fn head_dims_and_value_dim() {
    property::<HeadDim96>(3, 200, 1);
    property::<Dk192Dv128>(3, 200, 2);
    property::<HeadDim256>(3, 200, 1);
}

#[test]
fn everything_composed() {
    property::<Everything>(6, 300, 1);
}

/// No leak across documents: changing one document's keys and values changes no other
/// document's output, bit for bit.
#[test]
fn documents_do_not_leak() {
    let client = client();
    let spec = DocumentsFull::SPEC;
    let (mut rng, _) = seeded_rng("documents_do_not_leak");
    let offsets = vec![0, 1, 70, 70, 150, 211];
    let total = 211;
    let (h, d) = (2, spec.head_dim as usize);
    let shape = [1, h, total, d];
    let qh: Vec<f32> = random_vec(&mut rng, h * total * d);
    let kh: Vec<f32> = random_vec(&mut rng, h * total * d);
    let vh: Vec<f32> = random_vec(&mut rng, h * total * d);
    let inputs = DocumentsFullInputs {
        q_offsets: &offsets,
        k_offsets: &offsets,
    };
    let run = |k: &[f32], v: &[f32]| {
        let q = Tensor::from_slice(&client, &qh, shape).unwrap();
        let k = Tensor::from_slice(&client, k, shape).unwrap();
        let v = Tensor::from_slice(&client, v, shape).unwrap();
        DocumentsFull::forward(&client, &q, &k, &v, &inputs)
            .unwrap()
            .o
            .to_vec(&client)
    };
    let before = run(&kh, &vh);
    // Scramble document 2 (tokens 70..150) of every head with huge values.
    let (mut k2, mut v2) = (kh.clone(), vh.clone());
    for head in 0..h {
        for t in 70..150 {
            for c in 0..d {
                let i = (head * total + t) * d + c;
                k2[i] = 50.0 * (c as f32 - 30.0);
                v2[i] = 1.0e4;
            }
        }
    }
    let after = run(&k2, &v2);
    for head in 0..h {
        for t in (0..70).chain(150..total) {
            let row = (head * total + t) * d;
            assert_eq!(
                before[row..row + d],
                after[row..row + d],
                "head {head} token {t}: output changed when another document's K/V changed"
            );
        }
    }
    let row = 80 * d;
    assert_ne!(
        before[row..row + d],
        after[row..row + d],
        "document 2 itself must change"
    );
}

/// Rows that see no key yield O = 0 and LSE = −∞ (never NaN); with a sink, O = 0 and LSE = the
/// sink's logit.
#[test]
fn rows_without_keys() {
    let client = client();
    let (d, n) = (64, 40);
    let (mut rng, _) = seeded_rng("rows_without_keys");
    let mut upload = |heads: usize| {
        let data = random_vec::<f32>(&mut rng, 2 * heads * n * d);
        Tensor::from_slice(&client, &data, [2, heads, n, d]).unwrap()
    };
    // KeyLengths groups 2 query heads per K/V head; KeyLengthsSinks is MHA.
    let (q2, q1, k, v) = (upload(2), upload(1), upload(1), upload(1));

    // Batch entry 0 has no keys at all, entry 1 has 5.
    let lengths = KeyLengthsInputs {
        key_lengths: &[0, 5],
    };
    let out = KeyLengths::forward(&client, &q2, &k, &v, &lengths).unwrap();
    let (o, lse) = (out.o.to_vec(&client), out.lse.to_vec(&client));
    let rows = 2 * n; // batch entry 0: 2 heads × n rows
    assert!(
        o[..rows * d].iter().all(|&x| x == 0.0),
        "O of a row without keys is 0"
    );
    assert!(
        lse[..rows].iter().all(|&x| x == f32::NEG_INFINITY),
        "its LSE is −∞"
    );
    assert!(o[rows * d..].iter().all(|x| x.is_finite()));
    assert!(lse[rows..].iter().all(|x| x.is_finite()));

    // With a sink, a row without keys still has O = 0, and its LSE is the sink's logit.
    let inputs = KeyLengthsSinksInputs {
        key_lengths: &[0, 5],
        sinks: &[0.75],
    };
    let out = KeyLengthsSinks::forward(&client, &q1, &k, &v, &inputs).unwrap();
    let (o, lse) = (out.o.to_vec(&client), out.lse.to_vec(&client));
    assert!(
        o[..n * d].iter().all(|&x| x == 0.0),
        "O of a row without keys is 0"
    );
    assert!(
        lse[..n].iter().all(|&x| x == 0.75),
        "its LSE is the sink: {:?}",
        &lse[..3]
    );
    assert!(
        lse[n..].iter().all(|&x| x.is_finite() && x > 0.75),
        "the sink joins every LSE"
    );
}

/// The tile classifier the macro derives from a mask expression is sound — a tile it calls empty
/// has no visible pair, a tile it calls full has no hidden one — and sharp enough that tiles are
/// really skipped. Checked on the host form of the same interval code against brute force over
/// random tiles and inputs.
#[test]
fn interval_classification_is_sound_and_skips() {
    fn check<V: Variant>(tiles: usize, expect_skips: bool) {
        let spec = V::SPEC;
        let (mut rng, _) = seeded_rng(&format!("{} classification", spec.name));
        let (mut empty, mut full) = (0, 0);
        for _ in 0..tiles {
            let owned = OwnedInputs::random(&spec, [3, 4, 400, 400], 3, &mut rng);
            let inputs = owned.view();
            let sequences = owned.q_offsets.as_ref().map_or(3, |o| o.len() - 1);
            let b = rng.random_range(0..sequences) as i64;
            let h = rng.random_range(0..4) as i64;
            let q_lo = rng.random_range(0..400i64);
            let k_lo = rng.random_range(0..400i64);
            let (q_hi, k_hi) = (
                q_lo + rng.random_range(0..64),
                k_lo + rng.random_range(0..64),
            );
            let class = V::host_classify(b, h, q_lo, q_hi, k_lo, k_hi, &inputs);
            let pairs = (q_lo..=q_hi).flat_map(|q| (k_lo..=k_hi).map(move |k| (q, k)));
            let visible: Vec<bool> = pairs
                .map(|(q, k)| V::host_mask(b, h, q, k, &inputs))
                .collect();
            match class {
                attn::TILE_EMPTY => {
                    empty += 1;
                    assert!(visible.iter().all(|v| !v), "{}: a tile called empty has a visible pair: b {b} h {h} q {q_lo}..={q_hi} k {k_lo}..={k_hi}", spec.name);
                }
                attn::TILE_FULL => {
                    full += 1;
                    assert!(visible.iter().all(|v| *v), "{}: a tile called full has a hidden pair: b {b} h {h} q {q_lo}..={q_hi} k {k_lo}..={k_hi}", spec.name);
                }
                _ => {}
            }
        }
        println!(
            "{}: {empty} empty and {full} full of {tiles} random tiles",
            spec.name
        );
        if expect_skips {
            assert!(
                empty > 0 && full > 0,
                "{}: the classifier never skipped ({empty} empty, {full} full)",
                spec.name
            );
        }
    }
    check::<CustomBand>(3000, true);
    check::<Everything>(3000, true);
    check::<SparseBand>(3000, true);
    // `%` is not bounded: every tile stays partial (sound, never skips).
    check::<CustomInputs>(200, false);
    assert_eq!(
        CustomInputs::host_classify(0, 0, 0, 0, 0, 0, &attn::Inputs::default()),
        attn::TILE_PARTIAL
    );
}

/// A custom mask that empties steps in the middle of a query block's walk (and query blocks in the
/// middle of a key block's): every tile shape gives the reference answer, the walks that skip
/// from one live step to the next included.
#[test]
fn steps_a_custom_mask_empties_inside_the_walk() {
    let client = client();
    if !attn::supports::<attn::f16>(&client) {
        println!("f16 unsupported here, skipped");
        return;
    }
    for tiling in attn::runnable_tilings(&client, &SparseBand::SPEC) {
        check_with::<SparseBand>(&client, [1, 4, 2, 330, 330], Layout::Bhnd, tiling);
    }
}

/// Every runnable tile shape of a variant composing every mask and score modification gives the
/// reference answer (tile shapes move step and block boundaries across documents, windows and the
/// classifier's tiles).
#[test]
fn every_tile_candidate_of_a_composed_variant() {
    let client = client();
    let spec = Everything::SPEC;
    for tiling in attn::runnable_tilings(&client, &spec) {
        check_inputs::<Everything>(
            &client,
            [1, 3, 1, 203, 203],
            Layout::Bhnd,
            tiling,
            |rng, dims| OwnedInputs::random(&spec, dims, 5, rng),
        );
    }
}

/// The tuner's side: every candidate it may pick for the composed variant on this device, run on
/// the same inputs, gives the reference answer, and so does the tuned `forward` itself (which, on
/// a key it has not seen, times every candidate before running the winner into its output).
#[test]
fn tuned_forward_and_every_tuner_candidate_match_the_reference() {
    let client = client();
    // Tune here too (calls on CPU-emulated devices default to the fallback), into a fresh cache
    // so that the tuned call times every candidate on every run.
    attn::tune::set_policy(attn::tune::Policy::Tune);
    let dir = std::env::temp_dir().join(format!("attn-numerics-tune-{}", std::process::id()));
    assert!(attn::tune::cache::use_dir(&dir), "no tuned call ran before");
    let spec = Everything::SPEC;
    let candidates = attn::tune::candidates(&client, &spec, true).expect("candidates");
    assert!(
        candidates.len() > 1,
        "the composed variant has several candidates here, so the tuned call really tunes"
    );
    assert_eq!(
        candidates[0].tiling,
        attn::select_tiling(&client, &spec).unwrap(),
        "the fallback comes first"
    );
    let dims = [1, 3, 1, 150, 171];
    let random =
        |rng: &mut rand::rngs::StdRng, d: [usize; 4]| OwnedInputs::random(&spec, d, 4, rng);
    for candidate in &candidates {
        check_run::<Everything>(&client, dims, Layout::Bhnd, Some(candidate.tiling), random);
    }
    check_run::<Everything>(&client, dims, Layout::Bhnd, None, random);
    let stored = attn::tune::cache::summary(&client);
    assert!(
        stored.ours >= 1 && stored.records >= 1,
        "the call tuned and stored its key: {stored:?}"
    );
    // A second tuned call of the same key (settled now) and one of a new length in its bucket.
    check_run::<Everything>(&client, [1, 3, 1, 150, 171], Layout::Bhnd, None, random);
    check_run::<Everything>(&client, [1, 3, 1, 141, 160], Layout::Bhnd, None, random);
    let _ = std::fs::remove_dir_all(&dir);
}
