//! The K/V pipeline of the warpgroup kernel: two shared-memory stages each of K and V filled by
//! the copy engine one step ahead, their barriers, the named barriers of the two warpgroups'
//! turns, and the inline PTX the kernel needs beside cubecl's operations.
//!
//! **The hand-off invariant.** Every step of the walk — one that computes and one the mask rules
//! out alike — passes through [`Pipeline`]'s hand-offs in the same order: [`Pipeline::begin_step`]
//! (K arrived), [`Pipeline::scores_done`] (turn passed, K released), the prefetch of the next
//! step's K and then V, [`Pipeline::before_pv`] (turn back, V arrived), [`Pipeline::pv_done`] (V
//! released). The turns and every stage's barrier phases then stay in step whatever the mask
//! skips: the tiles of an empty step arrive all the same, and their phases complete before the
//! stage is refilled.

// `#[cube]` code: a comptime `if` around a run-time one must stay separate (the outer branch
// disappears at expansion, the inner one is kept).
#![allow(clippy::collapsible_if)]

use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use crate::kernels::common::Ctx;
use crate::kernels::prefill::config::{PrefillConfig, PANEL, STAGES};

/// Named barrier of warpgroup `w`'s turn on the tensor cores: `TURN + w` (0 is the cube's own).
pub const TURN: u32 = 1;
/// Named barrier of warpgroup `w`'s own 128 units: `WARPGROUP_SYNC + w`.
pub const WARPGROUP_SYNC: u32 = 3;

/// Where a bulk copy lands in the tensor: `(batch, head, row, 0)`.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct TmaOrigin {
    /// Batch index.
    pub batch: usize,
    /// Head.
    pub head: usize,
    /// First row.
    pub row: i32,
}

/// The shape of a bulk copy of rows into a panelled tile: `rows` rows of `width` columns, landing
/// at row `at` of each 64-column panel of `lines` rows.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct RowBox {
    /// First row of each panel written.
    pub at: usize,
    /// Rows copied.
    pub rows: usize,
    /// Rows per panel of the tile.
    pub lines: usize,
    /// Columns copied.
    pub width: usize,
}

/// The next step's fill of a stage: its first key, how many fills the stage had before, and
/// whether there is a next step at all.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Fetch {
    /// First key row of the next step (in the tensor).
    pub key: i32,
    /// Earlier fills of the stage it goes to.
    pub uses: usize,
    /// Whether a next step exists.
    pub has_next: bool,
}

/// The two shared-memory stages of K or of V: per stage a "full" barrier (its copy arrived) and
/// a "free" barrier (every plane is done reading it), and the columns of one row.
#[derive(CubeType)]
pub struct Stages {
    full0: Shared<Barrier>,
    full1: Shared<Barrier>,
    free0: Shared<Barrier>,
    free1: Shared<Barrier>,
    /// Columns of a row.
    #[cube(comptime)]
    width: usize,
    /// Rows of a stage (`block_kv`).
    #[cube(comptime)]
    rows: usize,
    /// Bytes of one column: 2 for 16-bit tiles, 4 for the `u32` words of fp8 codes.
    #[cube(comptime)]
    column_bytes: usize,
}

#[cube]
impl Stages {
    /// Both stages' barriers: "full" completes on one arrival (unit 0's, with the copy's bytes),
    /// "free" on one arrival per plane.
    pub fn new(
        #[comptime] planes: u32,
        #[comptime] width: usize,
        #[comptime] rows: usize,
    ) -> Stages {
        Stages::of_columns(planes, width, rows, 2usize)
    }

    /// Stages of `words` `u32` words a row (fp8 codes, four a word), filled by
    /// [`Stages::copy_words`]; barriers as [`Stages::new`]'s.
    pub fn of_words(
        #[comptime] planes: u32,
        #[comptime] words: usize,
        #[comptime] rows: usize,
    ) -> Stages {
        Stages::of_columns(planes, words, rows, 4usize)
    }

    /// Both stages' barriers, for rows of `width` columns of `column_bytes` bytes each.
    fn of_columns(
        #[comptime] planes: u32,
        #[comptime] width: usize,
        #[comptime] rows: usize,
        #[comptime] column_bytes: usize,
    ) -> Stages {
        Stages {
            full0: Barrier::shared(1, UNIT_POS == 0),
            full1: Barrier::shared(1, UNIT_POS == 0),
            free0: Barrier::shared(planes, UNIT_POS == 0),
            free1: Barrier::shared(planes, UNIT_POS == 0),
            width,
            rows,
            column_bytes,
        }
    }

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

    /// Unit 0, when there is a next step: fill stage `stage` with the next step's `block_kv`
    /// rows, completing on the stage's "full" barrier, once every plane has released the
    /// previous fill.
    pub fn prefetch<E: Float>(
        &self,
        map: &TensorMap<E, Tiled>,
        tile: &mut Shared<[E]>,
        ctx: &Ctx,
        fetch: Fetch,
        #[comptime] stage: usize,
    ) {
        if UNIT_POS == 0 && fetch.has_next {
            self.refill::<E>(map, tile, ctx, fetch, stage);
        }
    }

