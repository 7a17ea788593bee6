//! The backward pass against float64 gradients on random inputs (fresh seed per run, printed):
//! every mask kind, softcap, ALiBi, sinks (their logits' gradient too), custom score expressions
//! (the macro's derivative, also against finite differences), GQA and MQA (dK and dV summed over each group), a V
//! head dim of its own, odd lengths and Nq ≠ Nk, f32 and f16. Pass criterion as the forward's:
//! max error ≤ 2 × the naive low-precision computation's error + a floor, per gradient; the naive
//! backward takes `D = dO·O` from the forward's stored O, as the kernels do (in f16 that O's error
//! moves a learnable scalar's gradient, a sum over every pair, by about 2 %, the naive's as much
//! as the kernels').

use attn::inputs::pack;
use attn::reference::{
    backward_f64, backward_naive, error_floor, random_vec, seeded_rng, widen, OwnedInputs, Verdict,
};
use attn::{AttnError, ComputeClient, Element, Problem, Tensor, Variant};

attn::attention! {
    /// MHA, causal, f32.
    MhaCausalF32 { heads: mha, head_dim: 64, dtype: f32, mask: causal }
    /// GQA 4, causal with a window, f16.
    Gqa4WindowF16 { heads: gqa(group = 4), head_dim: 64, dtype: f16, mask: causal & window(left = 20) }
    /// GQA 2, softcap, no mask, f16 (d 128).
    SoftcapF16 { heads: gqa(group = 2), head_dim: 128, dtype: f16, softcap: 3.0 }
    /// MHA, ALiBi, causal top-left, f32.
    AlibiF32 { heads: mha, head_dim: 64, dtype: f32, mask: causal(top_left), alibi: geometric }
    /// GQA 2, packed documents, causal, f32.
    DocsF32 { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal & documents }
    /// MQA, key lengths, sinks, f32.
    SinksMqaF32 { heads: mqa, head_dim: 64, dtype: f32, mask: key_lengths, sinks: per_head }
    /// GQA 2, packed documents with sinks, f16 (the sinks' gradient summed over documents).
    SinksDocsF16 { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: causal & documents, sinks: per_head }
    /// GQA 3, V head dim 64 under QK head dim 128, prefix-LM, f32.
    PrefixDvF32 { heads: gqa(group = 3), head_dim: 128, value_dim: 64, dtype: f32, mask: prefix_lm }
    /// MHA, a custom mask expression, f32.
    BandF32 { heads: mha, head_dim: 64, dtype: f32, mask: |b, h, q, k| (q - k) % 3 != 1 && k <= q + 2 }
    /// A custom mask with gaps inside the causal range (a band, the first keys, every key for the
    /// last rows): the warpgroup walks skip from one live step to the next; f16.
    SparseBandF16 { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: |b, h, q, k| q >= k && ((q - k) < 40 || k < 3 || q >= 300) }
    /// A linear custom score (its derivative the constant 0.5).
    CustomLinF32 { heads: mha, head_dim: 64, dtype: f32, mask: causal, score: |s, b, h, q, k| s * 0.5 + (q - k) as f32 * 0.01 }
    /// A piecewise, nonlinear custom score reading a per-head input.
    CustomNonlinF32 {
        heads: gqa(group = 2), head_dim: 64, dtype: f32,
        inputs: { bias: [f32; heads] },
        score: |s, b, h, q, k| if s > 0.0 { (s * bias[h]).tanh() * 3.0 } else { s.max(-2.0) + (s * 0.1).exp() },
    }
    /// Learnable inputs: a scalar temperature and a per-head relative bias.
    LearnBiasF32 {
        heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal,
        inputs: { temp: f32, bias: [f32; heads] },
        score: |s, b, h, q, k| s * temp + bias[h] * ((q - k) as f32 / 16.0).tanh(),
    }
    /// T5's relative bias: a learnable table of 32 buckets per head, read at the bucket of
    /// `q − k` (exact below 8, log-spaced above).
    RelTableF32 {
        heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal,
        inputs: { rel: [f32; heads, 32] },
        score: |s, b, h, q, k| s + rel[h][if q - k < 8 { q - k } else { 8 + (((q - k) as f32 / 8.0).ln() * 6.0) as i32 }],
    }
    /// The same on Llama-3's heads in f16: where the device has them, the tensor-core (and
    /// warpgroup) kernels run dK and dV, and the warpgroup dQ kernel sums the table's gradient.
    RelTableF16 {
        heads: gqa(group = 4), head_dim: 128, dtype: f16, mask: causal,
        inputs: { temp: f32, rel: [f32; heads, 32] },
        score: |s, b, h, q, k| s * temp + rel[h][if q - k < 8 { q - k } else { 8 + (((q - k) as f32 / 8.0).ln() * 6.0) as i32 }],
    }
    /// Tables of every shape: document ids per position (the mask; no gradient), a learnable
    /// bias per key, and a learnable table of 4 per sequence and head read twice, at two
    /// indices, inside a nonlinear expression.
    TablesF32 {
        heads: mha, head_dim: 64, dtype: f32,
        inputs: { doc: [i32; batch, seq], kb: [f32; seq], w: [f32; batch, heads, 4] },
        mask: |b, h, q, k| doc[b][q] == doc[b][k] || k < 3,
        score: |s, b, h, q, k| s * w[b][h][0].tanh() + w[b][h][(q + k) % 4] * 0.5 + kb[k],
    }
    /// Learnable `seq` tables over packed documents with GQA: a temperature per head and query
    /// position, a bias per document and key position read twice (two sums per key), and a
    /// table read at a computed position (no gradient: left out of `d_inputs`).
    SeqTablesF32 {
        heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal & documents,
        inputs: { qt: [f32; heads, seq], kb: [f32; batch, seq], pe: [f32; seq] },
        score: |s, b, h, q, k| s * qt[h][q] + (kb[b][k] * 2.0).tanh() + kb[b][k] * 0.5 + pe[q - k] * 0.1,
    }
    /// A learnable per-document scale of the logits.
    DocScaleF32 {
        heads: mha, head_dim: 64, dtype: f32, mask: causal & documents,
        inputs: { scale: [f32; batch] },
        score: |s, b, h, q, k| s * scale[b],
    }
    /// Llama-3's attention at head dim 128, f16.
    Llama3F16 { heads: gqa(group = 4), head_dim: 128, dtype: f16, mask: causal }
    /// The same in bf16.
    Llama3Bf16 { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal }
    /// A window over packed documents, softcapped.
    WindowDocsF16 { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: causal & window(left = 40) & documents, softcap: 20.0 }
    /// V narrower than Q and K, top-left causal.
    Dv64F16 { heads: mha, head_dim: 128, value_dim: 64, dtype: f16, mask: causal(top_left) }
    /// Prefix-LM over key lengths, f16.
    PrefixLengthsF16 { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: prefix_lm & key_lengths }
    /// A two-sided window, f16.
    BandWindowF16 { heads: mha, head_dim: 64, dtype: f16, mask: window(left = 20, right = 7) }
    /// Given ALiBi slopes, learnable.
    AlibiGivenF32 { heads: mha, head_dim: 64, dtype: f32, mask: causal, alibi: given }
    /// A custom score after softcap and ALiBi (the chain rule through all three), f16.
    CustomChainF16 { heads: mha, head_dim: 64, dtype: f16, mask: causal, softcap: 4.0, alibi: geometric, score: |s, b, h, q, k| s * s * 0.1 + s }
}

