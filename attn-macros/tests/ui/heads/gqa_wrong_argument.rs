attn_macros::attention! {
    pub Bad { heads: gqa(groups = 4), head_dim: 64, dtype: f16 }
}

fn main() {}
