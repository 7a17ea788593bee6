attn_macros::attention! {
    pub Bad { heads: gqa(group = 1), head_dim: 64, dtype: f16 }
}

fn main() {}