fn client() -> ComputeClient {
    attn::default_client()
}

/// Forward, then backward with a random dO; every gradient checked against float64.
fn check<V: Variant>(client: &ComputeClient, [batch, heads_q, heads_kv, seq_q, seq_k]: [usize; 5]) {
    let spec = V::SPEC;
    let (d, dv) = (spec.head_dim as usize, spec.value_dim as usize);
    let label = format!(
        "{} B{batch} H{heads_q}/{heads_kv} Nq{seq_q} Nk{seq_k}",
        spec.name
    );
    let (mut rng, _) = seeded_rng(&label);
    let q_shape = [batch, heads_q, seq_q, d];
    let k_shape = [batch, heads_kv, seq_k, d];
    let v_shape = [batch, heads_kv, seq_k, dv];
    let o_shape = [batch, heads_q, seq_q, dv];
    let qh: Vec<V::Elem> = random_vec(&mut rng, q_shape.iter().product());
    let kh: Vec<V::Elem> = random_vec(&mut rng, k_shape.iter().product());
    let vh: Vec<V::Elem> = random_vec(&mut rng, v_shape.iter().product());
    let doh: Vec<V::Elem> = random_vec(&mut rng, o_shape.iter().product());
    let owned = OwnedInputs::random(&spec, [batch, heads_q, seq_q, seq_k], 4, &mut rng);
    let inputs = owned.view();
    let upload =
        |h: &[V::Elem], shape| Tensor::from_slice(client, h, shape).expect("fills its shape");
    let (q, k, v, d_out) = (
        upload(&qh, q_shape),
        upload(&kh, k_shape),
        upload(&vh, v_shape),
        upload(&doh, o_shape),
    );
    let out = attn::forward::<V>(client, &q, &k, &v, &inputs).expect("forward");
    let problem = Problem::new(&spec, &q, &k, &v).expect("valid problem");
    let packed = pack(&spec, &problem, &inputs).expect("valid inputs");
    let host = [widen(&qh), widen(&kh), widen(&vh), widen(&doh)];
    let qkv_do = [&host[0][..], &host[1][..], &host[2][..], &host[3][..]];
    let reference = backward_f64::<V>(&problem, &packed, &inputs, qkv_do);
    let stored_o = widen(&out.o.to_vec(client));
    let naive = backward_naive::<V>(&problem, &packed, &inputs, qkv_do, Some(&stored_o));
    // Every plan that runs on this device: the tensor-core kernels at each tile where the device
    // has them, and the portable kernels.
    for plan in attn::backward_plans(client, &spec) {
        let grads =
            attn::backward_with_plan::<V>(client, [&q, &k, &v], &out, &d_out, &inputs, plan)
                .expect("backward");
        let label = format!("{label} {plan}");
        let reference = &reference;
        let naive = &naive;
        for (name, got, want, low) in [
            ("dQ", &grads.dq, &reference.dq, &naive.dq),
            ("dK", &grads.dk, &reference.dk, &naive.dk),
            ("dV", &grads.dv, &reference.dv, &naive.dv),
        ] {
            let got = widen(&got.to_vec(client));
            assert!(
                got.iter().all(|x| x.is_finite()),
                "{label}: {name} has a non-finite element"
            );
            let verdict = Verdict::new(&got, want, low, error_floor::<V::Elem>());
            println!(
            "{label}: {name}: max |kernel − f64| {:.2e}, naive {:.2e}, bound {:.2e}, max |f64| {:.2e}",
            verdict.kernel_error,
            verdict.naive_error,
            verdict.bound,
            want.iter().fold(0.0f64, |m, x| m.max(x.abs()))
        );
            assert!(
                verdict.passed(),
                "{label}: {name}: max |kernel − f64| = {:.3e} > bound {:.3e} (naive {}: {:.3e})",
                verdict.kernel_error,
                verdict.bound,
                <V::Elem as Element>::DTYPE.name(),
                verdict.naive_error
            );
        }
        match (&grads.d_sinks, spec.score.sinks) {
            (Some(d_sinks), true) => {
                let got: Vec<f64> = d_sinks.to_vec(client).into_iter().map(f64::from).collect();
                // Summed from the kernel's rounded O and dO: the element type's floor, as dQ's.
                let floor = error_floor::<V::Elem>().max(1e-4);
                let verdict = Verdict::new(&got, &reference.d_sinks, &naive.d_sinks, floor);
                println!(
                    "{label}: d_sinks: max |kernel − f64| {:.2e}, naive {:.2e}, bound {:.2e}",
                    verdict.kernel_error, verdict.naive_error, verdict.bound
                );
                assert!(
                    verdict.passed(),
                    "{label}: d_sinks: max |kernel − f64| = {:.3e} > bound {:.3e}",
                    verdict.kernel_error,
                    verdict.bound
                );
            }
            (None, false) => {}
            (d_sinks, _) => panic!(
                "{label}: sink gradients {:?} for sinks: {}",
                d_sinks.is_some(),
                spec.score.sinks
            ),
        }
        let learned = grads
            .d_inputs
            .iter()
            .map(|(name, t)| (*name, t))
            .chain(grads.d_alibi_slopes.iter().map(|t| ("alibi_slopes", t)));
        let expected = reference
            .d_inputs
            .iter()
            .zip(&naive.d_inputs)
            .chain(std::iter::once((
                &reference.d_alibi_slopes,
                &naive.d_alibi_slopes,
            )))
            .filter(|(r, _)| !r.is_empty());
        let mut compared = 0;
        for ((name, got), (want, low)) in learned.zip(expected) {
            let got: Vec<f64> = got.to_vec(client).into_iter().map(f64::from).collect();
            let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            // A sum over every pair, of terms made from the element type's O and dO (through
            // `D`): the element type's relative floor at the sum's magnitude, 1e-4 at least.
            let floor = error_floor::<V::Elem>().max(1e-4) * scale;
            let verdict = Verdict::new(&got, want, low, floor);
            println!(
            "{label}: d {name}: max |kernel − f64| {:.2e}, naive {:.2e}, bound {:.2e}, max |f64| {scale:.2e}",
            verdict.kernel_error, verdict.naive_error, verdict.bound
        );
            assert!(
                verdict.passed(),
                "{label}: d {name}: max |kernel − f64| = {:.3e} > bound {:.3e}",
                verdict.kernel_error,
                verdict.bound
            );
            compared += 1;
        }
        let floats = (0..spec.inputs.len())
            .filter(|&i| spec.learnable(i))
            .count();
        let slopes = usize::from(spec.score.alibi == Some(attn::Alibi::Given));
        assert_eq!(
            compared,
            floats + slopes,
            "{label}: every learnable input compared"
        );
        // The same bits again: dK and dV unless the plan splits their walks, dQ unless it sums
        // dQ with atomics (either was checked against float64 above, like every run's).
        let again =
            attn::backward_with_plan::<V>(client, [&q, &k, &v], &out, &d_out, &inputs, plan)
                .expect("backward");
        if plan.kv_splits == 1 {
            assert_eq!(
                again.dk.to_vec(client),
                grads.dk.to_vec(client),
                "{label}: dK differs between two runs"
            );
            assert_eq!(
                again.dv.to_vec(client),
                grads.dv.to_vec(client),
                "{label}: dV differs between two runs"
            );
        }
        if plan.dq == attn::DqSum::Kernel {
            assert_eq!(
                again.dq.to_vec(client),
                grads.dq.to_vec(client),
                "{label}: dQ differs between two runs"
            );
        }
    }
    // The default plan is the first.
    assert_eq!(
        attn::backward_plan(client, &spec).ok(),
        attn::backward_plans(client, &spec).first().copied()
    );
}

