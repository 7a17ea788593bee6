//! Cross-field rules of a [`Spec`]: one named function each, with the reason it exists.

use crate::ctxt::Ctxt;
use crate::keywords as kw;
use crate::spec::Spec;

/// Runs every cross-field rule, recording each violation in `cx`.
pub fn check(cx: &Ctxt, spec: &Spec) {
    check_tiles_fit_shared_memory(cx, spec);
    check_tiles_distinct(cx, spec);
}

/// A tile stages a K and a V tile of `block_kv × head_dim` f32 values in shared memory; a shape
/// that needs more than the largest GPU offers could never launch anywhere, so it is refused here
/// rather than pruned silently at run time.
pub fn check_tiles_fit_shared_memory(cx: &Ctxt, spec: &Spec) {
    for tile in &spec.tiles {
        let bytes = tile.value.shared_bytes(spec.head_dim.value);
        if bytes > kw::MAX_SHARED_BYTES {
            cx.error_at(
                tile.span,
                format!(
                    "tile {} x {} stages {} KiB of K/V at head_dim {}, more than any GPU's {} KiB of shared memory; use fewer keys per tile",
                    tile.value.block_q,
                    tile.value.block_kv,
                    bytes / 1024,
                    spec.head_dim.value,
                    kw::MAX_SHARED_BYTES / 1024
                ),
            );
        }
    }
}

/// Tile candidates are keyed by shape in the tuning cache; listing one twice would tune it twice
/// and is almost always a typo for another shape.
pub fn check_tiles_distinct(cx: &Ctxt, spec: &Spec) {
    for (i, tile) in spec.tiles.iter().enumerate() {
        if spec.tiles[..i].iter().any(|t| t.value == tile.value) {
            cx.error_at(
                tile.span,
                format!(
                    "tile {} x {} is listed twice",
                    tile.value.block_q, tile.value.block_kv
                ),
            );
        }
    }
}
