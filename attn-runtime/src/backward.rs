//! The backward pass of a variant: validate, pick the tiles, launch the three kernels of
//! [`crate::kernels::backward`] (`D`, then dK and dV, then dQ; on Hopper's `…_atomic` plans dQ
//! is summed by the dK/dV kernel and a last pass rounds it).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use cubecl::prelude::*;

use crate::blueprint::{
    cube_limits, family_cap, prefill_config, tensor_cores_unfit, warpgroup_unfit, Family,
};
use crate::error::{AttnError, Dim, Operand};
use crate::inputs::{pack, Inputs, Packed};
use crate::kernels::backward::tensor_core::{backward_dkdv_tc, backward_dq_tc};
use crate::kernels::backward::warpgroup::{
    backward_dkdv_wg, backward_dq_wg, BackwardMapsLaunch, SumsLaunch,
};
use crate::kernels::backward::{
    backward_delta, backward_dkdv, backward_dq, backward_from_sums, backward_learned,
    backward_positions, backward_sinks, backward_zero, BackwardOperandsLaunch, BackwardShape,
    DeltaShape, Grid, GridLaunch, KvGradsLaunch, LearnConfig, Learned, QueryGradsLaunch,
    SinkConfig, SinkStatsLaunch, ALONG_KEY, ALONG_QUERY, ELEMENTWISE_UNITS, MAX_LEARNED,
    MAX_LEARNED_SLOTS, MAX_READS, SINK_UNITS,
};
use crate::kernels::prefill::config::{MMA, WARPGROUP_UNITS};
use crate::kv_cache::grid;
use crate::launch::{
    check_loop_budget_for, check_output, copy_engine_can_read, is_cpu_emulated, kernel_args,
    offsets, run_inputs, tensor_arg, tma_map, unsupported_dtype, upload_inputs, Output,
};
use crate::problem::{check_view, Problem};
use crate::tensor::{supports, ComputeClient, Element, Tensor};
use crate::variant::{Alibi, Inner, ReadIndex, Tiling, Variant, VariantSpec};

