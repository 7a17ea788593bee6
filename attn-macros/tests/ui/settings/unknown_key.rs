attn_macros::attention! {
    pub Bad { heads: mha, head_dims: 64, dtype: f16 }
}

fn main() {}
