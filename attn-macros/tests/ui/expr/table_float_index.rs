attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, inputs: { doc: [i32; seq] }, mask: |b, h, q, k| doc[q as f32] == doc[k] }
}

fn main() {}
