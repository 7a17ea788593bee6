// The variants of the `sinks` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// gpt-oss local layers: GQA 8, causal, 128-key window, per-head sinks.
    pub SinkWindow { heads: gqa(group = 8), head_dim: 64, dtype: f16, mask: causal & window(left = 127), sinks: per_head }
}
