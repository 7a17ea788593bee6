//! Launching a variant: validate, pick a tile shape the device can run, allocate, launch.

use cubecl::prelude::*;

use crate::error::{AttnError, Dim, Operand};
use crate::inputs::{pack, Inputs, Packed};
use crate::kernels::prefill::{prefill_forward, PrefillArgsLaunch, PrefillConfig};
use crate::kernels::prefill_tc::{prefill_forward_tc, MMA};
use crate::kernels::prefill_wg::{prefill_forward_wg, PANEL, WARPGROUP_ROWS, WARPGROUP_UNITS};
use crate::problem::Problem;
use crate::tensor::{contiguous_strides, supports, ComputeClient, Element, Tensor};
use crate::variant::{DType, Tiling, Variant, VariantSpec};

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
    check_tiling(client, &V::SPEC, tiling)?;
    check_output(&problem, out)?;
    launch::<V>(client, &problem, &packed, tiling, q, k, v, out)
}

/// The tile shapes of `spec` this device can run, in order of preference.
pub fn runnable_tilings(client: &ComputeClient, spec: &VariantSpec) -> Vec<Tiling> {
    spec.tilings
        .iter()
        .copied()
        .filter(|t| check_tiling(client, spec, *t).is_ok())
        .collect()
}

/// The tile shape `spec` runs with on this device until the tuner measures: the first candidate
/// (declaration order is preference order) that the device's fastest kernel family can run
/// (warpgroup, then 16×16×16 tensor cores, then portable). Preferring the family keeps a shape that
/// only fits a slower kernel from displacing one on a faster kernel. On the warpgroup kernel at
/// head dim 64 the 64-row tile goes first (see `preferred_tiling`).
pub fn select_tiling(client: &ComputeClient, spec: &VariantSpec) -> Result<Tiling, AttnError> {
    let ranked: Vec<(Tiling, u8)> = spec
        .tilings
        .iter()
        .filter(|t| check_tiling(client, spec, **t).is_ok())
        .map(|&t| (t, engine_for(client, spec, t).rank()))
        .collect();
    if let Some(tiling) = preferred_tiling(&ranked, spec.head_dim) {
        return Ok(tiling);
    }
    let first_error = spec
        .tilings
        .iter()
        .find_map(|t| check_tiling(client, spec, *t).err());
    Err(first_error
        .unwrap_or_else(|| AttnError::Unsupported(format!("{} declares no tile shape", spec.name))))
}

/// The untuned pick among `(tile, engine rank)` pairs the device runs: the first tile of the
/// fastest family, except that on the warpgroup kernel at head dim 64 or less the 64-row tile
/// with the longest steps goes first. There a cube of one warpgroup is faster than two taking
/// turns: their MMAs are too short to hide each other's softmax (H200, B 4, H 32, N 4096:
/// q64_kv128 1.87–1.92 ms, q128_kv128 2.13–2.44 ms, q64_kv64 2.01–2.12 ms; bench/NOTES.md). Past
/// head dim 128 the first 128-row tile goes first: a one-warpgroup cube's tiles fill the SM's
/// shared memory, leaving it four planes (H200, B 2, Hq 16, Hkv 8, N 8192, d 256: q128_kv64
/// 4.83 ms, q64_kv64 6.61 ms; causal 2.62 and 3.40 ms).
fn preferred_tiling(ranked: &[(Tiling, u8)], head_dim: u32) -> Option<Tiling> {
    let best = ranked.iter().map(|&(_, rank)| rank).max()?;
    let mut fastest = ranked.iter().filter(|&&(_, rank)| rank == best);
    if best == Engine::Warpgroup.rank() && head_dim <= 64 {
        let one_warpgroup = fastest.clone().filter(|(t, _)| t.block_q == 64);
        if let Some(&(tiling, _)) = one_warpgroup.max_by_key(|(t, _)| t.block_kv) {
            return Some(tiling);
        }
    }
    if best == Engine::Warpgroup.rank() && head_dim > 128 {
        // Two warpgroups taking turns: one alone has a whole SM (its tiles fill the shared
        // memory) with four planes.
        if let Some(&(tiling, _)) = fastest.clone().find(|(t, _)| t.block_q == 128) {
            return Some(tiling);
        }
    }
    fastest.next().map(|&(tiling, _)| tiling)
}

