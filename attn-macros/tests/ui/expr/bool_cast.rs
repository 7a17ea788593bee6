attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, score: |s, b, h, q, k| s + (q > k) as f32 }
}

fn main() {}