/// `backward` itself runs the plan the tuner reports: on a device with several plans its first
/// call of a key times them and judges the pick against the default; the gradients are that
/// plan's, bit for bit, on the first call and on a later one; in deterministic mode the plan sums
/// dQ without atomics and the two calls' gradients have the same bits.
#[test]
fn backward_runs_the_plan_the_tuner_reports() {
    let c = client();
    let spec = Llama3F16::SPEC;
    let (mut rng, _) = seeded_rng("tuned backward");
    let (q_shape, kv_shape) = ([1, 4, 100, 128], [1, 1, 100, 128]);
    let upload = |shape: [usize; 4], rng: &mut _| {
        let host: Vec<attn::f16> = random_vec(rng, shape.iter().product());
        Tensor::from_slice(&c, &host, shape).expect("fills its shape")
    };
    let (q, k, v, d_out) = (
        upload(q_shape, &mut rng),
        upload(kv_shape, &mut rng),
        upload(kv_shape, &mut rng),
        upload(q_shape, &mut rng),
    );
    let inputs = attn::Inputs::default();
    let out = attn::forward::<Llama3F16>(&c, &q, &k, &v, &inputs).expect("forward");
    let problem = Problem::new(&spec, &q, &k, &v).expect("valid problem");
    let packed = pack(&spec, &problem, &inputs).expect("valid inputs");
    let key = attn::tune::TuneKey::of(&spec, &problem, &packed);
    let plans = attn::backward_plans(&c, &spec);
    let default = attn::backward_plan(&c, &spec).expect("a plan runs");
    // Both modes, each with its own tuner: in deterministic mode only the plans whose every
    // gradient keeps its bits run, and two calls agree bit for bit.
    for deterministic in [false, true] {
        attn::set_deterministic(deterministic);
        assert_eq!(attn::deterministic(), deterministic);
        let mut earlier: Option<[Vec<u16>; 3]> = None;
        for call in ["first", "later"] {
            let grads = attn::backward::<Llama3F16>(&c, &q, &k, &v, &out, &d_out, &inputs)
                .expect("backward");
            let plan = attn::tune::chosen_backward::<Llama3F16>(&c, &key).unwrap_or(default);
            assert!(plans.contains(&plan), "{plan} runs on this device");
            assert_eq!(
                plan.family, default.family,
                "the tuner keeps to the fastest family"
            );
            if deterministic {
                assert!(plan.same_bits(), "deterministic mode ran {plan}");
            }
            let pinned = attn::backward_with_plan::<Llama3F16>(
                &c,
                [&q, &k, &v],
                &out,
                &d_out,
                &inputs,
                plan,
            )
            .expect("backward");
            // Bit for bit, but for a gradient the plan adds up with atomics: there the order of
            // the additions moves the last bits (f16 rounding of f32 sums), and only that.
            for (name, got, want) in [
                ("dQ", &grads.dq, &pinned.dq),
                ("dK", &grads.dk, &pinned.dk),
                ("dV", &grads.dv, &pinned.dv),
            ] {
                let (got, want) = (widen(&got.to_vec(&c)), widen(&want.to_vec(&c)));
                let largest = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                let atomic = match name {
                    "dQ" => plan.dq == attn::DqSum::Atomic,
                    _ => plan.kv_splits > 1,
                };
                let tolerance = if atomic { 1e-3 * largest } else { 0.0 };
                let worst = got
                    .iter()
                    .zip(&want)
                    .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    worst <= tolerance,
                    "{call} call: {name} is not {plan}'s (off by {worst:.3e})"
                );
            }
            let bits = [&grads.dq, &grads.dk, &grads.dv].map(|t| {
                t.to_vec(&c)
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<u16>>()
            });
            if let (true, Some(earlier)) = (deterministic, &earlier) {
                assert!(
                    earlier == &bits,
                    "deterministic mode: the {call} call's gradients differ from the first's"
                );
            }
            earlier = Some(bits);
            println!(
                "{call} call (deterministic: {deterministic}) ran {plan} ({} plans here)",
                plans.len()
            );
        }
    }
    attn::set_deterministic(false);
}

