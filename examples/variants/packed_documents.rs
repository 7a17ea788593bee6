// The variants of the `packed_documents` example; shared with the snapshot tests (tests/snapshots.rs).

attn::attention! {
    /// Packed documents, causal within each, GQA 2, head dim 64.
    pub PackedCausal { heads: gqa(group = 2), head_dim: 64, dtype: f16, mask: causal & documents }
}
