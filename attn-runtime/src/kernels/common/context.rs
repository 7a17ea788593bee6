//! The cube's context: built once per cube, passed to every phase as one value.

use cubecl::prelude::*;

use crate::inputs::slots;
use crate::variant::{CausalAlignment, MaskSpec, ScoreFlags};

/// Run-time scalars of one launch, the same for every kernel family.
#[derive(CubeType, CubeLaunch, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Args {
    /// Softmax scale applied to q·k.
    pub scale: f32,
    /// Query heads per K/V head.
    pub group: u32,
    /// Window: keys before the aligned query position that stay visible.
    pub window_left: i32,
    /// Window: keys after it.
    pub window_right: i32,
    /// Softcap `cap`.
    pub softcap: f32,
    /// `1 / cap`.
    pub inv_softcap: f32,
    /// −∞, passed in because not every shading language can spell it: the masked score.
    pub neg_inf: f32,
}

/// The run-time inputs of a call, packed in two flat buffers of `slot_len`-value slots
/// ([`crate::inputs::slots`]): the mask's key lengths, offsets and prefix lengths, the ALiBi
/// slopes, the sinks and the variant's own declared inputs. The variant's expressions read them
/// ([`crate::Hooks`]).
#[derive(CubeType, CubeLaunch)]
pub struct RunInputs {
    /// The `i32` slots.
    pub ints: OwnedTensor<i32>,
    /// The `f32` slots.
    pub floats: OwnedTensor<f32>,
    /// Values per slot.
    pub slot_len: u32,
}

/// What a forward kernel reads: Q `[B, Hq, Nq, D]`, K `[B, Hkv, Nk, D]`, V `[B, Hkv, Nk, Dv]`.
#[derive(CubeType, CubeLaunch)]
pub struct Operands<E: Float> {
    /// Queries.
    pub q: OwnedTensor<E>,
    /// Keys.
    pub k: OwnedTensor<E>,
    /// Values.
    pub v: OwnedTensor<E>,
}

/// What a forward kernel writes: O and the log-sum-exp per query row.
#[derive(CubeType, CubeLaunch)]
pub struct Outputs<E: Float> {
    /// `[B, Hq, Nq, Dv]`.
    pub o: OwnedTensor<E>,
    /// `[B, Hq, Nq]` (f32).
    pub lse: OwnedTensor<f32>,
}

/// Which sequence and head a cube works on, and the tensors' sequence extents.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Lengths {
    /// The cube's sequence: batch entry or packed document.
    pub sequence: usize,
    /// The cube's query head (its first, where a cube serves several).
    pub head: usize,
    /// Query rows of the Q tensor.
    pub q_total: usize,
    /// Key rows of the K tensor (0 where key lengths always come from the inputs).
    pub k_total: usize,
}

/// Where one cube works: its sequence in the tensors, its heads, and per-cube constants.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Site {
    /// Batch index into the tensors (0 for packed documents).
    pub batch: usize,
    /// The index expressions see as `b`: batch entry or document.
    pub index: i32,
    /// First query row of the sequence in the tensor.
    pub q_off: usize,
    /// Queries in the sequence.
    pub seq_q: usize,
    /// First key row of the sequence in the tensor.
    pub k_off: usize,
    /// Visible keys in the sequence (key lengths applied).
    pub seq_k: usize,
    /// Aligned position of query 0.
    pub shift: i32,
    /// Prefix length (prefix-LM), else 0.
    pub prefix: i32,
    /// The query head's ALiBi slope, else 0.
    pub slope: f32,
    /// Query head.
    pub head: usize,
    /// The K/V head its group shares.
    pub kv_head: usize,
}

/// Everything a kernel's phases read besides their own tiles: where the cube works, the launch's
/// run-time scalars, and the variant's comptime mask and score flags.
#[derive(CubeType, Clone, Copy)]
#[expand(derive(Clone, Copy))]
pub struct Ctx {
    /// Where the cube works.
    pub site: Site,
    /// The launch's scalars.
    pub args: Args,
    /// The mask the kernel was compiled for.
    #[cube(comptime)]
    pub mask: MaskSpec,
    /// The score modifications it was compiled for.
    #[cube(comptime)]
    pub score: ScoreFlags,
}

