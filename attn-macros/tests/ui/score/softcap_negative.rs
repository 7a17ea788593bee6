attn_macros::attention! {
    pub Bad { heads: mha, head_dim: 64, dtype: f16, softcap: -30.0 }
}

fn main() {}