/// The gradients of a forward pass's inputs.
#[derive(Clone, Debug)]
pub struct Grads<E> {
    /// dQ, `[B, Hq, Nq, D]`, contiguous.
    pub dq: Tensor<E>,
    /// dK, `[B, Hkv, Nk, D]`, contiguous: summed over each K/V head's query group.
    pub dk: Tensor<E>,
    /// dV, `[B, Hkv, Nk, Dv]`, contiguous, summed the same way.
    pub dv: Tensor<E>,
    /// With sinks (`sinks: per_head`): the gradient of each head's sink logit, `[1, 1, 1, Hq]`,
    /// f32.
    pub d_sinks: Option<Tensor<f32>>,
    /// With `alibi: given`: the gradient of each head's slope, `[1, 1, 1, Hq]`, f32.
    pub d_alibi_slopes: Option<Tensor<f32>>,
    /// The gradient of each declared `f32` input the backward differentiates
    /// ([`VariantSpec::learnable`]), in declaration order, by name: `[1, 1, 1, n]` with `n` its
    /// length (its values, row-major: sequences, heads, then the table's inner count or
    /// positions), f32.
    pub d_inputs: Vec<(&'static str, Tensor<f32>)>,
}

/// Query rows (and keys) per cube of the backward kernels where shared memory allows.
const BLOCK: u32 = 64;

/// The gradients of variant `V`'s attention of Q, K and V with run-time `inputs`, given the
/// forward's output `out` (O and its LSE, as [`crate::forward`] returned them) and the gradient
/// of the loss with respect to O, `d_out` (`[B, Hq, Nq, Dv]`, any strides contiguous in the head
/// dim). Every input is checked before anything is launched.
///
/// **Determinism.** On Hopper the tuner may pick a plan that sums dQ with atomics
/// ([`DqSum::Atomic`]: dQ's low bits vary with the order of the additions) or one that splits
/// long dK/dV walks ([`BackwardPlan::kv_splits`]: dK's and dV's do). With
/// [`set_deterministic`]`(true)` (or `ATTN_DETERMINISTIC=1`) only
/// the plans whose every gradient has the same bits on every run are used, tuned on their own.
///
/// A variant's own score expression is differentiated by the macro ([`crate::Hooks::score_grad`],
/// [`crate::Hooks::score_input_grad`]); the run-time inputs get their gradients too: sink
/// logits ([`Grads::d_sinks`]), given ALiBi slopes ([`Grads::d_alibi_slopes`]) and every declared
/// `f32` input ([`Grads::d_inputs`]), each summed over the pairs in a fixed order.
///
/// The plan (kernel family and tile) is tuned per device like the forward's tile shape
/// ([`crate::tune::Policy`]; the first call of a key times [`backward_plans()`] unless the policy
/// says otherwise; a pick stays only when it beats the default plan beyond the spread).
pub fn backward<V: Variant>(
    client: &ComputeClient,
    q: &Tensor<V::Elem>,
    k: &Tensor<V::Elem>,
    v: &Tensor<V::Elem>,
    out: &Output<V::Elem>,
    d_out: &Tensor<V::Elem>,
    inputs: &Inputs,
) -> Result<Grads<V::Elem>, AttnError> {
    let (problem, packed, _) = checked::<V>(client, [q, k, v], out, d_out, inputs)?;
    // The plans that run on these operands: the warpgroup kernels read them through the copy
    // engine.
    let readable = [q, k, v, d_out].iter().all(|t| copy_engine_can_read(t));
    let plans = tuned_plans(client, &V::SPEC, readable);
    if plans.is_empty() {
        let plan = backward_plan(client, &V::SPEC)?;
        return run::<V>(client, [q, k, v], out, d_out, inputs, plan);
    }
    crate::tune::backward_tuned::<V>(
        client,
        crate::tune::BackwardCall {
            qkv: [q, k, v],
            out,
            d_out,
            inputs,
            problem: &problem,
            packed: &packed,
        },
        &plans,
        readable,
    )
}

/// [`backward()`] with a given plan (one of [`backward_plans()`]): for benchmarks and tuning.
pub fn backward_with_plan<V: Variant>(
    client: &ComputeClient,
    qkv: [&Tensor<V::Elem>; 3],
    out: &Output<V::Elem>,
    d_out: &Tensor<V::Elem>,
    inputs: &Inputs,
    plan: BackwardPlan,
) -> Result<Grads<V::Elem>, AttnError> {
    if !backward_plans(client, &V::SPEC).contains(&plan) {
        let per_position = learn_config(&V::SPEC).is_ok_and(|l| l.regions() > 0);
        let why = if per_position && plan.family != Family::Portable {
            "sums learnable `seq` tables' gradients (only the portable plans do)"
        } else {
            "runs on this device"
        };
        return Err(AttnError::Unsupported(format!(
            "{}: backward plan {plan} is not one of this variant's plans that {why}",
            V::SPEC.name
        )));
    }
    run::<V>(client, qkv, out, d_out, inputs, plan)
}

/// The plans `backward` chooses among for operands the copy engine reads (`readable`) or not: the
/// tiles of the fastest family that runs them, its default first (the slower families are
/// several times slower each: timing them only lengthens tuning).
pub(crate) fn tuned_plans(
    client: &ComputeClient,
    spec: &VariantSpec,
    readable: bool,
) -> Vec<BackwardPlan> {
    let mut plans: Vec<BackwardPlan> = backward_plans(client, spec)
        .into_iter()
        .filter(|p| p.family != Family::Warpgroup || readable)
        .filter(|p| p.same_bits() || !deterministic())
        .collect();
    if let Some(first) = plans.first().map(|p| p.family) {
        plans.retain(|p| p.family == first);
    }
    plans
}

/// A backward call's problem and packed inputs, every input checked against the variant and the
/// device (nothing launched): what every plan needs.
fn checked<V: Variant>(
    client: &ComputeClient,
    [q, k, v]: [&Tensor<V::Elem>; 3],
    out: &Output<V::Elem>,
    d_out: &Tensor<V::Elem>,
    inputs: &Inputs,
) -> Result<(Problem, Packed, AddressType), AttnError> {
    let spec = &V::SPEC;
    let problem = Problem::new(spec, q, k, v)?;
    let packed = pack(spec, &problem, inputs)?;
    if !supports::<V::Elem>(client) {
        return Err(unsupported_dtype(spec));
    }
    check_output(&problem, out)?;
    check_gradient(&problem, d_out)?;
    backward_tiling(client, spec)?;
    learn_config(spec)?;
    // The dK/dV kernel's units walk every query row of their group (and stage each block's rows
    // in a few loops), the dQ kernel's every key.
    let walked = (problem.group * problem.seq_q).max(problem.seq_k);
    check_loop_budget_for(client, 4 * walked + 64, "this backward call")?;
    // The gradients and dQ's f32 sums take the operands' shapes.
    let grads = [q, k, v].map(|t| t.shape().iter().product::<usize>());
    let address = offsets(
        client,
        &[
            q.buffer_len(),
            k.buffer_len(),
            v.buffer_len(),
            d_out.buffer_len(),
            out.o.buffer_len(),
            out.lse.tensor.buffer_len(),
            grads[0],
            grads[1],
            grads[2],
        ],
    )?;
    Ok((problem, packed, address))
}

/// The backward pass with `plan`, one of [`backward_plans()`]: every input checked, then launched.
pub(crate) fn run<V: Variant>(
    client: &ComputeClient,
    [q, k, v]: [&Tensor<V::Elem>; 3],
    out: &Output<V::Elem>,
    d_out: &Tensor<V::Elem>,
    inputs: &Inputs,
    plan: BackwardPlan,
) -> Result<Grads<V::Elem>, AttnError> {
    let spec = &V::SPEC;
    let (problem, packed, address) = checked::<V>(client, [q, k, v], out, d_out, inputs)?;
    if plan.family == Family::Warpgroup && ![q, k, v, d_out].iter().all(|t| copy_engine_can_read(t))
    {
        return Err(AttnError::Unsupported(format!(
            "{}: backward plan {plan} needs operands the copy engine can read (16-byte aligned \
             strides and start)",
            spec.name
        )));
    }
    // The portable tile: the whole pass on the portable family, or its dQ kernel where the
    // learnable inputs' gradients ride on it.
    let tiling = backward_tiling(client, spec)?;

    // The kernels write every row of a sequence (zeros where no pair reaches it); rows outside
    // every sequence (outside every document, keys past a sequence's length) are zeroed first.
    let (q_covered, k_covered) = covered_rows(spec, &problem, &packed);
    let gradient = |shape: [usize; 4], covered: bool| match covered {
        true => Tensor::empty(client, shape),
        false => device_zeros::<V::Elem>(client, shape, address),
    };
    let learn = learn_config(spec)?;
    // Where the dK/dV kernel sums dQ, the last pass writes every element of it (zero where no
    // key was added).
    let mut grads = Grads {
        dq: gradient(q.shape(), q_covered || plan.dq == DqSum::Atomic),
        dk: gradient(k.shape(), k_covered || plan.kv_splits > 1),
        dv: gradient(v.shape(), k_covered || plan.kv_splits > 1),
        d_sinks: spec
            .score
            .sinks
            .then(|| {
                Tensor::<f32>::from_slice(
                    client,
                    &vec![0.0; problem.heads_q],
                    [1, 1, 1, problem.heads_q],
                )
            })
            .transpose()?,
        d_alibi_slopes: None,
        d_inputs: Vec::new(),
    };
    // The learnable inputs' gradients, zero until the kernels sum them: which slots each sums,
    // and how many values it holds (the slopes last).
    let mut learned_slots: Vec<Learned> = learn.inputs[..learn.count as usize].to_vec();
    if learn.alibi {
        learned_slots.push(Learned {
            decl: u32::MAX,
            table: false,
            outer: 2,
            width: 1,
            first: learn.slots() as u32 - 1,
        });
    }
    let positions = crate::inputs::positions(&problem);
    let learned_len = |l: &Learned| {
        let rows = match l.outer {
            0 => 1,
            1 => packed.sequences,
            2 => problem.heads_q,
            _ => packed.sequences * problem.heads_q,
        };
        // A `seq` table's values: one per position.
        rows * if l.width == 0 {
            positions
        } else {
            l.width as usize
        }
    };
    let mut learned = Vec::new();
    for l in &learned_slots {
        let len = learned_len(l);
        learned.push(device_zeros::<f32>(client, [1, 1, 1, len], address));
    }
    let attach = |grads: &mut Grads<V::Elem>, mut learned: Vec<Tensor<f32>>| {
        if learn.alibi {
            grads.d_alibi_slopes = learned.pop();
        }
        let names = (0..spec.inputs.len()).filter(|&i| spec.learnable(i));
        grads.d_inputs = names.map(|i| spec.inputs[i].name).zip(learned).collect();
    };
    if packed.max_seq_q == 0 {
        attach(&mut grads, learned);
        return Ok(grads);
    }
    let max_seq_k = (0..packed.sequences)
        .map(|s| packed.sequence(spec, &problem, s).3)
        .max()
        .unwrap_or(0);
    let delta = Tensor::<f32>::empty(client, [problem.batch, problem.heads_q, problem.seq_q, 1]);
    let config = prefill_config(spec, tiling);
    let args = || kernel_args(spec, &problem);
    let (ints, floats) = upload_inputs(client, &packed);
    // SAFETY (every `tensor_arg`): Q, K and V were checked against their buffers by
    // `Problem::new`, O and the LSE by `check_output`, dO by `check_gradient`; the gradients and
    // `delta` were created with their shapes.
    // SAFETY: as above.
    unsafe { launch_delta(client, [&out.o, d_out], &delta, address) };
    let operands = || unsafe {
        BackwardOperandsLaunch::new(
            tensor_arg(q),
            tensor_arg(k),
            tensor_arg(v),
            tensor_arg(d_out),
            tensor_arg(&out.lse.tensor),
            tensor_arg(&delta),
        )
    };
    tracing::debug!(variant = spec.name, %plan, "backward launch");
    let tensor_cores = plan.family == Family::TensorCores;
    let tc_shape = |keys: bool| BackwardShape {
        config: prefill_config(spec, plan.tile.tiling(keys)),
        keys,
        atomic_dq: false,
        learn: LearnConfig::default(),
        splits: 1,
    };
    let tc_cube = CubeDim::new_2d(32, plan.tile.resident / MMA as u32);
    // The dQ kernel that runs: the warpgroup one (unless dK/dV sums dQ), else the tensor-core
    // one, or the portable one where learnable inputs' gradients are summed. Its grid, which
    // the learnable inputs' partial sums follow.
    let wg_dq = plan.family == Family::Warpgroup && plan.dq != DqSum::Atomic;
    let dq_rows = if wg_dq {
        plan.tile.resident
    } else {
        tiling.block_q
    };
    let dq_grid = Grid {
        x: packed.max_seq_q.div_ceil(dq_rows as usize) as u32,
        y: problem.heads_q as u32,
        z: packed.sequences as u32,
    };
    let cubes = (dq_grid.x * dq_grid.y * dq_grid.z) as usize;
    // Zeroed on the device (a cube past its sequence's queries writes none of its partials).
    let partials = device_zeros::<f32>(client, [1, 1, 1, (learn.slots() * cubes).max(1)], address);
    // The per-position sums of learnable `seq` tables' reads (zeroed: positions no row or key
    // reaches stay 0), `[regions, sequences, Hq, positions]`.
    let position_shape = [
        learn.regions(),
        packed.sequences,
        problem.heads_q,
        positions,
    ];
    let position_sums = match learn.regions() {
        0 => Tensor::<f32>::empty(client, [1, 1, 1, 1]),
        _ => device_zeros::<f32>(client, position_shape, address),
    };
    if plan.family == Family::Warpgroup {
        let resident = plan.tile.resident;
        // SAFETY: as above; every map describes a checked operand.
        let maps = |keys: bool| unsafe {
            let tiling = plan.tile.tiling(keys);
            let (q_rows, kv_rows) = (tiling.block_q, tiling.block_kv);
            BackwardMapsLaunch::new(
                tma_map(q, q_rows),
                tma_map(k, kv_rows),
                tma_map(v, kv_rows),
                tma_map(d_out, q_rows),
                tensor_arg(&out.lse.tensor),
                tensor_arg(&delta),
            )
        };
        let wg_cube = CubeDim::new_1d(resident / 64 * WARPGROUP_UNITS as u32);
        // dQ summed by the dK/dV kernel: f32 sums of Q's shape, zeroed (a one-element stand-in
        // otherwise, never written).
        let atomic = plan.dq == DqSum::Atomic;
        // Split walks: dK and dV summed in f32, zeroed (stand-ins otherwise, never written).
        let splits = plan.kv_splits as usize;
        let sums = |shape: [usize; 4], used: bool| match used {
            true => device_zeros::<f32>(client, shape, address),
            false => Tensor::<f32>::empty(client, [1, 1, 1, 1]),
        };
        let (dq_sums, dk_sums, dv_sums) = (
            sums(q.shape(), atomic),
            sums(k.shape(), splits > 1),
            sums(v.shape(), splits > 1),
        );
        backward_dkdv_wg::launch::<V::Elem, V::Hooks>(
            client,
            CubeCount::Static(
                (max_seq_k.div_ceil(resident as usize) * splits) as u32,
                problem.heads_kv as u32,
                packed.sequences as u32,
            ),
            wg_cube,
            address,
            maps(true),
            unsafe { KvGradsLaunch::new(tensor_arg(&grads.dk), tensor_arg(&grads.dv)) },
            unsafe {
                SumsLaunch::new(
                    tensor_arg(&dq_sums),
                    tensor_arg(&dk_sums),
                    tensor_arg(&dv_sums),
                )
            },
            unsafe { run_inputs(&ints, &floats, &packed) },
            args(),
            BackwardShape {
                config: prefill_config(spec, plan.tile.tiling(true)),
                keys: true,
                atomic_dq: atomic,
                learn: LearnConfig::default(),
                splits,
            },
        );
        // The gradients from their sums: dQ scaled here, dK already as it was added.
        let from_sums = |sums: &Tensor<f32>, grad: &Tensor<V::Elem>, factor: f32| {
            backward_from_sums::launch::<V::Elem>(
                client,
                grid(sums.shape().iter().product(), ELEMENTWISE_UNITS),
                CubeDim::new_1d(ELEMENTWISE_UNITS),
                address,
                // SAFETY: both created with the same shape, contiguous.
                unsafe { tensor_arg(sums) },
                unsafe { tensor_arg(grad) },
                factor,
                ELEMENTWISE_UNITS,
            )
        };
        if splits > 1 {
            from_sums(&dk_sums, &grads.dk, 1.0);
            from_sums(&dv_sums, &grads.dv, 1.0);
        }
        if atomic {
            from_sums(&dq_sums, &grads.dq, spec.softmax_scale() as f32);
        } else {
            backward_dq_wg::launch::<V::Elem, V::Hooks>(
                client,
                CubeCount::Static(dq_grid.x, dq_grid.y, dq_grid.z),
                wg_cube,
                address,
                maps(false),
                unsafe { QueryGradsLaunch::new(tensor_arg(&grads.dq), tensor_arg(&partials)) },
                unsafe { run_inputs(&ints, &floats, &packed) },
                args(),
                BackwardShape {
                    config: prefill_config(spec, plan.tile.tiling(false)),
                    keys: false,
                    atomic_dq: false,
                    learn,
                    splits: 1,
                },
            );
        }
    } else if tensor_cores {
        backward_dkdv_tc::launch::<V::Elem, V::Hooks>(
            client,
            CubeCount::Static(
                max_seq_k.div_ceil(plan.tile.resident as usize) as u32,
                problem.heads_kv as u32,
                packed.sequences as u32,
            ),
            tc_cube,
            address,
            operands(),
            unsafe { KvGradsLaunch::new(tensor_arg(&grads.dk), tensor_arg(&grads.dv)) },
            unsafe { run_inputs(&ints, &floats, &packed) },
            args(),
            tc_shape(true),
        );
    } else {
        backward_dkdv::launch::<V::Elem, V::Hooks>(
            client,
            CubeCount::Static(
                max_seq_k.div_ceil(tiling.block_kv as usize) as u32,
                problem.heads_kv as u32,
                packed.sequences as u32,
            ),
            CubeDim::new_1d(tiling.block_kv),
            address,
            operands(),
            unsafe { KvGradsLaunch::new(tensor_arg(&grads.dk), tensor_arg(&grads.dv)) },
            unsafe { tensor_arg(&position_sums) },
            unsafe { run_inputs(&ints, &floats, &packed) },
            args(),
            BackwardShape::portable(config, true, learn),
        );
    }
    // Without learnable inputs, the fast families' own dQ kernel (the warpgroup one ran beside
    // its dK/dV kernel above, summing the learnable inputs' gradients too); otherwise the
    // portable one, which sums them.
    if wg_dq || (tensor_cores && learn.slots() == 0) {
        if tensor_cores {
            backward_dq_tc::launch::<V::Elem, V::Hooks>(
                client,
                CubeCount::Static(
                    packed.max_seq_q.div_ceil(plan.tile.resident as usize) as u32,
                    problem.heads_q as u32,
                    packed.sequences as u32,
                ),
                tc_cube,
                address,
                operands(),
                unsafe { tensor_arg(&grads.dq) },
                unsafe { run_inputs(&ints, &floats, &packed) },
                args(),
                tc_shape(false),
            );
        }
    } else {
        backward_dq::launch::<V::Elem, V::Hooks>(
            client,
            CubeCount::Static(dq_grid.x, dq_grid.y, dq_grid.z),
            CubeDim::new_1d(tiling.block_q),
            address,
            operands(),
            unsafe { QueryGradsLaunch::new(tensor_arg(&grads.dq), tensor_arg(&partials)) },
            unsafe { tensor_arg(&position_sums) },
            unsafe { run_inputs(&ints, &floats, &packed) },
            args(),
            BackwardShape::portable(config, false, learn),
        );
    }
    // Each learnable input's gradient from the cubes' partials (or a `seq` table's from the
    // per-position sums of its reads), element by element.
    // (`learned_slots` follows `learn.inputs`, the slopes last.)
    for (g, (l, out)) in learned_slots.iter().zip(&learned).enumerate() {
        const UNITS: u32 = 64;
        if l.width == 0 {
            backward_positions::launch(
                client,
                CubeCount::Static((learned_len(l) as u32).div_ceil(UNITS), 1, 1),
                CubeDim::new_1d(UNITS),
                unsafe { tensor_arg(&position_sums) },
                unsafe { tensor_arg(out) },
                GridLaunch::new(
                    positions as u32,
                    problem.heads_q as u32,
                    packed.sequences as u32,
                ),
                *l,
                learn.regions_of(g),
            );
            continue;
        }
        backward_learned::launch(
            client,
            CubeCount::Static((learned_len(l) as u32).div_ceil(UNITS), 1, 1),
            CubeDim::new_1d(UNITS),
            unsafe { tensor_arg(&partials) },
            unsafe { tensor_arg(out) },
            GridLaunch::new(dq_grid.x, dq_grid.y, dq_grid.z),
            *l,
        );
    }
    if let Some(d_sinks) = &grads.d_sinks {
        let stats = unsafe {
            SinkStatsLaunch::new(
                tensor_arg(&out.lse.tensor),
                tensor_arg(&delta),
                packed.sequences as u32,
            )
        };
        backward_sinks::launch(
            client,
            CubeCount::Static(problem.heads_q as u32, 1, 1),
            CubeDim::new_1d(SINK_UNITS),
            stats,
            unsafe { tensor_arg(d_sinks) },
            unsafe { run_inputs(&ints, &floats, &packed) },
            args(),
            SinkConfig {
                mask: spec.mask,
                score: spec.score.flags(),
            },
        );
    }
    attach(&mut grads, learned);
    Ok(grads)
}

/// The tile of the tensor-core backward kernels: each cube keeps `resident` rows of one side in
/// shared memory (keys in the dK/dV kernel, query rows in the dQ kernel; one plane per 16) and
/// streams the other side past them `streamed` rows at a time (`dq_streamed` keys in the dQ
/// kernel, whose registers hold one accumulator fewer).
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct BackwardTile {
    /// Resident rows per cube.
    pub resident: u32,
    /// Streamed rows per step.
    pub streamed: u32,
    /// Keys per step of the dQ kernel.
    pub dq_streamed: u32,
}

/// How a backward plan sums dQ over the keys.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub enum DqSum {
    /// A kernel of its own walks the keys of each query block: the same bits on every run, at
    /// the cost of computing `S` and `dP` a second time.
    Kernel,
    /// The warpgroup dK/dV kernel adds each block's dQ into f32 sums with atomics (Hopper): `S`
    /// and `dP` once, but the order of the additions, so dQ's low bits, vary from run to run.
    Atomic,
}

