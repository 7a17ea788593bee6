// The variant of the `train_bias` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// T5's relative position bias, learnable: a temperature, and per head a table of 32
    /// buckets read at the bucket of the distance `q − k` — exact below 16, log-spaced up to 128,
    /// the last bucket beyond (indices past a table's end read its last entry). GQA 2, causal;
    /// f32 for the example, bf16 as a model would run it.
    pub RelBias {
        heads: gqa(group = 2), head_dim: 64, dtype: f32 | bf16, mask: causal,
        inputs: { temp: f32, rel: [f32; heads, 32] },
        score: |s, b, h, q, k| s * temp
            + rel[h][if q - k < 16 { q - k } else { 16 + (((q - k) as f32 / 16.0).ln() * 7.69) as i32 }],
    }
}