/// The shapes the tensor-core kernels take on GPUs, at lengths that leave partial 16-row blocks:
/// Llama-3's GQA at head dim 128 (every back end), and where the device has tensor cores also a
/// window over documents with a softcap, `value_dim < head_dim`, bf16, prefix-LM over key
/// lengths and a two-sided window (the warpgroup dK/dV kernel's walk over the query blocks).
#[test]
fn tensor_core_shapes() {
    let c = client();
    check::<Llama3F16>(&c, [1, 4, 1, 37, 37]);
    let tensor_cores = attn::backward_plans(&c, &Llama3F16::SPEC)
        .iter()
        .any(|p| p.family == attn::Family::TensorCores);
    if !tensor_cores {
        println!("no tensor-core backward on this device; the other shapes skipped");
        return;
    }
    // Every plan of every shape compiles its own kernels: side by side, on the host's cores.
    std::thread::scope(|s| {
        s.spawn(|| check::<Llama3F16>(&c, [1, 8, 2, 100, 100]));
        s.spawn(|| check::<WindowDocsF16>(&c, [1, 4, 2, 150, 150]));
        s.spawn(|| check::<Dv64F16>(&c, [1, 2, 2, 50, 81]));
        s.spawn(|| check::<Llama3Bf16>(&c, [2, 4, 1, 33, 97]));
        s.spawn(|| check::<PrefixLengthsF16>(&c, [2, 4, 2, 90, 90]));
        s.spawn(|| check::<BandWindowF16>(&c, [1, 2, 2, 130, 130]));
    });
}