/// How a backward call runs: the kernel family (portable, or the tensor-core kernels), its tile
/// (the portable family's: `resident = streamed =` its block) and how dQ is summed.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct BackwardPlan {
    /// The kernel family.
    pub family: Family,
    /// The tile.
    pub tile: BackwardTile,
    /// How dQ is summed.
    pub dq: DqSum,
    /// Cubes per block of keys in the warpgroup dK/dV kernel (1 elsewhere): with more, a walk
    /// of at least [`MIN_SPLIT_STEPS`](crate::kernels::backward::MIN_SPLIT_STEPS) steps a cube
    /// is split between them and their dK and dV summed in f32 with atomics (so the low bits of
    /// dK and dV vary from run to run).
    pub kv_splits: u32,
}

impl BackwardPlan {
    /// Whether every gradient has the same bits on every run: no atomics add into dQ, dK or
    /// dV.
    pub const fn same_bits(&self) -> bool {
        matches!(self.dq, DqSum::Kernel) && self.kv_splits == 1
    }
}

/// Cubes per block of keys of the split plans (`…_x4`).
pub const KV_SPLITS: u32 = 4;

impl BackwardTile {
    /// The prefill tiling of one of the two kernels: the dK/dV kernel's (`keys`: `block_kv`
    /// resident keys, `block_q` streamed query rows) or the dQ kernel's (the other way round).
    pub const fn tiling(&self, keys: bool) -> Tiling {
        if keys {
            Tiling {
                block_q: self.streamed,
                block_kv: self.resident,
            }
        } else {
            Tiling {
                block_q: self.resident,
                block_kv: self.dq_streamed,
            }
        }
    }
}

