//! The fused forward kernel on Hopper's warpgroup tensor cores (wgmma), fed by the bulk tensor
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
//! The N×N score matrix never exists; K and V are read once per query block, from the K/V head
//! the query head's group shares. Mask tiles are classified as in the other kernels: keys outside
//! the block's visible range are never loaded, empty steps skip the math, full steps skip the
//! mask arithmetic. Heavy causal blocks are scheduled first.

// `%` stays in `#[cube]` code: cubecl's frontend expands operators, not `is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]
// `#[cube]` code: `div_ceil` has no GPU expansion, and a comptime `if` around a run-time one must
// stay separate (the outer branch disappears at expansion, the inner one is kept).
#![allow(clippy::manual_div_ceil, clippy::collapsible_if)]

use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;
use cubecl::wgmma::{Accumulator, Fragment, Major, MatrixDescriptor, Swizzle, WgmmaTileLayout};

use crate::hooks::{Hooks, TILE_EMPTY, TILE_PARTIAL};
use crate::kernels::mask::{
    block_walk, classify_step, finish_state, key_visible, locate_sequence, modify_score, step_keys,
    SequenceSpan,
};
use crate::kernels::prefill::{PrefillArgs, PrefillConfig, RowState};

/// Query rows of one warpgroup (the M of every warpgroup MMA).
pub const WARPGROUP_ROWS: usize = 64;
/// Units of one warpgroup.
pub const WARPGROUP_UNITS: usize = 128;
/// Columns of one 128-byte swizzle panel of 16-bit elements: the copy engine's box width.
pub const PANEL: usize = 64;
/// K (keys) of one warpgroup MMA on 16-bit elements.
const MMA_K: usize = 16;
/// Shared-memory stages of K and V.
pub const STAGES: usize = 2;
/// Independent partial maxima and sums per row in the softmax (the joins below take four).
const PARTS: usize = 4;
const _: () = assert!(
    PARTS == 4,
    "join_parts and the sums' joins take exactly four parts"
);
/// `log2(e)`: the softmax runs in base 2.
const LOG2_E: f32 = core::f32::consts::LOG2_E;

/// What only the warpgroup kernel derives from the comptime configuration. Its constraints
/// (checked by the launcher): `block_q` a multiple of 64, `block_kv` a multiple of 16 up to 256,
/// `head_dim` and `value_dim` multiples of 64, 16-bit elements.
impl PrefillConfig {
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

/// The online-softmax state of a unit's two rows (`row0`, `row0 + 8`), and the factors this
/// step's max moved their output by.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct RowPair {
    /// Row `row0`.
    pub top: RowState,
    /// Row `row0 + 8`.
    pub bottom: RowState,
    /// `exp(old max − new max)` of the top row, this step.
    pub corr_top: f32,
    /// The same for the bottom row.
    pub corr_bottom: f32,
}

