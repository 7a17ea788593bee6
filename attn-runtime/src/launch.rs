//! Launching a variant: validate, pick a tile shape the device can run, allocate, launch.

use cubecl::prelude::*;

use crate::blueprint::{family_for, Blueprint, Candidate, Family};
use crate::error::{AttnError, Dim, Operand};
use crate::inputs::{pack, Inputs, Packed};
use crate::kernels::common::{ArgsLaunch, OperandsLaunch, OutputsLaunch, RunInputsLaunch};
use crate::kernels::prefill::config::{PANEL, WARPGROUP_ROWS};
use crate::kernels::prefill::portable::prefill_forward;
use crate::kernels::prefill::tensor_core::prefill_forward_tc;
use crate::kernels::prefill::warpgroup::{prefill_forward_wg, TmaOperandsLaunch, TmaOutputsLaunch};
use crate::problem::Problem;
use crate::tensor::{contiguous_strides, supports, ComputeClient, Element, Tensor};
use crate::variant::{Tiling, Variant, VariantSpec};

/// The log-sum-exp of each query row's scaled logits, `[batch, heads_q, seq_q]`, f32, contiguous.
/// A row that sees no key holds −∞.
#[derive(Clone, Debug)]
pub struct Lse {
    /// The whole LSE as a `[batch, heads_q, seq_q, 1]` tensor.
    pub tensor: Tensor<f32>,
}

impl Lse {
    /// A new, uninitialised LSE for `shape = [batch, heads_q, seq_q]`.
    pub fn empty(client: &ComputeClient, shape: [usize; 3]) -> Self {
        Self {
            tensor: Tensor::empty(client, [shape[0], shape[1], shape[2], 1]),
        }
    }

    /// `[batch, heads_q, seq_q]`.
    pub fn shape(&self) -> [usize; 3] {
        let [b, h, n, _] = self.tensor.shape();
        [b, h, n]
    }

    /// Reads the LSE back, in `[batch, heads_q, seq_q]` order.
    pub fn to_vec(&self, client: &ComputeClient) -> Vec<f32> {
        self.tensor.to_vec(client)
    }
}

/// The result of a forward pass.
#[derive(Clone, Debug)]
pub struct Output<E> {
    /// Attention output, `[batch, heads_q, seq_q, head_dim]`, contiguous.
    pub o: Tensor<E>,
    /// Log-sum-exp per query row.
    pub lse: Lse,
}

impl<E: Element> Output<E> {
    /// Fresh, uninitialised output buffers for `o_shape = [batch, heads_q, seq_q, value_dim]`.
    pub fn empty(client: &ComputeClient, o_shape: [usize; 4]) -> Self {
        Self {
            o: Tensor::empty(client, o_shape),
            lse: Lse::empty(client, [o_shape[0], o_shape[1], o_shape[2]]),
        }
    }
}

/// Runs variant `V` on Q `[B, Hq, Nq, D]`, K `[B, Hkv, Nk, D]` and V `[B, Hkv, Nk, Dv]` with its
/// run-time `inputs`, with the tile shape tuned for this device and shape bucket (see
/// [`crate::tune`]: cached, tuned on a miss, or the fallback shape with `ATTN_TUNE=off`).
pub fn forward<V: Variant>(
    client: &ComputeClient,
    q: &Tensor<V::Elem>,
    k: &Tensor<V::Elem>,
    v: &Tensor<V::Elem>,
    inputs: &Inputs,
) -> Result<Output<V::Elem>, AttnError> {
    let problem = Problem::new(&V::SPEC, q, k, v)?;
    let packed = pack(&V::SPEC, &problem, inputs)?;
    if !supports::<V::Elem>(client) {
        return Err(unsupported_dtype(&V::SPEC));
    }
    let o_len = problem.out_shape().iter().product();
    forward_offsets(client, [q, k, v], o_len)?;
    let out = Output {
        o: Tensor::empty(client, problem.out_shape()),
        lse: Lse::empty(client, problem.lse_shape()),
    };
    crate::tune::forward_tuned::<V>(client, &problem, packed, q, k, v, &out)?;
    Ok(out)
}