impl std::fmt::Display for BackwardPlan {
    /// `wg_r64_s32_q128`, `tc_r64_s32`, `portable_r64_s64` (the dQ kernel's keys per step
    /// named where they differ), `wg_r128_s32_atomic` (dQ summed with atomics),
    /// `wg_r64_s32_q64_x4` (long dK/dV walks split four ways).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.tile;
        write!(
            f,
            "{}_r{}_s{}",
            self.family.short_name(),
            t.resident,
            t.streamed
        )?;
        if self.dq == DqSum::Atomic {
            write!(f, "_atomic")?;
        } else if t.dq_streamed != t.streamed {
            write!(f, "_q{}", t.dq_streamed)?;
        }
        if self.kv_splits > 1 {
            write!(f, "_x{}", self.kv_splits)?;
        }
        Ok(())
    }
}

/// The warpgroup tiles (resident, streamed, the dQ kernel's streamed): 64 resident rows per
/// warpgroup, one or two warpgroups, 32 or 64 streamed rows, 64 or 128 keys per step of the dQ
/// kernel. The default comes first: measured on an H100 (`bench --backward`, RESULTS.md,
/// 2026-12-07, every row of the backward table), one warpgroup streaming 64 query rows (64 keys
/// per dQ step) at head dim 128, and 32 at head dim 64 ([`wg_tiles`]).
const WG_TILES: [(u32, u32, u32); 6] = [
    (64, 64, 64),
    (64, 32, 64),
    (128, 32, 128),
    (64, 32, 128),
    (64, 64, 128),
    (128, 64, 128),
];