    /// Unit 0 only: [`Stages::prefetch`]'s fill.
    pub fn refill<E: Float>(
        &self,
        map: &TensorMap<E, Tiled>,
        tile: &mut Shared<[E]>,
        ctx: &Ctx,
        fetch: Fetch,
        #[comptime] stage: usize,
    ) {
        let origin = TmaOrigin {
            batch: ctx.site.batch,
            head: ctx.site.kv_head,
            row: fetch.key,
        };
        self.fill::<E>(map, tile, origin, fetch.uses, stage);
    }

    /// Unit 0 only: fill stage `stage` with the `rows` rows at `origin` (of any head: the
    /// backward streams query heads through the same stages), once every plane has released the
    /// stage's `uses` earlier fills.
    pub fn fill<E: Float>(
        &self,
        map: &TensorMap<E, Tiled>,
        tile: &mut Shared<[E]>,
        origin: TmaOrigin,
        uses: usize,
        #[comptime] stage: usize,
    ) {
        if uses > 0 {
            self.free(stage).wait_parity(((uses - 1) % 2) as u32);
        }
        self.fill_now::<E>(map, tile, origin, stage);
    }

    /// Unit 0 only: announce a fill of stage `stage` made of several copies ([`Stages::copy_box`],
    /// `rows` rows in all), once every plane has released the stage's `uses` earlier fills.
    pub fn announce(&self, #[comptime] stage: usize, uses: usize) {
        if uses > 0 {
            self.free(stage).wait_parity(((uses - 1) % 2) as u32);
        }
        let bytes = comptime!((self.rows * self.width * self.column_bytes) as u32);
        let _token = self.full(stage).arrive_and_expect_tx(1, bytes);
    }

    /// Unit 0 only: one copy of an announced fill of word stages ([`Stages::of_words`]):
    /// `shape.rows` rows of `shape.width` words at `origin`, unswizzled, into rows `shape.at..` of
    /// `tile` (rows of `shape.width / 4` vectors).
    pub fn copy_words(
        &self,
        map: &TensorMap<u32, Tiled>,
        tile: &mut Shared<[WordVector]>,
        origin: TmaOrigin,
        #[comptime] stage: usize,
        #[comptime] shape: RowBox,
    ) {
        let start = comptime!(shape.at * shape.width / 4);
        let len = comptime!(shape.rows * shape.width / 4);
        self.full(stage).tma_load_4d(
            map,
            &mut tile[start..start + len],
            origin.batch as i32,
            origin.head as i32,
            origin.row,
            0i32,
        );
    }

    /// Unit 0 only: one copy of an announced fill: `shape.rows` rows at `origin` into stage
    /// `stage`, from its row `shape.at`.
    pub fn copy_box<E: Float>(
        &self,
        map: &TensorMap<E, Tiled>,
        tile: &mut Shared<[E]>,
        origin: TmaOrigin,
        #[comptime] stage: usize,
        #[comptime] shape: RowBox,
    ) {
        copy_rows::<E>(map, self.full(stage), tile, origin, shape);
    }

    /// One unit only: fill stage `stage` with the `rows` rows at `origin` now, its readers known
    /// to be done with it.
    pub fn fill_now<E: Float>(
        &self,
        map: &TensorMap<E, Tiled>,
        tile: &mut Shared<[E]>,
        origin: TmaOrigin,
        #[comptime] stage: usize,
    ) {
        let rows = comptime!(self.rows);
        let shape = comptime!(RowBox {
            at: stage * rows,
            rows,
            lines: STAGES * rows,
            width: self.width,
        });
        load_rows::<E>(map, self.full(stage), tile, origin, shape);
    }
}

/// Four `u32` words (16 fp8 codes): the unit in which word stages are copied and read.
pub type WordVector = Vector<u32, Const<4>>;

/// The K and V stages and the two warpgroups' turns: the hand-offs of one step, in the order of
/// the module's invariant.
#[derive(CubeType)]
pub struct Pipeline {
    /// K's stages.
    pub k: Stages,
    /// V's stages.
    pub v: Stages,
    /// This unit's warpgroup.
    warpgroup: u32,
    /// Whether two warpgroups take turns.
    #[cube(comptime)]
    pingpong: bool,
}

#[cube]
impl Pipeline {
    /// The stages of `config`'s cube, for a unit of `warpgroup`.
    pub fn new(warpgroup: u32, #[comptime] config: PrefillConfig) -> Pipeline {
        let planes = comptime!((config.warpgroups() * super::WARPGROUP_UNITS / 32) as u32);
        Pipeline {
            k: Stages::new(planes, config.head_dim(), config.block_kv()),
            v: Stages::new(planes, config.value_dim(), config.block_kv()),
            warpgroup,
            pingpong: comptime!(config.warpgroups() == 2),
        }
    }

