attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 128, dtype: f16, tiles: [64 x 16, 32 x 16, 64 x 16] }
}

fn main() {}