/// `family`'s first plan for `spec` before any device is asked (the tile it would try first):
/// what the snapshots record. The portable family's is its 64-row block.
pub fn first_plan(family: Family, spec: &VariantSpec) -> BackwardPlan {
    let (resident, streamed, dq_streamed) = match family {
        Family::Warpgroup => wg_tiles(spec.head_dim)[0],
        Family::TensorCores => (TC_TILES[0].0, TC_TILES[0].1, TC_TILES[0].1),
        Family::Portable => (BLOCK, BLOCK, BLOCK),
    };
    BackwardPlan {
        family,
        tile: BackwardTile {
            resident,
            streamed,
            dq_streamed,
        },
        dq: DqSum::Kernel,
        kv_splits: 1,
    }
}

/// [`WG_TILES`] in the order tried for head dim `head_dim`: at 64, the one-warpgroup tile first.
fn wg_tiles(head_dim: u32) -> Vec<(u32, u32, u32)> {
    let mut tiles = WG_TILES.to_vec();
    if head_dim <= 64 {
        tiles.swap(0, 1);
    }
    tiles
}

/// The tensor-core tiles, the default first: 64 resident rows (four planes) against 32 streamed
/// keep two cubes' shared memory on one Hopper SM at head dim 128.
const TC_TILES: [(u32, u32); 4] = [(64, 32), (64, 64), (128, 32), (128, 64)];

