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

/// Every setting, in the order the README documents them.
pub const KEYS: &[&str] = &[
    KEY_HEADS,
    KEY_HEAD_DIM,
    KEY_DTYPE,
    KEY_MASK,
    KEY_SCALE,
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
/// The forms of `mask`, as users write them.
pub const MASK_FORMS: &str = "`none`, `causal`, `causal(bottom_right)` or `causal(top_left)`";

/// The separator of a tile shape: `64 x 16` is 64 query rows by 16 keys.
pub const TILE_SEPARATOR: &str = "x";

/// Head dimensions the kernels support today.
pub const HEAD_DIMS: &[u32] = &[64, 128];
/// Query rows per tile: a power of two in this range (units of one cube).
pub const TILE_Q_RANGE: (u32, u32) = (1, 1024);
/// Keys per tile: a power of two in this range.
pub const TILE_KV_RANGE: (u32, u32) = (1, 256);
/// Shared memory of the largest supported GPU (H100/H200: 227 KiB per block).
pub const MAX_SHARED_BYTES: usize = 227 * 1024;
