//! Attention of a few new query tokens against a K/V cache: validation, the plan (tile shape and
//! number of key splits), the launch of the decode kernel and of its combine step, and the merge
//! of two results over disjoint keys (cascade and shared-prefix decoding).
//!
//! Semantics are the prefill kernels' with the cache as K and V: sequence `b` has
//! `cache.lengths()[b]` keys (further cut by the variant's own key lengths, if it declares them),
//! and with bottom-right alignment the `Nq` query tokens are the last `Nq` positions of the
//! sequence, as after appending them. Up to 16 query tokens per sequence is the decode regime
//! (speculative decoding included); more is chunked prefill against the cache, which the same
//! kernel runs by packing rows into more cubes.

use std::marker::PhantomData;

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl_common::bytes::Bytes;

use crate::blueprint::{prefill_config, KernelFamily, Warpgroup};
use crate::error::{AttnError, Dim, Operand};
use crate::hooks::Hooks;
use crate::inputs::{pack, Inputs, Packed};
use crate::kernels::common::{ArgsLaunch, OutputsLaunch, RunInputsLaunch};
use crate::kernels::decode::combine::{
    combine_splits, merge_states, CombineConfig, MergeConfig, PartsLaunch,
};
use crate::kernels::decode::warpgroup::{decode_forward_wg, CacheMapsLaunch, DecodeWgConfig};
use crate::kernels::decode::{
    decode_forward, DecodeArgsLaunch, DecodeConfig, DecodeOperandsLaunch, DecodeOutputsLaunch,
    DecodeTiling, KV_VECTOR,
};
use crate::kernels::prefill::config::{PANEL, WARPGROUP_ROWS, WARPGROUP_UNITS};
use crate::kv_cache::{grid, DeviceTables, KvCache, KvPool};
use crate::launch::{
    copy_engine_can_read, flat_arg, is_cpu_emulated, kernel_args, tensor_arg, tma_map,
    unsupported_dtype, upload_inputs, Lse, Output,
};
use crate::problem::{check_view, Problem};
use crate::tensor::{supports, ComputeClient, Element, Tensor};
use crate::variant::Tiling;
use crate::variant::{Variant, VariantSpec};

/// Query tokens per sequence up to which a call is decoding (more is chunked prefill).
pub const MAX_DECODE_QUERIES: usize = 16;

/// Most query rows one decode cube packs: (head of a group, token) pairs.
const MAX_ROWS: usize = 16;

/// Loads issued together by default (`DecodeTiling::chunk`): 16 for cubes of at most 4 rows
/// (one new token of a GQA-4 group), 8 above. On an H100 (bench/RESULTS.md, 2026-12-06) the
/// sweep's fastest plan for 4 rows issued 16 in all five single-token cases, 1–4 % ahead of 8 at
/// the same split; with 16 rows 8 stayed fastest (their scores take the registers).
const fn default_chunk(rows: u32) -> u32 {
    if rows <= 4 {
        16
    } else {
        8
    }
}

/// The fewest keys a split gets: below this, the combine step costs more than the parallelism
/// brings.
const MIN_KEYS_PER_SPLIT: usize = 256;

/// Which decode kernel runs a plan, and its tile shape.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum DecodeKernel {
    /// The CUDA-core kernel ([`crate::kernels::decode`]; every back end) with this tile shape.
    Units(DecodeTiling),
    /// The warpgroup kernel ([`crate::kernels::decode::warpgroup`]; Hopper, fp8 caches and
    /// 16-bit caches the copy engine reads): 64 packed rows per cube, `block_kv` keys per step.
    Warpgroup {
        /// Keys per step.
        block_kv: u32,
    },
}

impl DecodeKernel {
    /// A stable name (`r4_u64_c16`, `wg_kv128`).
    pub fn name(&self) -> String {
        match self {
            DecodeKernel::Units(tiling) => tiling.name(),
            DecodeKernel::Warpgroup { block_kv } => format!("wg_kv{block_kv}"),
        }
    }

    /// Keys per step.
    pub fn block_kv(&self) -> usize {
        match self {
            DecodeKernel::Units(tiling) => tiling.units as usize,
            DecodeKernel::Warpgroup { block_kv } => *block_kv as usize,
        }
    }

    /// Packed query rows per cube.
    pub fn rows(&self) -> usize {
        match self {
            DecodeKernel::Units(tiling) => tiling.rows as usize,
            DecodeKernel::Warpgroup { .. } => WARPGROUP_ROWS,
        }
    }
}

/// How a decode call runs: the kernel and its tile shape, and into how many key splits each
/// sequence is cut.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct DecodePlan {
    /// The kernel and its tile shape.
    pub kernel: DecodeKernel,
    /// Key splits per sequence (1: no combine step).
    pub splits: usize,
}

impl DecodePlan {
    /// A stable name for logs and benchmark tables (`r4_u64_c16_s8`, `wg_kv128_s2`).
    pub fn name(&self) -> String {
        format!("{}_s{}", self.kernel.name(), self.splits)
    }
}

/// A validated decode call: the problem (Nq query tokens, the cache's capacity as Nk) and the
/// packed run-time inputs, with the effective key length of every sequence in the key-length slot.
#[derive(Clone, Debug)]
pub struct DecodeProblem {
    /// Shapes; `seq_k` is the cache's capacity per sequence.
    pub problem: Problem,
    /// The inputs, packed.
    pub packed: Packed,
    /// The longest effective key length.
    pub max_len: usize,
    /// The variant's facts as the decode kernel runs them (key lengths on).
    pub spec: VariantSpec,
    /// Ragged queries: each sequence's first row of Q `[1, Hq, total, D]`, `B + 1` offsets
    /// (`problem.seq_q` is then the most tokens of any sequence).
    pub q_offsets: Option<Vec<usize>>,
    /// How the cache stores its tokens.
    pub layout: CacheLayout,
}

impl DecodeProblem {
    /// Checks Q `[B, Hq, Nq, D]` against the variant and the cache, and the inputs against both.
    pub fn new<V: Variant>(
        q: &Tensor<V::Elem>,
        cache: &KvCache<V::Elem>,
        inputs: &Inputs,
    ) -> Result<Self, AttnError> {
        let base = &V::SPEC;
        if base.mask.documents {
            return Err(AttnError::Unsupported(format!(
                "{} packs documents into one sequence; a K/V cache holds one sequence per batch entry, so decode with a batch instead",
                base.name
            )));
        }
        check_cache_vectors(cache)?;
        // The shapes are those of an ordinary call with the cache as K and V.
        let k_view = cache_view(cache.k(), cache, q);
        let v_view = cache_view(cache.v(), cache, q);
        let problem = Problem::new(base, q, &k_view, &v_view)?;
        let mut spec = *base;
        spec.mask.key_lengths = true;
        let mut lengths: Vec<i32> = cache.lengths().iter().map(|&l| l as i32).collect();
        if base.mask.key_lengths {
            let own = inputs.key_lengths.ok_or(AttnError::Input {
                input: "key_lengths",
                reason: "the variant declares key_lengths; pass one per sequence".into(),
            })?;
            if own.len() != lengths.len() {
                return Err(AttnError::Input {
                    input: "key_lengths",
                    reason: format!("{} values for {} sequences", own.len(), lengths.len()),
                });
            }
            for (b, (len, &own)) in lengths.iter_mut().zip(own).enumerate() {
                if own < 0 || own > *len {
                    return Err(AttnError::Input {
                        input: "key_lengths",
                        reason: format!(
                            "entry {b} is {own}; a key length lies between 0 and the sequence's {len} cached tokens"
                        ),
                    });
                }
                *len = own;
            }
        }
        let with_lengths = Inputs {
            key_lengths: Some(&lengths),
            ..inputs.clone()
        };
        let packed = pack(&spec, &problem, &with_lengths)?;
        let max_len = lengths.iter().copied().max().unwrap_or(0) as usize;
        Ok(Self {
            problem,
            packed,
            max_len,
            spec,
            q_offsets: None,
            layout: cache_layout(cache),
        })
    }

