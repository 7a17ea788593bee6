//! burn and candle tensors in and out of attn (features `burn` and `candle`), on the default back
//! end: views without copies, both layouts, refusals with typed errors, and a forward pass on a
//! framework's tensors giving the same bits as on uploaded slices.

use attn::interop::burn::{
    attention as burn_attention, attention_learning, burn_tensor, client as burn_client,
    from_attn as burn_out, to_attn, to_cube, Learned,
};
use attn::interop::candle::{candle_core, from_attn as candle_out, to_attn as candle_in};
use attn::interop::Layout;
use attn::reference::{random_vec, seeded_rng};
use attn::{AttnError, Tensor};
use burn_tensor::{DType, Device, Distribution, TensorData};

attn::attention! {
    /// GQA 2, causal, head dim 64, f32 (every back end runs it).
    pub Gqa2 { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal }
    /// Learning run-time inputs: sink logits, a temperature and a relative bias of 8 buckets
    /// per head.
    pub RelSinks {
        heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal, sinks: per_head,
        inputs: { temp: f32, rel: [f32; heads, 8] },
        score: |s, b, h, q, k| s * temp + rel[h][if q - k < 7 { q - k } else { 7 }],
    }
}

/// `[B, H, N, D]` values in `[B, N, H, D]` order.
fn bnhd(values: &[f32], [_, h, n, d]: [usize; 4]) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for (i, x) in values.iter().enumerate() {
        let (bi, hi, ni, di) = (i / (h * n * d), i / (n * d) % h, i / d % n, i % d);
        out[((bi * n + ni) * h + hi) * d + di] = *x;
    }
    out
}

fn burn_values(t: burn_tensor::Tensor<4>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().expect("read back")
}

/// An f32 burn tensor of `shape` holding `data`.
fn burn_f32<const D: usize>(
    data: &[f32],
    shape: [usize; D],
    device: &Device,
) -> burn_tensor::Tensor<D> {
    burn_tensor::Tensor::<D>::from_data(TensorData::new(data.to_vec(), shape), (device, DType::F32))
}

/// A random `[B, N, H, D]` f32 burn tensor and its values.
fn burn_random(shape: [usize; 4], device: &Device) -> burn_tensor::Tensor<4> {
    burn_tensor::Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), (device, DType::F32))
}

/// The same kernel on the same values gives the same bits, every one written (finite).
fn assert_same_bits(from_burn: &[f32], direct: &[f32], what: &str) {
    assert_eq!(from_burn.len(), direct.len(), "{what}");
    assert!(
        from_burn.iter().all(|x| x.is_finite()),
        "{what}: every output written"
    );
    assert!(
        from_burn
            .iter()
            .zip(direct)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: the same kernel on the same values gives the same bits"
    );
}

#[test]
fn burn_views_share_buffers_in_both_layouts() {
    let device = Device::default();
    let client = burn_client(&device).unwrap();
    let x = burn_random([2, 17, 3, 64], &device); // [B, N, H, D]
    let bhnd = burn_values(x.clone().swap_dims(1, 2));
    let view = to_attn::<f32>(&x, Layout::Bnhd).unwrap();
    assert_eq!(view.shape(), [2, 3, 17, 64]);
    // The view is burn's buffer itself (device-wide memory counts would see the other tests'
    // allocations; `examples/burn_llama.rs` measures them in a process of its own).
    let burn_handle = to_cube(&x).unwrap().handle;
    assert_eq!(
        format!("{:?}", view.handle().memory),
        format!("{:?}", burn_handle.memory),
        "a view shares burn's buffer"
    );
    assert_eq!(view.to_vec(&client), bhnd);
    // The transposed burn tensor read as [B, H, N, D].
    let t = x.clone().swap_dims(1, 2);
    assert_eq!(
        to_attn::<f32>(&t, Layout::Bhnd).unwrap().to_vec(&client),
        bhnd
    );
    // Back to burn: the same buffer, the same values.
    let back = burn_out(&view, &device).unwrap();
    assert_eq!(back.dims(), [2, 3, 17, 64]);
    assert_eq!(burn_values(back), bhnd);
}

