attn_macros::attention! {
    pub Bad { heads: mla, head_dim: 64, dtype: f16 }
}

fn main() {}
