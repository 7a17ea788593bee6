attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, mask: window(before = 64) }
}

fn main() {}