/// Every plan that runs `spec`'s backward pass on this device, the default first: on Hopper the
/// warpgroup kernels (f16 and bf16, head dims 64 and 128, operands the copy engine can read), the
/// tensor-core kernels where the device has them for the dtype, head dims are multiples of 16
/// and `head_dim + value_dim <= 256` (the dK and dV accumulators stay in registers), capped by
/// `ATTN_ENGINE` like the forward; the portable kernels always.
pub fn backward_plans(client: &ComputeClient, spec: &VariantSpec) -> Vec<BackwardPlan> {
    let mut plans = Vec::new();
    let mma = MMA as u32;
    let half_panels = |d: u32| d == 64 || d == 128;
    // Learnable `seq` tables are summed per position by the portable kernels alone.
    let per_position = learn_config(spec).is_ok_and(|l| l.regions() > 0);
    let wg_fits = family_cap().rank() >= Family::Warpgroup.rank()
        && !per_position
        && half_panels(spec.head_dim)
        && half_panels(spec.value_dim);
    if wg_fits {
        // The two-kernel plans, then each (resident, streamed) tile once more with dQ summed by
        // the dK/dV kernel (not where learnable inputs' gradients ride on the dQ kernel), then
        // each two-kernel tile with long dK/dV walks split.
        let sums_here = learn_config(spec).is_ok_and(|l| l.slots() == 0);
        let mut tiles: Vec<(BackwardTile, DqSum, u32)> = Vec::new();
        for (resident, streamed, dq_streamed) in wg_tiles(spec.head_dim) {
            let tile = BackwardTile {
                resident,
                streamed,
                dq_streamed,
            };
            tiles.push((tile, DqSum::Kernel, 1));
        }
        for (resident, streamed, _) in wg_tiles(spec.head_dim) {
            let tile = BackwardTile {
                resident,
                streamed,
                dq_streamed: streamed,
            };
            if sums_here && !tiles.contains(&(tile, DqSum::Atomic, 1)) {
                tiles.push((tile, DqSum::Atomic, 1));
            }
        }
        for (resident, streamed, dq_streamed) in wg_tiles(spec.head_dim) {
            let tile = BackwardTile {
                resident,
                streamed,
                dq_streamed,
            };
            tiles.push((tile, DqSum::Kernel, KV_SPLITS));
        }
        for (tile, dq, kv_splits) in tiles {
            let atomic = dq == DqSum::Atomic;
            // The dK/dV kernel, and the dQ kernel where it runs.
            let kernels: &[bool] = if atomic { &[true] } else { &[true, false] };
            let fits = kernels.iter().all(|&keys| {
                let shape = BackwardShape {
                    config: prefill_config(spec, tile.tiling(keys)),
                    keys,
                    atomic_dq: atomic,
                    learn: LearnConfig::default(),
                    splits: kv_splits as usize,
                };
                let units = shape.warpgroups() as u32 * WARPGROUP_UNITS as u32;
                // Only whether it fits matters here: no message is built.
                let ns = [
                    tile.streamed,
                    tile.dq_streamed,
                    spec.head_dim,
                    spec.value_dim,
                ];
                warpgroup_unfit(client, spec, &ns).is_none()
                    && cube_limits(client, "", units, shape.warpgroup_bytes()).is_none()
            });
            if fits {
                plans.push(BackwardPlan {
                    family: Family::Warpgroup,
                    tile,
                    dq,
                    kv_splits,
                });
            }
        }
    }
    let tc_fits = family_cap().rank() >= Family::TensorCores.rank()
        && !per_position
        && tensor_cores_unfit(client, spec).is_none()
        && spec.head_dim.is_multiple_of(mma)
        && spec.value_dim.is_multiple_of(mma)
        && spec.head_dim + spec.value_dim <= 256;
    if tc_fits {
        for (resident, streamed) in TC_TILES {
            let tile = BackwardTile {
                resident,
                streamed,
                dq_streamed: streamed,
            };
            let fits = [true, false].iter().all(|&keys| {
                let shape = BackwardShape {
                    config: prefill_config(spec, tile.tiling(keys)),
                    keys,
                    atomic_dq: false,
                    learn: LearnConfig::default(),
                    splits: 1,
                };
                cube_limits(
                    client,
                    "",
                    32 * shape.planes() as u32,
                    shape.tensor_core_bytes(),
                )
                .is_none()
            });
            if fits {
                plans.push(BackwardPlan {
                    family: Family::TensorCores,
                    tile,
                    dq: DqSum::Kernel,
                    kv_splits: 1,
                });
            }
        }
    }
    if let Ok(tiling) = backward_tiling(client, spec) {
        plans.push(BackwardPlan {
            family: Family::Portable,
            tile: BackwardTile {
                resident: tiling.block_q,
                streamed: tiling.block_kv,
                dq_streamed: tiling.block_kv,
            },
            dq: DqSum::Kernel,
            kv_splits: 1,
        });
    }
    plans
}

