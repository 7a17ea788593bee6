// The variants of the `llama3` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// Llama-3 style: 32 query heads share 8 K/V heads, causal.
    pub Llama3 { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal }

    /// The same variant in f16, for back ends without bf16.
    pub Llama3F16 { heads: gqa(group = 4), head_dim: 128, dtype: f16, mask: causal }
}
