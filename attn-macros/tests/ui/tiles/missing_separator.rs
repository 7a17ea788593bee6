attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 128, dtype: f16, tiles: [64 by 16] }
}

fn main() {}