/// Whether this device can run `tiling` for `spec`: shared memory, units per cube, element type.
pub fn check_tiling(
    client: &ComputeClient,
    spec: &VariantSpec,
    tiling: Tiling,
) -> Result<(), AttnError> {
    let hw = &client.properties().hardware;
    let smem = tiling.shared_bytes(spec.head_dim, spec.value_dim);
    if smem > hw.max_shared_memory_size {
        return Err(AttnError::Unsupported(format!(
            "tile {} needs {smem} bytes of shared memory at head_dim {}; the device has {}",
            tiling.name(),
            spec.head_dim,
            hw.max_shared_memory_size
        )));
    }
    if tiling.units_per_cube() > hw.max_units_per_cube || tiling.block_q > hw.max_cube_dim.0 {
        return Err(AttnError::Unsupported(format!(
            "tile {} needs {} units per cube; the device allows {}",
            tiling.name(),
            tiling.units_per_cube(),
            hw.max_units_per_cube
        )));
    }
    Ok(())
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

/// The comptime configuration of `spec`'s kernels for `tiling`.
pub fn kernel_config(spec: &VariantSpec, tiling: Tiling) -> PrefillConfig {
    PrefillConfig {
        tiling,
        head_dim: spec.head_dim,
        value_dim: spec.value_dim,
        mask: spec.mask,
        score: spec.score.flags(),
    }
}

pub(crate) fn unsupported_dtype(spec: &VariantSpec) -> AttnError {
    AttnError::Unsupported(format!(
        "{} runs in {}, which this device does not support",
        spec.name,
        spec.dtype.name()
    ))
}

/// The launch itself; every input has been checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch<V: Variant>(
    client: &ComputeClient,
    problem: &Problem,
    packed: &Packed,
    tiling: Tiling,
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
    let cube_count = CubeCount::Static(
        packed.max_seq_q.div_ceil(tiling.block_q as usize) as u32,
        problem.heads_q as u32,
        packed.sequences as u32,
    );
    let args = kernel_args(spec, problem, packed);
    let (ints, floats) = upload_inputs(client, packed);
    let ints_arg = unsafe { flat_arg(&ints, packed.ints.len()) };
    let floats_arg = unsafe { flat_arg(&floats, packed.floats.len()) };
    let config = kernel_config(spec, tiling);
    // Every kernel family takes the same arguments; only the kernel, the cube shape and how Q, K
    // and V are passed (tensors, or tensor maps for the copy engine) differ, and the warpgroup
    // kernel also takes O as a tensor map, to store it with the copy engine.
    macro_rules! launch_with {
        ($kernel:path, $cube_dim:expr) => {
            launch_with!(
                $kernel,
                $cube_dim,
                tensor_arg(q),
                tensor_arg(k),
                tensor_arg(v)
            )
        };
        ($kernel:path, $cube_dim:expr, $q:expr, $k:expr, $v:expr $(, $o_map:expr)?) => {
            unsafe {
                $kernel(
                    client,
                    cube_count,
                    $cube_dim,
                    $q,
                    $k,
                    $v,
                    $($o_map,)?
                    tensor_arg(&out.o),
                    tensor_arg(&out.lse.tensor),
                    ints_arg,
                    floats_arg,
                    args,
                    config,
                )
            }
        };
    }
    let mut engine = engine_for(client, spec, tiling);
    if engine == Engine::Warpgroup && ![q, k, v, &out.o].iter().all(|t| copy_engine_can_read(t)) {
        // The copy engine cannot describe these strides: same tile shape, older kernel.
        engine = cmma_engine_for(client, spec, tiling);
        tracing::debug!(
            variant = spec.name,
            "strides the copy engine cannot describe (not multiples of 16 bytes): tensor-core kernel"
        );
    }
    tracing::debug!(
        variant = spec.name,
        family = ?engine,
        tile = %tiling.name(),
        cubes = packed.max_seq_q.div_ceil(tiling.block_q as usize) * problem.heads_q * packed.sequences,
        "prefill launch"
    );
    match engine {
        Engine::Warpgroup => {
            // SAFETY: Q, K and V were checked against their buffers by `Problem::new`.
            let map = |t: &Tensor<V::Elem>, rows: u32| {
                TensorMapArg::new(
                    TiledArgs {
                        tile_size: cubecl::zspace::shape![1, 1, rows as usize, PANEL],
                    },
                    unsafe { tensor_arg(t) },
                    V::Elem::cube_type(),
                )
                .with_swizzle(cubecl::prelude::TensorMapSwizzle::B128)
            };
            launch_with!(
                prefill_forward_wg::launch::<V::Elem, V::Hooks>,
                CubeDim::new_1d(config.warpgroups() as u32 * WARPGROUP_UNITS as u32),
                map(q, tiling.block_q),
                map(k, tiling.block_kv),
                map(v, tiling.block_kv),
                // O leaves through the copy engine a warpgroup's rows at a time.
                map(&out.o, WARPGROUP_ROWS as u32)
            )
        }
        Engine::TensorCores => launch_with!(
            prefill_forward_tc::launch::<V::Elem, V::Hooks>,
            CubeDim::new_2d(32, config.planes() as u32)
        ),
        Engine::Portable => {
            check_loop_budget(client, problem, tiling)?;
            launch_with!(
                prefill_forward::launch::<V::Elem, V::Hooks>,
                CubeDim::new_1d(tiling.block_q)
            )
        }
    }
    Ok(())
}