/// [`forward`] into caller-owned `out` (checked before anything launches: the problem's shape,
/// contiguous, large enough), with the tuned tile shape: for callers that reuse output buffers
/// or hand the kernel memory of their own (a framework's tensor, a preallocated arena).
pub fn forward_into<V: Variant>(
    client: &ComputeClient,
    q: &Tensor<V::Elem>,
    k: &Tensor<V::Elem>,
    v: &Tensor<V::Elem>,
    inputs: &Inputs,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    let problem = Problem::new(&V::SPEC, q, k, v)?;
    let packed = pack(&V::SPEC, &problem, inputs)?;
    if !supports::<V::Elem>(client) {
        return Err(unsupported_dtype(&V::SPEC));
    }
    check_output(&problem, out)?;
    forward_offsets(client, [q, k, v], out.o.buffer_len())?;
    crate::tune::forward_tuned::<V>(client, &problem, packed, q, k, v, out)?;
    Ok(())
}

/// Runs variant `V` with a given tile shape, writing into caller-owned `out` (checked: the right
/// shape, contiguous). Used by the tuner, tests and benchmarks.
pub fn forward_with_tiling<V: Variant>(
    client: &ComputeClient,
    q: &Tensor<V::Elem>,
    k: &Tensor<V::Elem>,
    v: &Tensor<V::Elem>,
    inputs: &Inputs,
    tiling: Tiling,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    let problem = Problem::new(&V::SPEC, q, k, v)?;
    let packed = pack(&V::SPEC, &problem, inputs)?;
    let candidate = Candidate::on(client, &V::SPEC, tiling, copy_engine_reads(q, k, v, out))?;
    check_output(&problem, out)?;
    let blueprint = Blueprint::new(&V::SPEC, candidate, &problem, &packed);
    launch::<V>(client, &blueprint, &problem, &packed, q, k, v, out)
}

/// The tile shapes of `spec` this device can run (on some kernel family), in order of
/// preference.
pub fn runnable_tilings(client: &ComputeClient, spec: &VariantSpec) -> Vec<Tiling> {
    spec.tilings
        .iter()
        .copied()
        .filter(|&t| family_for(client, spec, t, true).is_ok())
        .collect()
}

/// The tile shape `spec` runs with on this device until the tuner measures (operands the copy
/// engine can read): [`select_candidate`]'s.
pub fn select_tiling(client: &ComputeClient, spec: &VariantSpec) -> Result<Tiling, AttnError> {
    select_candidate(client, spec, true).map(|c| c.tiling)
}

/// The candidate `spec` runs with on this device until the tuner measures: the first declared
/// tile shape (declaration order is preference order) that the device's fastest kernel family
/// runs (warpgroup — for operands the copy engine reads — then 16×16×16 tensor cores, then
/// portable). Preferring the family keeps a shape that only fits a slower kernel from displacing
/// one on a faster kernel. On the warpgroup kernel at head dim 64 the 64-row tile goes first (see
/// `preferred_tiling`).
pub fn select_candidate(
    client: &ComputeClient,
    spec: &VariantSpec,
    copy_engine: bool,
) -> Result<Candidate, AttnError> {
    let ranked: Vec<Candidate> = spec
        .tilings
        .iter()
        .filter_map(|&t| Candidate::on(client, spec, t, copy_engine).ok())
        .collect();
    if let Some(candidate) = preferred_tiling(&ranked, spec.head_dim) {
        return Ok(candidate);
    }
    let first_error = spec
        .tilings
        .iter()
        .find_map(|&t| family_for(client, spec, t, copy_engine).err());
    Err(first_error
        .unwrap_or_else(|| AttnError::Unsupported(format!("{} declares no tile shape", spec.name))))
}