#[test]
fn masks_and_groups() {
    let c = client();
    check::<MhaCausalF32>(&c, [2, 2, 2, 37, 37]);
    check::<MhaCausalF32>(&c, [1, 3, 3, 17, 70]);
    check::<Gqa4WindowF16>(&c, [1, 8, 2, 65, 65]);
    check::<DocsF32>(&c, [1, 4, 2, 90, 90]);
    check::<BandF32>(&c, [1, 2, 2, 33, 41]);
    check::<SparseBandF16>(&c, [1, 4, 2, 330, 330]);
    check::<PrefixDvF32>(&c, [2, 3, 1, 29, 29]);
}

#[test]
fn score_modifications_and_sinks() {
    let c = client();
    check::<SoftcapF16>(&c, [1, 4, 2, 40, 53]);
    check::<AlibiF32>(&c, [1, 4, 4, 31, 47]);
    check::<SinksMqaF32>(&c, [2, 4, 1, 1, 77]);
    check::<SinksMqaF32>(&c, [2, 4, 1, 19, 33]);
    check::<SinksDocsF16>(&c, [1, 4, 2, 70, 70]);
}

#[test]
fn refusals_are_typed_and_launch_nothing() {
    let c = client();
    let zeros = |shape: [usize; 4]| {
        Tensor::<f32>::from_slice(&c, &vec![0.5; shape.iter().product()], shape).unwrap()
    };
    let (q, k, v) = (
        zeros([1, 2, 8, 64]),
        zeros([1, 2, 8, 64]),
        zeros([1, 2, 8, 64]),
    );
    let out = attn::forward::<MhaCausalF32>(&c, &q, &k, &v, &Default::default()).unwrap();
    // dO of the wrong length.
    let e = attn::backward::<MhaCausalF32>(
        &c,
        &q,
        &k,
        &v,
        &out,
        &zeros([1, 2, 7, 64]),
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(e, AttnError::DimMismatch { .. }), "{e:?}");
    // Through the method the macro generates on every variant.
    let e = MhaCausalF32::backward(&c, &q, &k, &v, &out, &zeros([2, 2, 8, 64])).unwrap_err();
    assert!(matches!(e, AttnError::DimMismatch { .. }), "{e:?}");
}

