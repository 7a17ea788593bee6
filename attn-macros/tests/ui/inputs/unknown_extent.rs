attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, inputs: { w: [f32; tokens] }, mask: |b, h, q, k| k < 4 }
}

fn main() {}
