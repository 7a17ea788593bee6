attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, inputs: { sinks: [f32; heads] }, mask: |b, h, q, k| k < 4 }
}

fn main() {}
