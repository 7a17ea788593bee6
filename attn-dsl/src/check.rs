//! Cross-field rules of a [`Spec`]: one named function each, with the reason it exists.

use crate::ctxt::Ctxt;
use crate::keywords as kw;
use crate::spec::Spec;

/// Runs every cross-field rule, recording each violation in `cx`.
pub fn check(cx: &Ctxt, spec: &Spec) {
    check_tiles_fit_shared_memory(cx, spec);
    check_tiles_distinct(cx, spec);
    check_prefix_lm_not_causal(cx, spec);
    check_window_right_not_causal(cx, spec);
}

/// `prefix_lm` is causal after its prefix already; adding `causal` would hide the prefix's
/// bidirectional part, which is the point of prefix-LM. Two contradictory intents: say which.
pub fn check_prefix_lm_not_causal(cx: &Ctxt, spec: &Spec) {
    if let (Some(prefix), Some(causal)) = (spec.mask.prefix_lm, spec.mask.causal) {
        cx.error_at(
            causal.span,
            "`causal` conflicts with `prefix_lm`, which is already causal after its prefix; keep one",
        );
        cx.error_at(prefix, "`prefix_lm` is declared here");
    }
}

/// With `causal`, no key after the query is visible, so a window's `right` side could never
/// matter; it is almost always a misunderstanding of the window's direction.
pub fn check_window_right_not_causal(cx: &Ctxt, spec: &Spec) {
    let right = spec.mask.window.and_then(|w| w.value.right);
    if let (Some(right), Some(_)) = (right, spec.mask.causal) {
        cx.error_at(
            right.span,
            "conflicting masks: `causal` hides every key after the query, so `right` has no effect; remove it",
        );
    }
}

/// A tile stages a K and a V tile of `block_kv × head_dim` f32 values in shared memory; a shape
/// that needs more than the largest GPU offers could never launch anywhere, so it is refused here
/// rather than pruned silently at run time.
pub fn check_tiles_fit_shared_memory(cx: &Ctxt, spec: &Spec) {
    for tile in &spec.tiles {
        let bytes = tile
            .value
            .portable_shared_bytes(spec.head_dim.value, spec.value_dim());
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
