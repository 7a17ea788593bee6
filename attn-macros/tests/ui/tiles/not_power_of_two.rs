attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, tiles: [64 x 16, 48 x 16] }
}

fn main() {}
