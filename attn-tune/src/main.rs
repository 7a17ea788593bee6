//! `attn-tune` for this workspace: tunes the example variants (`examples/variants/`).
//!
//! A program of yours gets the same command by depending on `attn-tune` and adding a binary with
//! `fn main() -> std::process::ExitCode { attn_tune::main() }`: every variant it declares is found.

#[allow(dead_code)]
mod variants {
    include!("../../examples/variants/alibi.rs");
    include!("../../examples/variants/gemma2.rs");
    include!("../../examples/variants/llama3.rs");
    include!("../../examples/variants/mha.rs");
    include!("../../examples/variants/mistral.rs");
    include!("../../examples/variants/mqa.rs");
    include!("../../examples/variants/packed_documents.rs");
    include!("../../examples/variants/sinks.rs");
}

fn main() -> std::process::ExitCode {
    attn_tune::main()
}
