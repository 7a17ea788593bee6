//! The comptime configuration of the prefill kernels, and every size each family derives from it.

use cubecl::wgmma::{Major, Swizzle, WgmmaTileLayout};

use crate::variant::{MaskSpec, ScoreFlags, Tiling};

/// Rows, columns and depth of one 16×16×16 tensor-core instruction.
pub const MMA: usize = 16;
/// Query rows of one warpgroup (the M of every warpgroup MMA).
pub const WARPGROUP_ROWS: usize = 64;
/// Units of one warpgroup.
pub const WARPGROUP_UNITS: usize = 128;
/// Columns of one 128-byte swizzle panel of 16-bit elements: the copy engine's box width.
pub const PANEL: usize = 64;
/// Shared-memory stages of K and V in the warpgroup kernel.
pub const STAGES: usize = 2;

/// Everything that selects the generated code of the prefill kernels.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct PrefillConfig {
    /// Tile shape.
    pub tiling: Tiling,
    /// Head dimension of Q and K.
    pub head_dim: u32,
    /// Head dimension of V and O.
    pub value_dim: u32,
    /// The mask.
    pub mask: MaskSpec,
    /// The score modifications.
    pub score: ScoreFlags,
}

impl PrefillConfig {
    // Every family.

    /// Query rows per cube (M of QKᵀ and of P·V).
    pub const fn block_q(&self) -> usize {
        self.tiling.block_q as usize
    }

    /// Keys per step (N of QKᵀ, K of P·V).
    pub const fn block_kv(&self) -> usize {
        self.tiling.block_kv as usize
    }

    /// Head dimension of Q and K (K of QKᵀ).
    pub const fn head_dim(&self) -> usize {
        self.head_dim as usize
    }

    /// Head dimension of V and O (N of P·V).
    pub const fn value_dim(&self) -> usize {
        self.value_dim as usize
    }

    // The portable kernel.

    /// Shared memory of one portable cube, in bytes: one f32 K tile and one f32 V tile.
    pub const fn portable_shared_bytes(&self) -> usize {
        self.tiling
            .portable_shared_bytes(self.head_dim, self.value_dim)
    }

    // The tensor-core kernel: `block_q` and `block_kv` multiples of 16, head dims too.

    /// Planes per cube: one per 16 query rows.
    pub const fn planes(&self) -> usize {
        self.block_q() / MMA
    }

    /// Row stride of the f32 score tile: `block_kv` plus 4 floats of padding, so the 16 lanes
    /// that each read one row do not all land in the same shared-memory banks (a multiple of 4,
    /// as tensor-core stores require).
    pub const fn score_stride(&self) -> usize {
        self.block_kv() + 4
    }

    /// Row stride of the probability tile (`E`): `block_kv` plus 8 elements of padding, for the
    /// same reason (a multiple of 8, as 16-bit tensor-core loads require).
    pub const fn prob_stride(&self) -> usize {
        self.block_kv() + 8
    }

    /// Offsets in the `E` shared array: Q tile, K tile, V tile, P tile, and its length.
    pub const fn elem_layout(&self) -> [usize; 5] {
        let q = 0;
        let k = q + self.block_q() * self.head_dim();
        let v = k + self.block_kv() * self.head_dim();
        let p = v + self.block_kv() * self.value_dim();
        [q, k, v, p, p + self.block_q() * self.prob_stride()]
    }

    /// Offsets in the f32 shared array: scores, output accumulator, row corrections, per-plane
    /// "some row's max moved" flags, and the length.
    pub const fn f32_layout(&self) -> [usize; 5] {
        let s = 0;
        let o = s + self.block_q() * self.score_stride();
        let corr = o + self.block_q() * self.value_dim();
        let moved = corr + self.block_q();
        [s, o, corr, moved, moved + self.planes()]
    }

