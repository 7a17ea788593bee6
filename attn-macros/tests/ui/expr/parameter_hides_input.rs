attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, inputs: { q: i32 }, mask: |b, h, q, k| k < q }
}

fn main() {}
