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

use cubecl::prelude::*;

use crate::error::{AttnError, Dim, Operand};
use crate::inputs::{pack, Inputs, Packed};
use crate::kernels::common::OutputsLaunch;
use crate::kernels::decode::combine::{
    combine_splits, merge_states, CombineConfig, MergeConfig, PartsLaunch,
};
use crate::kernels::decode::{
    decode_forward, DecodeArgsLaunch, DecodeConfig, DecodeOperandsLaunch, DecodeOutputsLaunch,
    DecodeTiling, KV_VECTOR,
};
use crate::kv_cache::{grid, KvCache};
use crate::launch::{
    flat_arg, is_cpu_emulated, kernel_args, run_inputs, tensor_arg, unsupported_dtype,
    upload_inputs, Lse, Output,
};
use crate::problem::{check_view, Problem};
use crate::tensor::{supports, ComputeClient, Element, Tensor};
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

/// How a decode call runs: the tile shape and into how many key splits each sequence is cut.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct DecodePlan {
    /// Tile shape.
    pub tiling: DecodeTiling,
    /// Key splits per sequence (1: no combine step).
    pub splits: usize,
}

impl DecodePlan {
    /// A stable name for logs and benchmark tables (`r4_kv64_u128_s8`).
    pub fn name(&self) -> String {
        format!("{}_s{}", self.tiling.name(), self.splits)
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
        // The kernel reads K and V in vectors of 4 elements.
        for (operand, t) in [(Operand::K, cache.k()), (Operand::V, cache.v())] {
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
        // The shapes are those of an ordinary call with the cache as K and V.
        let k_view = cache_view(cache.k(), cache);
        let v_view = cache_view(cache.v(), cache);
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
        })
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
fn cache_view<E: Element>(pool: &Tensor<E>, cache: &KvCache<E>) -> Tensor<E> {
    let [_, heads, _, d] = pool.shape();
    let shape = [cache.batch(), heads, cache.capacity(), d];
    if cache.is_paged() {
        // Only the shape matters; the view is never launched.
        Tensor::from_raw_parts(
            pool.handle().clone(),
            shape.iter().product(),
            shape,
            crate::tensor::contiguous_strides(shape),
        )
    } else {
        pool.clone()
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
    if !supports::<V::Elem>(client) {
        return Err(unsupported_dtype(&call.spec));
    }
    let out = Output {
        o: Tensor::empty(client, call.problem.out_shape()),
        lse: Lse::empty(client, call.problem.lse_shape()),
    };
    crate::tune::decode_tuned::<V>(client, call, q, cache, &out)?;
    Ok(out)
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
    if !supports::<V::Elem>(client) {
        return Err(unsupported_dtype(&call.spec));
    }
    crate::launch::check_output(&call.problem, out)?;
    crate::tune::decode_tuned::<V>(client, call, q, cache, out)?;
    Ok(())
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
    crate::launch::check_output(&call.problem, out)?;
    launch_decode::<V>(client, &call, plan, q, cache, out)
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

/// The plan used without tuning: [`default_tiling`], and key splits that bring the launch to at
/// most about eight cubes per multiprocessor (`B × Hkv × row chunks` cubes before splitting), in
/// a power of two, never below 256 of the keys a sequence's queries see
/// ([`DecodeProblem::keys_seen`]) per split. On a CPU-emulated device, splits also keep
/// each invocation under llvmpipe's loop limit.
pub fn default_plan(client: &ComputeClient, call: &DecodeProblem) -> Result<DecodePlan, AttnError> {
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
        let config = decode_config(&call.spec, tiling, false, true);
        let budget = keys_within_loop_budget(config);
        splits = splits.max(span.div_ceil(budget));
    }
    Ok(DecodePlan {
        tiling,
        splits: splits.clamp(1, u16::MAX as usize),
    })
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
    let t = plan.tiling;
    let hw = &client.properties().hardware;
    let bad = |reason: String| {
        Err(AttnError::Unsupported(format!(
            "decode plan {}: {reason}",
            plan.name()
        )))
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
    if plan.splits == 0 || plan.splits > u16::MAX as usize {
        return bad("splits lie between 1 and 65 535".into());
    }
    if is_cpu_emulated(client) {
        let config = decode_config(&call.spec, t, plan.splits > 1, true);
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
    paged: bool,
) -> DecodeConfig {
    DecodeConfig {
        tiling,
        head_dim: spec.head_dim,
        value_dim: spec.value_dim,
        mask: spec.mask,
        score: spec.score.flags(),
        paged,
        split,
    }
}

/// The launches: the decode kernel, and with several splits the combine step.
pub(crate) fn launch_decode<V: Variant>(
    client: &ComputeClient,
    call: &DecodeProblem,
    plan: DecodePlan,
    q: &Tensor<V::Elem>,
    cache: &KvCache<V::Elem>,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    let spec = &call.spec;
    if !supports::<V::Elem>(client) {
        return Err(unsupported_dtype(spec));
    }
    let p = &call.problem;
    let tiling = plan.tiling;
    let span = call.split_span(tiling.units as usize);
    let kps = keys_per_split(span, plan.splits, tiling.units as usize);
    let splits = span.div_ceil(kps).max(1);
    let config = decode_config(spec, tiling, splits > 1, cache.is_paged());
    let chunks = call.group_rows().div_ceil(tiling.rows as usize);
    tracing::debug!(
        variant = spec.name,
        plan = %plan.name(),
        splits,
        keys_per_split = kps,
        paged = cache.is_paged(),
        "decode launch"
    );
    let (page_size, max_pages, table) = cache.table_parts();
    let args = kernel_args(spec, p);
    let dargs = DecodeArgsLaunch::new(
        p.seq_q as u32,
        call.group_rows() as u32,
        page_size as u32,
        max_pages as u32,
        kps as u32,
    );
    let (ints, floats) = upload_inputs(client, &call.packed);
    let table_handle = client.create_from_slice(i32::as_bytes(table));
    let rows = p.batch * p.heads_q * p.seq_q;
    let (part_o, part_lse) = if splits > 1 {
        (
            Tensor::<f32>::empty(client, [1, 1, rows * splits, p.value_dim]),
            Tensor::<f32>::empty(client, [1, 1, rows * splits, 1]),
        )
    } else {
        (
            Tensor::<f32>::empty(client, [1, 1, 1, 1]),
            out.lse.tensor.clone(),
        )
    };
    let cube_count = CubeCount::Static(splits as u32, (p.heads_kv * chunks) as u32, p.batch as u32);
    unsafe {
        decode_forward::launch::<V::Elem, V::Hooks>(
            client,
            cube_count,
            CubeDim::new_1d(tiling.units),
            DecodeOperandsLaunch::new(
                tensor_arg(q),
                tensor_arg(cache.k()),
                tensor_arg(cache.v()),
                flat_arg(&table_handle, table.len()),
            ),
            DecodeOutputsLaunch::new(
                tensor_arg(&out.o),
                tensor_arg(&part_lse),
                tensor_arg(&part_o),
            ),
            run_inputs(&ints, &floats, &call.packed),
            args,
            dargs,
            config,
        );
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
                CubeCount::Static(p.seq_q as u32, p.heads_q as u32, p.batch as u32),
                CubeDim::new_1d(UNITS),
                PartsLaunch::new(tensor_arg(&part_o), tensor_arg(&part_lse)),
                OutputsLaunch::new(tensor_arg(&out.o), tensor_arg(&out.lse.tensor)),
                run_inputs(&ints, &floats, &call.packed),
                splits as u32,
                f32::NEG_INFINITY,
                combine,
            );
        }
    }
    Ok(())
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
    let out = Output {
        o: Tensor::empty(client, shape),
        lse: Lse::empty(client, rows_shape),
    };
    const UNITS: u32 = 256;
    let elements = shape.iter().product::<usize>();
    unsafe {
        merge_states::launch::<E>(
            client,
            grid(elements, UNITS),
            CubeDim::new_1d(UNITS),
            OutputsLaunch::new(tensor_arg(&a.o), tensor_arg(&a.lse.tensor)),
            OutputsLaunch::new(tensor_arg(&b.o), tensor_arg(&b.lse.tensor)),
            OutputsLaunch::new(tensor_arg(&out.o), tensor_arg(&out.lse.tensor)),
            elements as u32,
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