/// The fused forward pass on warpgroup tensor cores: O = softmax(mod(scale · Q Kᵀ) + mask) V, and
/// LSE. `q_map`, `k_map` and `v_map` describe Q, K and V (`[B, H, N, D]`) to the copy engine with
/// boxes of `block_q` (Q) or `block_kv` (K, V) rows by 64 columns, 128-byte swizzled.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn prefill_forward_wg<E: Float, M: Hooks>(
    q_map: &TensorMap<E, Tiled>,
    k_map: &TensorMap<E, Tiled>,
    v_map: &TensorMap<E, Tiled>,
    o_map: &mut TensorMap<E, Tiled>,
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    let block_q = config.block_q();
    let block_kv = config.block_kv();
    let head = CUBE_POS_Y as usize;
    let seq = locate_sequence(
        CUBE_POS_Z as usize,
        head,
        out.shape(2),
        k_map.shape(2),
        ints,
        floats,
        args,
        config.mask,
        config.score,
    );
    // Heaviest blocks first: under a causal mask the last query blocks see the most keys, and
    // starting them first shortens the tail of the grid.
    let mut block = CUBE_POS_X as usize;
    if comptime!(config.mask.causal) {
        block = CUBE_COUNT_X as usize - 1 - block;
    }
    let q_start = block * block_q;
    // Cubes past the end of a short document have nothing to do (uniform across the cube).
    if q_start < seq.seq_q {
        let kv_head = head / args.group as usize;
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
        let k_full0 = Barrier::shared(1, UNIT_POS == 0);
        let k_full1 = Barrier::shared(1, UNIT_POS == 0);
        let v_full0 = Barrier::shared(1, UNIT_POS == 0);
        let v_full1 = Barrier::shared(1, UNIT_POS == 0);
        // A stage's K (V) is free again once every plane has finished the scores (P·V) that read
        // it: one arrival per plane.
        let planes = comptime!((config.warpgroups() * WARPGROUP_UNITS / 32) as u32);
        let k_free0 = Barrier::shared(planes, UNIT_POS == 0);
        let k_free1 = Barrier::shared(planes, UNIT_POS == 0);
        let v_free0 = Barrier::shared(planes, UNIT_POS == 0);
        let v_free1 = Barrier::shared(planes, UNIT_POS == 0);
        sync_async_proxy_shared();
        sync_cube();
        let k_stages = Stages {
            full0: k_full0,
            full1: k_full1,
            free0: k_free0,
            free1: k_free1,
            width: config.head_dim(),
        };
        let v_stages = Stages {
            full0: v_full0,
            full1: v_full1,
            free0: v_free0,
            free1: v_free1,
            width: config.value_dim(),
        };

        let walk = block_walk(seq, q_start, args, block_q, block_kv, config.mask);
        let row_at = (seq.q_off + q_start) as i32;
        let key_at = seq.k_off as i32;
        let steps = walk.end_step - walk.first_step;
        if UNIT_POS == 0 {
            load_rows::<E>(
                q_map,
                &q_bar,
                &mut q_smem,
                seq.batch,
                head,
                row_at,
                0,
                block_q,
                block_q,
                config.head_dim(),
            );
            if steps > 0 {
                let first_key = key_at + (walk.first_step * block_kv) as i32;
                k_stages.refill::<E>(
                    k_map,
                    &mut k_smem,
                    seq,
                    kv_head,
                    first_key,
                    0usize,
                    0usize,
                    config,
                );
                v_stages.refill::<E>(
                    v_map,
                    &mut v_smem,
                    seq,
                    kv_head,
                    first_key,
                    0usize,
                    0usize,
                    config,
                );
            }
        }

        let warpgroup = UNIT_POS as usize / WARPGROUP_UNITS;
        let unit = UNIT_POS as usize % WARPGROUP_UNITS;
        // This unit's two rows of its warpgroup's 64 (`row0` and `row0 + 8`) and its first column
        // in each group of 8: the accumulator layout of a warpgroup MMA.
        let row0 = (unit / 32) * 16 + (unit % 32) / 4;
        let col0 = (unit % 4) * 2;
        let first_row = q_start + warpgroup * WARPGROUP_ROWS + row0;

        let q_desc = MatrixDescriptor::new(&q_smem, q_tile).at(warpgroup * WARPGROUP_ROWS, 0usize);
        let k_desc = MatrixDescriptor::new(&k_smem, k_tile);
        let v_desc = MatrixDescriptor::new(&v_smem, v_tile);

        let mut out_regs = zero_output(config);
        // Running maxima, −∞ until a row sees a key.
        let mut rows = RowPair {
            top: RowState {
                max: args.neg_inf,
                sum: 0.0f32,
            },
            bottom: RowState {
                max: args.neg_inf,
                sum: 0.0f32,
            },
            corr_top: 1.0f32,
            corr_bottom: 1.0f32,
        };
        // Two warpgroups take turns on the tensor cores (FA3's ping-pong): a turn is one step's
        // P·V and the next step's scores, and while one warpgroup has it the other runs its
        // softmax. The first warpgroup goes first.
        let pingpong = comptime!(config.warpgroups() == 2);
        if pingpong {
            if warpgroup == 1 {
                pass_turn(1);
            }
            wait_turn(warpgroup as u32);
        }
        q_bar.wait_parity(0);

        // The walk in pairs of steps, one per stage, unrolled: each step's stage is a constant,
        // so its barrier waits, releases and refills name their barriers at compile time.
        for pair in 0..(steps + STAGES - 1) / STAGES {
            #[unroll]
            for stage in 0..STAGES {
                let index = pair * STAGES + stage;
                if index < steps {
                    let step = walk.first_step + index;
                    let parity = (pair % 2) as u32;
                    let next = index + 1;
                    let has_next = next < steps;
                    let next_key = key_at + ((step + 1) * block_kv) as i32;
                    let keys = step_keys(walk, step, block_kv);
                    let class =
                        classify_step::<M>(seq, head, walk, keys, ints, floats, args, config.mask);
                    // The plane meets before its warpgroup MMAs, which its units issue together.
                    sync_plane();
                    k_stages.wait(stage, parity);
                    if class != TILE_EMPTY {
                        // Opaque, or the optimizer would hoist both stages' K and V descriptors
                        // out of the loop and hold them all in registers (see `opaque`).
                        let stage_at = opaque(comptime!((stage * block_kv) as u32)) as usize;
                        let scores = compute_scores::<E>(&q_desc, &k_desc, stage_at, config);
                        if pingpong {
                            pass_turn(warpgroup as u32);
                        }
                        k_stages.release(stage);
                        // The next step's K goes into the other stage as soon as every plane is
                        // done with the scores that last read it (two turns ago, so this rarely
                        // waits).
                        if UNIT_POS == 0 && has_next {
                            k_stages.refill::<E>(
                                k_map,
                                &mut k_smem,
                                seq,
                                kv_head,
                                next_key,
                                next / STAGES,
                                (stage + 1) % STAGES,
                                config,
                            );
                        }
                        // Keys past the step's length (the ragged last step, or another
                        // document's) and masked pairs are set to −∞ before the max.
                        let check = class == TILE_PARTIAL || keys.len < block_kv;
                        let probs = online_softmax::<E, M>(
                            &scores, &mut rows, seq, head, first_row, col0, keys.start, keys.len,
                            check, ints, floats, args, config,
                        );
                        if UNIT_POS == 0 && has_next {
                            v_stages.refill::<E>(
                                v_map,
                                &mut v_smem,
                                seq,
                                kv_head,
                                next_key,
                                next / STAGES,
                                (stage + 1) % STAGES,
                                config,
                            );
                        }
                        // Unit 0 may have waited: its plane meets again before the warpgroup
                        // MMAs, which every unit of a plane issues together.
                        sync_plane();
                        if pingpong {
                            wait_turn(warpgroup as u32);
                        }
                        v_stages.wait(stage, parity);
                        accumulate_pv::<E>(&probs, &v_desc, stage_at, &mut out_regs, rows, config);
                        v_stages.release(stage);
                    } else {
                        // No math, but the same hand-offs in the same order, so the turns and the
                        // stages' phases stay in step: the tiles arrived all the same, and their
                        // phases complete before the stage is refilled.
                        if pingpong {
                            pass_turn(warpgroup as u32);
                        }
                        k_stages.release(stage);
                        if UNIT_POS == 0 && has_next {
                            k_stages.refill::<E>(
                                k_map,
                                &mut k_smem,
                                seq,
                                kv_head,
                                next_key,
                                next / STAGES,
                                (stage + 1) % STAGES,
                                config,
                            );
                            v_stages.refill::<E>(
                                v_map,
                                &mut v_smem,
                                seq,
                                kv_head,
                                next_key,
                                next / STAGES,
                                (stage + 1) % STAGES,
                                config,
                            );
                        }
                        sync_plane();
                        if pingpong {
                            wait_turn(warpgroup as u32);
                        }
                        v_stages.wait(stage, parity);
                        v_stages.release(stage);
                    }
                }
            }
        }
        // The first warpgroup hands over the turn for the other's last P·V.
        if pingpong {
            if warpgroup == 0 {
                pass_turn(0);
            }
        }

        write_output::<E>(
            o_map,
            &mut q_smem,
            out,
            lse,
            &out_regs,
            rows,
            seq,
            head,
            warpgroup,
            first_row,
            row0,
            col0,
            floats,
            args,
            config,
        );
    }
}

