attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 192, value_dim: 100, dtype: f16 }
}

fn main() {}
