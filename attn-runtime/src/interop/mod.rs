//! Tensors that other programs already hold, in and out of attn's kernels.
//!
//! - `cuda` (feature `cuda`): any CUDA tensor described by its DLPack fields (device pointer,
//!   shape, strides), for engines with their own allocators.
//! - `burn` (feature `burn`): burn's cubecl tensors, zero-copy: the same client and buffers.
//! - `candle` (feature `candle`): candle tensors.
//!
//! Every function checks what it is given (rank, dtype, strides, sizes) and answers with an
//! [`AttnError`](crate::AttnError) before anything is copied or launched.

#[cfg(feature = "burn")]
pub mod burn;
#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "cuda")]
pub mod cuda;

/// How a framework's 4-D tensor orders its dimensions; attn views both as `[B, H, N, D]`
/// through strides, without a copy.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Layout {
    /// `[batch, heads, seq, head_dim]` (attn's, PyTorch SDPA's).
    Bhnd,
    /// `[batch, seq, heads, head_dim]` (most model code before the transpose, FlashAttention's).
    Bnhd,
}

impl Layout {
    /// The `[B, H, N, D]` shape and strides of a tensor stored with `shape` and `strides` (in
    /// elements) in this layout.
    pub fn to_bhnd(self, shape: [usize; 4], strides: [usize; 4]) -> ([usize; 4], [usize; 4]) {
        match self {
            Layout::Bhnd => (shape, strides),
            Layout::Bnhd => (
                [shape[0], shape[2], shape[1], shape[3]],
                [strides[0], strides[2], strides[1], strides[3]],
            ),
        }
    }
}

/// The number of elements a view reaches: one past its largest offset (0 for an empty view).
pub fn span(shape: [usize; 4], strides: [usize; 4]) -> usize {
    if shape.contains(&0) {
        return 0;
    }
    1 + shape
        .iter()
        .zip(strides)
        .map(|(&n, s)| (n - 1) * s)
        .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::{span, Layout};
    use crate::tensor::contiguous_strides;

    #[test]
    fn layouts_and_spans() {
        let stored = [2, 17, 4, 64];
        let strides = contiguous_strides(stored);
        let (shape, view) = Layout::Bnhd.to_bhnd(stored, strides);
        assert_eq!(shape, [2, 4, 17, 64]);
        assert_eq!(view, [17 * 4 * 64, 64, 4 * 64, 1]);
        assert_eq!(span(shape, view), 2 * 17 * 4 * 64);
        assert_eq!(Layout::Bhnd.to_bhnd(stored, strides), (stored, strides));
        // A view of every other sequence position, and an empty one.
        assert_eq!(span([1, 1, 3, 8], [0, 0, 16, 1]), 2 * 16 + 8);
        assert_eq!(span([1, 0, 3, 8], [0, 0, 16, 1]), 0);
    }
}
