attn_macros::attention! {
    /// Three mistakes, three errors, one compile.
    pub Bad { heads: gqa(group = 1), head_dim: 80, dtype: f8, mask: causal }

    /// A correct variant beside them still gets its name.
    pub Good { heads: mha, head_dim: 64, dtype: f16 }
}

fn main() {}
