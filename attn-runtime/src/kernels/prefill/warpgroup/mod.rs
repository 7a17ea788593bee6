//! The prefill kernel on Hopper's warpgroup tensor cores (wgmma), fed by the bulk tensor
//! copy engine (TMA).
//!
//! One cube per (query block, query head, batch or document); one warpgroup (4 planes, 128 units)
//! per 64 query rows. Unit 0 issues the copies: Q once, then each step's K and V tiles into one of
//! two shared-memory stages, each completing on its own barrier. K and V have separate "free"
//! barriers (one arrival per plane), so the next step's K is requested as soon as every plane has
//! finished this step's scores, and its V once every plane has finished the P·V before. Tiles are
//! laid out as the copy engine writes them with the 128-byte swizzle: panels of 64 columns, which
//! the warpgroup MMAs read directly (Q and K K-major, V MN-major), with no bank conflicts and no
//! unit touching them.
//!
//! Per step, each warpgroup:
//! 1. **scores**: `S = Q Kᵀ` for its 64 rows, `64 × block_kv` f32 in registers;
//! 2. **softmax**: score modification per register, then the mask in a pass of its own on the
//!    steps that need it (each unit holds two rows' values); each row's max and sum kept in four
//!    independent parts, so their chains stay short, and the row max joined across the four
//!    units of a row by two shuffles; f32 online state in base 2 (one fused multiply-add and one
//!    `ex2.approx` per probability), probabilities rounded to `E` straight into the MMA's
//!    A-operand registers (the accumulator's layout is the operand's);
//! 3. **P·V**: the step's `64 × value_dim` product from those registers and the V tile, added to
//!    the output, which stays in registers for the whole walk (rescaled by each row's correction).
//!    Past a value dim of 128 it runs in parts of 128 columns, each folded into the output before
//!    the next is issued, so one part's accumulator sits beside the output's 128 registers.
//!
//! The steps are walked in pairs, one per stage, unrolled, so each step's stage (its barriers,
//! its tiles' offsets) is a compile-time constant.
//!
//! At the end, a warpgroup whose rows all lie in the sequence stages its normalised O in its own
//! rows of the Q tile and stores it with the copy engine, whole lines at a time; the rows that end
//! a sequence are stored by the units, row by row.
//!
//! With two warpgroups per cube they take turns on the tensor cores (FA3's ping-pong, on two named
//! barriers): a turn is one step's P·V and the next step's scores, and one warpgroup's softmax
//! runs while the other has the turn.
//!
//! `ex2.approx` and the named barriers are inline PTX (`gpu_asm!`); cubecl's LLVM back end lowers
//! it with the change in `vendor/` (see its README).
//!
//! Phases: [`pipeline`] (the K/V stages, their barriers and the turns), [`mainloop`] (the two
//! products), [`softmax`] (the online softmax in registers), [`epilogue`] (the finish).
//!
//! The N×N score matrix never exists; K and V are read once per query block, from the K/V head
//! the query head's group shares. Mask tiles are classified as in the other kernels: keys outside
//! the block's visible range are never loaded, full steps skip the mask arithmetic, and the steps
//! a custom mask rules out inside that range are skipped whole: the walk goes from one live step
//! to the next ([`next_live()`](crate::kernels::common::walk::next_live())), so their tiles are
//! never fetched. Heavy causal blocks are scheduled first.

// `%` stays in `#[cube]` code: cubecl's frontend expands operators, not `is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]
// `#[cube]` code: `div_ceil` has no GPU expansion.
#![allow(clippy::manual_div_ceil)]

pub mod epilogue;
pub mod mainloop;
pub mod pipeline;
pub mod softmax;

use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;
use cubecl::wgmma::MatrixDescriptor;

use super::config::PrefillConfig;
pub use super::config::{PANEL, STAGES, WARPGROUP_ROWS, WARPGROUP_UNITS};
use crate::hooks::{Hooks, TILE_EMPTY};
use crate::kernels::common::{
    live_steps, mask, next_live, Args, BlockWalk, Ctx, KeySteps, Lengths, RunInputs, Step,
};
use mainloop::compute_scores;
use pipeline::{load_rows, opaque, Fetch, Pipeline, RowBox, TmaOrigin};
use softmax::{RowSites, UnitRows};