/// The untuned pick among the candidates the device runs: the first tile of the fastest family,
/// except that on the warpgroup kernel at head dim 64 or less the 64-row tile with the longest
/// steps goes first. There a cube of one warpgroup is faster than two taking turns: their MMAs
/// are too short to hide each other's softmax (H200, B 4, H 32, N 4096: q64_kv128 1.87–1.92 ms,
/// q128_kv128 2.13–2.44 ms, q64_kv64 2.01–2.12 ms; bench/NOTES.md). Past head dim 128 the first
/// 128-row tile goes first: a one-warpgroup cube's tiles fill the SM's shared memory, leaving it
/// four planes (H200, B 2, Hq 16, Hkv 8, N 8192, d 256: q128_kv64 4.83 ms, q64_kv64 6.61 ms;
/// causal 2.62 and 3.40 ms).
fn preferred_tiling(ranked: &[Candidate], head_dim: u32) -> Option<Candidate> {
    let best = ranked.iter().map(|c| c.family.rank()).max()?;
    let mut fastest = ranked.iter().filter(|c| c.family.rank() == best);
    if best == Family::Warpgroup.rank() && head_dim <= 64 {
        let one_warpgroup = fastest.clone().filter(|c| c.tiling.block_q == 64);
        if let Some(&candidate) = one_warpgroup.max_by_key(|c| c.tiling.block_kv) {
            return Some(candidate);
        }
    }
    if best == Family::Warpgroup.rank() && head_dim > 128 {
        // Two warpgroups taking turns: one alone has a whole SM (its tiles fill the shared
        // memory) with four planes.
        if let Some(&candidate) = fastest.clone().find(|c| c.tiling.block_q == 128) {
            return Some(candidate);
        }
    }
    fastest.next().copied()
}

pub(crate) fn check_output<E: Element>(
    problem: &Problem,
    out: &Output<E>,
) -> Result<(), AttnError> {
    const DIMS: [Dim; 4] = [Dim::Batch, Dim::Heads, Dim::Seq, Dim::HeadDim];
    let o_shape = problem.out_shape();
    let lse_shape = problem.lse_shape();
    let buffers = [
        (Operand::O, out.o.shape(), o_shape, 4),
        (
            Operand::Lse,
            out.lse.tensor.shape(),
            [lse_shape[0], lse_shape[1], lse_shape[2], 1],
            3,
        ),
    ];
    for (operand, found, expected, rank) in buffers {
        for i in 0..rank {
            if found[i] != expected[i] {
                return Err(AttnError::DimMismatch {
                    operand,
                    dim: DIMS[i],
                    expected: expected[i],
                    found: found[i],
                    why: "the output follows q's shape",
                });
            }
        }
    }
    check_contiguous(
        Operand::O,
        out.o.shape(),
        out.o.strides(),
        out.o.buffer_len(),
    )?;
    let lse = &out.lse.tensor;
    check_contiguous(Operand::Lse, lse.shape(), lse.strides(), lse.buffer_len())
}

/// An output buffer must be dense (the kernels write it by row-major index) and large enough.
fn check_contiguous(
    operand: Operand,
    shape: [usize; 4],
    strides: [usize; 4],
    len: usize,
) -> Result<(), AttnError> {
    let needed = shape.iter().product::<usize>();
    if strides != contiguous_strides(shape) || len < needed {
        return Err(AttnError::OutputLayout { operand, needed });
    }
    Ok(())
}

pub(crate) fn unsupported_dtype(spec: &VariantSpec) -> AttnError {
    AttnError::Unsupported(format!(
        "{} runs in {}, which this device does not support",
        spec.name,
        spec.dtype.name()
    ))
}