#[test]
fn learnable_inputs() {
    let c = client();
    check::<LearnBiasF32>(&c, [2, 4, 2, 31, 31]);
    check::<DocScaleF32>(&c, [1, 2, 2, 80, 80]);
    check::<AlibiGivenF32>(&c, [2, 3, 3, 27, 40]);
}

#[test]
fn learnable_tables() {
    let c = client();
    check::<RelTableF32>(&c, [2, 4, 2, 37, 37]);
    check::<TablesF32>(&c, [2, 2, 2, 29, 35]);
    check::<SeqTablesF32>(&c, [1, 4, 2, 90, 90]);
    let spec = SeqTablesF32::SPEC;
    let learnable: Vec<&str> = (0..spec.inputs.len())
        .filter(|&i| spec.learnable(i))
        .map(|i| spec.inputs[i].name)
        .collect();
    assert_eq!(
        learnable,
        ["qt", "kb"],
        "a table read at q − k has no gradient"
    );
    check::<RelTableF16>(&c, [1, 4, 1, 37, 37]);
    if attn::backward_plans(&c, &RelTableF16::SPEC)
        .iter()
        .any(|p| p.family != attn::Family::Portable)
    {
        check::<RelTableF16>(&c, [2, 8, 2, 150, 211]);
    }
}

#[test]
fn custom_score_expressions() {
    let c = client();
    check::<CustomLinF32>(&c, [1, 2, 2, 45, 45]);
    check::<CustomNonlinF32>(&c, [2, 4, 2, 23, 38]);
    check::<CustomChainF16>(&c, [1, 3, 3, 50, 50]);
}

