//! A Llama-style attention block written in burn, its attention step run three ways: burn ops
//! only (repeat K/V heads, Q·Kᵀ·scale, causal mask, softmax, ·V), burn's own
//! `module::attention` (cubek's flash kernels when burn's autotuning is on, as with the `burn`
//! crate's default features and attn's `burn-fusion` feature; its unfused fallback otherwise), and
//! attn's kernel on burn's own buffers (zero-copy, `attn::interop::burn`).
//!
//! x [B, N, Dm] -> q/k/v projections -> RoPE -> GQA causal attention -> output projection.
//!
//! First a small odd shape (N 333) is checked against float64 with FlashAttention's criterion,
//! then the step is timed at the shape asked for (default small enough for lavapipe):
//!
//! `cargo run --release --example burn_llama --features burn [-- --seq 512 --batch 1 --heads 8]`
//! (on NVIDIA: `--no-default-features --features cuda,burn`). Runs in bf16 where the device
//! supports it, else f16 (wgpu/Vulkan has no bf16).

use std::time::Instant;

use attn::cubecl::MemoryScope;
use attn::inputs::pack;
use attn::interop::burn::{burn_tensor, client as attn_client, from_attn, to_attn, to_cube};
use attn::interop::Layout;
use attn::reference::{attention_f64, attention_naive, error_floor, widen, Verdict};
use attn::{Problem, Variant};
use burn_tensor::activation::softmax;
use burn_tensor::module::attention;
use burn_tensor::ops::{AttentionModuleOptions, CausalAlignment};
use burn_tensor::{Bool, DType, Device, Distribution, Int, Tensor, TensorData};

attn::attention! {
    /// The block's attention: each K/V head serves 4 query heads, causal, head dim 128.
    pub BlockBf16 { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal }
    /// The same in f16, for back ends without bf16.
    pub BlockF16 { heads: gqa(group = 4), head_dim: 128, dtype: f16, mask: causal }
}

const HEAD_DIM: usize = 128;
const GROUP: usize = 4;
const ROPE_THETA: f64 = 500_000.0;

/// The block's size.
#[derive(Clone, Copy, Debug)]
struct Config {
    batch: usize,
    seq: usize,
    heads_q: usize,
}

impl Config {
    fn heads_kv(&self) -> usize {
        self.heads_q / GROUP
    }
    fn d_model(&self) -> usize {
        self.heads_q * HEAD_DIM
    }
    /// `--seq N`, `--batch B`, `--heads Hq` (a multiple of 4) override the defaults.
    fn from_args() -> Self {
        let mut c = Config {
            batch: 1,
            seq: 512,
            heads_q: 8,
        };
        let args: Vec<String> = std::env::args().collect();
        for pair in args.windows(2) {
            let value = || pair[1].parse::<usize>().expect("a positive integer");
            match pair[0].as_str() {
                "--seq" => c.seq = value(),
                "--batch" => c.batch = value(),
                "--heads" => c.heads_q = value(),
                _ => {}
            }
        }
        assert!(
            c.heads_q.is_multiple_of(GROUP),
            "--heads must be a multiple of {GROUP}"
        );
        c
    }
}

/// Random projection weights, stored `[in, out]` so that `x · W` is the projection.
struct Weights {
    wq: Tensor<2>,
    wk: Tensor<2>,
    wv: Tensor<2>,
    wo: Tensor<2>,
}

impl Weights {
    fn random(c: &Config, device: &Device, dtype: DType) -> Self {
        let w = |rows: usize, cols: usize| {
            let std = 1.0 / (rows as f64).sqrt();
            Tensor::<2>::random(
                [rows, cols],
                Distribution::Normal(0.0, std),
                (device, dtype),
            )
        };
        Self {
            wq: w(c.d_model(), c.heads_q * HEAD_DIM),
            wk: w(c.d_model(), c.heads_kv() * HEAD_DIM),
            wv: w(c.d_model(), c.heads_kv() * HEAD_DIM),
            wo: w(c.heads_q * HEAD_DIM, c.d_model()),
        }
    }
}

