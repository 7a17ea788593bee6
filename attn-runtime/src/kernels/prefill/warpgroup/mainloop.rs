//! The warpgroup kernel's two products per step: the scores `Q Kᵀ` and `P·V`, on warpgroup MMAs
//! reading the swizzled shared-memory stages through matrix descriptors.

use cubecl::prelude::*;
use cubecl::wgmma::{Accumulator, Fragment, MatrixDescriptor};

use super::pipeline::opaque;
use super::softmax::{register_row, UnitRows, UnitRowsExpand, MMA_K};
use crate::kernels::prefill::config::PrefillConfig;

/// Scores: this warpgroup's `64 × block_kv` logits `Q Kᵀ` against the stage starting at key row
/// `stage_at`, in f32 registers.
#[cube]
pub fn compute_scores<E: Float>(
    q_desc: &MatrixDescriptor<E>,
    k_desc: &MatrixDescriptor<E>,
    stage_at: usize,
    #[comptime] config: PrefillConfig,
) -> Accumulator<f32> {
    // Past head dim 128 the Q tile's descriptors (16, 64 bits each) are computed per step from
    // an opaque row: hoisted out of the walk, they held 32 registers beside the output's 128 and
    // pushed the kernel into spills. At 128 and below they stay hoisted (16 registers, no spills).
    let mut q_row = 0usize;
    if comptime!(config.head_dim() > 128) {
        q_row = opaque(0u32) as usize;
    }
    let mut acc = Accumulator::<f32>::new(config.block_kv()).start();
    #[unroll]
    for kk in 0..config.head_dim() / MMA_K {
        acc.execute(
            &q_desc.at(q_row, kk * MMA_K),
            &k_desc.at(stage_at, kk * MMA_K),
        );
    }
    acc.wait()
}

#[cube]
impl UnitRows {
    /// P·V: the step's product of the probabilities (A from registers) and the V stage starting
    /// at key `stage_at`, added to the output registers after scaling them by their rows'
    /// corrections.
    pub fn accumulate_pv<E: Float>(
        &mut self,
        probs: &Sequence<Fragment<E>>,
        v_desc: &MatrixDescriptor<E>,
        stage_at: usize,
        #[comptime] config: PrefillConfig,
    ) {
        // Past 128 columns, in parts of 128: one part's accumulator (64 registers) at a time,
        // beside the output's.
        let part = comptime!(config.pv_part());
        #[unroll]
        for at in 0..config.value_dim() / part {
            let mut acc = Accumulator::<f32>::new(part).start();
            #[unroll]
            for t in 0..config.block_kv() / MMA_K {
                acc.execute_registers(probs.index(t), &v_desc.at(at * part, stage_at + t * MMA_K));
            }
            let acc = acc.wait();
            #[unroll]
            for nth in 0..part / 2 {
                let c = select(register_row(nth) == 0, self.corr_top, self.corr_bottom);
                let o = at * (part / 2) + nth;
                self.out[o] = self.out[o] * c + acc.get(nth);
            }
        }
    }
}