    /// Checks a ragged call: sequence `b`'s query tokens are rows `q_offsets[b]..q_offsets[b + 1]`
    /// of Q `[1, Hq, total, D]` (cu_seqlens; a sequence may have none), the last tokens of its
    /// sequence as in [`Self::new`]; O and the LSE are laid out as Q.
    pub fn ragged<V: Variant>(
        q: &Tensor<V::Elem>,
        q_offsets: &[usize],
        cache: &KvCache<V::Elem>,
        inputs: &Inputs,
    ) -> Result<Self, AttnError> {
        let [one, heads_q, total, d] = q.shape();
        if one != 1 {
            return Err(AttnError::DimMismatch {
                operand: Operand::Q,
                dim: Dim::Batch,
                expected: 1,
                found: one,
                why: "ragged queries are rows of one batch entry, cut by q_offsets",
            });
        }
        let most = check_offsets(q_offsets, cache.batch(), total)?;
        // The shapes as a call of `most` tokens per sequence would have them (Q's buffer is
        // checked as Q itself; this view is never launched).
        check_view(Operand::Q, q.shape(), q.strides(), q.buffer_len())?;
        let shape = [cache.batch(), heads_q, most.max(1), d];
        let view = Tensor::from_raw_parts(
            q.handle().clone(),
            shape.iter().product(),
            shape,
            crate::tensor::contiguous_strides(shape),
        );
        let mut call = Self::new::<V>(&view, cache, inputs)?;
        call.q_offsets = Some(q_offsets.to_vec());
        Ok(call)
    }

    /// The output's shapes as a [`Problem`]: the call's, or for ragged queries one batch entry of
    /// every sequence's tokens.
    pub fn output_problem(&self) -> Problem {
        let mut p = self.problem;
        if let Some(offsets) = &self.q_offsets {
            p.batch = 1;
            p.seq_q = offsets[offsets.len() - 1];
        }
        p
    }

    /// O's shape, `[B, Hq, Nq, Dv]` (ragged: `[1, Hq, total, Dv]`).
    pub fn out_shape(&self) -> [usize; 4] {
        self.output_problem().out_shape()
    }

    /// The LSE's shape.
    pub fn lse_shape(&self) -> [usize; 3] {
        self.output_problem().lse_shape()
    }

    /// The most keys the query tokens of one sequence can see together: the longest length, or,
    /// under a sliding window that bounds both sides (its left side with causal, or both sides
    /// given), the window's span plus the query tokens, when that is shorter. The splits divide
    /// this span from where a sequence's visible keys start ([`Self::split_span`]), so a window's
    /// keys are spread over every split instead of landing on the few that cover the cache's
    /// last keys.
    pub fn keys_seen(&self) -> usize {
        let mask = &self.spec.mask;
        let span = mask.window.and_then(|w| {
            let left = w.left? as usize;
            let right = if mask.causal { 0 } else { w.right? as usize };
            Some(left + right + self.problem.seq_q)
        });
        span.map_or(self.max_len, |s| s.min(self.max_len))
    }

    /// The keys `splits` splits of `block_kv`-key steps must cover together: [`Self::keys_seen`],
    /// plus the steps' alignment (a split starts at the step holding the first visible key), at
    /// most the longest length.
    pub fn split_span(&self, block_kv: usize) -> usize {
        let seen = self.keys_seen();
        if seen >= self.max_len {
            self.max_len
        } else {
            (seen + block_kv - 1).min(self.max_len)
        }
    }

    /// Rows of one K/V head: group × query tokens.
    pub fn group_rows(&self) -> usize {
        self.problem.group * self.problem.seq_q
    }
}

/// The cache as the shape checks see it: `[B, Hkv, capacity, D]` (a paged pool's own shape is
/// checked when the cache is built).
fn cache_view<E: Element>(pool: &KvPool<E>, cache: &KvCache<E>, q: &Tensor<E>) -> Tensor<E> {
    let [_, heads, _, d] = pool.shape();
    let shape = [cache.batch(), heads, cache.capacity(), d];
    match pool.native() {
        Some(t) if !cache.is_paged() => t.clone(),
        // Only the shape matters; the view is never launched (Q's handle stands in).
        _ => Tensor::from_raw_parts(
            q.handle().clone(),
            shape.iter().product(),
            shape,
            crate::tensor::contiguous_strides(shape),
        ),
    }
}

/// Runs variant `V` for query tokens `q` `[B, Hq, Nq, D]` against `cache` with the plan tuned for
/// this device and key (cached; tuned on a miss; the heuristic's plan with `ATTN_TUNE=off` and on
/// CPU-emulated devices, see [`crate::tune::Policy`]); returns O `[B, Hq, Nq, Dv]` and the LSE.
pub fn decode<V: Variant>(
    client: &ComputeClient,
    q: &Tensor<V::Elem>,
    cache: &KvCache<V::Elem>,
    inputs: &Inputs,
) -> Result<Output<V::Elem>, AttnError> {
    let call = DecodeProblem::new::<V>(q, cache, inputs)?;
    decode_call::<V>(client, call, q, cache)
}

/// [`decode`] into caller-owned output buffers (checked before anything launches), with the
/// tuned plan: a serving loop reuses its buffers across steps.
pub fn decode_into<V: Variant>(
    client: &ComputeClient,
    q: &Tensor<V::Elem>,
    cache: &KvCache<V::Elem>,
    inputs: &Inputs,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    let call = DecodeProblem::new::<V>(q, cache, inputs)?;
    decode_call_into::<V>(client, call, q, cache, out)
}

/// [`decode`] for a batch whose sequences have their own counts of query tokens (a mixed batch:
/// single tokens, speculative drafts, chunks of a prompt): sequence `b`'s tokens are rows
/// `q_offsets[b]..q_offsets[b + 1]` of Q `[1, Hq, total, D]` (cu_seqlens; a sequence may have
/// none this step), each the last tokens of its sequence in the cache. Returns O
/// `[1, Hq, total, Dv]` and the LSE `[1, Hq, total]`, rows as Q's. One launch for the whole
/// batch, on the decode kernel (CUDA cores): long prompt chunks are better served by
/// [`crate::forward`] against the cache's tokens.
pub fn decode_ragged<V: Variant>(
    client: &ComputeClient,
    q: &Tensor<V::Elem>,
    q_offsets: &[usize],
    cache: &KvCache<V::Elem>,
    inputs: &Inputs,
) -> Result<Output<V::Elem>, AttnError> {
    let call = DecodeProblem::ragged::<V>(q, q_offsets, cache, inputs)?;
    decode_call::<V>(client, call, q, cache)
}

/// [`decode_ragged`] into caller-owned output buffers (`[1, Hq, total, Dv]` and
/// `[1, Hq, total]`, checked before anything launches), with the tuned plan.
pub fn decode_ragged_into<V: Variant>(
    client: &ComputeClient,
    q: &Tensor<V::Elem>,
    q_offsets: &[usize],
    cache: &KvCache<V::Elem>,
    inputs: &Inputs,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    let call = DecodeProblem::ragged::<V>(q, q_offsets, cache, inputs)?;
    decode_call_into::<V>(client, call, q, cache, out)
}