/// Waits for this warpgroup's turn on the tensor cores: named barrier `1 + warpgroup`, complete
/// once its own 128 units wait on it and the other warpgroup's 128 have passed the turn.
#[cube]
fn wait_turn(warpgroup: u32) {
    let id = 1 + warpgroup;
    gpu_asm!("bar.sync {}, 256;", in(_) id);
}

/// Waits until the 128 units of `warpgroup` all reach it: named barrier `3 + warpgroup` (0 is the
/// cube's, 1 and 2 the turns').
#[cube]
fn sync_warpgroup(warpgroup: u32) {
    let id = 3 + warpgroup;
    gpu_asm!("bar.sync {}, 128;", in(_) id);
}

/// Passes the turn from `warpgroup` to the other one: arrives on the other's named barrier
/// without waiting.
#[cube]
fn pass_turn(warpgroup: u32) {
    let id = 2 - warpgroup;
    gpu_asm!("bar.arrive {}, 256;", in(_) id);
}

/// `x`, through a statement the optimizer keeps in place. The walk passes each step's stage
/// offset through it: as a constant, the descriptors of both stages' K and V slices (16 per
/// stage at head dim 128, 64 bits each) are hoisted out of the loop and held in registers for the
/// whole walk, which took the two-warpgroup kernels to 255 registers with spills and the head
/// dim 64 one past the 168 that three cubes per SM allow. Computed per step, they cost an add
/// each.
#[cube]
fn opaque(x: u32) -> u32 {
    let y: u32;
    gpu_asm!("mov.b32 {}, {};", out(_) y, in(_) x);
    y
}