/// Q, K and V (`[B, H, N, D]`) described to the copy engine: boxes of `block_q` (Q) or
/// `block_kv` (K, V) rows by 64 columns, 128-byte swizzled.
#[derive(CubeType, CubeLaunch)]
pub struct TmaOperands<E: Float> {
    /// Queries.
    pub q: TensorMap<E, Tiled>,
    /// Keys.
    pub k: TensorMap<E, Tiled>,
    /// Values.
    pub v: TensorMap<E, Tiled>,
}

/// What the warpgroup kernel writes: O through the copy engine (boxes of a warpgroup's 64 rows)
/// and as a tensor (for the rows that end a sequence), and the LSE.
#[derive(CubeType, CubeLaunch)]
pub struct TmaOutputs<E: Float> {
    /// O for the copy engine.
    pub o_map: TensorMap<E, Tiled>,
    /// O, `[B, Hq, Nq, Dv]`.
    pub o: OwnedTensor<E>,
    /// The LSE, `[B, Hq, Nq]`.
    pub lse: OwnedTensor<f32>,
}

/// The fused forward pass on warpgroup tensor cores: O = softmax(mod(scale · Q Kᵀ) + mask) V, and
/// LSE.
#[cube(launch, address_type = "dynamic")]
pub fn prefill_forward_wg<E: Float, M: Hooks>(
    maps: &TmaOperands<E>,
    outputs: &mut TmaOutputs<E>,
    inputs: &RunInputs,
    args: Args,
    #[comptime] config: PrefillConfig,
) {
    let block_q = config.block_q();
    let block_kv = config.block_kv();
    let at = Lengths {
        sequence: CUBE_POS_Z as usize,
        head: CUBE_POS_Y as usize,
        q_total: outputs.o.shape(2),
        k_total: maps.k.shape(2),
    };
    let ctx = Ctx::locate(at, inputs, args, config.mask, config.score);
    // Heaviest blocks first: under a causal mask the last query blocks see the most keys, and
    // starting them first shortens the tail of the grid.
    let mut block = CUBE_POS_X as usize;
    if comptime!(config.mask.causal) {
        block = CUBE_COUNT_X as usize - 1 - block;
    }
    let q_start = block * block_q;
    // Cubes past the end of a short document have nothing to do (uniform across the cube).
    if q_start < ctx.site.seq_q {
        let seq = ctx.site;
        let q_tile = config.q_tile();
        let k_tile = config.k_tile();
        let v_tile = config.v_tile();
        let mut q_smem =
            Shared::<[E]>::new_aligned_slice(q_tile.rows * q_tile.k, q_tile.alignment());
        let mut k_smem =
            Shared::<[E]>::new_aligned_slice(k_tile.rows * k_tile.k, k_tile.alignment());
        let mut v_smem =
            Shared::<[E]>::new_aligned_slice(v_tile.rows * v_tile.k, v_tile.alignment());
        let q_bar = Barrier::shared(1, UNIT_POS == 0);
        let mut rows = UnitRows::new(&ctx, q_start, config);
        let sites = RowSites::block(ctx, rows.first_row);
        let pipe = Pipeline::new(rows.warpgroup as u32, config);
        sync_async_proxy_shared();
        sync_cube();

        let walk = BlockWalk::new(&ctx, q_start, block_q, block_kv);
        let key_steps = KeySteps { walk, block_kv };
        let key_at = seq.k_off as i32;
        // The steps that compute: all of the walk's, unless a custom mask rules some out.
        let steps = live_steps::<KeySteps, M>(&key_steps, &ctx, inputs);
        let mut at = next_live::<KeySteps, M>(&key_steps, &ctx, 0usize, inputs);
        if UNIT_POS == 0 {
            let origin = TmaOrigin {
                batch: seq.batch,
                head: seq.head,
                row: (seq.q_off + q_start) as i32,
            };
            let shape = comptime!(RowBox {
                at: 0,
                rows: block_q,
                lines: block_q,
                width: config.head_dim(),
            });
            load_rows::<E>(&maps.q, &q_bar, &mut q_smem, origin, shape);
            let first = Fetch {
                key: key_at + ((walk.first_step + at) * block_kv) as i32,
                uses: 0,
                has_next: steps > 0,
            };
            if steps > 0 {
                pipe.k
                    .refill::<E>(&maps.k, &mut k_smem, &ctx, first, 0usize);
                pipe.v
                    .refill::<E>(&maps.v, &mut v_smem, &ctx, first, 0usize);
            }
        }

        let q_desc =
            MatrixDescriptor::new(&q_smem, q_tile).at(rows.warpgroup * WARPGROUP_ROWS, 0usize);
        let k_desc = MatrixDescriptor::new(&k_smem, k_tile);
        let v_desc = MatrixDescriptor::new(&v_smem, v_tile);

        // Two warpgroups take turns on the tensor cores (FA3's ping-pong): a turn is one step's
        // P·V and the next step's scores, and while one warpgroup has it the other runs its
        // softmax. The first warpgroup goes first.
        pipe.first_turn();
        q_bar.wait_parity(0);

        // The walk in pairs of steps, one per stage, unrolled: each step's stage is a constant,
        // so its barrier waits, releases and refills name their barriers at compile time. Every
        // step passes the pipeline's hand-offs in the same order (see `pipeline`).
        for pair in 0..(steps + STAGES - 1) / STAGES {
            #[unroll]
            for stage in 0..STAGES {
                let index = pair * STAGES + stage;
                if index < steps {
                    let parity = (pair % 2) as u32;
                    let keys = walk.keys(walk.first_step + at, block_kv);
                    let step = Step {
                        keys,
                        class: mask::classify::<M>(&ctx, walk, keys, inputs),
                    };
                    // The next live step goes into the other stage.
                    let after = next_live::<KeySteps, M>(&key_steps, &ctx, at + 1, inputs);
                    let next = Fetch {
                        key: key_at + ((walk.first_step + after) * block_kv) as i32,
                        uses: (index + 1) / STAGES,
                        has_next: index + 1 < steps,
                    };
                    let next_stage = comptime!((stage + 1) % STAGES);
                    pipe.begin_step(stage, parity);
                    if step.class != TILE_EMPTY {
                        // Opaque, or the optimizer would hoist both stages' K and V descriptors
                        // out of the loop and hold them all in registers (see `opaque`).
                        let stage_at = opaque(comptime!((stage * block_kv) as u32)) as usize;
                        let scores = compute_scores::<E>(&q_desc, &k_desc, stage_at, config);
                        pipe.scores_done(stage);
                        // The next step's K goes into the other stage as soon as every plane is
                        // done with the scores that last read it (two turns ago, so this rarely
                        // waits).
                        pipe.k
                            .prefetch::<E>(&maps.k, &mut k_smem, &ctx, next, next_stage);
                        let probs =
                            rows.online_softmax::<E, M>(&scores, &sites, step, inputs, config);
                        pipe.v
                            .prefetch::<E>(&maps.v, &mut v_smem, &ctx, next, next_stage);
                        pipe.before_pv(stage, parity);
                        rows.accumulate_pv::<E>(&probs, &v_desc, stage_at, config);
                        pipe.pv_done(stage);
                    } else {
                        // No math, but the same hand-offs in the same order.
                        pipe.scores_done(stage);
                        pipe.k
                            .prefetch::<E>(&maps.k, &mut k_smem, &ctx, next, next_stage);
                        pipe.v
                            .prefetch::<E>(&maps.v, &mut v_smem, &ctx, next, next_stage);
                        pipe.before_pv(stage, parity);
                        pipe.pv_done(stage);
                    }
                    at = after;
                }
            }
        }
        pipe.last_turn();

        rows.write_output::<E>(&mut q_smem, outputs, &ctx, inputs, config);
    }
}