/// The plan [`backward()`] runs: the first of [`backward_plans()`]; the error says why no
/// kernel fits.
pub fn backward_plan(
    client: &ComputeClient,
    spec: &VariantSpec,
) -> Result<BackwardPlan, AttnError> {
    match backward_plans(client, spec).first() {
        Some(plan) => Ok(*plan),
        None => Err(backward_tiling(client, spec).err().unwrap_or_else(|| {
            AttnError::Unsupported(format!("{}: no backward kernel fits", spec.name))
        })),
    }
}

/// dO must have O's shape and be a view inside its buffer, contiguous in the head dim.
fn check_gradient<E: Element>(problem: &Problem, d_out: &Tensor<E>) -> Result<(), AttnError> {
    const DIMS: [Dim; 4] = [Dim::Batch, Dim::Heads, Dim::Seq, Dim::HeadDim];
    let expected = problem.out_shape();
    for (i, dim) in DIMS.into_iter().enumerate() {
        if d_out.shape()[i] != expected[i] {
            return Err(AttnError::DimMismatch {
                operand: Operand::DOut,
                dim,
                expected: expected[i],
                found: d_out.shape()[i],
                why: "the output's gradient follows the output's shape",
            });
        }
    }
    check_view(
        Operand::DOut,
        d_out.shape(),
        d_out.strides(),
        d_out.buffer_len(),
    )
}

/// The backward kernels' tile: `block_q` query rows (dQ cubes, and the dK/dV kernel's staged
/// query block) and `block_kv` keys, 64 each, halved until both kernels' f32 tiles fit the
/// device's shared memory.
pub fn backward_tiling(client: &ComputeClient, spec: &VariantSpec) -> Result<Tiling, AttnError> {
    let hw = &client.properties().hardware;
    let width = (spec.head_dim + spec.value_dim) as usize;
    let fits = |block: u32| {
        let staged = block as usize * (width + 2) * 4;
        staged <= hw.max_shared_memory_size && block <= hw.max_units_per_cube
    };
    let mut block = BLOCK;
    while block > 1 && !fits(block) {
        block /= 2;
    }
    if !fits(block) || is_cpu_emulated(client) && block < 4 {
        return Err(AttnError::Unsupported(format!(
            "{}: the backward tiles do not fit {} bytes of shared memory",
            spec.name, hw.max_shared_memory_size
        )));
    }
    Ok(Tiling {
        block_q: block,
        block_kv: block,
    })
}

/// Whether the kernels write every row of dQ, and of dK and dV: each sequence's rows are written
/// and sequences never overlap, so the rows are covered when the sequences' lengths add up to
/// the tensors' (not so where documents leave rows out or key lengths end early), and some
/// query row exists (else no kernel runs).
fn covered_rows(spec: &VariantSpec, problem: &Problem, packed: &Packed) -> (bool, bool) {
    if packed.max_seq_q == 0 {
        return (false, false);
    }
    let (q, k) = (0..packed.sequences)
        .map(|s| packed.sequence(spec, problem, s))
        .fold((0, 0), |(q, k), (_, seq_q, _, seq_k)| {
            (q + seq_q, k + seq_k)
        });
    // Packed documents are one batch entry.
    (
        q == problem.batch * problem.seq_q,
        k == problem.batch * problem.seq_k,
    )
}

/// A contiguous tensor of `shape` filled with zeros by a kernel (nothing uploaded).
fn device_zeros<E: Element>(
    client: &ComputeClient,
    shape: [usize; 4],
    address: AddressType,
) -> Tensor<E> {
    let t = Tensor::empty(client, shape);
    zero_fill(client, &t, address);
    t
}

/// Fills the contiguous `t` with zeros, a vector per unit.
fn zero_fill<E: Element>(client: &ComputeClient, t: &Tensor<E>, address: AddressType) {
    let elements: usize = t.shape().iter().product();
    let width = vector_width(client, elements, &[t]);
    let count = grid(elements / width, ELEMENTWISE_UNITS);
    let dim = CubeDim::new_1d(ELEMENTWISE_UNITS);
    // SAFETY: `t` was created with its shape, contiguous; `width` divides its length and start.
    backward_zero::launch::<E>(client, count, dim, address, width, unsafe { tensor_arg(t) });
}