/// `2^x` in one `ex2.approx.ftz` (relative error about 2⁻²²; −∞ gives 0, results below 2⁻¹²⁶
/// flush to 0, which a probability may).
#[cube]
fn exp2_approx(x: f32) -> f32 {
    let y: f32;
    gpu_asm!("ex2.approx.ftz.f32 {}, {};", out(_) y, in(_) x, options(pure, nomem));
    y
}

/// The two shared-memory stages of K or of V: per stage a "full" barrier (its copy arrived) and
/// a "free" barrier (every plane is done reading it), and the columns of one row.
#[derive(CubeType)]
pub struct Stages {
    full0: Shared<Barrier>,
    full1: Shared<Barrier>,
    free0: Shared<Barrier>,
    free1: Shared<Barrier>,
    #[cube(comptime)]
    width: usize,
}

#[cube]
impl Stages {
    /// The stage's "full" barrier.
    fn full(&self, #[comptime] stage: usize) -> &Shared<Barrier> {
        if comptime!(stage == 0) {
            &self.full0
        } else {
            &self.full1
        }
    }

    /// The stage's "free" barrier.
    fn free(&self, #[comptime] stage: usize) -> &Shared<Barrier> {
        if comptime!(stage == 0) {
            &self.free0
        } else {
            &self.free1
        }
    }

    /// Waits until the stage's tile (filled with `parity`) has arrived.
    pub fn wait(&self, #[comptime] stage: usize, parity: u32) {
        self.full(stage).wait_parity(parity);
    }

    /// This plane is done with the stage: its first unit arrives on the stage's "free" barrier
    /// (the plane's MMAs that read it have completed, for every unit of the plane together).
    pub fn release(&self, #[comptime] stage: usize) {
        if UNIT_POS_PLANE == 0 {
            let _done = self.free(stage).arrive();
        }
    }

    /// Unit 0 only: fills stage `stage`, whose previous fills number `uses`, with `block_kv` rows
    /// from key row `key`, completing on the stage's "full" barrier, once every plane has
    /// released the previous fill.
    #[allow(clippy::too_many_arguments)]
    pub fn refill<E: Float>(
        &self,
        map: &TensorMap<E, Tiled>,
        tile: &mut Shared<[E]>,
        seq: SequenceSpan,
        kv_head: usize,
        key: i32,
        uses: usize,
        #[comptime] stage: usize,
        #[comptime] config: PrefillConfig,
    ) {
        if uses > 0 {
            self.free(stage).wait_parity(((uses - 1) % 2) as u32);
        }
        let rows = comptime!(config.block_kv());
        load_rows::<E>(
            map,
            self.full(stage),
            tile,
            seq.batch,
            kv_head,
            key,
            stage * rows,
            rows,
            STAGES * rows,
            comptime!(self.width),
        );
    }
}

