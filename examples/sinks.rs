//! Attention sinks (gpt-oss style): each head has a learned logit that joins the softmax
//! denominator without contributing a value, so a head can attend to "nothing". Combined with a
//! sliding window, as gpt-oss's local layers do; GQA 8, head dim 64.
//!
//! `cargo run --release --example sinks [-- --seq 1024 --batch 2]`

mod common;

use common::{finish, run_and_check, Shape};

// The declaration lives in `variants/sinks.rs`, shared with the snapshot tests.
include!("variants/sinks.rs");

fn main() {
    let client = attn::default_client();
    let shape = Shape {
        batch: 2,
        heads_q: 16,
        heads_kv: 2,
        seq_q: 400,
        seq_k: 400,
    }
    .with_args();
    let sinks: Vec<f32> = (0..shape.heads_q).map(|h| h as f32 * 0.5 - 2.0).collect();
    let inputs = SinkWindowInputs { sinks: &sinks };
    finish(run_and_check::<SinkWindow>(
        &client,
        shape,
        &inputs.to_inputs(),
    ));
}
