// The variants of the `mqa` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// PaLM/Falcon style multi-query attention.
    pub Mqa64 { heads: mqa, head_dim: 64, dtype: f16 }
}
