attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, inputs: { len: [i32; batch] }, mask: |b, h, q, k| k < len }
}

fn main() {}
