//! The kernels attn generates for this crate's variant, snapshot-tested: an attn or cubecl
//! upgrade that changes them shows up here as a diff to review (`cargo insta review`).

attn::attention! {
    /// The variant `src/main.rs` runs: GQA 4, causal, f16.
    pub Llama { heads: gqa(group = 4), head_dim: 64, dtype: f16, mask: causal }
}

#[test]
fn llama_kernels() {
    let kernels = attn::snapshot::kernels::<Llama>();
    // One line per kernel (portable CUDA and WGSL, tensor cores, warpgroup IR, the backward
    // kernels of each family, decode): any change to any of them moves its line.
    insta::assert_snapshot!("llama_digests", attn::snapshot::digests(&kernels));
    // The kernel NVIDIA GPUs before Hopper run, in full.
    insta::assert_snapshot!(
        "llama_tensor_cores",
        kernels
            .source("tensor_core_cuda")
            .expect("a 16-bit variant has one")
    );
}