/// `t` (`[B, H, N, width]`) described to the copy engine in boxes of `rows` rows by one 64-column
/// panel, 128-byte swizzled: what the warpgroup kernels read their tiles through.
///
/// # Safety
///
/// `t`'s shape and strides must lie within its buffer (as [`tensor_arg`] requires).
pub(crate) unsafe fn tma_map<E: Element>(t: &Tensor<E>, rows: u32) -> TensorMapArg<Tiled> {
    TensorMapArg::new(
        TiledArgs {
            tile_size: cubecl::zspace::shape![1, 1, rows as usize, PANEL],
        },
        unsafe { tensor_arg(t) },
        E::cube_type(),
    )
    .with_swizzle(cubecl::prelude::TensorMapSwizzle::B128)
}

/// The launch itself, as `blueprint` says; every input has been checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch<V: Variant>(
    client: &ComputeClient,
    blueprint: &Blueprint,
    problem: &Problem,
    packed: &Packed,
    q: &Tensor<V::Elem>,
    k: &Tensor<V::Elem>,
    v: &Tensor<V::Elem>,
    out: &Output<V::Elem>,
) -> Result<(), AttnError> {
    let spec = &V::SPEC;
    if !supports::<V::Elem>(client) {
        return Err(unsupported_dtype(spec));
    }
    if packed.max_seq_q == 0 {
        // Every document is empty: nothing to compute, nothing to write.
        return Ok(());
    }
    let address = forward_offsets(client, [q, k, v], out.o.buffer_len())?;
    let (x, y, z) = blueprint.cube_count;
    let cube_count = CubeCount::Static(x, y, z);
    let args = kernel_args(spec, problem);
    let (ints, floats) = upload_inputs(client, packed);
    let inputs = unsafe { run_inputs(&ints, &floats, packed) };
    let config = blueprint.config;
    tracing::debug!(
        variant = spec.name,
        family = ?blueprint.family,
        tile = %config.tiling.name(),
        cubes = blueprint.cubes(),
        "prefill launch"
    );
    // SAFETY (every `tensor_arg`): Q, K and V were checked against their buffers by
    // `Problem::new`, O and the LSE by `check_output`.
    match blueprint.family {
        Family::Warpgroup => {
            if ![q, k, v, &out.o].iter().all(|t| copy_engine_can_read(t)) {
                return Err(AttnError::Unsupported(format!(
                    "{}: the warpgroup kernel was asked for operands the copy engine cannot read",
                    spec.name
                )));
            }
            let map = |t: &Tensor<V::Elem>, rows: u32| unsafe { tma_map(t, rows) };
            let maps = TmaOperandsLaunch::new(
                map(q, config.tiling.block_q),
                map(k, config.tiling.block_kv),
                map(v, config.tiling.block_kv),
            );
            // O leaves through the copy engine a warpgroup's rows at a time.
            let outputs = TmaOutputsLaunch::new(
                map(&out.o, WARPGROUP_ROWS as u32),
                unsafe { tensor_arg(&out.o) },
                unsafe { tensor_arg(&out.lse.tensor) },
            );
            prefill_forward_wg::launch::<V::Elem, V::Hooks>(
                client,
                cube_count,
                blueprint.cube_dim,
                address,
                maps,
                outputs,
                inputs,
                args,
                config,
            )
        }
        family => {
            let ops = unsafe { OperandsLaunch::new(tensor_arg(q), tensor_arg(k), tensor_arg(v)) };
            let outputs =
                unsafe { OutputsLaunch::new(tensor_arg(&out.o), tensor_arg(&out.lse.tensor)) };
            if family == Family::Portable {
                check_loop_budget(client, problem, config.tiling)?;
                prefill_forward::launch::<V::Elem, V::Hooks>(
                    client,
                    cube_count,
                    blueprint.cube_dim,
                    address,
                    ops,
                    outputs,
                    inputs,
                    args,
                    config,
                )
            } else {
                prefill_forward_tc::launch::<V::Elem, V::Hooks>(
                    client,
                    cube_count,
                    blueprint.cube_dim,
                    address,
                    ops,
                    outputs,
                    inputs,
                    args,
                    config,
                )
            }
        }
    }
    Ok(())
}

