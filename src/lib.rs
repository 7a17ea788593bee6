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
//! | `head_dim` | `64`, `96`, `128`, `192`, `256` | required |
//! | `value_dim` | the same set: the head dimension of V and O | `head_dim` |
//! | `dtype` | `f16`, `bf16`, `f32` (accumulation is always f32) | required |
//! | `mask` | `none`, or terms joined by `&`: `causal` (= `causal(bottom_right)`), `causal(top_left)`, `window(left = L, right = R)`, `key_lengths`, `documents`, `prefix_lm`, and last a closure `\|b, h, q, k\| bool` | `none` |
//! | `score` | a closure `\|s, b, h, q, k\| f32` | — |
//! | `softcap` | a positive number | — |
//! | `alibi` | `geometric`, `given` | — |
//! | `sinks` | `per_head` | — |
//! | `inputs` | `{ name: i32, name: [f32; heads], name: [i32; batch], … }` | — |
//! | `scale` | a positive number | `1/√head_dim` |
//! | `tiles` | `[64 x 16, 32 x 16, …]`: query rows × keys per step, powers of two, in order of preference: the first the device runs on tensor cores is used, else the first it can run | per head dim |
//!
//! Every mistake is a compile error at the offending token, all of them in one compile. A variant
//! with run-time inputs (key lengths, document offsets, prefix lengths, sinks, given ALiBi slopes,
//! declared inputs) gets a typed `…Inputs` struct that its `forward` takes.
//!
//! ## Semantics
//!
//! `O = softmax(mod(scale · Q Kᵀ) + mask) · V` per (sequence, query head), with query head `h`
//! reading K/V head `h / G`; `mod` applies softcap, then ALiBi, then the `score` expression. `LSE`
//! is the natural-log log-sum-exp of the modified logits over the visible keys (and the sink). A
//! row that sees no key yields `O = 0` and `LSE = −∞` (with a sink: `O = 0`, `LSE` = the sink),
//! never NaN.

//!
//! ## Training
//!
//! Every variant also gets `backward(&client, &q, &k, &v, &out, &d_out)` (plus its inputs, if it
//! declares any): dQ, dK and dV from the forward's output and the loss's gradient with respect to
//! O, with the gradients of sink logits, given ALiBi slopes and declared `f32` inputs (the macro
//! differentiates score expressions symbolically). Deterministic: the same bits on every run.
//! [`backward_plans`] lists the kernels that run it on the device, the fastest family first (on
//! Hopper, warpgroup MMAs fed by the copy engine); [`backward_with_plan`] pins one.
//!
//! ```ignore
//! let out = Llama3::forward(&client, &q, &k, &v)?;
//! let grads = Llama3::backward(&client, &q, &k, &v, &out, &d_out)?; // grads.dq, .dk, .dv
//! ```
//!
//! ## Decoding
//!
//! Every variant also gets `decode(&client, &q, &cache)`: new query tokens against a
//! [`KvCache`] (paged, pages of 16–256 tokens through a block table, or contiguous), GQA-packed and
//! split over the keys with an exact combine; [`merge`] combines results over disjoint keys
//! through their LSEs.

#![warn(missing_docs)]

extern crate self as attn;

pub use attn_macros::attention;
pub use attn_runtime::*;