/// Unit 0 only: copy `rows` rows of `width` columns starting at `(batch, head, row, 0)` into
/// `tile` (`lines` rows per panel) at row `at` of each panel, one 64-column box per panel,
/// completing on `bar`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_rows<E: Float>(
    map: &TensorMap<E, Tiled>,
    bar: &Shared<Barrier>,
    tile: &mut Shared<[E]>,
    batch: usize,
    head: usize,
    row: i32,
    at: usize,
    #[comptime] rows: usize,
    #[comptime] lines: usize,
    #[comptime] width: usize,
) {
    let bytes = comptime!((rows * width * 2) as u32);
    let _token = bar.arrive_and_expect_tx(1, bytes);
    #[unroll]
    for p in 0..width / PANEL {
        let start = (p * lines + at) * PANEL;
        bar.tma_load_4d(
            map,
            &mut tile[start..start + rows * PANEL],
            batch as i32,
            head as i32,
            row,
            (p * PANEL) as i32,
        );
    }
}

/// A zero output: the unit's `value_dim / 2` f32 registers of its warpgroup's `64 × value_dim`.
#[cube]
fn zero_output(#[comptime] config: PrefillConfig) -> Array<f32> {
    let len = config.value_dim() / 2;
    let mut regs = Array::<f32>::new(len);
    #[unroll]
    for i in 0..len {
        regs[i] = 0.0f32;
    }
    regs
}