/// `x [B, N, Din] · w [Din, Dout] -> [B, N, Dout]` as one 2-D matmul.
fn linear(x: Tensor<3>, w: &Tensor<2>) -> Tensor<3> {
    let [b, n, d_in] = x.dims();
    let d_out = w.dims()[1];
    x.reshape([b * n, d_in])
        .matmul(w.clone())
        .reshape([b, n, d_out])
}

/// RoPE tables `cos, sin`, each `[1, N, 1, D/2]` in `dtype` (angles computed in f32 on device).
fn rope_tables(
    seq: usize,
    head_dim: usize,
    device: &Device,
    dtype: DType,
) -> (Tensor<4>, Tensor<4>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| (1.0 / ROPE_THETA.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let inv_freq =
        Tensor::<2>::from_data(TensorData::new(inv_freq, [1, half]), (device, DType::F32));
    let pos = Tensor::<1, Int>::arange(0..seq as i64, device)
        .float()
        .cast(DType::F32)
        .reshape([seq, 1]);
    let angles = pos.matmul(inv_freq); // [N, D/2]
    let table = |t: Tensor<2>| t.cast(dtype).reshape([1, seq, 1, half]);
    (table(angles.clone().cos()), table(angles.sin()))
}

/// Rotate-half RoPE on `x [B, N, H, D]`.
fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, n, h, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let cos = cos.clone().expand([b, n, h, half]);
    let sin = sin.clone().expand([b, n, h, half]);
    let r1 = x1.clone() * cos.clone() - x2.clone() * sin.clone();
    let r2 = x1 * sin + x2 * cos;
    Tensor::cat(vec![r1, r2], 3)
}

/// Projections and RoPE: q `[B, N, Hq, D]`, k and v `[B, N, Hkv, D]` (the layout a projection
/// produces; attn reads it as `[B, H, N, D]` through strides).
fn qkv(c: &Config, device: &Device, dtype: DType) -> (Tensor<4>, Tensor<4>, Tensor<4>, Weights) {
    let w = Weights::random(c, device, dtype);
    let x = Tensor::<3>::random(
        [c.batch, c.seq, c.d_model()],
        Distribution::Normal(0.0, 1.0),
        (device, dtype),
    );
    let (cos, sin) = rope_tables(c.seq, HEAD_DIM, device, dtype);
    let (b, n) = (c.batch, c.seq);
    let q = linear(x.clone(), &w.wq).reshape([b, n, c.heads_q, HEAD_DIM]);
    let k = linear(x.clone(), &w.wk).reshape([b, n, c.heads_kv(), HEAD_DIM]);
    let v = linear(x, &w.wv).reshape([b, n, c.heads_kv(), HEAD_DIM]);
    (rope(q, &cos, &sin), rope(k, &cos, &sin), v, w)
}

/// `[B, N, H, D] -> [B, H, N, D]` with each K/V head repeated for its query group.
fn repeat_kv(t: Tensor<4>, group: usize) -> Tensor<4> {
    let [b, n, hkv, d] = t.dims();
    t.swap_dims(1, 2) // [B, Hkv, N, D]
        .reshape([b, hkv, 1, n, d])
        .repeat_dim(2, group) // [B, Hkv, G, N, D]
        .reshape([b, hkv * group, n, d])
}

/// The attention step in burn ops: repeat K/V heads, Q·Kᵀ·scale, causal mask, softmax, ·V.
/// Returns `[B, Hq, N, D]`. Scores and softmax run in f32.
fn attention_burn(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let dtype = q.dtype();
    let device = q.device();
    let [b, n, hq, d] = q.dims();
    let group = hq / k.dims()[2];
    let q = q.swap_dims(1, 2); // [B, Hq, N, D]
    let k = repeat_kv(k, group);
    let v = repeat_kv(v, group);
    let scale = 1.0 / (d as f64).sqrt();
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .cast(DType::F32)
        .mul_scalar(scale); // [B, Hq, N, N]
                            // `true` above the diagonal: key j > query i is masked.
    let mask = Tensor::<2, Bool>::tril_mask([n, n], 0, &device)
        .unsqueeze::<4>()
        .expand([b, hq, n, n]);
    let probs = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3).cast(dtype);
    probs.matmul(v)
}