/// The macro's derivative of each score expression (`host_score_grad`) against central finite
/// differences of the expression itself (`host_score`), at random logits and positions.
#[test]
fn derived_score_gradients_match_finite_differences() {
    use attn::reference::OwnedInputs;
    use rand::Rng;
    fn one<V: Variant>(rng: &mut rand::rngs::StdRng) {
        let owned = OwnedInputs::random(&V::SPEC, [2, 4, 16, 16], 1, rng);
        let inputs = owned.view();
        for _ in 0..2000 {
            let s: f64 = rng.random_range(-6.0..6.0);
            let (b, h, q, k) = (
                rng.random_range(0..2),
                rng.random_range(0..4),
                rng.random_range(0..16),
                rng.random_range(0..16),
            );
            let eps = 1e-6;
            let f = |x: f64| V::host_score(x, b, h, q, k, &inputs);
            let numeric = (f(s + eps) - f(s - eps)) / (2.0 * eps);
            let derived = V::host_score_grad(s, b, h, q, k, &inputs);
            assert!(
                (numeric - derived).abs() <= 1e-5 * (1.0 + derived.abs()),
                "{}: at s = {s}, b {b}, h {h}, q {q}, k {k}: derived {derived}, finite differences {numeric}",
                V::SPEC.name
            );
        }
    }
    let (mut rng, _) = seeded_rng("derived score gradients");
    // With respect to each element of a declared input: perturb it, difference the expression.
    {
        let mut owned = OwnedInputs::random(&LearnBiasF32::SPEC, [1, 4, 16, 16], 1, &mut rng);
        for _ in 0..500 {
            let s: f64 = rng.random_range(-6.0..6.0);
            let (h, q, k) = (
                rng.random_range(0..4usize),
                rng.random_range(0..16),
                rng.random_range(0..16),
            );
            for (decl, element) in [(0usize, 0usize), (1, h)] {
                let base = owned.floats[decl][element];
                let eps = 1e-3f32;
                let mut at = |x: f32| {
                    owned.floats[decl][element] = x;
                    let v = LearnBiasF32::host_score(s, 0, h as i64, q, k, &owned.view());
                    owned.floats[decl][element] = base;
                    v
                };
                let numeric = (at(base + eps) - at(base - eps)) / (2.0 * eps as f64);
                let derived =
                    LearnBiasF32::host_score_input_grad(s, 0, h as i64, q, k, &owned.view(), decl);
                assert!(
                    (numeric - derived).abs() <= 1e-3 * (1.0 + derived.abs()),
                    "d score / d input {decl}[{element}] at s = {s}, h {h}, q {q}, k {k}: derived {derived}, finite differences {numeric}"
                );
            }
        }
    }
    // With respect to the element each table read reads: perturb it, difference the expression.
    fn reads<V: Variant>(rng: &mut rand::rngs::StdRng, learnable: usize) {
        let dims = [2, 4, 16, 16];
        let mut owned = OwnedInputs::random(&V::SPEC, dims, 1, rng);
        // Only the query heads and the positions matter to a table's layout.
        let problem = attn::Problem {
            batch: dims[0],
            heads_q: dims[1],
            heads_kv: dims[1],
            group: 1,
            seq_q: dims[2],
            seq_k: dims[3],
            head_dim: 64,
            value_dim: 64,
        };
        for _ in 0..500 {
            let s: f64 = rng.random_range(-6.0..6.0);
            let (b, h, q, k) = (
                rng.random_range(0..2),
                rng.random_range(0..4),
                rng.random_range(0..16),
                rng.random_range(0..16),
            );
            // Reads of one element add up: the expression's derivative with respect to it.
            let mut derived = std::collections::HashMap::new();
            for read in 0..V::SPEC.score_reads.len() {
                if V::SPEC.score_reads[read].input as usize != learnable {
                    continue;
                }
                let view = owned.view().with_dims(&problem);
                let at = V::host_read_index(b, h, q, k, &view, read);
                *derived.entry(at).or_insert(0.0) +=
                    V::host_score_read_grad(s, b, h, q, k, &view, read);
            }
            assert!(
                !derived.is_empty(),
                "{}: no read of input {learnable}",
                V::SPEC.name
            );
            let slot = V::SPEC.inputs[..learnable]
                .iter()
                .filter(|d| d.ty == attn::InputType::F32)
                .count();
            for (at, derived) in derived {
                let base = owned.floats[slot][at];
                let eps = 1e-3f32;
                let mut score = |x: f32| {
                    owned.floats[slot][at] = x;
                    let v = V::host_score(s, b, h, q, k, &owned.view().with_dims(&problem));
                    owned.floats[slot][at] = base;
                    v
                };
                let numeric = (score(base + eps) - score(base - eps)) / (2.0 * eps as f64);
                assert!(
                    (numeric - derived).abs() <= 1e-3 * (1.0 + derived.abs()),
                    "{}: d score / d element {at} at s = {s}, b {b}, h {h}, q {q}, k {k}: derived {derived}, finite differences {numeric}",
                    V::SPEC.name
                );
            }
        }
    }
    reads::<RelTableF32>(&mut rng, 0);
    reads::<TablesF32>(&mut rng, 2);
    reads::<TablesF32>(&mut rng, 1);
    one::<CustomLinF32>(&mut rng);
    one::<CustomNonlinF32>(&mut rng);
    one::<CustomChainF16>(&mut rng);
}

