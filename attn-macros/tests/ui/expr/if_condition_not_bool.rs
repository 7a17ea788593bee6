attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, score: |s, b, h, q, k| if q { s } else { s * 0.5 } }
}

fn main() {}
