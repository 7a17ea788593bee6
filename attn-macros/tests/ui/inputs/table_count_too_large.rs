attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, inputs: { rel: [f32; heads, 100000] }, score: |s, b, h, q, k| s }
}

fn main() {}
