attn_macros::attention! {
    /// Forgot the element type.
    pub Bad { heads: mha, head_dim: 64 }
}

fn main() {}