#[test]
fn burn_refusals_are_typed() {
    let device = Device::default();
    let x = burn_random([1, 5, 2, 64], &device);
    let e = to_attn::<attn::f16>(&x, Layout::Bnhd).unwrap_err();
    assert!(matches!(e, AttnError::Input { .. }), "{e}");
    assert!(e.to_string().contains("dtype"), "{e}");
    // The head dim strided (a transpose of the last two dims).
    let e = to_attn::<f32>(&x.swap_dims(2, 3), Layout::Bnhd).unwrap_err();
    assert!(matches!(e, AttnError::Input { .. }), "{e}");
    assert!(e.to_string().contains("stride"), "{e}");
}

/// `interop::burn::attention` in burn's autodiff: a loss through it, `backward()`, and dQ, dK, dV
/// as burn's gradients of the leaves, in their `[B, N, H, D]` layout, the same bits as
/// `backward` called directly on the same values; without autodiff, the forward's bits.
#[test]
fn attention_is_differentiable_in_burn() {
    let device = Device::default();
    let client = burn_client(&device).unwrap();
    let (mut rng, _) = seeded_rng("interop-burn-autodiff");
    let (b, n, hq, hkv, d) = (1, 45, 4, 2, 64);
    let qh: Vec<f32> = random_vec(&mut rng, b * n * hq * d);
    let kh: Vec<f32> = random_vec(&mut rng, b * n * hkv * d);
    let vh: Vec<f32> = random_vec(&mut rng, b * n * hkv * d);
    let wh: Vec<f32> = random_vec(&mut rng, b * hq * n * d);
    let burn = |data: &Vec<f32>, shape: [usize; 4]| burn_f32(data, shape, &device);
    let leaf = |data: &Vec<f32>, h: usize| burn(data, [b, n, h, d]).autodiff().require_grad();
    let (q, k, v) = (leaf(&qh, hq), leaf(&kh, hkv), leaf(&vh, hkv));
    let inputs = attn::Inputs::default();
    let out = burn_attention::<Gqa2>([&q, &k, &v], Layout::Bnhd, &inputs).unwrap();
    assert_eq!(out.dims(), [b, hq, n, d]);
    // loss = Σ O ∘ W: the output's gradient is W.
    let loss = (out.clone() * burn(&wh, [b, hq, n, d])).sum();
    let grads = loss.backward();
    let grad = |t: &burn_tensor::Tensor<4>| burn_values(t.grad(&grads).expect("a gradient"));
    let (dq, dk, dv) = (grad(&q), grad(&k), grad(&v));

    let upload =
        |data: &Vec<f32>, h: usize| Tensor::from_slice_bnhd(&client, data, [b, n, h, d]).unwrap();
    let (qa, ka, va) = (upload(&qh, hq), upload(&kh, hkv), upload(&vh, hkv));
    let direct = Gqa2::forward(&client, &qa, &ka, &va).unwrap();
    let d_out = Tensor::from_slice(&client, &wh, [b, hq, n, d]).unwrap();
    let g = Gqa2::backward(&client, &qa, &ka, &va, &direct, &d_out).unwrap();
    assert_same_bits(
        &burn_values(out.without_autodiff()),
        &direct.o.to_vec(&client),
        "O",
    );
    assert_same_bits(&dq, &bnhd(&g.dq.to_vec(&client), [b, hq, n, d]), "dQ");
    assert_same_bits(&dk, &bnhd(&g.dk.to_vec(&client), [b, hkv, n, d]), "dK");
    assert_same_bits(&dv, &bnhd(&g.dv.to_vec(&client), [b, hkv, n, d]), "dV");
    // Without autodiff: the forward alone.
    let plain = |data: &Vec<f32>, h: usize| burn(data, [b, n, h, d]);
    let (q, k, v) = (plain(&qh, hq), plain(&kh, hkv), plain(&vh, hkv));
    let out = burn_attention::<Gqa2>([&q, &k, &v], Layout::Bnhd, &inputs).unwrap();
    assert!(!out.is_autodiff());
    assert_same_bits(
        &burn_values(out),
        &direct.o.to_vec(&client),
        "O without autodiff",
    );
}

