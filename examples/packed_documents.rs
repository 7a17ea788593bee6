//! Document masking for packed training batches: several documents of different lengths are
//! packed into one sequence, and each token attends only within its own document (causally).
//! Offsets (cu_seqlens style) are run-time values: a new packing never recompiles anything.
//!
//! `cargo run --release --example packed_documents`

mod common;

use common::{finish, run_and_check, Shape};

// The declaration lives in `variants/packed_documents.rs`, shared with the snapshot tests.
include!("variants/packed_documents.rs");

fn main() {
    let client = attn::default_client();
    // Seven documents, one of length 1, packed into 700 tokens.
    let offsets: Vec<i32> = vec![0, 1, 130, 131, 300, 512, 513, 700];
    let total = *offsets.last().expect("offsets") as usize;
    let shape = Shape {
        batch: 1,
        heads_q: 4,
        heads_kv: 2,
        seq_q: total,
        seq_k: total,
    };
    let inputs = PackedCausalInputs {
        q_offsets: &offsets,
        k_offsets: &offsets,
    };
    finish(run_and_check::<PackedCausal>(
        &client,
        shape,
        &inputs.to_inputs(),
    ));
}