/// The run-time scalars every attention kernel takes: scale, group, window, softcap, −∞.
pub(crate) fn kernel_args(spec: &VariantSpec, problem: &Problem) -> ArgsLaunch {
    let window = spec.mask.window;
    let softcap = spec.score.softcap.unwrap_or(1.0) as f32;
    ArgsLaunch::new(
        spec.softmax_scale() as f32,
        problem.group as u32,
        window.and_then(|w| w.left).unwrap_or(0) as i32,
        window.and_then(|w| w.right).unwrap_or(0) as i32,
        softcap,
        1.0 / softcap,
        f32::NEG_INFINITY,
    )
}

/// The packed run-time inputs as two device buffers (`i32`, `f32`).
pub(crate) fn upload_inputs(
    client: &ComputeClient,
    packed: &Packed,
) -> (cubecl::server::Handle, cubecl::server::Handle) {
    (
        client.create_from_slice(i32::as_bytes(&packed.ints)),
        client.create_from_slice(f32::as_bytes(&packed.floats)),
    )
}

/// The kernels' view of the uploaded inputs.
///
/// # Safety
/// `ints` and `floats` were created by [`upload_inputs`] from `packed`.
pub(crate) unsafe fn run_inputs(
    ints: &cubecl::server::Handle,
    floats: &cubecl::server::Handle,
    packed: &Packed,
) -> RunInputsLaunch {
    unsafe {
        RunInputsLaunch::new(
            flat_arg(ints, packed.ints.len()),
            flat_arg(floats, packed.floats.len()),
            packed.slot_len as u32,
        )
    }
}

/// Whether the copy engine can read every operand of a call (see [`copy_engine_can_read`]).
pub fn copy_engine_reads<E: Element>(
    q: &Tensor<E>,
    k: &Tensor<E>,
    v: &Tensor<E>,
    out: &Output<E>,
) -> bool {
    [q, k, v, &out.o].iter().all(|t| copy_engine_can_read(t))
}

/// Whether the copy engine can read `t` as a `[B, H, N, D]` tensor map: the view starting at a
/// multiple of 16 bytes in its buffer, the last dim contiguous, every other stride a multiple of
/// 16 bytes, every extent within `i32`.
pub fn copy_engine_can_read<E: Element>(t: &Tensor<E>) -> bool {
    let offset = t.handle().offset_start.unwrap_or(0) as usize;
    copy_engine_layout(t.shape(), t.strides(), std::mem::size_of::<E>(), offset)
}

/// [`copy_engine_can_read`] on a shape and strides (in elements of `elem_bytes`) starting
/// `offset_bytes` into the buffer.
pub fn copy_engine_layout(
    shape: [usize; 4],
    strides: [usize; 4],
    elem_bytes: usize,
    offset_bytes: usize,
) -> bool {
    offset_bytes.is_multiple_of(16)
        && strides[3] == 1
        && strides[..3]
            .iter()
            .all(|s| (s * elem_bytes).is_multiple_of(16))
        && shape.iter().all(|&n| n > 0 && n <= i32::MAX as usize)
}

/// Loop iterations of one kernel invocation that llvmpipe counts: per step, one for the step loop
/// and at most six per key (scores, score modification, mask, two softmax sweeps, P·V);
/// head-dimension loops are unrolled and not counted.
pub fn counted_loop_iterations(problem: &Problem, tiling: Tiling) -> usize {
    let steps = problem.seq_k.div_ceil(tiling.block_kv as usize);
    6 * problem.seq_k + steps + 8
}

