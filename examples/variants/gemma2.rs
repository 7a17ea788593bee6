// The variants of the `gemma2` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// Gemma-2 local layers: causal, sliding window of 4096 keys, softcap 50.
    pub Gemma2Local { heads: gqa(group = 2), head_dim: 256, dtype: f16, mask: causal & window(left = 4095), softcap: 50.0 }

    /// Gemma-2 global layers: causal, softcap 50.
    pub Gemma2Global { heads: gqa(group = 2), head_dim: 256, dtype: f16, mask: causal, softcap: 50.0 }
}