/// Scores: this warpgroup's `64 × block_kv` logits `Q Kᵀ` against the stage starting at key row
/// `stage_at`, in f32 registers.
#[cube]
fn compute_scores<E: Float>(
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

/// Which of the unit's two rows its `nth` accumulator register belongs to (0: `row0`, 1:
/// `row0 + 8`). `nth` is an unrolled constant, so this folds away.
#[cube]
fn register_row(nth: usize) -> usize {
    (nth / 2) % 2
}

/// Which of a row's `PARTS` partial maxima and sums the unit's `nth` accumulator register goes
/// to: consecutive registers of a row take turns. `nth` is an unrolled constant.
#[cube]
fn register_part(nth: usize) -> usize {
    (nth / 4) % PARTS
}

/// The max of a row's `PARTS` partial maxima starting at `at`, in a tree.
#[cube]
fn join_parts(part: &Array<f32>, #[comptime] at: usize) -> f32 {
    f32::max(
        f32::max(part[at], part[at + 1]),
        f32::max(part[at + 2], part[at + 3]),
    )
}

/// The sum of a row's `PARTS` partial sums starting at `at`, in a tree.
#[cube]
fn sum_parts(part: &Array<f32>, #[comptime] at: usize) -> f32 {
    (part[at] + part[at + 1]) + (part[at + 2] + part[at + 3])
}

/// The column of the unit's `nth` accumulator register, from the unit's first column.
#[cube]
fn register_col(nth: usize) -> usize {
    (nth / 4) * 8 + nth % 2
}

/// The online softmax of one step on the unit's registers: modify and mask each score, update
/// both rows' running max (joined across the row's four units), sum (the unit's part; joined at
/// the end) and correction, and round the probabilities into the P·V operand fragments.
///
/// Everything runs in base 2 on the logits' own units: without a score modification the raw
/// `q·k` (the positive scale commutes with the max), with one the modified scaled logit. One
/// fused multiply-add by `log2(e)` (times the scale) and one `ex2` give each probability; the
/// rows' maxima stay in the same units until [`write_output`].
#[cube]
#[allow(clippy::too_many_arguments)]
fn online_softmax<E: Float, M: Hooks>(
    scores: &Accumulator<f32>,
    rows: &mut RowPair,
    seq: SequenceSpan,
    head: usize,
    first_row: usize,
    col0: usize,
    kv_start: usize,
    kv_len: usize,
    check: bool,
    ints: &Tensor<i32>,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) -> Sequence<Fragment<E>> {
    let len = config.block_kv() / 2;
    let mut x = Array::<f32>::new(len);
    #[unroll]
    for nth in 0..len {
        let mut s = scores.get(nth);
        if comptime!(config.score.modifies_scores()) {
            let row = first_row + register_row(nth) * 8;
            let key = col0 + register_col(nth);
            s = modify_score::<M>(
                s * args.scale,
                seq,
                head,
                row as i32,
                (kv_start + key) as i32,
                ints,
                floats,
                args,
                config.score,
            );
        }
        x[nth] = s;
    }
    // The mask in a pass of its own, taken only on the steps that need it: full steps pay
    // nothing for it (folded into the loop above, it became two selects per score on every
    // step).
    if check {
        #[unroll]
        for nth in 0..len {
            let row = first_row + register_row(nth) * 8;
            let key = col0 + register_col(nth);
            let mut visible = key < kv_len;
            if comptime!(!config.mask.is_none()) {
                visible = visible
                    && key_visible::<M>(
                        seq,
                        head,
                        row as i32,
                        (kv_start + key) as i32,
                        ints,
                        floats,
                        args,
                        config.mask,
                    );
            }
            x[nth] = select(visible, x[nth], args.neg_inf);
        }
    }
    // Each row's max over the unit's 32 scores, in `PARTS` independent running maxima (one
    // `max` each, not a compare and a select): while the other warpgroup's MMAs run, this
    // warpgroup's planes have their sub-partitions to themselves, and the latency of a chain of
    // dependent instructions is what a long chain costs.
    let mut part = Array::<f32>::new(2 * PARTS);
    #[unroll]
    for i in 0..2 * PARTS {
        part[i] = args.neg_inf;
    }
    #[unroll]
    for nth in 0..len {
        let at = register_row(nth) * PARTS + register_part(nth);
        part[at] = f32::max(part[at], x[nth]);
    }
    let max0 = join_parts(&part, 0usize);
    let max1 = join_parts(&part, PARTS);
    let new0 = row_max(max0, rows.top.max);
    let new1 = row_max(max1, rows.bottom.max);
    // log2(e), times the scale when the logits are still raw.
    let mut to_log2 = LOG2_E.runtime();
    if comptime!(!config.score.modifies_scores()) {
        to_log2 *= args.scale;
    }
    // A row that has seen no key yet keeps −∞ as its max and subtracts 0 instead, so masked
    // scores (−∞) give 0 and nothing gives NaN.
    let base0 = select(new0 == args.neg_inf, 0.0f32, new0) * to_log2;
    let base1 = select(new1 == args.neg_inf, 0.0f32, new1) * to_log2;
    let corr0 = exp2_approx(rows.top.max * to_log2 - base0);
    let corr1 = exp2_approx(rows.bottom.max * to_log2 - base1);
    // The rows' sums in `PARTS` independent parts each, as the maxima.
    #[unroll]
    for i in 0..2 * PARTS {
        part[i] = 0.0f32;
    }
    let mut fragments = Sequence::<Fragment<E>>::new();
    #[unroll]
    for t in 0..config.block_kv() / MMA_K {
        let mut fragment = Fragment::<E>::new();
        #[unroll]
        for i in 0..8 {
            let nth = t * 8 + i;
            let which = register_row(nth);
            let p = exp2_approx(x[nth] * to_log2 - select(which == 0, base0, base1));
            let at = which * PARTS + register_part(nth);
            part[at] += p;
            fragment.set(i, E::cast_from(p));
        }
        fragments.push(fragment);
    }
    let sum0 = sum_parts(&part, 0usize);
    let sum1 = sum_parts(&part, PARTS);
    rows.top.sum = rows.top.sum * corr0 + sum0;
    rows.bottom.sum = rows.bottom.sum * corr1 + sum1;
    rows.top.max = new0;
    rows.bottom.max = new1;
    rows.corr_top = corr0;
    rows.corr_bottom = corr1;
    fragments
}

/// A row's new running max: the unit's step max joined across the row's four units (lanes
/// `4r..4r + 4`), and the old max.
#[cube]
fn row_max(unit_max: f32, old: f32) -> f32 {
    let other = plane_shuffle_xor(unit_max, 1);
    let a = select(other > unit_max, other, unit_max);
    let other = plane_shuffle_xor(a, 2);
    let b = select(other > a, other, a);
    select(old > b, old, b)
}

/// P·V: the step's product of the probabilities (A from registers) and the V stage starting at
/// key `stage_at`, added to the output registers after scaling them by their rows' corrections.
#[cube]
fn accumulate_pv<E: Float>(
    probs: &Sequence<Fragment<E>>,
    v_desc: &MatrixDescriptor<E>,
    stage_at: usize,
    out_regs: &mut Array<f32>,
    rows: RowPair,
    #[comptime] config: PrefillConfig,
) {
    // Past 128 columns, in parts of 128: one part's accumulator (64 registers) at a time, beside
    // the output's.
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
            let c = select(register_row(nth) == 0, rows.corr_top, rows.corr_bottom);
            let o = at * (part / 2) + nth;
            out_regs[o] = out_regs[o] * c + acc.get(nth);
        }
    }
}

