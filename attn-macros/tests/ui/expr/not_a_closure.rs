attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, score: 2.0 }
}

fn main() {}