#[cube]
impl Ctx {
    /// Locate the cube's sequence: a batch entry, or a packed document whose rows are read from
    /// the offsets; key lengths, prefix length and ALiBi slope come from the input slots.
    pub fn locate(
        at: Lengths,
        inputs: &RunInputs,
        args: Args,
        #[comptime] mask: MaskSpec,
        #[comptime] score: ScoreFlags,
    ) -> Ctx {
        let slot_len = inputs.slot_len as usize;
        let seq = at.sequence;
        let mut batch = seq;
        let mut q_off = 0usize.runtime();
        let mut seq_q = at.q_total;
        let mut k_off = 0usize.runtime();
        let mut seq_k = at.k_total;
        if comptime!(mask.documents) {
            let q_at = slots::Q_OFFSETS as usize * slot_len + seq;
            let k_at = slots::K_OFFSETS as usize * slot_len + seq;
            batch = 0;
            q_off = inputs.ints[q_at] as usize;
            seq_q = inputs.ints[q_at + 1] as usize - q_off;
            k_off = inputs.ints[k_at] as usize;
            seq_k = inputs.ints[k_at + 1] as usize - k_off;
        }
        if comptime!(mask.key_lengths) {
            seq_k = inputs.ints[slots::KEY_LENGTHS as usize * slot_len + seq] as usize;
        }
        let mut prefix = 0i32.runtime();
        if comptime!(mask.prefix_lm) {
            prefix = inputs.ints[slots::PREFIX_LENGTHS as usize * slot_len + seq];
        }
        let mut shift = 0i32.runtime();
        if comptime!(mask.align == CausalAlignment::BottomRight) {
            shift = seq_k as i32 - seq_q as i32;
        }
        let mut slope = 0.0f32.runtime();
        if comptime!(score.alibi) {
            slope = inputs.floats[slots::ALIBI_SLOPES as usize * slot_len + at.head];
        }
        Ctx {
            site: Site {
                batch,
                index: seq as i32,
                q_off,
                seq_q,
                k_off,
                seq_k,
                shift,
                prefix,
                slope,
                head: at.head,
                kv_head: at.head / args.group as usize,
            },
            args,
            mask,
            score,
        }
    }

    /// The same context with at most `keys` keys (decoding: the variant's own key length cut to
    /// the cache's), realigned when queries align bottom-right.
    pub fn keys_at_most(&self, keys: usize) -> Ctx {
        let site = self.site;
        let seq_k = select(keys < site.seq_k, keys, site.seq_k);
        let mut shift = site.shift;
        if comptime!(self.mask.align == CausalAlignment::BottomRight) {
            shift = seq_k as i32 - site.seq_q as i32;
        }
        Ctx {
            site: Site {
                batch: site.batch,
                index: site.index,
                q_off: site.q_off,
                seq_q: site.seq_q,
                k_off: site.k_off,
                seq_k,
                shift,
                prefix: site.prefix,
                slope: site.slope,
                head: site.head,
                kv_head: site.kv_head,
            },
            args: self.args,
            mask: self.mask,
            score: self.score,
        }
    }

    /// The score of a pair that does not take part: −∞.
    pub fn masked(&self) -> f32 {
        self.args.neg_inf
    }

    /// The same context for query head `head` of the cube's K/V group (a decode cube serves
    /// several), with that head's ALiBi `slope`.
    pub fn with_head(&self, head: usize, slope: f32) -> Ctx {
        let site = self.site;
        Ctx {
            site: Site {
                batch: site.batch,
                index: site.index,
                q_off: site.q_off,
                seq_q: site.seq_q,
                k_off: site.k_off,
                seq_k: site.seq_k,
                shift: site.shift,
                prefix: site.prefix,
                slope,
                head,
                kv_head: site.kv_head,
            },
            args: self.args,
            mask: self.mask,
            score: self.score,
        }
    }
}
