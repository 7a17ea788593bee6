//! Gemma-2 attention: logit softcapping (`50 · tanh(s / 50)`) on every layer, and layers that
//! alternate between a local sliding window (4096 keys) and global causal attention. GQA 2,
//! head dim 256, scale `1/√256`.
//!
//! `cargo run --release --example gemma2 [-- --seq 1024 --batch 2]`

mod common;

use common::{finish, run_and_check, Shape};

// The declaration lives in `variants/gemma2.rs`, shared with the snapshot tests.
include!("variants/gemma2.rs");

fn main() {
    let client = attn::default_client();
    let shape = Shape {
        batch: 1,
        heads_q: 4,
        heads_kv: 2,
        seq_q: 300,
        seq_k: 300,
    }
    .with_args();
    let none = attn::Inputs::default();
    // Layers alternate: local, global, local, global, ...
    let result = run_and_check::<Gemma2Local>(&client, shape, &none)
        .and_then(|ok| Ok(ok & run_and_check::<Gemma2Global>(&client, shape, &none)?));
    finish(result);
}
