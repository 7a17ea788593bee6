attn_macros::attention! {
    pub Twice { heads: mha, head_dim: 64, dtype: bf16 | f16 | bf16 }
}

fn main() {}
