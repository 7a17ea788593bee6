//! [`Spec`] → [`KernelPlan`]: which kernel family runs, its phases, the mask-tile classes that can
//! occur, and the tile candidates in order of preference.

use crate::expr::boundable;
use crate::spec::{Spec, Tiling};

/// A phase of the prefill kernel, in execution order (each is one `#[cube]` function).
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Phase {
    /// Q rows into registers, scaled.
    LoadQ,
    /// A K and a V tile into shared memory.
    LoadKv,
    /// Q·Kᵀ for one step.
    Scores,
    /// Mask arithmetic, only on tiles classified partial.
    Mask,
    /// Running max and sum, accumulator rescale.
    OnlineSoftmax,
    /// P·V into the f32 accumulator.
    AccumulatePv,
    /// Normalise, write O and LSE.
    Finish,
}

/// How a (query block, key block) tile relates to the mask.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum TileClass {
    /// No pair takes part: never loaded.
    Empty,
    /// Every pair takes part: no mask arithmetic.
    Full,
    /// Some pairs take part: mask evaluated per element.
    Partial,
}

/// Everything code generation needs, decided.
#[derive(Clone, Debug)]
pub struct KernelPlan {
    /// The validated declaration.
    pub spec: Spec,
    /// Phases per K/V step and around the loop.
    pub phases: Vec<Phase>,
    /// Tile classes that can occur with this mask (partial always can: the ragged last tile).
    pub tile_classes: Vec<TileClass>,
    /// Tile candidates, the first valid on every device.
    pub candidates: Vec<Tiling>,
    /// Whether the custom mask expression can be bounded over a tile by interval reasoning (so
    /// tiles it rules out are skipped and tiles it keeps whole skip its arithmetic).
    pub custom_bounds: bool,
}

/// Default tile candidates per head dimension, in order of preference; the launcher runs the
/// first the device can run (preferring ones its tensor cores can run). Every list holds a shape
/// that stages at most 32 KiB of K/V with 64 units, which every back end runs (lavapipe: 32 KiB,
/// 1024 units); the others are for GPUs and the tuner.
///
/// Of the GPU shapes, 128 × 128 comes first: on Hopper it is the first the warpgroup kernel runs
/// (64 to 256 keys per step, 64 or 128 query rows), so it is the untuned default there.
///
/// From head dim 192 on, 64-key steps come first: the tensor-core kernel keeps its f32 output
/// accumulator in shared memory and round-trips `block_q × value_dim` of it every step, so short
/// steps spend their time there (measured on the H200 at head dim 256: 64 × 64 took 39 % of the
/// time of 64 × 16; bench/RESULTS.md).
pub fn default_tiles(head_dim: u32) -> Vec<Tiling> {
    let kv = if head_dim <= 64 { 32 } else { 16 };
    let tile = |block_q, block_kv| Tiling { block_q, block_kv };
    if head_dim >= 192 {
        return vec![
            tile(64, 64),
            tile(64, kv),
            tile(32, kv),
            tile(128, kv),
            tile(128, 64),
        ];
    }
    vec![
        tile(64, kv),
        tile(32, kv),
        tile(128, kv),
        tile(128, 128),
        tile(64, 64),
        tile(128, 64),
        tile(64, 128),
    ]
}

/// Plans a validated spec. Cannot fail.
pub fn plan(spec: Spec) -> KernelPlan {
    let tile_classes = if spec.mask.is_none() {
        vec![TileClass::Full, TileClass::Partial]
    } else {
        vec![TileClass::Empty, TileClass::Full, TileClass::Partial]
    };
    let custom_bounds = spec
        .mask
        .custom
        .as_ref()
        .is_some_and(|c| boundable(&c.body));
    let candidates = if spec.tiles.is_empty() {
        default_tiles(spec.head_dim.value.max(spec.value_dim()))
    } else {
        spec.tiles.iter().map(|t| t.value).collect()
    };
    KernelPlan {
        spec,
        phases: vec![
            Phase::LoadQ,
            Phase::LoadKv,
            Phase::Scores,
            Phase::Mask,
            Phase::OnlineSoftmax,
            Phase::AccumulatePv,
            Phase::Finish,
        ],
        tile_classes,
        candidates,
        custom_bounds,
    }
}