    /// The stages of a one-warpgroup cube whose K and V arrive as fp8 codes, `block_kv` rows of
    /// `head_dim / 4` and `value_dim / 4` words per stage.
    pub fn of_words(#[comptime] config: PrefillConfig) -> Pipeline {
        let planes = comptime!((super::WARPGROUP_UNITS / 32) as u32);
        Pipeline {
            k: Stages::of_words(planes, config.head_dim() / 4, config.block_kv()),
            v: Stages::of_words(planes, config.value_dim() / 4, config.block_kv()),
            warpgroup: 0u32,
            pingpong: false,
        }
    }

    /// Before the first step: the second warpgroup hands the first its turn, and each waits for
    /// its own.
    pub fn first_turn(&self) {
        if comptime!(self.pingpong) {
            if self.warpgroup == 1 {
                pass_turn(1);
            }
            wait_turn(self.warpgroup);
        }
    }

    /// After the last step: the first warpgroup hands over the turn for the other's last P·V.
    pub fn last_turn(&self) {
        if comptime!(self.pingpong) {
            if self.warpgroup == 0 {
                pass_turn(0);
            }
        }
    }

    /// A step starts: the plane meets (its units issue the warpgroup MMAs together) and waits for
    /// the stage's K.
    pub fn begin_step(&self, #[comptime] stage: usize, parity: u32) {
        sync_plane();
        self.k.wait(stage, parity);
    }

    /// The scores are issued and complete: the other warpgroup gets the turn, and the stage's K
    /// is released.
    pub fn scores_done(&self, #[comptime] stage: usize) {
        if comptime!(self.pingpong) {
            pass_turn(self.warpgroup);
        }
        self.k.release(stage);
    }

    /// Before P·V: the plane meets again (unit 0 may have waited to refill), the turn comes back,
    /// and the stage's V has arrived.
    pub fn before_pv(&self, #[comptime] stage: usize, parity: u32) {
        sync_plane();
        if comptime!(self.pingpong) {
            wait_turn(self.warpgroup);
        }
        self.v.wait(stage, parity);
    }

    /// P·V is done with the stage's V.
    pub fn pv_done(&self, #[comptime] stage: usize) {
        self.v.release(stage);
    }
}

/// Unit 0 only: copy `shape.rows` rows of `shape.width` columns from `origin` into `tile`, one
/// 64-column box per panel, completing on `bar`.
#[cube]
pub fn load_rows<E: Float>(
    map: &TensorMap<E, Tiled>,
    bar: &Shared<Barrier>,
    tile: &mut Shared<[E]>,
    origin: TmaOrigin,
    #[comptime] shape: RowBox,
) {
    let bytes = comptime!((shape.rows * shape.width * 2) as u32);
    let _token = bar.arrive_and_expect_tx(1, bytes);
    copy_rows::<E>(map, bar, tile, origin, shape);
}

/// Unit 0 only: [`load_rows()`]' copies, completing on `bar` whose arrival announced their bytes.
#[cube]
pub fn copy_rows<E: Float>(
    map: &TensorMap<E, Tiled>,
    bar: &Shared<Barrier>,
    tile: &mut Shared<[E]>,
    origin: TmaOrigin,
    #[comptime] shape: RowBox,
) {
    #[unroll]
    for p in 0..shape.width / PANEL {
        let start = (p * shape.lines + shape.at) * PANEL;
        bar.tma_load_4d(
            map,
            &mut tile[start..start + shape.rows * PANEL],
            origin.batch as i32,
            origin.head as i32,
            origin.row,
            (p * PANEL) as i32,
        );
    }
}

/// Waits for this warpgroup's turn on the tensor cores: its named barrier `TURN + warpgroup`,
/// complete once its own 128 units wait on it and the other warpgroup's 128 have passed the turn.
#[cube]
pub fn wait_turn(warpgroup: u32) {
    let id = TURN + warpgroup;
    gpu_asm!("bar.sync {}, 256;", in(_) id);
}

/// Passes the turn from `warpgroup` to the other one: arrives on the other's named barrier
/// without waiting.
#[cube]
pub fn pass_turn(warpgroup: u32) {
    let id = TURN + 1 - warpgroup;
    gpu_asm!("bar.arrive {}, 256;", in(_) id);
}

/// Waits until the 128 units of `warpgroup` all reach it: named barrier
/// `WARPGROUP_SYNC + warpgroup`.
#[cube]
pub fn sync_warpgroup(warpgroup: u32) {
    let id = WARPGROUP_SYNC + warpgroup;
    gpu_asm!("bar.sync {}, 128;", in(_) id);
}

/// `x`, through a statement the optimizer keeps in place. The walk passes each step's stage
/// offset through it: as a constant, the descriptors of both stages' K and V slices (16 per
/// stage at head dim 128, 64 bits each) are hoisted out of the loop and held in registers for the
/// whole walk, which took the two-warpgroup kernels to 255 registers with spills and the head
/// dim 64 one past the 168 that three cubes per SM allow. Computed per step, they cost an add
/// each.
#[cube]
pub fn opaque(x: u32) -> u32 {
    let y: u32;
    gpu_asm!("mov.b32 {}, {};", out(_) y, in(_) x);
    y
}
