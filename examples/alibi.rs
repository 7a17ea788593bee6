//! ALiBi (Press et al.): no position embeddings; each head adds `−slope_h · |q − k|` to its logits,
//! with the standard geometric slopes for the run-time number of heads (BLOOM, MPT). Causal, MHA,
//! head dim 128.
//!
//! `cargo run --release --example alibi [-- --seq 1024 --batch 2]`

mod common;

use common::{finish, run_and_check, Shape};

// The declaration lives in `variants/alibi.rs`, shared with the snapshot tests.
include!("variants/alibi.rs");

fn main() {
    let client = attn::default_client();
    let shape = Shape {
        batch: 2,
        heads_q: 12,
        heads_kv: 12,
        seq_q: 333,
        seq_k: 333,
    }
    .with_args();
    let none = attn::Inputs::default();
    let slopes: Vec<f32> = (0..shape.heads_q)
        .map(|h| 0.5f32.powi(h as i32 + 1))
        .collect();
    let bias_scale: Vec<f32> = (0..shape.heads_q).map(|h| 0.1 * h as f32 - 0.5).collect();
    let given = AlibiGivenInputs {
        alibi_slopes: &slopes,
        bias_scale: &bias_scale,
    };
    let result = run_and_check::<Alibi>(&client, shape, &none)
        .and_then(|ok| Ok(ok & run_and_check::<AlibiGiven>(&client, shape, &given.to_inputs())?));
    finish(result);
}