/// A checked call (rectangular or ragged) with the tuned plan, into caller-owned buffers.
fn decode_call_into<V: Variant>(
    client: &ComputeClient,
    call: DecodeProblem,
    q: &Tensor<V::Elem>,
    cache: &KvCache<V::Elem>,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    if !supports::<V::Elem>(client) {
        return Err(unsupported_dtype(&call.spec));
    }
    crate::launch::check_output(&call.output_problem(), out)?;
    call_offsets(client, q, cache, &[out.o.buffer_len()])?;
    crate::tune::decode_tuned::<V>(client, call, q, cache, out)?;
    Ok(())
}

/// The width of a decode call's offsets, from Q, the cache and the outputs' element counts:
/// checked before the tuner launches anything (where the back end lacks the width the buffers
/// need), and again when a step runs, its splits' partials among the outputs.
fn call_offsets<E: Element>(
    client: &ComputeClient,
    q: &Tensor<E>,
    cache: &KvCache<E>,
    outputs: &[usize],
) -> Result<AddressType, AttnError> {
    let mut buffers = vec![
        q.buffer_len(),
        cache.k().buffer_elements(),
        cache.v().buffer_elements(),
    ];
    buffers.extend_from_slice(outputs);
    crate::launch::offsets(client, &buffers)
}

/// A checked call (rectangular or ragged) with the tuned plan, into new output buffers.
fn decode_call<V: Variant>(
    client: &ComputeClient,
    call: DecodeProblem,
    q: &Tensor<V::Elem>,
    cache: &KvCache<V::Elem>,
) -> Result<Output<V::Elem>, AttnError> {
    if !supports::<V::Elem>(client) {
        return Err(unsupported_dtype(&call.spec));
    }
    call_offsets(client, q, cache, &[call.out_shape().iter().product()])?;
    let out = Output {
        o: Tensor::empty(client, call.out_shape()),
        lse: Lse::empty(client, call.lse_shape()),
    };
    crate::tune::decode_tuned::<V>(client, call, q, cache, &out)?;
    Ok(out)
}

/// Runs variant `V` against `cache` with a given plan, into caller-owned output buffers (for the
/// tests and the benchmarks).
pub fn decode_with_plan<V: Variant>(
    client: &ComputeClient,
    q: &Tensor<V::Elem>,
    cache: &KvCache<V::Elem>,
    inputs: &Inputs,
    plan: DecodePlan,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    let call = DecodeProblem::new::<V>(q, cache, inputs)?;
    check_plan(client, &call, plan)?;
    crate::launch::check_output(&call.output_problem(), out)?;
    launch_decode::<V>(client, &call, plan, q, cache, out)
}

/// A checked call (rectangular or ragged, [`DecodeProblem`]) with a given plan, into
/// caller-owned output buffers (for the tests and the benchmarks). `q` is the Q the call was
/// checked with.
pub fn decode_call_with_plan<V: Variant>(
    client: &ComputeClient,
    call: &DecodeProblem,
    q: &Tensor<V::Elem>,
    cache: &KvCache<V::Elem>,
    plan: DecodePlan,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    check_plan(client, call, plan)?;
    crate::launch::check_output(&call.output_problem(), out)?;
    launch_decode::<V>(client, call, plan, q, cache, out)
}

/// The tile shape for a call: rows cover the group's packed rows (at most 16 per cube, fewer where
/// shared memory is short), 64 units (keys per step) where the device allows, and 8 loads issued
/// together.
pub fn default_tiling(
    client: &ComputeClient,
    spec: &VariantSpec,
    group_rows: usize,
) -> Result<DecodeTiling, AttnError> {
    let hw = &client.properties().hardware;
    // 64 units: on the H200 the sweep around the plans did best with 64 (bench/RESULTS.md).
    let units = hw.max_units_per_cube.min(64);
    let mut rows = group_rows
        .next_power_of_two()
        .min(MAX_ROWS)
        .min(units as usize) as u32;
    let fits = |rows| {
        DecodeTiling {
            rows,
            units,
            chunk: default_chunk(rows),
        }
        .shared_bytes(spec.head_dim, spec.value_dim)
            <= hw.max_shared_memory_size
    };
    while rows > 1 && !fits(rows) {
        rows /= 2;
    }
    let tiling = DecodeTiling {
        rows,
        units,
        chunk: default_chunk(rows),
    };
    if !fits(rows) || (spec.value_dim / KV_VECTOR as u32) > units {
        return Err(AttnError::Unsupported(format!(
            "decoding {} needs more shared memory or units per cube than the device has ({} bytes, {} units)",
            spec.name, hw.max_shared_memory_size, hw.max_units_per_cube
        )));
    }
    Ok(tiling)
}

/// The plan used without tuning: on Hopper, for fp8 caches and 16-bit caches the copy engine
/// reads, the warpgroup kernel's ([`warpgroup_plan`] at 64 keys per step); elsewhere the
/// CUDA-core kernel's ([`units_plan`]).
pub fn default_plan(client: &ComputeClient, call: &DecodeProblem) -> Result<DecodePlan, AttnError> {
    // 64 keys per step: two cubes per multiprocessor. On an H100 (bench/RESULTS.md) steps of 64
    // matched or beat steps of 128 at every split count of the single-token cases and ran 9 %
    // faster with 16 query tokens.
    if warpgroup_decode_unfit(client, call, WARPGROUP_DECODE_KEYS).is_none() {
        return Ok(warpgroup_plan(client, call, WARPGROUP_DECODE_KEYS));
    }
    units_plan(client, call)
}

/// Keys per step of the warpgroup decode kernel's default plan.
const WARPGROUP_DECODE_KEYS: u32 = 64;

/// The warpgroup kernel's plan at `block_kv` keys per step: key splits that bring the launch to
/// one wave of cubes (as many per multiprocessor as its shared memory allows), in a power of two,
/// never below 256 of the keys a sequence's queries see per split.
pub fn warpgroup_plan(client: &ComputeClient, call: &DecodeProblem, block_kv: u32) -> DecodePlan {
    let hw = &client.properties().hardware;
    let processors = hw.num_streaming_multiprocessors.unwrap_or(1) as usize;
    let config = warpgroup_decode_config(&call.spec, block_kv, None, false, false, call.layout.fp8);
    let per_processor = (hw.max_shared_memory_size / config.shared_bytes()).max(1);
    let cubes =
        call.problem.batch * call.problem.heads_kv * call.group_rows().div_ceil(WARPGROUP_ROWS);
    let target = per_processor * processors;
    let wanted = if cubes >= target {
        1
    } else {
        target.div_ceil(cubes)
    };
    let most = call
        .split_span(block_kv as usize)
        .div_ceil(MIN_KEYS_PER_SPLIT)
        .max(1);
    DecodePlan {
        kernel: DecodeKernel::Warpgroup { block_kv },
        splits: power_of_two_at_most(wanted.min(most)).clamp(1, u16::MAX as usize),
    }
}