/// Mesa's llvmpipe (lavapipe, the CPU Vulkan driver) stops every loop of a shader invocation once
/// 65 535 loop iterations have run, silently, so the kernel would write a wrong answer; refuse such
/// calls on it (about 13 000 keys). Real GPUs have no such limit.
pub fn check_loop_budget(
    client: &ComputeClient,
    problem: &Problem,
    tiling: Tiling,
) -> Result<(), AttnError> {
    const LLVMPIPE_LOOP_LIMIT: usize = 65_535;
    let needed = counted_loop_iterations(problem, tiling);
    if is_cpu_emulated(client) && needed > LLVMPIPE_LOOP_LIMIT {
        return Err(AttnError::Unsupported(format!(
            "{} keys need {needed} loop iterations per invocation; CPU-emulated Vulkan (llvmpipe) stops loops after {LLVMPIPE_LOOP_LIMIT}, so at most {} keys per call run correctly there",
            problem.seq_k,
            (LLVMPIPE_LOOP_LIMIT - 8) * tiling.block_kv as usize / (6 * tiling.block_kv as usize + 1)
        )));
    }
    Ok(())
}

/// [`check_loop_budget`] for a kernel whose invocations run `iterations` counted loop iterations
/// (`what` names the work in the error).
pub(crate) fn check_loop_budget_for(
    client: &ComputeClient,
    iterations: usize,
    what: &str,
) -> Result<(), AttnError> {
    const LLVMPIPE_LOOP_LIMIT: usize = 65_535;
    if is_cpu_emulated(client) && iterations > LLVMPIPE_LOOP_LIMIT {
        return Err(AttnError::Unsupported(format!(
            "{what} needs {iterations} loop iterations per invocation; CPU-emulated Vulkan (llvmpipe) stops loops after {LLVMPIPE_LOOP_LIMIT}"
        )));
    }
    Ok(())
}

/// Whether the device is a CPU emulating a GPU (Mesa's llvmpipe behind lavapipe).
pub fn is_cpu_emulated(client: &ComputeClient) -> bool {
    client
        .properties()
        .identity
        .name
        .to_ascii_lowercase()
        .contains("llvmpipe")
}

/// # Safety
/// The tensor's view was checked against its buffer ([`Problem::new`] or [`check_output`]).
pub(crate) unsafe fn tensor_arg<E: Element>(t: &Tensor<E>) -> TensorArg {
    unsafe {
        TensorArg::from_raw_parts(
            t.handle().clone(),
            t.strides().to_vec().into(),
            t.shape().to_vec().into(),
        )
    }
}

/// The width of the offsets a launch's kernels compute, from the element counts of the buffers
/// it binds: 32 bits, the common and faster case, unless one of them holds more than
/// `u32::MAX` elements; then 64 bits where the back end has them, else [`AttnError::TooLarge`]
/// (checked before anything launches). Kernels are compiled once per width.
pub(crate) fn offsets(client: &ComputeClient, buffers: &[usize]) -> Result<AddressType, AttnError> {
    let largest = buffers.iter().copied().max().unwrap_or(0);
    let has_wide = client.properties().supports_address(AddressType::U64);
    if largest > u32::MAX as usize {
        if !has_wide {
            return Err(AttnError::TooLarge {
                what: "a buffer's element count (this back end has no 64-bit offsets)",
                found: largest,
                max: u32::MAX as usize,
            });
        }
        tracing::debug!(largest, "64-bit offsets");
        return Ok(AddressType::U64);
    }
    if has_wide && WIDE_OFFSETS.with(std::cell::Cell::get) {
        return Ok(AddressType::U64);
    }
    Ok(AddressType::U32)
}

/// [`offsets`] of a forward call: Q, K, V and an output of `o_len` elements (its LSE is smaller).
fn forward_offsets<E: Element>(
    client: &ComputeClient,
    [q, k, v]: [&Tensor<E>; 3],
    o_len: usize,
) -> Result<AddressType, AttnError> {
    offsets(
        client,
        &[q.buffer_len(), k.buffer_len(), v.buffer_len(), o_len],
    )
}