/// Finish: join each row's sum across its four units, fold in the sink, normalise once and write
/// O and the LSE (O = 0, LSE = −∞ for a row that saw no key and has no sink).
///
/// A warpgroup whose 64 rows all lie in the sequence stages its O in its own rows of the Q tile
/// (its last scores have read them) in the copy engine's swizzled layout, and stores it with one
/// bulk copy per 64-column panel: whole 128-byte lines, where the units' own stores write 2 bytes
/// each, scattered over eight rows per instruction. The rows of a block that end a sequence (and
/// O wider than Q's tile) take the units' stores, row by row, so no row of another document is
/// touched.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_output<E: Float>(
    o_map: &mut TensorMap<E, Tiled>,
    q_smem: &mut Shared<[E]>,
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    out_regs: &Array<f32>,
    rows: RowPair,
    seq: SequenceSpan,
    head: usize,
    warpgroup: usize,
    first_row: usize,
    row0: usize,
    col0: usize,
    floats: &Tensor<f32>,
    args: PrefillArgs,
    #[comptime] config: PrefillConfig,
) {
    // The maxima are in the logits' own units (see `online_softmax`): back to scaled logits.
    let mut unit = 1.0f32.runtime();
    if comptime!(!config.score.modifies_scores()) {
        unit = args.scale;
    }
    let mut state0 = RowState {
        max: rows.top.max * unit,
        sum: quad_sum(rows.top.sum),
    };
    let mut state1 = RowState {
        max: rows.bottom.max * unit,
        sum: quad_sum(rows.bottom.sum),
    };
    let factor0 = finish_state(&mut state0, head, floats, args, config.score);
    let factor1 = finish_state(&mut state1, head, floats, args, config.score);
    let inv0 = select(state0.sum > 0.0, factor0 / state0.sum, 0.0f32);
    let inv1 = select(state1.sum > 0.0, factor1 / state1.sum, 0.0f32);
    let row1 = first_row + 8;
    // The warpgroup's first row.
    let group_row = first_row - row0;
    // Staging needs O to fit in the warpgroup's Q rows (known at compile time) and every row to
    // lie in the sequence (known at run time): two `if`s, each with the row stores as its other arm.
    if comptime!(config.value_dim() <= config.head_dim()) {
        if group_row + WARPGROUP_ROWS <= seq.seq_q {
            store_output_staged::<E>(
                o_map, q_smem, out_regs, inv0, inv1, seq, head, warpgroup, group_row, row0, col0,
                config,
            );
        } else {
            store_output_rows::<E>(
                out, out_regs, inv0, inv1, seq, head, first_row, col0, config,
            );
        }
    } else {
        store_output_rows::<E>(
            out, out_regs, inv0, inv1, seq, head, first_row, col0, config,
        );
    }
    if col0 == 0 {
        let lse_base = seq.batch * lse.stride(0) + head * lse.stride(1);
        let lse_row = lse.stride(2);
        if first_row < seq.seq_q {
            lse[lse_base + (seq.q_off + first_row) * lse_row] =
                select(state0.sum > 0.0, state0.max + state0.sum.ln(), args.neg_inf);
        }
        if row1 < seq.seq_q {
            lse[lse_base + (seq.q_off + row1) * lse_row] =
                select(state1.sum > 0.0, state1.max + state1.sum.ln(), args.neg_inf);
        }
    }
}