/// The CUDA-core kernel's plan: [`default_tiling`], and key splits that bring the launch to at
/// most about eight cubes per multiprocessor (`B × Hkv × row chunks` cubes before splitting), in
/// a power of two, never below 256 of the keys a sequence's queries see
/// ([`DecodeProblem::keys_seen`]) per split. On a CPU-emulated device, splits also keep each
/// invocation under llvmpipe's loop limit.
pub fn units_plan(client: &ComputeClient, call: &DecodeProblem) -> Result<DecodePlan, AttnError> {
    let tiling = default_tiling(client, &call.spec, call.group_rows())?;
    let hw = &client.properties().hardware;
    let processors = hw
        .num_streaming_multiprocessors
        .or(hw.num_cpu_cores)
        .unwrap_or(1) as usize;
    let cubes = call.problem.batch
        * call.problem.heads_kv
        * call.group_rows().div_ceil(tiling.rows as usize);
    // Eight cubes per multiprocessor: measured on the H200, the split counts around this did best
    // (bench/RESULTS.md); the tuner refines it per key.
    let target = 8 * processors;
    let wanted = if cubes >= target {
        1
    } else {
        target.div_ceil(cubes)
    };
    let span = call.split_span(tiling.units as usize);
    let most = span.div_ceil(MIN_KEYS_PER_SPLIT).max(1);
    let mut splits = power_of_two_at_most(wanted.min(most));
    if is_cpu_emulated(client) {
        let config = decode_config(&call.spec, tiling, false, LOOP_BUDGET_LAYOUT);
        let budget = keys_within_loop_budget(config);
        splits = splits.max(span.div_ceil(budget));
    }
    Ok(DecodePlan {
        kernel: DecodeKernel::Units(tiling),
        splits: splits.clamp(1, u16::MAX as usize),
    })
}

/// Why the warpgroup decode kernel cannot run `call` at `block_kv` keys per step on this device
/// and build, or `None` when it can: the warpgroup prefill kernel's conditions at 64 query rows
/// (16-bit elements, head dims in multiples of 64 up to 256, steps of 64 to 256 keys in
/// multiples of 16, at most 64 past a value dim of 128), a cache the copy engine reads (16-bit
/// pools laid out for it, or fp8 ones, whose codes are converted to f16 in shared memory), and
/// pages of a multiple of 8 tokens that divide the step or that the step divides.
pub fn warpgroup_decode_unfit(
    client: &ComputeClient,
    call: &DecodeProblem,
    block_kv: u32,
) -> Option<String> {
    let spec = &call.spec;
    let layout = call.layout;
    if !layout.copy_engine {
        return Some("the copy engine cannot read this cache's pools".into());
    }
    let page = layout.page_size as u32;
    if layout.paged
        && !(page.is_multiple_of(8)
            && (page.is_multiple_of(block_kv) || block_kv.is_multiple_of(page)))
    {
        return Some(format!(
            "pages of {page} tokens: the warpgroup decode kernel reads pages of a multiple of 8 tokens that divide its {block_kv}-key steps or that they divide"
        ));
    }
    let config = prefill_config(
        spec,
        Tiling {
            block_q: WARPGROUP_ROWS as u32,
            block_kv,
        },
    );
    Warpgroup::unfit(client, spec, &config)
}

/// The warpgroup decode kernel's configuration for `spec` at `block_kv` keys per step, over a
/// cache paged in pages of `page_size` tokens (`None`: contiguous), in e4m3 or not.
pub fn warpgroup_decode_config(
    spec: &VariantSpec,
    block_kv: u32,
    page_size: Option<u32>,
    split: bool,
    ragged: bool,
    fp8: bool,
) -> DecodeWgConfig {
    let mut prefill = prefill_config(
        spec,
        Tiling {
            block_q: WARPGROUP_ROWS as u32,
            block_kv,
        },
    );
    prefill.mask.key_lengths = true;
    DecodeWgConfig {
        prefill,
        paged: page_size.is_some(),
        split,
        ragged,
        box_rows: page_size.map_or(block_kv, |p| p.min(block_kv)),
        fp8,
    }
}

/// The largest power of two at or below `n` (1 for 0). Split counts are powers of two: splits of
/// equal length (three splits of 8192 keys left the last one short and ran 20 % slower than two
/// or four on the H200). Rounded down, so the launch stays at about eight cubes per
/// multiprocessor or under: on the H200 that beat rounding up on all six benchmark cases (B 64 ×
/// 8192 keys: 2 splits 0.906 ms, 4 splits 0.993 ms; B 1 × 128k: 128 splits 0.292 ms, 256 splits
/// 0.409 ms; bench/RESULTS.md).
fn power_of_two_at_most(n: usize) -> usize {
    1 << n.max(1).ilog2()
}

/// Whether this device can run `plan` for `call`.
pub fn check_plan(
    client: &ComputeClient,
    call: &DecodeProblem,
    plan: DecodePlan,
) -> Result<(), AttnError> {
    let hw = &client.properties().hardware;
    let bad = |reason: String| {
        Err(AttnError::Unsupported(format!(
            "decode plan {}: {reason}",
            plan.name()
        )))
    };
    if plan.splits == 0 || plan.splits > u16::MAX as usize {
        return bad("splits lie between 1 and 65 535".into());
    }
    let t = match plan.kernel {
        DecodeKernel::Units(t) => t,
        DecodeKernel::Warpgroup { block_kv } => {
            return match warpgroup_decode_unfit(client, call, block_kv) {
                Some(why) => bad(why),
                None => Ok(()),
            };
        }
    };
    if !t.rows.is_power_of_two()
        || !t.units.is_power_of_two()
        || t.units < t.rows
        || (t.units as usize) < call.spec.value_dim as usize / KV_VECTOR
        || !t.chunk.is_power_of_two()
        || t.chunk > 64
    {
        return bad(format!(
            "rows, units and chunk must be powers of two with units ≥ rows, units ≥ value_dim / {KV_VECTOR} and chunk ≤ 64"
        ));
    }
    if t.units > hw.max_units_per_cube {
        return bad(format!(
            "the device allows {} units per cube",
            hw.max_units_per_cube
        ));
    }
    let smem = t.shared_bytes(call.spec.head_dim, call.spec.value_dim);
    if smem > hw.max_shared_memory_size {
        return bad(format!(
            "needs {smem} bytes of shared memory; the device has {}",
            hw.max_shared_memory_size
        ));
    }
    if is_cpu_emulated(client) {
        let config = decode_config(&call.spec, t, plan.splits > 1, LOOP_BUDGET_LAYOUT);
        let block_kv = t.units as usize;
        let per_split = keys_per_split(call.split_span(block_kv), plan.splits, block_kv);
        let budget = keys_within_loop_budget(config);
        if per_split > budget {
            return bad(format!(
                "{per_split} keys per split exceed the {budget} that CPU-emulated Vulkan (llvmpipe) runs per invocation before it stops loops; use more splits"
            ));
        }
    }
    Ok(())
}

/// Keys per split for `splits` splits: a multiple of the keys per step, so no step straddles two
/// splits.
fn keys_per_split(max_len: usize, splits: usize, block_kv: usize) -> usize {
    max_len.div_ceil(splits).div_ceil(block_kv).max(1) * block_kv
}

/// The keys one invocation of the decode kernel can walk within llvmpipe's 65 535 counted loop
/// iterations: per step, the step loop, the blocks of the K row and of P·V and the row-max fold;
/// once, the finish's loops.
fn keys_within_loop_budget(config: DecodeConfig) -> usize {
    let chunk = config.chunk();
    let per_step = (config.head_dim() / KV_VECTOR).div_ceil(chunk)
        + config.keys_per_group().div_ceil(chunk)
        + config.row_lanes()
        + 2;
    let fixed = config.rows() * config.head_dim() / KV_VECTOR
        + config.units()
        + config.key_groups()
        + config.rows() * config.value_dim()
        + 64;
    (65_535 - fixed) / per_step * config.block_kv()
}