/// `D = rowsum(dO ∘ O)` into `delta` (`[B, Hq, Nq, 1]`), read in the widest vectors both allow.
///
/// # Safety
/// O and dO were checked against their buffers; `delta` was created with its shape.
unsafe fn launch_delta<E: Element>(
    client: &ComputeClient,
    [o, d_out]: [&Tensor<E>; 2],
    delta: &Tensor<f32>,
    address: AddressType,
) {
    let [b, h, n, value_dim] = o.shape();
    let width = vector_width(client, value_dim, &[o, d_out]);
    let shape = DeltaShape::new(value_dim, width);
    let count = grid(b * h * n * shape.lanes, ELEMENTWISE_UNITS);
    let dim = CubeDim::new_1d(ELEMENTWISE_UNITS);
    backward_delta::launch::<E>(
        client,
        count,
        dim,
        address,
        width,
        unsafe { tensor_arg(o) },
        unsafe { tensor_arg(d_out) },
        unsafe { tensor_arg(delta) },
        shape,
    );
}

/// The widest vector — 8, 4, 2 or 1 elements, at most 16 bytes and the device's widest — that
/// divides `last` (the extent read in vectors) and every tensor's start and strides but the last
/// (which is 1).
fn vector_width<E: Element>(client: &ComputeClient, last: usize, tensors: &[&Tensor<E>]) -> usize {
    let elem = std::mem::size_of::<E>();
    let most = client.properties().hardware.max_vector_size.min(16 / elem);
    [8, 4, 2]
        .into_iter()
        .find(|&w| {
            w <= most
                && last.is_multiple_of(w)
                && tensors.iter().all(|t| {
                    let start = t.handle().offset_start.unwrap_or(0) as usize;
                    start.is_multiple_of(w * elem)
                        && t.strides()[..3].iter().all(|s| s.is_multiple_of(w))
                })
        })
        .unwrap_or(1)
}

/// Which run-time inputs get gradients: the learnable declared inputs (at most
/// [`MAX_LEARNED`], [`MAX_LEARNED_SLOTS`] values per cube in all) and given ALiBi slopes.
pub(crate) fn learn_config(spec: &VariantSpec) -> Result<LearnConfig, AttnError> {
    let mut learn = LearnConfig {
        alibi: spec.score.alibi == Some(Alibi::Given),
        read_of: [MAX_LEARNED as u32; MAX_READS],
        ..LearnConfig::default()
    };
    let too_many = |what: String| {
        AttnError::Unsupported(format!(
            "{}: the backward pass computes the gradients of {what}",
            spec.name
        ))
    };
    let mut first = 0u32;
    for (i, decl) in spec.inputs.iter().enumerate() {
        if !spec.learnable(i) {
            continue;
        }
        let g = learn.count as usize;
        if g == MAX_LEARNED {
            return Err(too_many(format!("at most {MAX_LEARNED} f32 inputs")));
        }
        let shape = decl.shape;
        let width = match shape.inner {
            Inner::Fixed(n) => n,
            Inner::Seq => 0,
            Inner::None => 1,
        };
        learn.inputs[g] = Learned {
            decl: i as u32,
            table: shape.is_table(),
            outer: u32::from(shape.per_batch) | (u32::from(shape.per_head) << 1),
            width,
            first,
        };
        first += width;
        learn.count += 1;
    }
    if learn.slots() > MAX_LEARNED_SLOTS {
        return Err(too_many(format!(
            "at most {MAX_LEARNED_SLOTS} values per batch entry and head in all (the tables' counts); {} here",
            learn.slots()
        )));
    }
    if spec.score_reads.len() > MAX_READS {
        return Err(too_many(format!(
            "score expressions of at most {MAX_READS} table reads; {} here",
            spec.score_reads.len()
        )));
    }
    learn.reads = spec.score_reads.len() as u32;
    for (r, read) in spec.score_reads.iter().enumerate() {
        if let Some(g) = learn.inputs[..learn.count as usize]
            .iter()
            .position(|l| l.decl == read.input)
        {
            learn.read_of[r] = g as u32;
            if spec.inputs[read.input as usize].shape.inner == Inner::Seq {
                learn.along[r] = match read.index {
                    ReadIndex::Query => ALONG_QUERY,
                    ReadIndex::Key => ALONG_KEY,
                    // `VariantSpec::learnable` keeps such tables out.
                    ReadIndex::Computed => 0,
                };
            }
        }
    }
    Ok(learn)
}

/// Whether [`backward()`] keeps to the plans whose gradients have the same bits on every run:
/// [`set_deterministic`]'s choice, else `ATTN_DETERMINISTIC` (`1` or `on`), else no.
pub fn deterministic() -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    match DETERMINISTIC.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => *FROM_ENV.get_or_init(|| {
            matches!(
                std::env::var("ATTN_DETERMINISTIC").as_deref(),
                Ok("1" | "on")
            )
        }),
    }
}

/// Keeps [`backward()`] to the plans whose gradients have the same bits on every run (`true`), or
/// lets it use the plans that sum dQ with atomics when they are faster (`false`, the default).
/// For the whole process, over `ATTN_DETERMINISTIC`; the two kinds of call are tuned apart.
pub fn set_deterministic(on: bool) {
    DETERMINISTIC.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// [`set_deterministic`]'s choice: 0 none, 1 on, 2 off.
static DETERMINISTIC: AtomicU8 = AtomicU8::new(0);
