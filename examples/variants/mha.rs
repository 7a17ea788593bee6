// The variants of the `mha` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// BERT/GPT-2 style multi-head attention in f32.
    pub Mha64 { heads: mha, head_dim: 64, dtype: f32, scale: 0.125, tiles: [32 x 32, 64 x 32] }
}
