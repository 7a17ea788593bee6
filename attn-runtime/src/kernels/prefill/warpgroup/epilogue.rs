//! The warpgroup kernel's finish: join each row's sum across its four units, fold in the sink,
//! normalise once and write O and the LSE (O = 0, LSE = −∞ for a row that saw no key and has no
//! sink).
//!
//! A warpgroup whose 64 rows all lie in the sequence stages its O in its own rows of the Q tile
//! (its last scores have read them) in the copy engine's swizzled layout, and stores it with one
//! bulk copy per 64-column panel: whole 128-byte lines, where the units' own stores write 2 bytes
//! each, scattered over eight rows per instruction. The rows of a block that end a sequence (and
//! O wider than Q's tile) take the units' stores, row by row, so no row of another document is
//! touched.

// `#[cube]` code: a comptime `if` around a run-time one must stay separate.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use super::pipeline::sync_warpgroup;
use super::softmax::{quad_sum, register_col, register_row, UnitRows, UnitRowsExpand};
use super::{TmaOutputs, PANEL, WARPGROUP_ROWS, WARPGROUP_UNITS};
use crate::kernels::common::{Ctx, RowState, RunInputs};
use crate::kernels::prefill::config::PrefillConfig;

/// The normalisers of a unit's two rows.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Normalisers {
    /// Row `row0`.
    pub top: f32,
    /// Row `row0 + 8`.
    pub bottom: f32,
}

#[cube]
impl UnitRows {
    /// Finish the unit's two rows and write them (see the module's documentation).
    pub fn write_output<E: Float>(
        &self,
        q_smem: &mut Shared<[E]>,
        outputs: &mut TmaOutputs<E>,
        ctx: &Ctx,
        inputs: &RunInputs,
        #[comptime] config: PrefillConfig,
    ) {
        // The maxima are in the logits' own units (see `online_softmax`): back to scaled logits.
        let mut unit = 1.0f32.runtime();
        if comptime!(!config.score.modifies_scores()) {
            unit = ctx.args.scale;
        }
        let mut state0 = RowState {
            max: self.top.max * unit,
            sum: quad_sum(self.top.sum),
        };
        let mut state1 = RowState {
            max: self.bottom.max * unit,
            sum: quad_sum(self.bottom.sum),
        };
        let factor0 = state0.fold_sink(ctx, inputs);
        let factor1 = state1.fold_sink(ctx, inputs);
        let inv = Normalisers {
            top: state0.normaliser(factor0),
            bottom: state1.normaliser(factor1),
        };
        let seq = ctx.site;
        let row1 = self.first_row + 8;
        // The warpgroup's first row.
        let group_row = self.first_row - self.row0;
        // Staging needs O to fit in the warpgroup's Q rows (known at compile time) and every row
        // to lie in the sequence (known at run time): two `if`s, each with the row stores as its
        // other arm.
        if comptime!(config.value_dim() <= config.head_dim()) {
            if group_row + WARPGROUP_ROWS <= seq.seq_q {
                self.store_staged::<E>(q_smem, &mut outputs.o_map, inv, ctx, config);
            } else {
                self.store_rows::<E>(&mut outputs.o, inv, ctx, config);
            }
        } else {
            self.store_rows::<E>(&mut outputs.o, inv, ctx, config);
        }
        if self.col0 == 0 {
            let lse_base = seq.batch * outputs.lse.stride(0) + seq.head * outputs.lse.stride(1);
            let lse_row = outputs.lse.stride(2);
            if self.first_row < seq.seq_q {
                outputs.lse[lse_base + (seq.q_off + self.first_row) * lse_row] = state0.lse(ctx);
            }
            if row1 < seq.seq_q {
                outputs.lse[lse_base + (seq.q_off + row1) * lse_row] = state1.lse(ctx);
            }
        }
    }

    /// O of a warpgroup whose rows all lie in the sequence: into its 64 rows of the Q tile,
    /// panels of 64 columns with the 128-byte swizzle (16-byte chunk `c` of row `r` at chunk
    /// `c ^ (r % 8)`, which also spreads a plane's eight rows over all banks), then one bulk copy
    /// per panel, issued by the warpgroup's first unit once every unit's writes are visible to
    /// the copy engine.
    fn store_staged<E: Float>(
        &self,
        q_smem: &mut Shared<[E]>,
        o_map: &mut TensorMap<E, Tiled>,
        inv: Normalisers,
        ctx: &Ctx,
        #[comptime] config: PrefillConfig,
    ) {
        let seq = ctx.site;
        let block_q = config.block_q();
        let group_at = self.warpgroup * WARPGROUP_ROWS;
        let group_row = self.first_row - self.row0;
        let swizzle = self.row0 % 8;
        #[unroll]
        for nth in 0..config.value_dim() / 2 {
            let chunk = nth / 4;
            let panel = chunk / 8;
            let row = self.row0 + register_row(nth) * 8;
            let scale = select(register_row(nth) == 0, inv.top, inv.bottom);
            let at = (panel * block_q + group_at + row) * PANEL
                + ((chunk % 8) ^ swizzle) * 8
                + self.col0
                + nth % 2;
            q_smem[at] = E::cast_from(self.out[nth] * scale);
        }
        sync_async_proxy_shared();
        sync_warpgroup(self.warpgroup as u32);
        if UNIT_POS as usize % WARPGROUP_UNITS == 0 {
            let row_at = (seq.q_off + group_row) as i32;
            let panels = comptime!(config.value_dim() / PANEL);
            #[unroll]
            for p in 0..panels {
                let start = (p * block_q + group_at) * PANEL;
                let stored = tma_store_4d(
                    &q_smem[start..start + WARPGROUP_ROWS * PANEL],
                    o_map,
                    seq.batch as i32,
                    seq.head as i32,
                    row_at,
                    (p * PANEL) as i32,
                );
                // The cube may end only once the copies have read the tile; the last wait covers
                // every earlier copy.
                if comptime!(p + 1 == panels) {
                    stored.wait();
                }
            }
        }
    }

    /// O row by row from the registers: each unit writes its two rows' elements, skipping rows
    /// past the sequence.
    fn store_rows<E: Float>(
        &self,
        out: &mut Tensor<E>,
        inv: Normalisers,
        ctx: &Ctx,
        #[comptime] config: PrefillConfig,
    ) {
        let seq = ctx.site;
        let first_row = self.first_row;
        let row1 = first_row + 8;
        let base = seq.batch * out.stride(0) + seq.head * out.stride(1);
        let base0 = base + (seq.q_off + first_row) * out.stride(2);
        let base1 = base + (seq.q_off + row1) * out.stride(2);
        #[unroll]
        for nth in 0..config.value_dim() / 2 {
            let c = self.col0 + register_col(nth);
            if register_row(nth) == 0 {
                if first_row < seq.seq_q {
                    out[base0 + c] = E::cast_from(self.out[nth] * inv.top);
                }
            } else if row1 < seq.seq_q {
                out[base1 + c] = E::cast_from(self.out[nth] * inv.bottom);
            }
        }
    }
}