/// dO laid out with row strides that no wide vector divides (65 and 66 elements for rows of 64:
/// `D = rowsum(dO ∘ O)` read one and two elements at a time) gives the gradients of the same dO
/// stored contiguously (read four or eight at a time), up to the order of `D`'s additions.
#[test]
fn gradients_of_a_strided_output_gradient() {
    let client = client();
    let spec = MhaCausalF32::SPEC;
    let (b, h, n, d) = (2, 3, 45, spec.head_dim as usize);
    let (mut rng, _) = seeded_rng("strided dO");
    let shape = [b, h, n, d];
    let upload = |data: &[f32]| Tensor::from_slice(&client, data, shape).expect("fills its shape");
    let [qh, kh, vh, doh]: [Vec<f32>; 4] =
        std::array::from_fn(|_| random_vec(&mut rng, b * h * n * d));
    let (q, k, v) = (upload(&qh), upload(&kh), upload(&vh));
    let inputs = attn::Inputs::default();
    let out = attn::forward::<MhaCausalF32>(&client, &q, &k, &v, &inputs).expect("forward");
    let contiguous =
        attn::backward::<MhaCausalF32>(&client, &q, &k, &v, &out, &upload(&doh), &inputs)
            .expect("backward");
    for row_stride in [d + 1, d + 2] {
        // Each row of dO, then `row_stride - d` elements the view skips (never read: NaN).
        let mut padded = vec![f32::NAN; b * h * n * row_stride];
        for (r, row) in doh.chunks(d).enumerate() {
            padded[r * row_stride..r * row_stride + d].copy_from_slice(row);
        }
        let stored = Tensor::from_slice(&client, &padded, [b, h, n, row_stride]).expect("fills");
        let strides = [h * n * row_stride, n * row_stride, row_stride, 1];
        let d_out =
            Tensor::<f32>::from_raw_parts(stored.handle().clone(), padded.len(), shape, strides);
        let grads = attn::backward::<MhaCausalF32>(&client, &q, &k, &v, &out, &d_out, &inputs)
            .expect("backward of a strided dO");
        for (name, got, want) in [
            ("dQ", &grads.dq, &contiguous.dq),
            ("dK", &grads.dk, &contiguous.dk),
            ("dV", &grads.dv, &contiguous.dv),
        ] {
            let (got, want) = (got.to_vec(&client), want.to_vec(&client));
            assert!(
                got.iter().all(|x| x.is_finite()),
                "row stride {row_stride}: {name} has a non-finite element"
            );
            let scale = want.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            println!("row stride {row_stride}: {name}: max |strided − contiguous| {worst:.2e}");
            assert!(
                worst <= 1e-5 * scale,
                "row stride {row_stride}: {name} differs by {worst:.3e} (max |{name}| {scale:.3e})"
            );
        }
    }
}
