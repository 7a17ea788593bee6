// The variants of the `alibi` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// ALiBi with the standard slopes, causal.
    pub Alibi { heads: mha, head_dim: 128, dtype: f16, mask: causal, alibi: geometric }

    /// ALiBi with slopes given per head at run time, and a relative-position bias written as a
    /// score expression: a learned per-head scale on `tanh` of the distance.
    pub AlibiGiven {
        heads: mha, head_dim: 64, dtype: f32, mask: causal, alibi: given,
        inputs: { bias_scale: [f32; heads] },
        score: |s, b, h, q, k| s + bias_scale[h] * ((k - q) as f32 / 64.0).tanh(),
    }
}
