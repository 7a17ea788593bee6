//! What a declared variant tells the runtime: its compile-time facts and its tile candidates.

pub use attn_types::{Alibi, CausalAlignment, DType, HeadGrouping, Inner, InputShape, Tiling};

use crate::hooks::Hooks;
use crate::inputs::Inputs;
use crate::tensor::Element;

/// A sliding window around each query's (aligned) position: key `k` is visible to query `q` when
/// `q' − left ≤ k ≤ q' + right`, where `q'` is `q` on the mask's alignment (FlashAttention's
/// `window_size = (left, right)`). A missing side is unbounded.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct Window {
    /// Keys before the query's position that stay visible.
    pub left: Option<u32>,
    /// Keys after the query's position that stay visible.
    pub right: Option<u32>,
}

/// Which (query, key) pairs take part: the conjunction of every term that is on.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct MaskSpec {
    /// Keys after the query's aligned position are hidden.
    pub causal: bool,
    /// Where query `q` sits among the keys when lengths differ; used by `causal`, `window`,
    /// `prefix_lm` and ALiBi distances.
    pub align: CausalAlignment,
    /// A sliding window.
    pub window: Option<Window>,
    /// Per-sequence key lengths (run-time `[B]`): keys at or past the length are hidden.
    pub key_lengths: bool,
    /// Packed variable-length documents (run-time offsets for queries and keys): a token sees only
    /// its own document, and every index is relative to the document's start.
    pub documents: bool,
    /// Prefix-LM (run-time `[B]` prefix lengths): keys inside the prefix are visible to every
    /// query, later keys causally.
    pub prefix_lm: bool,
    /// The variant's own mask expression ([`crate::Hooks::mask`]).
    pub custom: bool,
    /// Whether [`crate::Hooks::classify`] bounds the custom mask per tile (else every tile is
    /// treated as partial).
    pub custom_bounds: bool,
}

impl MaskSpec {
    /// No mask at all.
    pub const NONE: MaskSpec = MaskSpec {
        causal: false,
        align: CausalAlignment::BottomRight,
        window: None,
        key_lengths: false,
        documents: false,
        prefix_lm: false,
        custom: false,
        custom_bounds: false,
    };

    /// Causal with the given alignment, nothing else.
    pub const fn causal(align: CausalAlignment) -> MaskSpec {
        MaskSpec {
            causal: true,
            align,
            ..MaskSpec::NONE
        }
    }

    /// Whether the window bounds keys before the query.
    pub const fn has_left(&self) -> bool {
        matches!(self.window, Some(Window { left: Some(_), .. }))
    }

    /// Whether the window bounds keys after the query.
    pub const fn has_right(&self) -> bool {
        matches!(self.window, Some(Window { right: Some(_), .. }))
    }

    /// Whether some pair can be hidden.
    pub const fn is_none(&self) -> bool {
        !self.causal
            && self.window.is_none()
            && !self.key_lengths
            && !self.documents
            && !self.prefix_lm
            && !self.custom
    }

    /// A short description for logs and benchmark tables (`causal+window(4095,·)`).
    pub fn describe(&self) -> String {
        let mut terms = Vec::new();
        if self.causal {
            terms.push("causal".to_string());
        }
        if let Some(w) = self.window {
            let side = |s: Option<u32>| s.map_or("·".to_string(), |v| v.to_string());
            terms.push(format!("window({},{})", side(w.left), side(w.right)));
        }
        for (on, name) in [
            (self.key_lengths, "key_lengths"),
            (self.documents, "documents"),
            (self.prefix_lm, "prefix_lm"),
            (self.custom, "custom"),
        ] {
            if on {
                terms.push(name.to_string());
            }
        }
        if terms.is_empty() {
            "none".to_string()
        } else {
            terms.join("+")
        }
    }
}

/// The pointwise modification of each scaled logit, applied in this order: softcap, ALiBi,
/// the variant's own score expression; and the per-head sink logit that joins the denominator.
#[derive(Copy, Clone, PartialEq, Debug)]
pub struct ScoreSpec {
    /// `cap · tanh(s / cap)`.
    pub softcap: Option<f64>,
    /// `s − slope_h · |q' − k|`.
    pub alibi: Option<Alibi>,
    /// The variant's own score expression ([`crate::Hooks::score`]).
    pub custom: bool,
    /// A per-head learned logit (run-time `[Hq]` f32) that joins the softmax denominator.
    pub sinks: bool,
}

impl ScoreSpec {
    /// No modification.
    pub const NONE: ScoreSpec = ScoreSpec {
        softcap: None,
        alibi: None,
        custom: false,
        sinks: false,
    };

    /// The comptime flags the kernels specialise on.
    pub fn flags(&self) -> ScoreFlags {
        ScoreFlags {
            softcap: self.softcap.is_some(),
            alibi: self.alibi.is_some(),
            custom: self.custom,
            sinks: self.sinks,
        }
    }
}

/// Which score modifications a kernel applies (the values travel as run-time arguments).
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug, Default)]
pub struct ScoreFlags {
    /// Softcap.
    pub softcap: bool,
    /// ALiBi.
    pub alibi: bool,
    /// The variant's score expression.
    pub custom: bool,
    /// Attention sinks.
    pub sinks: bool,
}

impl ScoreFlags {
    /// Whether any per-element modification runs in the inner loop.
    pub const fn modifies_scores(&self) -> bool {
        self.softcap || self.alibi || self.custom
    }
}

/// Element type of a run-time input a variant declares for its expressions.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum InputType {
    /// `i32`.
    I32,
    /// `f32`.
    F32,
}