/// O of a warpgroup whose rows all lie in the sequence: into its 64 rows of the Q tile, panels of
/// 64 columns with the 128-byte swizzle (16-byte chunk `c` of row `r` at chunk `c ^ (r % 8)`,
/// which also spreads a plane's eight rows over all banks), then one bulk copy per panel, issued
/// by the warpgroup's first unit once every unit's writes are visible to the copy engine.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_output_staged<E: Float>(
    o_map: &mut TensorMap<E, Tiled>,
    q_smem: &mut Shared<[E]>,
    out_regs: &Array<f32>,
    inv0: f32,
    inv1: f32,
    seq: SequenceSpan,
    head: usize,
    warpgroup: usize,
    group_row: usize,
    row0: usize,
    col0: usize,
    #[comptime] config: PrefillConfig,
) {
    let block_q = config.block_q();
    let group_at = warpgroup * WARPGROUP_ROWS;
    let swizzle = row0 % 8;
    #[unroll]
    for nth in 0..config.value_dim() / 2 {
        let chunk = nth / 4;
        let panel = chunk / 8;
        let row = row0 + register_row(nth) * 8;
        let inv = select(register_row(nth) == 0, inv0, inv1);
        let at = (panel * block_q + group_at + row) * PANEL
            + ((chunk % 8) ^ swizzle) * 8
            + col0
            + nth % 2;
        q_smem[at] = E::cast_from(out_regs[nth] * inv);
    }
    sync_async_proxy_shared();
    sync_warpgroup(warpgroup as u32);
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
                head as i32,
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

/// O row by row from the registers: each unit writes its two rows' elements, skipping rows past
/// the sequence.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_output_rows<E: Float>(
    out: &mut Tensor<E>,
    out_regs: &Array<f32>,
    inv0: f32,
    inv1: f32,
    seq: SequenceSpan,
    head: usize,
    first_row: usize,
    col0: usize,
    #[comptime] config: PrefillConfig,
) {
    let row1 = first_row + 8;
    let base = seq.batch * out.stride(0) + head * out.stride(1);
    let base0 = base + (seq.q_off + first_row) * out.stride(2);
    let base1 = base + (seq.q_off + row1) * out.stride(2);
    #[unroll]
    for nth in 0..config.value_dim() / 2 {
        let c = col0 + register_col(nth);
        if register_row(nth) == 0 {
            if first_row < seq.seq_q {
                out[base0 + c] = E::cast_from(out_regs[nth] * inv0);
            }
        } else if row1 < seq.seq_q {
            out[base1 + c] = E::cast_from(out_regs[nth] * inv1);
        }
    }
}

/// A row's sum over its four units.
#[cube]
fn quad_sum(x: f32) -> f32 {
    let a = x + plane_shuffle_xor(x, 1);
    a + plane_shuffle_xor(a, 2)
}

#[cfg(test)]
mod tests {
    use crate::kernels::prefill::PrefillConfig;
    use crate::variant::{MaskSpec, ScoreFlags, Tiling};

    /// Every shape the launcher may pick has tiles a warpgroup MMA reads (whole 128-byte panels,
    /// whole 8-line swizzle patterns, whole K steps), and the two-stage layout fits a Hopper cube
    /// at the largest of them.
    #[test]
    fn tile_layouts_are_readable() {
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
                    assert_eq!(
                        config.warpgroups() * super::WARPGROUP_ROWS,
                        block_q as usize
                    );
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
