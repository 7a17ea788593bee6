// The variants of the `mistral` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// Mistral 7B: GQA 4, causal, sliding window of 4096 keys.
    pub Mistral { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal & window(left = 4095) }

    /// The same in f16 with a 128-key window, for back ends without bf16 and short sequences.
    pub MistralSmallWindow { heads: gqa(group = 4), head_dim: 128, dtype: f16, mask: causal & window(left = 127) }
}
