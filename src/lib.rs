//! # attn
//!
//! Declare attention variants in Rust; get one fused, IO-aware GPU kernel for each.
//!
//! ```ignore
//! attn::attention! {
//!     /// Llama-3 style: 32 query heads share 8 K/V heads, causal.
//!     pub Llama3 { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal }
//! }
//! let client = attn::default_client();
//! let out = Llama3::forward(&client, &q, &k, &v)?; // out.o [B, Hq, Nq, D], out.lse [B, Hq, Nq]
//! ```
//!
//! ## Settings of a declaration
//!
//! | setting | values | default |
//! |---|---|---|
//! | `heads` | `mha`, `mqa`, `gqa(group = G)` (G ≥ 2; head counts are run-time values checked against it) | required |
//! | `head_dim` | `64`, `128` | required |
//! | `dtype` | `f16`, `bf16`, `f32` (accumulation is always f32) | required |
//! | `mask` | `none`, `causal` (= `causal(bottom_right)`, FlashAttention 2's alignment), `causal(top_left)` (PyTorch's `is_causal`) | `none` |
//! | `scale` | a positive number | `1/√head_dim` |
//! | `tiles` | `[64 x 16, 32 x 16, …]`: query rows × keys per step, powers of two; the first the device can run is used | per head dim |
//!
//! Every mistake is a compile error at the offending token, all of them in one compile.
//!
//! ## Semantics
//!
//! `O = softmax(scale · Q Kᵀ + mask) · V` per (batch, query head), with query head `h` reading K/V
//! head `h / G`. `LSE = log Σ exp(scale · q·k)` over the visible keys, natural log. A row that sees
//! no key (causal, bottom-right, `Nq > Nk`) yields `O = 0` and `LSE = −∞`, never NaN.

#![warn(missing_docs)]

extern crate self as attn;

pub use attn_macros::attention;
pub use attn_runtime::*;