/// The attention step through burn's own op (`burn_tensor::module::attention`: GQA by head
/// index, causal by flag; cubek's flash kernels when burn autotunes, else its unfused fallback).
/// `[B, Hq, N, D]`.
fn attention_burn_builtin(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let options = AttentionModuleOptions {
        scale: None, // 1/sqrt(head_dim)
        softcap: None,
        is_causal: true,
        causal_alignment: CausalAlignment::TopLeft,
    };
    attention(
        q.swap_dims(1, 2),
        k.swap_dims(1, 2),
        v.swap_dims(1, 2),
        None,
        None,
        options,
    )
}

/// The attention step through attn: zero-copy views in, zero-copy result out. `[B, Hq, N, D]`.
fn attention_attn<V: Variant>(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Tensor<4> {
    let device = q.device();
    let client = attn_client(&device).expect("a cubecl device");
    let qa = to_attn::<V::Elem>(q, Layout::Bnhd).expect("q view");
    let ka = to_attn::<V::Elem>(k, Layout::Bnhd).expect("k view");
    let va = to_attn::<V::Elem>(v, Layout::Bnhd).expect("v view");
    let out =
        attn::forward::<V>(&client, &qa, &ka, &va, &attn::Inputs::default()).expect("attention");
    from_attn(&out.o, &device).expect("output")
}

/// `[B, Hq, N, D] -> [B, N, Hq·D] · Wo`.
fn output_projection(o: Tensor<4>, w: &Weights) -> Tensor<3> {
    let [b, h, n, d] = o.dims();
    linear(o.swap_dims(1, 2).reshape([b, n, h * d]), &w.wo)
}

/// The attention step of each path against float64, on a small odd shape; whether attn passed.
fn check<V: Variant>(device: &Device, dtype: DType) -> bool {
    let c = Config {
        batch: 1,
        seq: 333,
        heads_q: 8,
    };
    println!(
        "check: B {} N {} Hq/Hkv {}/{} D {HEAD_DIM} {dtype:?} causal, against float64",
        c.batch,
        c.seq,
        c.heads_q,
        c.heads_kv()
    );
    let (q, k, v, _) = qkv(&c, device, dtype);
    let client = attn_client(device).expect("a cubecl device");
    let (qa, ka, va) = (
        to_attn::<V::Elem>(&q, Layout::Bnhd).unwrap(),
        to_attn::<V::Elem>(&k, Layout::Bnhd).unwrap(),
        to_attn::<V::Elem>(&v, Layout::Bnhd).unwrap(),
    );
    let none = attn::Inputs::default();
    let problem = Problem::new(&V::SPEC, &qa, &ka, &va).unwrap();
    let packed = pack(&V::SPEC, &problem, &none).unwrap();
    let (qw, kw, vw) = (
        widen(&qa.to_vec(&client)),
        widen(&ka.to_vec(&client)),
        widen(&va.to_vec(&client)),
    );
    let reference = attention_f64::<V>(&problem, &packed, &none, &qw, &kw, &vw);
    let naive = attention_naive::<V>(&problem, &packed, &none, &qw, &kw, &vw);
    let mut attn_passed = false;
    for (name, o) in [
        ("attn", attention_attn::<V>(&q, &k, &v)),
        ("burn ops", attention_burn(q.clone(), k.clone(), v.clone())),
        (
            "burn attn op",
            attention_burn_builtin(q.clone(), k.clone(), v.clone()),
        ),
    ] {
        let o: Vec<f64> = o
            .try_into_vec_as::<f32>()
            .expect("read")
            .into_iter()
            .map(f64::from)
            .collect();
        let verdict = Verdict::new(&o, &reference.o, &naive, error_floor::<V::Elem>());
        println!(
            "  {name:>12}: max |O − float64| = {:.3e} (bound {:.3e}: 2 × naive {dtype:?} {:.3e} + floor) {}",
            verdict.kernel_error,
            verdict.bound,
            verdict.naive_error,
            if verdict.passed() { "within" } else { "OUTSIDE" }
        );
        if name == "attn" {
            attn_passed = verdict.passed();
        }
    }
    attn_passed
}

/// Device memory in use on `device`'s client: (bytes, live allocations).
fn memory(device: &Device) -> (u64, u64) {
    let usage = attn_client(device)
        .unwrap()
        .memory_report(MemoryScope::Device)
        .usage();
    (usage.bytes_in_use, usage.number_allocs)
}

/// The three paths timed on the attention step (median of 10 calls each, after a warm-up that
/// compiles and tunes), the block's outputs compared, and attn's views shown to allocate nothing.
fn time<V: Variant>(c: &Config, device: &Device, dtype: DType) {
    println!(
        "time: B {} N {} Hq/Hkv {}/{} D {HEAD_DIM} {dtype:?} causal",
        c.batch,
        c.seq,
        c.heads_q,
        c.heads_kv()
    );
    let (q, k, v, w) = qkv(c, device, dtype);
    device.sync().expect("sync");

    let before = memory(device);
    let views = [&q, &k, &v].map(|t| to_attn::<V::Elem>(t, Layout::Bnhd).unwrap());
    device.sync().expect("sync");
    let after = memory(device);
    println!(
        "  q, k, v as attn tensors: {} bytes and {} allocations added (zero-copy: the views share burn's buffers)",
        after.0 as i64 - before.0 as i64,
        after.1 as i64 - before.1 as i64
    );
    drop(views);

    // Each call's result is made to exist before the clock stops: under burn's fusion nothing
    // runs until a tensor is needed (a dropped result never runs), and fusion executes on its own
    // stream, attn on the caller's, so both are waited for.
    let client = attn_client(device).expect("a cubecl device");
    let finish = |o: &Tensor<4>| {
        let o = to_cube(o).expect("burn ran the step");
        device.sync().expect("sync");
        attn::sync(&client).expect("sync");
        // A launch that failed (or was skipped because its inputs failed) leaves the output
        // unwritten: such a time would be no measurement.
        if let Err(e) = client.check([&o.handle]) {
            println!("  the step's output was never written: {e}");
            std::process::exit(1);
        }
    };
    let step = |name: &str, f: &dyn Fn() -> Tensor<4>| -> Tensor<4> {
        let o = f(); // warm-up: kernel compilation, autotune, attn's tuning
        finish(&o);
        let mut times = Vec::new();
        for _ in 0..10 {
            let start = Instant::now();
            finish(&f());
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "  {name:>12}: attention step {:8.3} ms (median of 10)",
            times[5]
        );
        o
    };
    let o_burn = step("burn ops", &|| {
        attention_burn(q.clone(), k.clone(), v.clone())
    });
    let o_fused = step("burn attn op", &|| {
        attention_burn_builtin(q.clone(), k.clone(), v.clone())
    });
    let o_attn = step("attn", &|| attention_attn::<V>(&q, &k, &v));

    // The block's output on each path, read back; burn's own kernels may fail to launch at some
    // shapes (reported, not fatal: the comparison is skipped).
    let y = |o: Tensor<4>| output_projection(o, &w).try_into_vec_as::<f32>();
    let Ok(y_burn) =
        y(o_burn).map_err(|e| println!("  burn ops: the block could not be read: {e:?}"))
    else {
        return;
    };
    let scale = y_burn.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (name, o) in [("burn attn op", o_fused), ("attn", o_attn)] {
        match y(o) {
            Ok(y) => {
                let diff = y_burn
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                println!(
                    "  block output: max |burn ops − {name}| = {diff:.3e} (max |y| = {scale:.3e})"
                );
            }
            Err(e) => println!("  {name}: the block could not be read: {e:?}"),
        }
    }
}

fn run<V: Variant>(device: &Device, dtype: DType) -> bool {
    let passed = check::<V>(device, dtype);
    time::<V>(&Config::from_args(), device, dtype);
    passed
}

fn main() {
    // CUDA first when compiled in, else wgpu (`BURN_DEVICE` overrides); explicitly:
    // `Device::cuda(0)` or `Device::wgpu(burn_tensor::DeviceKind::DefaultDevice)`.
    let device = Device::default();
    let client = attn_client(&device).expect("a cubecl device");
    let passed = if device.supports_dtype(DType::BF16) && attn::supports::<attn::bf16>(&client) {
        run::<BlockBf16>(&device, DType::BF16)
    } else {
        println!("bf16 is not supported on this device; running in f16");
        run::<BlockF16>(&device, DType::F16)
    };
    println!("{}", if passed { "PASS" } else { "FAIL" });
    if !passed {
        std::process::exit(1);
    }
}