/// The run-time scalars every attention kernel takes: scale, group, slot length, window, softcap.
pub(crate) fn kernel_args(
    spec: &VariantSpec,
    problem: &Problem,
    packed: &Packed,
) -> PrefillArgsLaunch {
    let window = spec.mask.window;
    let softcap = spec.score.softcap.unwrap_or(1.0) as f32;
    PrefillArgsLaunch::new(
        spec.softmax_scale() as f32,
        problem.group as u32,
        packed.slot_len as u32,
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

/// Which kernel family runs a tile shape on a device.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum Engine {
    /// Scalar units, shared memory only: every back end.
    Portable,
    /// 16×16×16 tensor-core instructions (cubecl `cmma`).
    TensorCores,
    /// Warpgroup tensor cores (Hopper's wgmma) fed by the bulk tensor copy engine (TMA).
    Warpgroup,
}

impl Engine {
    /// Preference among the families a device runs: the higher, the faster.
    pub const fn rank(self) -> u8 {
        match self {
            Engine::Portable => 0,
            Engine::TensorCores => 1,
            Engine::Warpgroup => 2,
        }
    }
}

/// The warpgroup kernel where it can run the shape (see [`warpgroup_fits`]), else
/// [`cmma_engine_for`]'s choice.
pub fn engine_for(client: &ComputeClient, spec: &VariantSpec, tiling: Tiling) -> Engine {
    if warpgroup_fits(client, spec, tiling) && forced_engine() != Some("tc") {
        Engine::Warpgroup
    } else {
        cmma_engine_for(client, spec, tiling)
    }
}

/// Whether the warpgroup kernel runs `tiling` for `spec` on this device: 16-bit elements, warpgroup
/// MMAs of `64 × block_kv` and `64 × value_dim` and the copy engine on the device, 64 or 128 query
/// rows, 64 to 256 keys per step in multiples of 16, head dims in multiples of 64 up to 256 (the
/// output and a step's scores stay in registers: past a value dim of 128, steps of at most 64
/// keys), and its shared memory.
pub fn warpgroup_fits(client: &ComputeClient, spec: &VariantSpec, tiling: Tiling) -> bool {
    use cubecl::features::{Tma, WgmmaElems};
    use cubecl::ir::types::MatrixShape;
    use cubecl::ir::{ElemType, FloatKind};
    let elem = match spec.dtype {
        DType::F16 => ElemType::Float(FloatKind::F16),
        DType::BF16 => ElemType::Float(FloatKind::BF16),
        DType::F32 => return false,
    };
    let features = client.features();
    let elems = WgmmaElems {
        a: elem,
        b: elem,
        cd: ElemType::Float(FloatKind::F32),
    };
    let mma = |n: u32| {
        features.matmul.wgmma.iter().any(|c| {
            c.matches(
                elems,
                MatrixShape {
                    m: WARPGROUP_ROWS,
                    n: n as usize,
                    k: 16,
                },
            )
        })
    };
    let config = kernel_config(spec, tiling);
    let hw = &client.properties().hardware;
    let dims = |d: u32| d.is_multiple_of(PANEL as u32) && d <= 256;
    let fits = features.tma.contains(Tma::Base)
        && (tiling.block_q == 64 || tiling.block_q == 128)
        && tiling.block_kv.is_multiple_of(16)
        && (64..=256).contains(&tiling.block_kv)
        && dims(spec.head_dim)
        && dims(spec.value_dim)
        // Past value dim 128 the output takes 128 registers a unit: steps of at most 64 keys
        // keep the scores and probabilities beside it.
        && (spec.value_dim <= 128 || tiling.block_kv <= 64)
        && mma(tiling.block_kv)
        && mma(spec.value_dim)
        && config.warpgroup_shared_bytes() <= hw.max_shared_memory_size
        && config.warpgroups() as u32 * WARPGROUP_UNITS as u32 <= hw.max_units_per_cube
        && hw.plane_size_max == 32
        && forced_engine() != Some("portable");
    fits && warpgroup_compiles()
}

/// Whether this build can compile the warpgroup kernel: cubecl's CUDA crates must carry attn's
/// patches (vendor/README.md), which a crate depending on attn gets only through the same
/// `[patch.crates-io]` lines as this workspace. Without them the tensor-core kernel runs, and the
/// first call that would have taken the warpgroup kernel says once how to enable it.
fn warpgroup_compiles() -> bool {
    if cfg!(attn_warpgroup_patches) {
        return true;
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::warn!(
            "attn: this device runs attn's warpgroup (Hopper) kernel, but this build links the \
             published cubecl-cuda and cubecl-llvm, which cannot compile it; the tensor-core \
             kernel runs instead. To enable the fast path, add attn's two patched crates to your \
             workspace's Cargo.toml: [patch.crates-io] cubecl-llvm = {{ path = \".../vendor/cubecl-llvm\" }} \
             and cubecl-cuda = {{ path = \".../vendor/cubecl-cuda\" }} (see attn's README, \"Depending on attn\")"
        );
    });
    false
}