/// `attention_learning`: sink logits, a scalar and a table as rank-1 burn tensors in burn's
/// autodiff; their gradients (and dQ, dK, dV) the same bits as `backward` called directly with
/// the same values; bad learning inputs refused with typed errors.
#[test]
fn learning_inputs_are_differentiable_in_burn() {
    let device = Device::default();
    let client = burn_client(&device).unwrap();
    let (mut rng, _) = seeded_rng("interop-burn-learned");
    let (b, n, hq, hkv, d) = (2, 37, 4, 2, 64);
    let qh: Vec<f32> = random_vec(&mut rng, b * n * hq * d);
    let kh: Vec<f32> = random_vec(&mut rng, b * n * hkv * d);
    let vh: Vec<f32> = random_vec(&mut rng, b * n * hkv * d);
    let wh: Vec<f32> = random_vec(&mut rng, b * hq * n * d);
    let sinks: Vec<f32> = random_vec(&mut rng, hq);
    let temp = vec![0.75f32];
    let rel: Vec<f32> = random_vec(&mut rng, hq * 8);
    let burn = |data: &Vec<f32>, shape: [usize; 4]| burn_f32(data, shape, &device);
    let flat = |data: &Vec<f32>| {
        burn_f32(data, [data.len()], &device)
            .autodiff()
            .require_grad()
    };
    let leaf = |data: &Vec<f32>, h: usize| burn(data, [b, n, h, d]).autodiff().require_grad();
    let (q, k, v) = (leaf(&qh, hq), leaf(&kh, hkv), leaf(&vh, hkv));
    let (s, t, r) = (flat(&sinks), flat(&temp), flat(&rel));
    let learned = [
        (Learned::Sinks, &s),
        (Learned::Input("temp"), &t),
        (Learned::Input("rel"), &r),
    ];
    let none = attn::Inputs::default();
    let out = attention_learning::<RelSinks>([&q, &k, &v], Layout::Bnhd, &none, &learned).unwrap();
    let loss = (out.clone() * burn(&wh, [b, hq, n, d])).sum();
    let grads = loss.backward();
    let grad4 = |t: &burn_tensor::Tensor<4>| burn_values(t.grad(&grads).expect("a gradient"));
    let grad1 = |t: &burn_tensor::Tensor<1>| {
        t.grad(&grads)
            .expect("a gradient")
            .try_into_vec_as::<f32>()
            .expect("read back")
    };

    let upload =
        |data: &Vec<f32>, h: usize| Tensor::from_slice_bnhd(&client, data, [b, n, h, d]).unwrap();
    let (qa, ka, va) = (upload(&qh, hq), upload(&kh, hkv), upload(&vh, hkv));
    let inputs = attn::Inputs {
        sinks: Some(&sinks),
        floats: vec![&temp, &rel],
        ..Default::default()
    };
    let direct = attn::forward::<RelSinks>(&client, &qa, &ka, &va, &inputs).unwrap();
    let d_out = Tensor::from_slice(&client, &wh, [b, hq, n, d]).unwrap();
    let g = attn::backward::<RelSinks>(&client, &qa, &ka, &va, &direct, &d_out, &inputs).unwrap();
    assert_same_bits(
        &burn_values(out.without_autodiff()),
        &direct.o.to_vec(&client),
        "O",
    );
    assert_same_bits(
        &grad4(&q),
        &bnhd(&g.dq.to_vec(&client), [b, hq, n, d]),
        "dQ",
    );
    assert_same_bits(
        &grad4(&k),
        &bnhd(&g.dk.to_vec(&client), [b, hkv, n, d]),
        "dK",
    );
    let d_sinks = g.d_sinks.as_ref().expect("sinks learn").to_vec(&client);
    assert_same_bits(&grad1(&s), &d_sinks, "d sinks");
    for (name, tensor) in [("temp", &t), ("rel", &r)] {
        let (_, direct) = g.d_inputs.iter().find(|(n, _)| *n == name).expect("learns");
        assert_same_bits(&grad1(tensor), &direct.to_vec(&client), name);
    }
    // The gradients are not all zero: the inputs reach the loss.
    assert!(grad1(&r).iter().any(|x| *x != 0.0) && grad1(&s).iter().any(|x| *x != 0.0));

    // Refusals, before anything runs.
    let refused = |learned: &[(Learned, &burn_tensor::Tensor<1>)], what: &str| {
        let e =
            attention_learning::<RelSinks>([&q, &k, &v], Layout::Bnhd, &none, learned).unwrap_err();
        assert!(matches!(e, AttnError::Input { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    };
    refused(&[(Learned::AlibiSlopes, &s)], "AlibiSlopes");
    refused(&[(Learned::Input("nope"), &t)], "nope");
    refused(&[(Learned::Sinks, &s), (Learned::Sinks, &s)], "twice");
    let half = flat(&sinks).cast(DType::F16);
    refused(&[(Learned::Sinks, &half)], "f32");
    let e = attention_learning::<RelSinks>(
        [&q, &k, &v],
        Layout::Bnhd,
        &none,
        &[(Learned::Input("rel"), &s)],
    )
    .unwrap_err();
    assert!(
        matches!(e, AttnError::Input { .. }),
        "a table of the wrong length: {e}"
    );
}

#[test]
fn forward_on_burn_tensors_matches_uploaded_slices() {
    let device = Device::default();
    let client = burn_client(&device).unwrap();
    let (mut rng, _) = seeded_rng("interop-burn");
    let (b, n, hq, hkv, d) = (2, 77, 4, 2, 64);
    let qh: Vec<f32> = random_vec(&mut rng, b * n * hq * d);
    let kh: Vec<f32> = random_vec(&mut rng, b * n * hkv * d);
    let vh: Vec<f32> = random_vec(&mut rng, b * n * hkv * d);
    let burn = |data: &Vec<f32>, h: usize| {
        burn_tensor::Tensor::<4>::from_data(
            TensorData::new(data.clone(), [b, n, h, d]),
            (&device, DType::F32),
        )
    };
    let (q, k, v) = (burn(&qh, hq), burn(&kh, hkv), burn(&vh, hkv));
    let out = Gqa2::forward(
        &client,
        &to_attn(&q, Layout::Bnhd).unwrap(),
        &to_attn(&k, Layout::Bnhd).unwrap(),
        &to_attn(&v, Layout::Bnhd).unwrap(),
    )
    .unwrap();
    let from_burn = burn_values(burn_out(&out.o, &device).unwrap());
    let direct = Gqa2::forward(
        &client,
        &Tensor::from_slice_bnhd(&client, &qh, [b, n, hq, d]).unwrap(),
        &Tensor::from_slice_bnhd(&client, &kh, [b, n, hkv, d]).unwrap(),
        &Tensor::from_slice_bnhd(&client, &vh, [b, n, hkv, d]).unwrap(),
    )
    .unwrap();
    let direct = direct.o.to_vec(&client);
    assert_same_bits(&from_burn, &direct, "forward");
}

fn candle_values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every path (contiguous, transposed view, narrowed view, broadcast, packed copy) gives the
/// values in attn's `[B, H, N, D]` order, and back.
#[test]
fn candle_round_trips() {
    use candle_core::{DType, Device};
    let client = attn::default_client();
    let (b, h, n, d) = (2, 3, 5, 64);
    let x = candle_core::Tensor::randn(0f32, 1f32, (b, n, h, d), &Device::Cpu).unwrap();
    let want = candle_values(&x.transpose(1, 2).unwrap());
    let cases = [
        (x.clone(), Layout::Bnhd),
        (x.transpose(1, 2).unwrap(), Layout::Bhnd),
        (
            x.transpose(1, 2).unwrap().contiguous().unwrap(),
            Layout::Bhnd,
        ),
    ];
    for (t, layout) in cases {
        let a = candle_in::<f32>(&client, &t, layout).unwrap();
        assert_eq!(a.shape(), [b, h, n, d]);
        assert_eq!(a.to_vec(&client), want, "{layout:?} {:?}", t.stride());
        assert_eq!(
            candle_values(&candle_out(&client, &a, &Device::Cpu).unwrap()),
            want
        );
    }
    // A narrowed sequence range (a start offset), and a strided head dim (packed once).
    let part = x.narrow(1, 1, 3).unwrap();
    let a = candle_in::<f32>(&client, &part, Layout::Bnhd).unwrap();
    assert_eq!(
        a.to_vec(&client),
        candle_values(&part.transpose(1, 2).unwrap())
    );
    let y = candle_core::Tensor::randn(0f32, 1f32, (b, n, d, h), &Device::Cpu).unwrap();
    let odd = y.transpose(2, 3).unwrap();
    let a = candle_in::<f32>(&client, &odd, Layout::Bnhd).unwrap();
    assert_eq!(
        a.to_vec(&client),
        candle_values(&odd.transpose(1, 2).unwrap())
    );
    // A broadcast over heads (stride 0): uploaded as is, smaller than its element count.
    let one = x
        .narrow(2, 0, 1)
        .unwrap()
        .broadcast_as((b, n, h, d))
        .unwrap();
    let a = candle_in::<f32>(&client, &one, Layout::Bnhd).unwrap();
    assert!(a.buffer_len() < b * n * h * d);
    assert_eq!(
        a.to_vec(&client),
        candle_values(&one.transpose(1, 2).unwrap())
    );
    // Refusals: another dtype, another rank.
    let e = candle_in::<attn::f16>(&client, &x, Layout::Bnhd).unwrap_err();
    assert!(matches!(e, AttnError::Input { .. }), "{e}");
    let e = candle_in::<f32>(&client, &x.flatten_from(2).unwrap(), Layout::Bnhd).unwrap_err();
    assert!(matches!(e, AttnError::Input { .. }), "{e}");
    let bf = x.to_dtype(DType::BF16).unwrap();
    assert_eq!(
        candle_in::<attn::bf16>(&client, &bf, Layout::Bnhd)
            .unwrap()
            .shape(),
        [b, h, n, d]
    );
}

#[test]
fn decode_on_a_burn_cache_matches_uploaded_slices() {
    let device = Device::default();
    let client = burn_client(&device).unwrap();
    let (mut rng, _) = seeded_rng("interop-burn-decode");
    // A contiguous cache in burn, [B, capacity, Hkv, D], two sequences of different lengths.
    let (b, cap, hq, hkv, d, nq) = (2, 96, 4, 2, 64, 1);
    let lengths = vec![96, 41];
    let qh: Vec<f32> = random_vec(&mut rng, b * nq * hq * d);
    let kh: Vec<f32> = random_vec(&mut rng, b * cap * hkv * d);
    let vh: Vec<f32> = random_vec(&mut rng, b * cap * hkv * d);
    let burn = |data: &Vec<f32>, n: usize, h: usize| {
        burn_tensor::Tensor::<4>::from_data(
            TensorData::new(data.clone(), [b, n, h, d]),
            (&device, DType::F32),
        )
    };
    let (q, k, v) = (burn(&qh, nq, hq), burn(&kh, cap, hkv), burn(&vh, cap, hkv));
    let cache = attn::KvCache::from_contiguous_parts(
        to_attn(&k, Layout::Bnhd).unwrap(),
        to_attn(&v, Layout::Bnhd).unwrap(),
        lengths.clone(),
    )
    .unwrap();
    let out = Gqa2::decode(&client, &to_attn(&q, Layout::Bnhd).unwrap(), &cache).unwrap();
    let from_burn = burn_values(burn_out(&out.o, &device).unwrap());

    let upload = |data: &Vec<f32>, n: usize, h: usize| {
        Tensor::from_slice_bnhd(&client, data, [b, n, h, d]).unwrap()
    };
    let direct_cache =
        attn::KvCache::from_contiguous_parts(upload(&kh, cap, hkv), upload(&vh, cap, hkv), lengths)
            .unwrap();
    let direct = Gqa2::decode(&client, &upload(&qh, nq, hq), &direct_cache).unwrap();
    let direct = direct.o.to_vec(&client);
    assert_same_bits(&from_burn, &direct, "decode");
}
