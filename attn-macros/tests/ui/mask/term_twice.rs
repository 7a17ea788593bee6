attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, mask: causal & key_lengths & causal }
}

fn main() {}
