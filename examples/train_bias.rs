//! A tiny training loop: learn an attention layer's temperature and its T5-style relative
//! position bias (a table of 32 distance buckets per head), both declared inputs of a score
//! expression, by gradient descent through attn's backward pass, to match a target layer's
//! output.
//!
//! `cargo run --release --example train_bias`
//!
//! The first step's gradients are checked against float64 (`attn::reference`); the loss must
//! fall by 100× over the run.

use attn::inputs::pack;
use attn::reference::{backward_f64, random_vec, seeded_rng, widen, OwnedInputs};
use attn::{Problem, Tensor};

include!("variants/train_bias.rs");

const HEADS_Q: usize = 4;
const HEADS_KV: usize = 2;
const SEQ: usize = 96;
const BUCKETS: usize = 32;
const D: usize = 64;

fn main() -> Result<(), attn::AttnError> {
    let client = attn::default_client();
    let (mut rng, _) = seeded_rng("train_bias");
    let q_shape = [1, HEADS_Q, SEQ, D];
    let kv_shape = [1, HEADS_KV, SEQ, D];
    let (qh, kh, vh): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        random_vec(&mut rng, HEADS_Q * SEQ * D),
        random_vec(&mut rng, HEADS_KV * SEQ * D),
        random_vec(&mut rng, HEADS_KV * SEQ * D),
    );
    let q = Tensor::from_slice(&client, &qh, q_shape)?;
    let k = Tensor::from_slice(&client, &kh, kv_shape)?;
    let v = Tensor::from_slice(&client, &vh, kv_shape)?;

    // The layer to match: a sharper softmax, and per head a bias over the distance buckets
    // (near keys favoured by some heads, far ones by others).
    let target_rel: Vec<f32> = (0..HEADS_Q * BUCKETS)
        .map(|i| {
            let (h, bucket) = ((i / BUCKETS) as f32, (i % BUCKETS) as f32);
            2.0 * ((h + 1.0) * bucket / 12.0).sin() - 0.1 * bucket * (h - 1.5)
        })
        .collect();
    let target_temp = 1.6f32;
    let target = RelBias::forward(
        &client,
        &q,
        &k,
        &v,
        &RelBiasInputs {
            temp: target_temp,
            rel: &target_rel,
        },
    )?;
    let target_o = target.o.to_vec(&client);

    // Start from the plain layer: temperature 1, no bias; Adam over the 1 + 4 × 32 parameters.
    let mut params = vec![0.0f32; 1 + HEADS_Q * BUCKETS];
    params[0] = 1.0;
    let mut adam = Adam::new(params.len(), 0.05);
    let steps = 300;
    let mut first_loss = 0.0;
    let mut loss = 0.0;
    for step in 0..steps {
        let inputs = RelBiasInputs {
            temp: params[0],
            rel: &params[1..],
        };
        let out = RelBias::forward(&client, &q, &k, &v, &inputs)?;
        let o = out.o.to_vec(&client);
        // Mean squared error and its gradient with respect to O.
        let n = o.len() as f32;
        loss = o
            .iter()
            .zip(&target_o)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / n;
        let d_o: Vec<f32> = o
            .iter()
            .zip(&target_o)
            .map(|(a, b)| 2.0 * (a - b) / n)
            .collect();
        let d_out = Tensor::from_slice(&client, &d_o, q_shape)?;
        let grads = RelBias::backward(&client, &q, &k, &v, &out, &d_out, &inputs)?;
        let mut gradient = grads.d_inputs[0].1.to_vec(&client);
        gradient.extend(grads.d_inputs[1].1.to_vec(&client));
        if step == 0 {
            first_loss = loss;
            check_gradients(&inputs, [&qh, &kh, &vh, &d_o], &gradient);
        }
        if step % 50 == 0 || step == steps - 1 {
            println!(
                "step {step:>3}: loss {loss:.3e}, temp {:.3}, head 0's buckets 1..5 {:.2?}",
                params[0],
                relative(&params[1..7])
            );
        }
        adam.step(&mut params, &gradient);
    }
    println!(
        "target: temp {target_temp}, head 0's buckets 1..5 {:.2?}; loss {first_loss:.3e} → {loss:.3e}",
        relative(&target_rel[..6])
    );
    if loss * 100.0 > first_loss {
        eprintln!("FAIL: the loss fell by less than 100×");
        std::process::exit(1);
    }
    println!("PASS: the loss fell {:.0}×", first_loss / loss);
    Ok(())
}

/// A head's buckets less its first: the softmax ignores a constant added to every bucket of a
/// head, so that is what training can recover.
fn relative(buckets: &[f32]) -> Vec<f32> {
    buckets[1..].iter().map(|b| b - buckets[0]).collect()
}

/// Adam (Kingma and Ba) with the usual β₁ = 0.9, β₂ = 0.999.
struct Adam {
    lr: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    fn new(params: usize, lr: f32) -> Self {
        Self {
            lr,
            m: vec![0.0; params],
            v: vec![0.0; params],
            t: 0,
        }
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        let (b1, b2) = (0.9f32, 0.999f32);
        self.t += 1;
        for i in 0..params.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * grads[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * grads[i] * grads[i];
            let m = self.m[i] / (1.0 - b1.powi(self.t));
            let v = self.v[i] / (1.0 - b2.powi(self.t));
            params[i] -= self.lr * m / (v.sqrt() + 1e-8);
        }
    }
}

/// The first step's input gradients (temperature, then the table) against the float64
/// reference on the same data.
fn check_gradients(inputs: &RelBiasInputs<'_>, qkv_do: [&[f32]; 4], got: &[f32]) {
    let client = attn::default_client();
    let owned = OwnedInputs {
        floats: vec![vec![inputs.temp], inputs.rel.to_vec()],
        ..OwnedInputs::default()
    };
    let view = owned.view();
    let upload = |h: &[f32], shape| Tensor::from_slice(&client, h, shape).expect("fills its shape");
    let q = upload(qkv_do[0], [1, HEADS_Q, SEQ, D]);
    let kv = upload(qkv_do[1], [1, HEADS_KV, SEQ, D]);
    let problem = Problem::new(&RelBias::SPEC, &q, &kv, &kv).expect("valid problem");
    let packed = pack(&RelBias::SPEC, &problem, &view).expect("valid inputs");
    let wide: Vec<Vec<f64>> = qkv_do.iter().map(|x| widen(x)).collect();
    let reference = backward_f64::<RelBias>(
        &problem,
        &packed,
        &view,
        [&wide[0], &wide[1], &wide[2], &wide[3]],
    );
    let want: Vec<f64> = reference.d_inputs.concat();
    let error = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let read = want[1..].iter().filter(|x| **x != 0.0).count();
    println!(
        "first step: d temp {:.4e} (float64 {:.4e}); d rel: {read} of {} buckets read, max |kernel − float64| {error:.2e} of max {scale:.2e}",
        got[0],
        want[0],
        want.len() - 1
    );
    if got.len() != want.len() || error > 1e-4 * scale.max(1e-6) + 1e-7 {
        eprintln!("FAIL: the input gradients differ from float64 by {error:.2e}");
        std::process::exit(1);
    }
}
