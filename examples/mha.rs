//! Classic multi-head attention: 8 heads, no mask, head dim 64, f32, with an explicit scale and
//! tile candidates.
//!
//! `cargo run --release --example mha [-- --seq 1024 --batch 2]`

mod common;

use common::{finish, run_and_check, Shape};

// The declaration lives in `variants/mha.rs`, shared with the snapshot tests.
include!("variants/mha.rs");

fn main() {
    let client = attn::default_client();
    let shape = Shape {
        batch: 2,
        heads_q: 8,
        heads_kv: 8,
        seq_q: 300,
        seq_k: 300,
    }
    .with_args();
    finish(run_and_check::<Mha64>(
        &client,
        shape,
        &attn::Inputs::default(),
    ));
}