    /// Shared memory of one tensor-core cube, in bytes, for elements of `elem_bytes`.
    pub const fn tensor_core_shared_bytes(&self, elem_bytes: usize) -> usize {
        self.elem_layout()[4] * elem_bytes + self.f32_layout()[4] * 4
    }

    // The warpgroup kernel: `block_q` a multiple of 64, `block_kv` a multiple of 16 up to 256,
    // head dims multiples of 64, 16-bit elements.

    /// Warpgroups per cube: one per 64 query rows.
    pub const fn warpgroups(&self) -> usize {
        self.block_q() / WARPGROUP_ROWS
    }

    /// Columns of O per P·V accumulator: all of them up to 128, else parts of 128.
    pub const fn pv_part(&self) -> usize {
        if self.value_dim() <= 128 {
            self.value_dim()
        } else {
            128
        }
    }

    /// Q: `block_q` rows by `head_dim`, K-major (the A operand of the scores).
    pub const fn q_tile(&self) -> WgmmaTileLayout {
        WgmmaTileLayout {
            major: Major::K,
            swizzle: Swizzle::B128,
            rows: self.block_q(),
            k: self.head_dim(),
        }
    }

    /// K, both stages: `STAGES × block_kv` key rows by `head_dim`, K-major (the B operand of the
    /// scores); stage `s` is rows `s · block_kv..`.
    pub const fn k_tile(&self) -> WgmmaTileLayout {
        WgmmaTileLayout {
            major: Major::K,
            swizzle: Swizzle::B128,
            rows: STAGES * self.block_kv(),
            k: self.head_dim(),
        }
    }

    /// V, both stages: `value_dim` columns by `STAGES × block_kv` keys, MN-major (the B operand of
    /// P·V, its columns contiguous); stage `s` is keys `s · block_kv..`.
    pub const fn v_tile(&self) -> WgmmaTileLayout {
        WgmmaTileLayout {
            major: Major::MN,
            swizzle: Swizzle::B128,
            rows: self.value_dim(),
            k: STAGES * self.block_kv(),
        }
    }

    /// Shared memory of one warpgroup cube, in bytes, for 16-bit elements (barriers and
    /// alignment included).
    pub const fn warpgroup_shared_bytes(&self) -> usize {
        let elems = self.block_q() * self.head_dim()
            + STAGES * self.block_kv() * (self.head_dim() + self.value_dim());
        elems * 2 + 3 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::{PrefillConfig, WARPGROUP_ROWS};
    use crate::variant::{MaskSpec, ScoreFlags, Tiling};

    /// Every shape the launcher may pick for the warpgroup kernel has tiles a warpgroup MMA reads
    /// (whole 128-byte panels, whole 8-line swizzle patterns, whole K steps), and the two-stage
    /// layout fits a Hopper cube at the largest of them.
    #[test]
    fn warpgroup_tile_layouts_are_readable() {
        for head_dim in [64, 128] {
            for block_q in [64, 128] {
                for block_kv in (64..=256).step_by(16) {
                    let config = PrefillConfig {
                        tiling: Tiling { block_q, block_kv },
                        head_dim,
                        value_dim: head_dim,
                        mask: MaskSpec::NONE,
                        score: ScoreFlags::default(),
                    };
                    for tile in [config.q_tile(), config.k_tile(), config.v_tile()] {
                        tile.validate(2).unwrap_or_else(|e| {
                            panic!("{block_q} x {block_kv} at d {head_dim}: {e}")
                        });
                        assert_eq!(tile.alignment(), 1024, "128-byte swizzle");
                    }
                    assert_eq!(config.warpgroups() * WARPGROUP_ROWS, block_q as usize);
                }
            }
        }
        let largest = PrefillConfig {
            tiling: Tiling {
                block_q: 128,
                block_kv: 128,
            },
            head_dim: 128,
            value_dim: 128,
            mask: MaskSpec::NONE,
            score: ScoreFlags::default(),
        };
        assert!(largest.warpgroup_shared_bytes() <= 227 * 1024);
    }
}