/// The comptime configuration of the decode kernel.
fn decode_config(
    spec: &VariantSpec,
    tiling: DecodeTiling,
    split: bool,
    layout: CacheLayout,
) -> DecodeConfig {
    DecodeConfig {
        tiling,
        head_dim: spec.head_dim,
        value_dim: spec.value_dim,
        mask: spec.mask,
        score: spec.score.flags(),
        paged: layout.paged,
        split,
        fp8: layout.fp8,
        ragged: false,
    }
}

/// The layout the loop budget is counted for: paged (the layout's loops do not depend on it).
const LOOP_BUDGET_LAYOUT: CacheLayout = CacheLayout {
    paged: true,
    fp8: false,
    page_size: 16,
    max_pages: 1,
    copy_engine: false,
};

/// How a cache stores its tokens, as a decode step is planned for it.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub struct CacheLayout {
    /// K/V live in pages addressed through a block table.
    pub paged: bool,
    /// K and V in e4m3.
    pub fp8: bool,
    /// Tokens per page (1: contiguous).
    pub page_size: usize,
    /// Entries per sequence in the block table (1: contiguous).
    pub max_pages: usize,
    /// The copy engine can read both pools: 16-bit ones laid out for it
    /// ([`copy_engine_can_read`]), and fp8 ones (always).
    pub copy_engine: bool,
}

impl CacheLayout {
    fn name(&self) -> String {
        let stored = if self.fp8 { ", fp8" } else { "" };
        if self.paged {
            format!(
                "paged, {} pages of {} tokens per sequence{stored}",
                self.max_pages, self.page_size
            )
        } else {
            format!("contiguous{stored}")
        }
    }
}

pub(crate) fn cache_layout<E: Element>(cache: &KvCache<E>) -> CacheLayout {
    let (page_size, max_pages, _) = cache.table_parts();
    let readable = |pool: &KvPool<E>| match pool {
        KvPool::Native(t) => copy_engine_can_read(t),
        KvPool::Fp8(_) => true,
    };
    CacheLayout {
        paged: cache.is_paged(),
        fp8: cache.is_fp8(),
        page_size,
        max_pages,
        copy_engine: readable(cache.k()) && readable(cache.v()),
    }
}

/// The decode kernel reads K and V in vectors of [`KV_VECTOR`] elements: their strides and head
/// dims must be multiples of it.
fn check_cache_vectors<E: Element>(cache: &KvCache<E>) -> Result<(), AttnError> {
    for (operand, pool) in [(Operand::K, cache.k()), (Operand::V, cache.v())] {
        // An fp8 pool is contiguous, its head dim a multiple of 4 (checked when it was made).
        let Some(t) = pool.native() else { continue };
        let s = t.strides();
        if s[..3]
            .iter()
            .chain(&[t.shape()[3]])
            .any(|x| x % KV_VECTOR != 0)
        {
            return Err(AttnError::Unsupported(format!(
                "decoding reads the cache in vectors of {KV_VECTOR} elements; {operand} has strides {s:?} and head dim {}, which must be multiples of {KV_VECTOR}",
                t.shape()[3]
            )));
        }
    }
    Ok(())
}

/// The launches of [`decode`] and the tuner: a step planned for this one call.
pub(crate) fn launch_decode<V: Variant>(
    client: &ComputeClient,
    call: &DecodeProblem,
    plan: DecodePlan,
    q: &Tensor<V::Elem>,
    cache: &KvCache<V::Elem>,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    let step = DecodeStep::<V>::for_call(client, call, plan, cache)?;
    step.launch(client, q, cache, out, step.offsets(client, q, cache, out)?);
    Ok(())
}

/// A decode step planned once for a batch's shape and run at every step: the plan (tile shape and
/// key splits), the variant's run-time inputs already on the device, and the splits' workspace.
///
/// [`DecodeStep::run`] allocates no device memory and uploads nothing: the cache's lengths and
/// block table are read from its device-resident copies (an append advances them on the device),
/// and each sequence's splits divide its own keys, computed by the kernel from its length. A step
/// can therefore be recorded as a graph ([`DecodeStep::capture`]; a CUDA graph on CUDA) and
/// replayed while the cache grows:
///
/// ```ignore
/// let step = DecodeStep::<Llama3>::new(&client, &q, &cache, &Inputs::default())?;
/// let graph = step.capture(&client, &q, &cache, &out)?;
/// loop {
///     cache.append(&client, &k_new, &v_new, None)?; // outside the graph
///     q.write(&client, &next_queries)?;             // the recorded buffer, in place
///     unsafe { graph.replay() }?;                   // `out` holds this step's O and LSE
/// }
/// ```
///
/// The plan is fixed when the step is made: its split count was chosen for the lengths of that
/// moment (or given); plan again when the lengths have grown far past them. Host-side changes of
/// the cache (pages handed out, [`KvCache::release`], [`KvCache::truncate`]) reach the device at
/// its next append or run, never inside a graph replay.
#[derive(Debug)]
pub struct DecodeStep<V: Variant> {
    plan: DecodePlan,
    /// The call's shapes (`seq_k`: the cache's capacity).
    problem: Problem,
    /// The variant's facts as the kernel runs them (key lengths as declared).
    spec: VariantSpec,
    /// The cache the step was planned for.
    layout: CacheLayout,
    /// The variant's inputs on the device, and their slot length.
    ints: (Handle, usize),
    floats: (Handle, usize),
    slot_len: u32,
    /// Partial outputs and LSEs of the splits (unused with one split).
    part_o: Tensor<f32>,
    part_lse: Tensor<f32>,
    /// A ragged call's query offsets on the device, and their count.
    q_offsets: Option<(Handle, usize)>,
    /// O's shapes (a ragged call's: one batch entry of every sequence's tokens).
    out_problem: Problem,
    _variant: PhantomData<V>,
}

impl<V: Variant> DecodeStep<V> {
    /// Plans a step for query tokens shaped like `q` against `cache`, with the plan [`decode`]
    /// would pick (tuned on a miss as [`crate::tune::Policy`] says; this runs one decode into
    /// scratch buffers).
    pub fn new(
        client: &ComputeClient,
        q: &Tensor<V::Elem>,
        cache: &KvCache<V::Elem>,
        inputs: &Inputs,
    ) -> Result<Self, AttnError> {
        let call = DecodeProblem::new::<V>(q, cache, inputs)?;
        Self::tuned(client, call, q, cache, inputs)
    }

    /// Plans a step with a given plan.
    pub fn with_plan(
        client: &ComputeClient,
        q: &Tensor<V::Elem>,
        cache: &KvCache<V::Elem>,
        inputs: &Inputs,
        plan: DecodePlan,
    ) -> Result<Self, AttnError> {
        let call = DecodeProblem::new::<V>(q, cache, inputs)?;
        check_plan(client, &call, plan)?;
        Self::planned(client, &call, plan, inputs, cache)
    }

    /// A step for a checked call, its inputs packed as the kernel reads them.
    fn planned(
        client: &ComputeClient,
        call: &DecodeProblem,
        plan: DecodePlan,
        inputs: &Inputs,
        cache: &KvCache<V::Elem>,
    ) -> Result<Self, AttnError> {
        let packed = pack(&V::SPEC, &call.problem, inputs)?;
        Ok(Self::from_packed(
            client,
            call,
            plan,
            &packed,
            cache_layout(cache),
        ))
    }

