attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: fp8 }
}

fn main() {}