/// A run-time input declared in a variant's `inputs: { … }`.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct InputDecl {
    /// Its name in the declaration and in the generated inputs struct.
    pub name: &'static str,
    /// Element type.
    pub ty: InputType,
    /// Shape.
    pub shape: InputShape,
}

/// A table read of a variant's score expression: the input it reads, and what indexes its inner
/// dimension.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct ScoreRead {
    /// The input's declaration index.
    pub input: u32,
    /// Its inner index.
    pub index: ReadIndex,
}

/// What indexes a table read's inner dimension.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum ReadIndex {
    /// The query position itself (`t[q]`).
    Query,
    /// The key position itself (`t[k]`).
    Key,
    /// Any other expression (`rel[h][(q - k).min(31)]`), or no inner dimension.
    Computed,
}

/// The compile-time facts of a declared variant.
#[derive(Copy, Clone, PartialEq, Debug)]
pub struct VariantSpec {
    /// The variant's Rust name.
    pub name: &'static str,
    /// Head grouping.
    pub heads: HeadGrouping,
    /// Head dimension of Q and K.
    pub head_dim: u32,
    /// Head dimension of V and O (usually `head_dim`).
    pub value_dim: u32,
    /// Element type.
    pub dtype: DType,
    /// Mask.
    pub mask: MaskSpec,
    /// Score modifications.
    pub score: ScoreSpec,
    /// Run-time inputs the variant's expressions read, in declaration order.
    pub inputs: &'static [InputDecl],
    /// Each table read of the score expression, by read number
    /// ([`crate::Hooks::score_read_grad`]).
    pub score_reads: &'static [ScoreRead],
    /// Softmax scale; `None` means `1/√head_dim`.
    pub scale: Option<f64>,
    /// Tile shapes the launcher and the tuner may use, in order of preference.
    pub tilings: &'static [Tiling],
}

impl VariantSpec {
    /// Whether the backward computes the gradient of declared input number `input`: an `f32`
    /// input, and for one with a `seq` dimension, read by the score expression only at the query
    /// or the key position itself (`t[q]`, `t[b][k]`: each query row's or key's share is one
    /// sum, made where that row or key is resident); a `seq` table read at a computed position
    /// (`t[q - k]`) is left out of [`crate::Grads::d_inputs`].
    pub fn learnable(&self, input: usize) -> bool {
        let decl = &self.inputs[input];
        decl.ty == InputType::F32
            && (decl.shape.inner != Inner::Seq
                || self
                    .score_reads
                    .iter()
                    .filter(|r| r.input as usize == input)
                    .all(|r| r.index != ReadIndex::Computed))
    }

    /// The softmax scale this variant applies to `q·k`.
    pub fn softmax_scale(&self) -> f64 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f64).sqrt())
    }
}

/// A variant declared with `attention!`: the type the macro generates implements this
/// (`'static`: the tuner keeps per-variant state keyed by the type).
pub trait Variant: 'static {
    /// Element type of Q, K, V and O.
    type Elem: Element;
    /// The `#[cube]` code of the variant's mask and score expressions ([`crate::NoHooks`] when it has
    /// none).
    type Hooks: Hooks;
    /// The variant's compile-time facts.
    const SPEC: VariantSpec;

    /// The variant's mask expression on the host, for the float64 reference (indices as in the
    /// kernel: batch or document, query head, query and key position within the sequence).
    fn host_mask(_b: i64, _h: i64, _q: i64, _k: i64, _inputs: &Inputs) -> bool {
        true
    }

    /// The class ([`crate::TILE_EMPTY`], [`crate::TILE_PARTIAL`], [`crate::TILE_FULL`]) the
    /// kernels' tile classifier gives the custom mask over queries `q_lo..=q_hi` and keys
    /// `k_lo..=k_hi`, computed on the host by the same interval reasoning (for testing it against
    /// brute force); partial when the variant has no bounded custom mask.
    fn host_classify(
        _b: i64,
        _h: i64,
        _q_lo: i64,
        _q_hi: i64,
        _k_lo: i64,
        _k_hi: i64,
        _inputs: &Inputs,
    ) -> u32 {
        crate::hooks::TILE_PARTIAL
    }

    /// The variant's score expression on the host, in float64, for the reference.
    fn host_score(s: f64, _b: i64, _h: i64, _q: i64, _k: i64, _inputs: &Inputs) -> f64 {
        s
    }

    /// `∂ score / ∂ s` of the variant's score expression on the host (the macro's derivative),
    /// for the gradients' reference; 1 without an expression.
    fn host_score_grad(_s: f64, _b: i64, _h: i64, _q: i64, _k: i64, _inputs: &Inputs) -> f64 {
        1.0
    }

    /// `∂ score / ∂ x` on the host for the element of declared input number `input` that the
    /// expression reads at this pair (the macro's derivative; 0 for `i32` inputs).
    #[allow(clippy::too_many_arguments)]
    fn host_score_input_grad(
        _s: f64,
        _b: i64,
        _h: i64,
        _q: i64,
        _k: i64,
        _inputs: &Inputs,
        _input: usize,
    ) -> f64 {
        0.0
    }

    /// `∂ score / ∂ x` on the host for the element `x` that table read number `read` of the
    /// score expression reads at this pair (the macro's derivative).
    #[allow(clippy::too_many_arguments)]
    fn host_score_read_grad(
        _s: f64,
        _b: i64,
        _h: i64,
        _q: i64,
        _k: i64,
        _inputs: &Inputs,
        _read: usize,
    ) -> f64 {
        0.0
    }

    /// Which element (flat, row-major, within its table) table read number `read` of the score
    /// expression reads at this pair.
    fn host_read_index(
        _b: i64,
        _h: i64,
        _q: i64,
        _k: i64,
        _inputs: &Inputs,
        _read: usize,
    ) -> usize {
        0
    }
}