thread_local! {
    /// Whether this thread's launches take 64-bit offsets where the back end has them
    /// (`wide_offsets`).
    static WIDE_OFFSETS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the launches this thread makes compute 64-bit offsets (where the back end has them),
/// whatever their buffers' sizes: for testing the kernels' 64-bit form on small inputs. Launches
/// choose 64 bits by themselves once a buffer holds more than `u32::MAX` elements.
#[cfg(feature = "testing")]
pub fn wide_offsets(on: bool) {
    WIDE_OFFSETS.with(|w| w.set(on));
}

/// # Safety
/// `len` elements fit in the buffer behind `handle` (it was created from a slice of `len`).
pub(crate) unsafe fn flat_arg(handle: &cubecl::server::Handle, len: usize) -> TensorArg {
    unsafe { TensorArg::from_raw_parts(handle.clone(), vec![1].into(), vec![len].into()) }
}

#[cfg(test)]
mod tests {
    use super::{copy_engine_layout, preferred_tiling};
    use crate::blueprint::{Candidate, Family};
    use crate::tensor::contiguous_strides;
    use crate::variant::Tiling;

    /// The untuned pick: the first tile of the fastest family, and at head dim 64 on the
    /// warpgroup kernel the 64-row tile with the longest steps.
    #[test]
    fn preferred_tiles() {
        let tile = |block_q, block_kv, family| Candidate {
            tiling: Tiling { block_q, block_kv },
            family,
        };
        let (wg, tc) = (Family::Warpgroup, Family::TensorCores);
        let ranked = [
            tile(64, 32, tc),
            tile(128, 128, wg),
            tile(64, 64, wg),
            tile(128, 64, wg),
            tile(64, 128, wg),
        ];
        assert_eq!(preferred_tiling(&ranked, 128), Some(ranked[1]));
        assert_eq!(preferred_tiling(&ranked, 64), Some(ranked[4]));
        // No 64-row tile of the fastest family: its first.
        assert_eq!(preferred_tiling(&ranked[..2], 64), Some(ranked[1]));
        // Another family fastest: its first, whatever the head dim.
        let cmma = [tile(64, 32, tc), tile(32, 32, tc)];
        assert_eq!(preferred_tiling(&cmma, 64), Some(cmma[0]));
        assert_eq!(preferred_tiling(&[], 64), None);
        // Past head dim 128 on the warpgroup kernel: the first 128-row tile.
        let wide = [tile(64, 64, wg), tile(128, 64, wg)];
        assert_eq!(preferred_tiling(&wide, 256), Some(wide[1]));
        assert_eq!(preferred_tiling(&wide, 128), Some(wide[0]));
    }

    #[test]
    fn copy_engine_layouts() {
        // [B, H, N, D] contiguous, and the [B, N, H, D] storage viewed as [B, H, N, D].
        let shape = [2, 8, 333, 128];
        assert!(copy_engine_layout(shape, contiguous_strides(shape), 2, 0));
        let bnhd = contiguous_strides([2, 333, 8, 128]);
        let bnhd_view = [bnhd[0], bnhd[2], bnhd[1], bnhd[3]];
        assert!(copy_engine_layout(shape, bnhd_view, 2, 256));
        // A view starting 8 bytes into its buffer.
        assert!(!copy_engine_layout(shape, bnhd_view, 2, 8));
        // A head dim of 100 in bf16: rows 200 bytes apart, not a multiple of 16.
        let odd = [1, 2, 17, 100];
        assert!(!copy_engine_layout(odd, contiguous_strides(odd), 2, 0));
        // The last dim strided, or an empty extent.
        assert!(!copy_engine_layout(shape, [0, 0, 256, 2], 2, 0));
        let empty = [1, 1, 0, 64];
        assert!(!copy_engine_layout(empty, contiguous_strides(empty), 2, 0));
    }
}