    /// A step for a call whose plan was checked, with the call's packing (the kernel reads the
    /// cache's lengths from the device and only the variant's own key lengths from the slots).
    fn for_call(
        client: &ComputeClient,
        call: &DecodeProblem,
        plan: DecodePlan,
        cache: &KvCache<V::Elem>,
    ) -> Result<Self, AttnError> {
        if !supports::<V::Elem>(client) {
            return Err(unsupported_dtype(&call.spec));
        }
        Ok(Self::from_packed(
            client,
            call,
            plan,
            &call.packed,
            cache_layout(cache),
        ))
    }

    fn from_packed(
        client: &ComputeClient,
        call: &DecodeProblem,
        plan: DecodePlan,
        packed: &Packed,
        layout: CacheLayout,
    ) -> Self {
        let p = &call.problem;
        let out_problem = call.output_problem();
        let rows = out_problem.batch * out_problem.heads_q * out_problem.seq_q;
        let splits = plan.splits;
        let (part_o, part_lse) = if splits > 1 {
            (
                Tensor::<f32>::empty(client, [1, 1, rows * splits, p.value_dim]),
                Tensor::<f32>::empty(client, [1, 1, rows * splits, 1]),
            )
        } else {
            (
                Tensor::<f32>::empty(client, [1, 1, 1, 1]),
                Tensor::<f32>::empty(client, [1, 1, 1, 1]),
            )
        };
        let (ints, floats) = upload_inputs(client, packed);
        let mut spec = call.spec;
        spec.mask.key_lengths = V::SPEC.mask.key_lengths;
        Self {
            plan,
            problem: *p,
            spec,
            layout,
            ints: (ints, packed.ints.len()),
            floats: (floats, packed.floats.len()),
            slot_len: packed.slot_len as u32,
            part_o,
            part_lse,
            q_offsets: call.q_offsets.as_ref().map(|offsets| {
                let offsets: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
                let len = offsets.len();
                (client.create(Bytes::from_elems(offsets)), len)
            }),
            out_problem,
            _variant: PhantomData,
        }
    }

    /// Plans a step for ragged batches ([`decode_ragged`]): Q `[1, Hq, total, D]` cut by
    /// `q_offsets`, with the plan `decode_ragged` would pick. Later runs take any offsets over the
    /// same `total` rows whose sequences have at most as many tokens as the most of these
    /// ([`Self::set_offsets`]); they live on the device with the step.
    pub fn ragged(
        client: &ComputeClient,
        q: &Tensor<V::Elem>,
        q_offsets: &[usize],
        cache: &KvCache<V::Elem>,
        inputs: &Inputs,
    ) -> Result<Self, AttnError> {
        let call = DecodeProblem::ragged::<V>(q, q_offsets, cache, inputs)?;
        Self::tuned(client, call, q, cache, inputs)
    }

    /// A step for a checked call with the plan [`decode`] would pick for it (tuned on a miss:
    /// one decode into scratch buffers).
    fn tuned(
        client: &ComputeClient,
        call: DecodeProblem,
        q: &Tensor<V::Elem>,
        cache: &KvCache<V::Elem>,
        inputs: &Inputs,
    ) -> Result<Self, AttnError> {
        if !supports::<V::Elem>(client) {
            return Err(unsupported_dtype(&call.spec));
        }
        let scratch = Output {
            o: Tensor::empty(client, call.out_shape()),
            lse: Lse::empty(client, call.lse_shape()),
        };
        let plan = crate::tune::decode_tuned::<V>(client, call.clone(), q, cache, &scratch)?;
        Self::planned(client, &call, plan, inputs, cache)
    }

    /// A ragged step's next query offsets (checked as when planned, each sequence within the
    /// planned most), written into the step's device copy in place: call it before a
    /// [`Self::run`] or a graph replay, outside the recording.
    pub fn set_offsets(
        &self,
        client: &ComputeClient,
        q_offsets: &[usize],
    ) -> Result<(), AttnError> {
        let Some((handle, _)) = &self.q_offsets else {
            return Err(AttnError::Unsupported(
                "the decode step was planned for a fixed count of query tokens; plan one with DecodeStep::ragged".into(),
            ));
        };
        let most = check_offsets(q_offsets, self.problem.batch, self.out_problem.seq_q)?;
        if most > self.problem.seq_q {
            return Err(AttnError::Input {
                input: "q_offsets",
                reason: format!(
                    "a sequence has {most} query tokens; the step was planned for at most {}",
                    self.problem.seq_q
                ),
            });
        }
        let offsets: Vec<i32> = q_offsets.iter().map(|&o| o as i32).collect();
        client.write(handle, Bytes::from_elems(offsets));
        Ok(())
    }

    /// The plan the step runs.
    pub fn plan(&self) -> DecodePlan {
        self.plan
    }

    /// Runs the step: query tokens `q` (the planned shape; a ragged step's `[1, Hq, total, D]`
    /// cut by its offsets) against `cache` (the planned layout, any lengths up to its capacity),
    /// into `out`. Checked before anything launches; allocates no device memory and uploads
    /// nothing unless the host changed the cache's table or lengths since its last append or run.
    pub fn run(
        &self,
        client: &ComputeClient,
        q: &Tensor<V::Elem>,
        cache: &KvCache<V::Elem>,
        out: &Output<V::Elem>,
    ) -> Result<(), AttnError> {
        let p = &self.problem;
        let rows = &self.out_problem;
        check_view(Operand::Q, q.shape(), q.strides(), q.buffer_len())?;
        let planned_q = [rows.batch, rows.heads_q, rows.seq_q, p.head_dim];
        let cache_at = cache_layout(cache);
        if q.shape() != planned_q
            || [cache.batch(), cache.heads_kv(), cache.capacity()] != [p.batch, p.heads_kv, p.seq_k]
            || cache_at != self.layout
        {
            return Err(AttnError::Unsupported(format!(
                "the decode step was planned for q {planned_q:?} against a cache of {} sequences × {} K/V heads × {} tokens ({}); got q {:?} and a cache of {} × {} × {} ({}): plan a step for these",
                p.batch,
                p.heads_kv,
                p.seq_k,
                self.layout.name(),
                q.shape(),
                cache.batch(),
                cache.heads_kv(),
                cache.capacity(),
                cache_at.name(),
            )));
        }
        check_cache_vectors(cache)?;
        crate::launch::check_output(rows, out)?;
        self.launch(client, q, cache, out, self.offsets(client, q, cache, out)?);
        Ok(())
    }

    /// The width of the step's kernels' offsets for these buffers.
    fn offsets(
        &self,
        client: &ComputeClient,
        q: &Tensor<V::Elem>,
        cache: &KvCache<V::Elem>,
        out: &Output<V::Elem>,
    ) -> Result<AddressType, AttnError> {
        call_offsets(
            client,
            q,
            cache,
            &[
                out.o.buffer_len(),
                out.lse.tensor.buffer_len(),
                self.part_o.buffer_len(),
                self.part_lse.buffer_len(),
            ],
        )
    }

