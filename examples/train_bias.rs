//! A tiny training loop: learn an attention layer's temperature and per-head relative-position
//! bias, both declared inputs of a score expression, by gradient descent through attn's
//! backward pass, to match a target layer's output.
//!
//! `cargo run --release --example train_bias`
//!
//! The first step's gradients are checked against float64 (`attn::reference`); the loss must
//! fall by 100× over the run.

use attn::inputs::pack;
use attn::reference::{backward_f64, random_vec, seeded_rng, widen, OwnedInputs};
use attn::{Problem, Tensor, Variant};

attn::attention! {
    /// GQA 2, causal, a learnable temperature and a learnable relative bias per head.
    pub RelBias {
        heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal,
        inputs: { temp: f32, bias: [f32; heads] },
        score: |s, b, h, q, k| s * temp + bias[h] * ((q - k) as f32 / 16.0).tanh(),
    }
}

const HEADS_Q: usize = 4;
const HEADS_KV: usize = 2;
const SEQ: usize = 48;
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

    // The layer to match: a sharper softmax and a bias pulling each head its own way.
    let target_bias = [2.0f32, -1.5, 0.5, -3.0];
    let target_temp = 1.6f32;
    let target = RelBias::forward(
        &client,
        &q,
        &k,
        &v,
        &RelBiasInputs {
            temp: target_temp,
            bias: &target_bias,
        },
    )?;
    let target_o = target.o.to_vec(&client);

    // Start from the plain layer: temperature 1, no bias; Adam over the five parameters.
    let (mut temp, mut bias) = (1.0f32, [0.0f32; HEADS_Q]);
    let mut adam = Adam::new(1 + HEADS_Q, 0.1);
    let steps = 200;
    let mut first_loss = 0.0;
    let mut loss = 0.0;
    for step in 0..steps {
        let inputs = RelBiasInputs { temp, bias: &bias };
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
        let d_temp = grads.d_inputs[0].1.to_vec(&client)[0];
        let d_bias = grads.d_inputs[1].1.to_vec(&client);
        if step == 0 {
            first_loss = loss;
            check_gradients(&inputs, [&qh, &kh, &vh, &d_o], d_temp, &d_bias);
        }
        if step % 25 == 0 || step == steps - 1 {
            println!("step {step:>3}: loss {loss:.3e}, temp {temp:.3}, bias {bias:.3?}");
        }
        let mut params = [temp, bias[0], bias[1], bias[2], bias[3]];
        let grads = [d_temp, d_bias[0], d_bias[1], d_bias[2], d_bias[3]];
        adam.step(&mut params, &grads);
        temp = params[0];
        bias.copy_from_slice(&params[1..]);
    }
    println!(
        "target: temp {target_temp}, bias {target_bias:?}; loss {first_loss:.3e} → {loss:.3e}"
    );
    if loss * 100.0 > first_loss {
        eprintln!("FAIL: the loss fell by less than 100×");
        std::process::exit(1);
    }
    println!("PASS: the loss fell {:.0}×", first_loss / loss);
    Ok(())
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

/// The first step's input gradients against the float64 reference on the same data.
fn check_gradients(inputs: &RelBiasInputs<'_>, qkv_do: [&[f32]; 4], d_temp: f32, d_bias: &[f32]) {
    let client = attn::default_client();
    let owned = OwnedInputs {
        floats: vec![vec![inputs.temp], inputs.bias.to_vec()],
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
    let want_temp = reference.d_inputs[0][0];
    let err_temp = (d_temp as f64 - want_temp).abs();
    let err_bias = d_bias
        .iter()
        .zip(&reference.d_inputs[1])
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    let scale = reference.d_inputs[1]
        .iter()
        .fold(want_temp.abs(), |m, x| m.max(x.abs()));
    println!(
        "first step: d temp {d_temp:.4e} (float64 {want_temp:.4e}), max |d bias − float64| {err_bias:.2e}"
    );
    if err_temp.max(err_bias) > 1e-4 * scale.max(1e-6) + 1e-7 {
        eprintln!(
            "FAIL: the input gradients differ from float64 by {:.2e}",
            err_temp.max(err_bias)
        );
        std::process::exit(1);
    }
}
