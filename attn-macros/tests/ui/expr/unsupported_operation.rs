attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, mask: |b, h, q, k| (q << 1) >= k }
}

fn main() {}
