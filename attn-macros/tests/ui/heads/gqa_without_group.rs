attn_macros::attention! {
    pub Bad { heads: gqa, head_dim: 64, dtype: f16 }
}

fn main() {}
