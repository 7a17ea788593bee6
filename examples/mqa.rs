//! Multi-query attention: 16 query heads share one K/V head, no mask, head dim 64, f16.
//!
//! `cargo run --release --example mqa [-- --seq 1024 --batch 2]`

mod common;

use common::{finish, run_and_check, Shape};

// The declaration lives in `variants/mqa.rs`, shared with the snapshot tests.
include!("variants/mqa.rs");

fn main() {
    let client = attn::default_client();
    let shape = Shape {
        batch: 2,
        heads_q: 16,
        heads_kv: 1,
        seq_q: 384,
        seq_k: 640,
    }
    .with_args();
    finish(run_and_check::<Mqa64>(
        &client,
        shape,
        &attn::Inputs::default(),
    ));
}
