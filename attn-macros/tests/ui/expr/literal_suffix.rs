attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, mask: |b, h, q, k| k < 4u64 }
}

fn main() {}