    /// Records the step into a graph (a CUDA graph on CUDA; a recorded dispatch list on wgpu) for
    /// `q`, `cache` and `out`: checked, run once outside the recording (it compiles the kernels
    /// and brings the cache's device copies up to date), then recorded. Replaying the graph
    /// re-runs the step against these very buffers with whatever they hold then: the cache's
    /// lengths after appends, queries written into `q` in place ([`Tensor::write`]). A host-side
    /// change of the cache's table or lengths (pages handed out, release, truncate) reaches the
    /// device only through an append or a [`DecodeStep::run`] outside the graph, so make one
    /// after such changes and before the next replay.
    ///
    /// Replay with `unsafe { graph.replay() }`: the buffers must outlive the graph's use, and
    /// nothing else may use them while it runs (cubecl's `Graph::replay`).
    pub fn capture(
        &self,
        client: &ComputeClient,
        q: &Tensor<V::Elem>,
        cache: &KvCache<V::Elem>,
        out: &Output<V::Elem>,
    ) -> Result<cubecl::client::Graph, AttnError> {
        let failed = |what: &str, e: cubecl::server::ServerError| {
            AttnError::Launch(format!("graph capture: {what}: {e:?}"))
        };
        client.graph_prepare().map_err(|e| failed("prepare", e))?;
        self.run(client, q, cache, out)?;
        client.start_capture().map_err(|e| failed("start", e))?;
        // Checked by the run above: the same buffers, nothing to allocate or write.
        let address = self.offsets(client, q, cache, out)?;
        self.launch(client, q, cache, out, address);
        let graph = client.stop_capture().map_err(|e| failed("stop", e))?;
        tracing::debug!(variant = V::SPEC.name, plan = %self.plan.name(), "decode step captured");
        Ok(graph)
    }

    /// The launches: the decode kernel, and with several splits the combine step.
    fn launch(
        &self,
        client: &ComputeClient,
        q: &Tensor<V::Elem>,
        cache: &KvCache<V::Elem>,
        out: &Output<V::Elem>,
        address: AddressType,
    ) {
        let (p, spec) = (&self.problem, &self.spec);
        let splits = self.plan.splits;
        let chunks = (p.group * p.seq_q).div_ceil(self.plan.kernel.rows());
        tracing::debug!(
            variant = spec.name,
            plan = %self.plan.name(),
            paged = cache.is_paged(),
            "decode launch"
        );
        let tables = cache.device_tables(client);
        let CacheLayout {
            page_size,
            max_pages,
            ..
        } = self.layout;
        let dargs = || {
            DecodeArgsLaunch::new(
                p.seq_q as u32,
                (p.group * p.seq_q) as u32,
                page_size as u32,
                max_pages as u32,
                p.seq_k as u32,
            )
        };
        let inputs = || unsafe {
            RunInputsLaunch::new(
                flat_arg(&self.ints.0, self.ints.1),
                flat_arg(&self.floats.0, self.floats.1),
                self.slot_len,
            )
        };
        let lse = if splits > 1 {
            &self.part_lse
        } else {
            &out.lse.tensor
        };
        let outputs = || unsafe {
            DecodeOutputsLaunch::new(
                tensor_arg(&out.o),
                tensor_arg(lse),
                tensor_arg(&self.part_o),
            )
        };
        // Without ragged queries the lengths stand in for the offsets (never read).
        let q_offsets = || unsafe {
            match &self.q_offsets {
                Some((h, len)) => flat_arg(h, *len),
                None => flat_arg(&tables.lengths, p.batch),
            }
        };
        let cube_count =
            CubeCount::Static(splits as u32, (p.heads_kv * chunks) as u32, p.batch as u32);
        match self.plan.kernel {
            DecodeKernel::Units(tiling) => {
                let mut config = decode_config(spec, tiling, splits > 1, self.layout);
                config.ragged = self.q_offsets.is_some();
                unsafe {
                    decode_forward::launch::<V::Elem, V::Hooks>(
                        client,
                        cube_count,
                        CubeDim::new_1d(tiling.units),
                        address,
                        DecodeOperandsLaunch::new(
                            tensor_arg(q),
                            pool_arg(cache.k(), q),
                            pool_arg(cache.v(), q),
                            fp8_words(cache.k(), &tables),
                            fp8_words(cache.v(), &tables),
                            fp8_scales(cache, &tables),
                            flat_arg(&tables.table, tables.table_len),
                            flat_arg(&tables.lengths, p.batch),
                            q_offsets(),
                        ),
                        outputs(),
                        inputs(),
                        kernel_args(spec, p),
                        dargs(),
                        config,
                    );
                }
            }
            DecodeKernel::Warpgroup { block_kv } => {
                let page = self.layout.paged.then_some(page_size as u32);
                let config = warpgroup_decode_config(
                    spec,
                    block_kv,
                    page,
                    splits > 1,
                    self.q_offsets.is_some(),
                    self.layout.fp8,
                );
                let maps = WgOperands {
                    q,
                    cache,
                    tables: &tables,
                    q_offsets: q_offsets(),
                    box_rows: config.box_rows,
                };
                let launch = WgLaunch {
                    cube_count,
                    address,
                    outputs: outputs(),
                    inputs: inputs(),
                    args: kernel_args(spec, p),
                    dargs: dargs(),
                    config,
                };
                if self.layout.fp8 {
                    launch.run::<V::Hooks, half::f16>(client, maps);
                } else {
                    launch.run::<V::Hooks, V::Elem>(client, maps);
                }
            }
        }
        if splits > 1 {
            const UNITS: u32 = 64;
            let combine = CombineConfig {
                value_dim: spec.value_dim,
                units: UNITS,
                sinks: spec.score.sinks,
            };
            unsafe {
                combine_splits::launch::<V::Elem>(
                    client,
                    CubeCount::Static(
                        self.out_problem.seq_q as u32,
                        self.out_problem.heads_q as u32,
                        self.out_problem.batch as u32,
                    ),
                    CubeDim::new_1d(UNITS),
                    address,
                    PartsLaunch::new(tensor_arg(&self.part_o), tensor_arg(&self.part_lse)),
                    OutputsLaunch::new(tensor_arg(&out.o), tensor_arg(&out.lse.tensor)),
                    inputs(),
                    splits as u32,
                    f32::NEG_INFINITY,
                    combine,
                );
            }
        }
    }
}

/// Query offsets that cut `total` rows into `batch` sequences' tokens (cu_seqlens): `batch + 1`
/// of them, from 0 to `total`, never decreasing. Returns the most tokens of one sequence.
fn check_offsets(q_offsets: &[usize], batch: usize, total: usize) -> Result<usize, AttnError> {
    let bad = |reason: String| AttnError::Input {
        input: "q_offsets",
        reason,
    };
    if q_offsets.len() != batch + 1 {
        return Err(bad(format!(
            "{} offsets for {batch} sequences; give one more than the sequences",
            q_offsets.len()
        )));
    }
    if q_offsets[0] != 0 || q_offsets[batch] != total {
        return Err(bad(format!(
            "the offsets run from {} to {}; they run from 0 to q's {total} rows",
            q_offsets[0], q_offsets[batch]
        )));
    }
    if let Some(b) = q_offsets.windows(2).position(|w| w[1] < w[0]) {
        return Err(bad(format!(
            "offset {} is {} and offset {b} is {}; offsets never decrease",
            b + 1,
            q_offsets[b + 1],
            q_offsets[b]
        )));
    }
    Ok(q_offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0))
}

/// The warpgroup decode kernel's launch, less its cache operands, whose element type depends
/// on the cache ([`WgLaunch::run`]).
struct WgLaunch<E: Element> {
    cube_count: CubeCount,
    address: AddressType,
    outputs: DecodeOutputsLaunch<E>,
    inputs: RunInputsLaunch,
    args: ArgsLaunch,
    dargs: DecodeArgsLaunch,
    config: DecodeWgConfig,
}

/// The cache operands of [`WgLaunch::run`].
struct WgOperands<'a, E: Element> {
    q: &'a Tensor<E>,
    cache: &'a KvCache<E>,
    tables: &'a DeviceTables,
    q_offsets: TensorArg,
    box_rows: u32,
}

