attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, inputs: { n: i32 }, mask: |b, h, q, k| k < n[b] }
}

fn main() {}
