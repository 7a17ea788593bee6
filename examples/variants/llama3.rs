// The variants of the `llama3` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// Llama-3 style: 32 query heads share 8 K/V heads, causal. bf16, or f16 for back ends
    /// without bf16 (`Llama3<attn::f16>`).
    pub Llama3 { heads: gqa(group = 4), head_dim: 128, dtype: bf16 | f16, mask: causal }
}
