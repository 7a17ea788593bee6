//! Every word of the declaration language, in one place.

/// `heads: …` — head grouping.
pub const KEY_HEADS: &str = "heads";
/// `head_dim: …` — head dimension.
pub const KEY_HEAD_DIM: &str = "head_dim";
/// `dtype: …` — element type.
pub const KEY_DTYPE: &str = "dtype";
/// `mask: …` — which pairs take part.
pub const KEY_MASK: &str = "mask";
/// `scale: …` — softmax scale (default 1/√head_dim).
pub const KEY_SCALE: &str = "scale";
/// `tiles: […]` — tile shapes the launcher and tuner may use.
pub const KEY_TILES: &str = "tiles";
/// `value_dim: …` — head dimension of V and O (default: `head_dim`).
pub const KEY_VALUE_DIM: &str = "value_dim";
/// `score: |s, b, h, q, k| …` — the variant's own score modification.
pub const KEY_SCORE: &str = "score";
/// `softcap: 50.0` — `cap · tanh(s / cap)`.
pub const KEY_SOFTCAP: &str = "softcap";
/// `alibi: geometric | given` — ALiBi biases.
pub const KEY_ALIBI: &str = "alibi";
/// `sinks: per_head` — a learned logit per head in the softmax denominator.
pub const KEY_SINKS: &str = "sinks";
/// `inputs: { name: type, … }` — run-time values the expressions read.
pub const KEY_INPUTS: &str = "inputs";

/// Every setting, in the order the README documents them.
pub const KEYS: &[&str] = &[
    KEY_HEADS,
    KEY_HEAD_DIM,
    KEY_VALUE_DIM,
    KEY_DTYPE,
    KEY_MASK,
    KEY_SCORE,
    KEY_SOFTCAP,
    KEY_ALIBI,
    KEY_SINKS,
    KEY_SCALE,
    KEY_INPUTS,
    KEY_TILES,
];
/// Settings a declaration must have.
pub const REQUIRED_KEYS: &[&str] = &[KEY_HEADS, KEY_HEAD_DIM, KEY_DTYPE];

/// `heads: mha`.
pub const HEADS_MHA: &str = "mha";
/// `heads: mqa`.
pub const HEADS_MQA: &str = "mqa";
/// `heads: gqa(group = G)`.
pub const HEADS_GQA: &str = "gqa";
/// The argument name inside `gqa(…)`.
pub const GQA_GROUP: &str = "group";
/// The forms of `heads`, as users write them.
pub const HEADS_FORMS: &str = "`mha`, `mqa` or `gqa(group = G)`";

/// `dtype: f16`.
pub const DTYPE_F16: &str = "f16";
/// `dtype: bf16`.
pub const DTYPE_BF16: &str = "bf16";
/// `dtype: f32`.
pub const DTYPE_F32: &str = "f32";
/// Every dtype.
pub const DTYPES: &[&str] = &[DTYPE_F16, DTYPE_BF16, DTYPE_F32];

/// `mask: none`.
pub const MASK_NONE: &str = "none";
/// `mask: causal` (bottom-right aligned) or `mask: causal(top_left)`.
pub const MASK_CAUSAL: &str = "causal";
/// `causal(bottom_right)`: the last query sees every key (the default).
pub const ALIGN_BOTTOM_RIGHT: &str = "bottom_right";
/// `causal(top_left)`: query `i` sees keys `0..=i`.
pub const ALIGN_TOP_LEFT: &str = "top_left";
/// `window(left = L, right = R)`: a sliding window (either side may be left out).
pub const MASK_WINDOW: &str = "window";
/// The left side of a window: keys before the query.
pub const WINDOW_LEFT: &str = "left";
/// The right side of a window: keys after the query.
pub const WINDOW_RIGHT: &str = "right";
/// `key_lengths`: a run-time key length per sequence.
pub const MASK_KEY_LENGTHS: &str = "key_lengths";
/// `documents`: packed variable-length documents with run-time offsets.
pub const MASK_DOCUMENTS: &str = "documents";
/// `prefix_lm`: bidirectional over a run-time prefix, causal after it.
pub const MASK_PREFIX_LM: &str = "prefix_lm";
/// The separator of mask terms: `causal & window(left = 4095)`.
pub const MASK_AND: &str = "&";
/// The forms of `mask`, as users write them.
pub const MASK_FORMS: &str = "`none`, or terms joined by `&`: `causal`, `causal(top_left)`, `window(left = L, right = R)`, `key_lengths`, `documents`, `prefix_lm`, and last a closure `|b, h, q, k| …`";

/// `alibi: geometric`: the standard slopes for the run-time head count.
pub const ALIBI_GEOMETRIC: &str = "geometric";
/// `alibi: given`: slopes passed per head at run time.
pub const ALIBI_GIVEN: &str = "given";
/// `sinks: per_head`.
pub const SINKS_PER_HEAD: &str = "per_head";

/// Names the generated inputs struct uses for built-in inputs; declared inputs may not take them.
pub const RESERVED_INPUT_NAMES: &[&str] = &[
    "key_lengths",
    "q_offsets",
    "k_offsets",
    "prefix_lengths",
    "sinks",
    "alibi_slopes",
];

/// Input type `i32`.
pub const INPUT_I32: &str = "i32";
/// Input type `f32`.
pub const INPUT_F32: &str = "f32";
/// `[T; batch]`: one value per sequence.
pub const EXTENT_BATCH: &str = "batch";
/// `[T; heads]`: one value per query head.
pub const EXTENT_HEADS: &str = "heads";
/// `[T; seq]`: one value per position.
pub const EXTENT_SEQ: &str = "seq";
/// The dimensions of an input, in their order.
pub const INPUT_DIMS: &str = "`batch`, `heads`, then `seq` or a count such as `32`";
/// The most values a table's counted dimension holds.
pub const MAX_TABLE_LEN: u32 = 4096;
/// The forms of an input's type.
pub const INPUT_FORMS: &str =
    "`i32`, `f32`, or `[i32; …]` / `[f32; …]` with dimensions `batch`, `heads`, then `seq` or a count (`[f32; heads]`, `[i32; seq]`, `[f32; heads, 32]`)";

/// Methods expressions may call, on `f32` unless noted.
pub const EXPR_METHODS: &[&str] = &["abs", "min", "max", "tanh", "exp", "ln", "sqrt"];
/// What expressions may use, for messages.
pub const EXPR_FORMS: &str = "the closure's parameters, the variant's inputs, integer and float literals, `+ - * / %`, comparisons, `&& || !`, `as i32`/`as f32`, `if … { … } else { … }` and the methods `abs`, `min`, `max` (i32 or f32) and `tanh`, `exp`, `ln`, `sqrt` (f32)";

/// The separator of a tile shape: `64 x 16` is 64 query rows by 16 keys.
pub const TILE_SEPARATOR: &str = "x";

/// Head dimensions the kernels support today.
pub const HEAD_DIMS: &[u32] = &[64, 96, 128, 192, 256];
/// Query rows per tile: a power of two in this range (units of one cube).
pub const TILE_Q_RANGE: (u32, u32) = (1, 1024);
/// Keys per tile: a power of two in this range.
pub const TILE_KV_RANGE: (u32, u32) = (1, 256);
/// Shared memory of the largest supported GPU (H100/H200: 227 KiB per block).
pub const MAX_SHARED_BYTES: usize = 227 * 1024;
