attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, inputs: { rel: [f32; heads, 32] }, score: |s, b, h, q, k| s + rel[q][h] }
}

fn main() {}