impl<E: Element> WgLaunch<E> {
    /// Launches the kernel with MMAs in `T`: the cache's element for a 16-bit cache, f16 for
    /// an fp8 one. Each layout's unused maps describe the other's buffer (never read).
    fn run<M: Hooks, T: Element>(self, client: &ComputeClient, ops: WgOperands<'_, E>) {
        let (cache, rows) = (ops.cache, ops.box_rows);
        let maps = |pool: &KvPool<E>| -> [TensorMapArg<Tiled>; 2] {
            // SAFETY: the pools were checked against their buffers when the cache was made.
            unsafe {
                match pool {
                    KvPool::Native(t) => {
                        let words = native_words(t);
                        let cols = words.shape[3];
                        [tma_map(t, rows), words_map(words.arg, rows, cols)]
                    }
                    KvPool::Fp8(p) => {
                        let halves = TensorMapArg::new(
                            TiledArgs {
                                tile_size: cubecl::zspace::shape![1, 1, rows as usize, PANEL],
                            },
                            p.view_arg(2),
                            T::cube_type(),
                        )
                        .with_swizzle(cubecl::prelude::TensorMapSwizzle::B128);
                        [halves, words_map(p.words_arg(), rows, p.shape()[3] / 4)]
                    }
                }
            }
        };
        let [k, k8] = maps(cache.k());
        let [v, v8] = maps(cache.v());
        let tables = ops.tables;
        // SAFETY: Q and the tables were checked when the step was planned and run.
        unsafe {
            decode_forward_wg::launch::<E, T, M>(
                client,
                self.cube_count,
                CubeDim::new_1d(WARPGROUP_UNITS as u32),
                self.address,
                CacheMapsLaunch::new(
                    tensor_arg(ops.q),
                    k,
                    v,
                    k8,
                    v8,
                    fp8_scales(cache, tables),
                    flat_arg(&tables.table, tables.table_len),
                    flat_arg(&tables.lengths, cache.batch()),
                    ops.q_offsets,
                ),
                self.outputs,
                self.inputs,
                self.args,
                self.dargs,
                self.config,
            );
        }
    }
}

/// A 16-bit pool's bytes as `u32` words (a stand-in for an fp8 pool's words, never read).
struct NativeWords {
    arg: TensorArg,
    shape: [usize; 4],
}

/// # Safety
/// `t` was checked against its buffer; the copy engine reads it (strides of 16-byte multiples).
unsafe fn native_words<E: Element>(t: &Tensor<E>) -> NativeWords {
    let per_word = 4 / std::mem::size_of::<E>();
    let [a, b, c, d] = t.shape();
    let shape = [a, b, c, d / per_word];
    let s = t.strides();
    let strides = [s[0] / per_word, s[1] / per_word, s[2] / per_word, 1];
    let arg = unsafe {
        TensorArg::from_raw_parts(
            t.handle().clone(),
            strides.to_vec().into(),
            shape.to_vec().into(),
        )
    };
    NativeWords { arg, shape }
}

/// The copy engine's map of `words` (`[.., cols]` `u32`s): boxes of `rows` whole rows,
/// unswizzled.
fn words_map(words: TensorArg, rows: u32, cols: usize) -> TensorMapArg<Tiled> {
    TensorMapArg::new(
        TiledArgs {
            tile_size: cubecl::zspace::shape![1, 1, rows as usize, cols],
        },
        words,
        u32::cube_type(),
    )
}

/// A native pool as the kernel's K or V; for an fp8 pool, Q stands in (never read: the kernel
/// reads the words).
///
/// # Safety
/// `q` was checked against its buffer, a native pool when the cache was made.
unsafe fn pool_arg<E: Element>(pool: &KvPool<E>, q: &Tensor<E>) -> TensorArg {
    unsafe { tensor_arg(pool.native().unwrap_or(q)) }
}

/// An fp8 pool's words; for a native pool the block table stands in (never read).
///
/// # Safety
/// The tables' buffers hold their lengths.
unsafe fn fp8_words<E: Element>(pool: &KvPool<E>, tables: &DeviceTables) -> TensorArg {
    match pool.fp8() {
        Some(p) => p.words_arg(),
        None => unsafe { flat_arg(&tables.table, tables.table_len) },
    }
}

/// An fp8 cache's scales; for a native cache the lengths stand in (never read).
///
/// # Safety
/// As [`fp8_words`].
unsafe fn fp8_scales<E: Element>(cache: &KvCache<E>, tables: &DeviceTables) -> TensorArg {
    match cache.fp8_scales() {
        Some((h, n)) => unsafe { flat_arg(h, n) },
        None => unsafe { flat_arg(&tables.lengths, cache.batch()) },
    }
}

/// Merges two results of the same queries over disjoint key sets (say a shared prefix and each
/// sequence's own suffix) into the result over their union, exactly, through the LSEs. Sinks, if
/// any, must be in only one of the two.
pub fn merge<E: Element>(
    client: &ComputeClient,
    a: &Output<E>,
    b: &Output<E>,
) -> Result<Output<E>, AttnError> {
    let shape = a.o.shape();
    for (operand, t) in [(Operand::O, &a.o), (Operand::O, &b.o)] {
        check_view(operand, t.shape(), t.strides(), t.buffer_len())?;
    }
    for (i, dim) in [Dim::Batch, Dim::Heads, Dim::Seq, Dim::HeadDim]
        .into_iter()
        .enumerate()
    {
        if b.o.shape()[i] != shape[i] {
            return Err(AttnError::DimMismatch {
                operand: Operand::O,
                dim,
                expected: shape[i],
                found: b.o.shape()[i],
                why: "both results of a merge cover the same queries",
            });
        }
    }
    let rows_shape = [shape[0], shape[1], shape[2]];
    for r in [a, b] {
        crate::launch::check_output(
            &Problem {
                batch: shape[0],
                heads_q: shape[1],
                heads_kv: shape[1],
                group: 1,
                seq_q: shape[2],
                seq_k: 1,
                head_dim: shape[3],
                value_dim: shape[3],
            },
            r,
        )?;
    }
    let elements = shape.iter().product::<usize>();
    let address = crate::launch::offsets(client, &[a.o.buffer_len(), b.o.buffer_len(), elements])?;
    let out = Output {
        o: Tensor::empty(client, shape),
        lse: Lse::empty(client, rows_shape),
    };
    const UNITS: u32 = 256;
    unsafe {
        merge_states::launch::<E>(
            client,
            grid(elements, UNITS),
            CubeDim::new_1d(UNITS),
            address,
            OutputsLaunch::new(tensor_arg(&a.o), tensor_arg(&a.lse.tensor)),
            OutputsLaunch::new(tensor_arg(&b.o), tensor_arg(&b.lse.tensor)),
            OutputsLaunch::new(tensor_arg(&out.o), tensor_arg(&out.lse.tensor)),
            elements,
            f32::NEG_INFINITY,
            MergeConfig {
                value_dim: shape[3] as u32,
                units: UNITS,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::power_of_two_at_most;

    #[test]
    fn split_counts_round_down_to_a_power_of_two() {
        // The benchmark's cases on 132 multiprocessors: 1056 cubes wanted over 512, 64 and 8.
        assert_eq!(power_of_two_at_most(3), 2);
        assert_eq!(power_of_two_at_most(17), 16);
        assert_eq!(power_of_two_at_most(132), 128);
        assert_eq!(power_of_two_at_most(4), 4);
        assert_eq!(power_of_two_at_most(1), 1);
        assert_eq!(power_of_two_at_most(0), 1);
        assert_eq!(power_of_two_at_most(usize::MAX), 1 << (usize::BITS - 1));
    }
}
