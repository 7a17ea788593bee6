//! Mistral attention: 32 query heads share 8 K/V heads (GQA, group 4), causal with a sliding
//! window of 4096 keys (the query itself and the 4095 before it), head dim 128.
//!
//! `cargo run --release --example mistral [-- --seq 1024 --batch 2]`
//!
//! The window is declared in the variant, so key blocks outside it are never loaded: at a long
//! sequence the cost grows with the window, not with the sequence. The default run uses a short
//! sequence and a variant with a 128-key window so the window actually cuts on the CPU back end.

mod common;

use common::{finish, run_and_check, Shape};

// The declaration lives in `variants/mistral.rs`, shared with the snapshot tests.
include!("variants/mistral.rs");

fn main() {
    let client = attn::default_client();
    let shape = Shape {
        batch: 1,
        heads_q: 8,
        heads_kv: 2,
        seq_q: 600,
        seq_k: 600,
    }
    .with_args();
    let none = attn::Inputs::default();
    let result = if attn::supports::<attn::bf16>(&client) {
        run_and_check::<Mistral>(&client, shape, &none)
            .and_then(|ok| Ok(ok & run_and_check::<MistralSmallWindow>(&client, shape, &none)?))
    } else {
        println!("bf16 is not supported on this back end; running the f16 variant");
        run_and_check::<MistralSmallWindow>(&client, shape, &none)
    };
    finish(result);
}
