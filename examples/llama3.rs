//! Llama-3 attention: 32 query heads share 8 K/V heads (GQA, group 4), causal, head dim 128.
//!
//! `cargo run --release --example llama3 [-- --seq 1024 --batch 2]`
//!
//! Runs in bf16 where the back end supports it (CUDA), else in f16 (wgpu/Vulkan has no bf16).

mod common;

use common::{finish, run_and_check, Shape};

// The declaration lives in `variants/llama3.rs`, shared with the snapshot tests.
include!("variants/llama3.rs");

fn main() {
    let client = attn::default_client();
    let shape = Shape {
        batch: 1,
        heads_q: 32,
        heads_kv: 8,
        seq_q: 512,
        seq_k: 512,
    }
    .with_args();
    let result = if attn::supports::<attn::bf16>(&client) {
        run_and_check::<Llama3>(&client, shape, &attn::Inputs::default())
    } else {
        println!("bf16 is not supported on this back end; running the f16 variant");
        run_and_check::<Llama3<attn::f16>>(&client, shape, &attn::Inputs::default())
    };
    finish(result);
}