/// Whether the warpgroup kernel family is compiled into this build (see [`warpgroup_fits`]).
pub const WARPGROUP_BUILT: bool = cfg!(attn_warpgroup_patches);

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

/// The tensor-core kernel when the device has 16×16×16 tensor cores for `E` (accumulating in f32),
/// the shape is made of whole 16-blocks and fits in shared memory; the portable kernel otherwise.
pub fn cmma_engine_for(client: &ComputeClient, spec: &VariantSpec, tiling: Tiling) -> Engine {
    use cubecl::ir::{ElemType, FloatKind};
    let mma = MMA as u32;
    let elem = match spec.dtype {
        DType::F16 => ElemType::Float(FloatKind::F16),
        DType::BF16 => ElemType::Float(FloatKind::BF16),
        DType::F32 => return Engine::Portable,
    };
    let has_cores = client
        .features()
        .matmul
        .cmma
        .contains(&cubecl::features::MmaConfig {
            a_type: elem,
            b_type: elem,
            cd_type: ElemType::Float(FloatKind::F32),
            m: mma,
            k: mma,
            n: mma,
        });
    let config = kernel_config(spec, tiling);
    let hw = &client.properties().hardware;
    let fits = tiling.block_q.is_multiple_of(mma)
        && tiling.block_kv.is_multiple_of(mma)
        && spec.head_dim.is_multiple_of(mma)
        && spec.value_dim.is_multiple_of(mma)
        && config.planes() as u32 * 32 <= hw.max_units_per_cube
        && config.tensor_core_shared_bytes(2) <= hw.max_shared_memory_size;
    if has_cores && fits && hw.plane_size_max == 32 && forced_engine() != Some("portable") {
        Engine::TensorCores
    } else {
        Engine::Portable
    }
}

/// `ATTN_ENGINE=portable` forces the portable kernel, `ATTN_ENGINE=tc` caps at the 16×16×16
/// tensor-core kernel (for comparisons and diagnosis); read once.
fn forced_engine() -> Option<&'static str> {
    static FORCED: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var("ATTN_ENGINE").as_deref() {
        Ok("portable") => Some("portable"),
        Ok("tc") => Some("tc"),
        _ => None,
    })
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

/// # Safety
/// `len` elements fit in the buffer behind `handle` (it was created from a slice of `len`).
pub(crate) unsafe fn flat_arg(handle: &cubecl::server::Handle, len: usize) -> TensorArg {
    unsafe { TensorArg::from_raw_parts(handle.clone(), vec![1].into(), vec![len].into()) }
}

#[cfg(test)]
mod tests {
    use super::{copy_engine_layout, preferred_tiling, Engine};
    use crate::tensor::contiguous_strides;
    use crate::variant::Tiling;

    /// The untuned pick: the first tile of the fastest family, and at head dim 64 on the
    /// warpgroup kernel the 64-row tile with the longest steps.
    #[test]
    fn preferred_tiles() {
        let tile = |block_q, block_kv| Tiling { block_q, block_kv };
        let (wg, tc) = (Engine::Warpgroup.rank(), Engine::TensorCores.rank());
        let ranked = [
            (tile(64, 32), tc),
            (tile(128, 128), wg),
            (tile(64, 64), wg),
            (tile(128, 64), wg),
            (tile(64, 128), wg),
        ];
        assert_eq!(preferred_tiling(&ranked, 128), Some(tile(128, 128)));
        assert_eq!(preferred_tiling(&ranked, 64), Some(tile(64, 128)));
        // No 64-row tile of the fastest family: its first.
        assert_eq!(preferred_tiling(&ranked[..2], 64), Some(tile(128, 128)));
        // Another family fastest: its first, whatever the head dim.
        let cmma = [(tile(64, 32), tc), (tile(32, 32), tc)];
        assert_eq!(preferred_tiling(&cmma, 64), Some(tile(64, 32)));
        assert_eq!(preferred_tiling(&[], 64), None);
        // Past head dim 128 on the warpgroup kernel: the first 128-row tile.
        let wide = [(tile(64, 64), wg), (tile(128, 64), wg)];
        assert_eq!(preferred_tiling(&wide, 256), Some(tile(128, 64)));
        assert_eq!(preferred_tiling(&wide, 128), Some(tile(64, 64)));
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
