//! burn tensors in and out (feature `burn`), zero-copy: a burn 0.23 `Tensor<4>` on a cubecl
//! device (wgpu, CUDA, …) shares its client and buffers with attn.
//!
//! Enabled with attn's feature `burn` together with `wgpu` or `cuda` (burn's cubecl runtimes).
//!
//! - [`to_attn`]: resolves the burn tensor (under fusion: submits the pending fused work that
//!   writes it, as a read does, without copying), checks dtype, rank, tiling and the head-dim
//!   stride, and wraps a clone of its cubecl `Handle` with its strides; `Layout::Bnhd` swaps the
//!   strides of dims 1 and 2.
//! - [`from_attn`]: wraps an attn tensor's handle as a burn tensor (contiguous or strided, as the
//!   attn view says). Under fusion it is registered with the fusion server through a zero-input
//!   custom operation, the mechanism `burn-backend-extension` uses for custom ops.
//! - [`attention`]: a declared variant on burn tensors, differentiable in burn's autodiff: on
//!   tensors that take part in a graph, the forward registers an operation whose backward runs
//!   attn's backward kernels ([`crate::backward()`]) and hands dQ, dK and dV to burn's gradients.
//!
//! Fusion on or off: the `burn` facade's default features turn burn-cubecl's `fusion` on
//! (`burn/default` -> `burn-tensor/default` -> `burn-dispatch/default` -> `burn-cubecl?/default`),
//! making burn's cubecl backend `burn_fusion::Fusion<CubeBackend>` (float primitive: a lazy
//! `FusionTensor`) instead of `CubeBackend` (float primitive: `CubeTensor`). [`CubeKind`] is
//! implemented for both, keyed on the backend type, so this module compiles either way.
//!
//! While attn holds a handle clone, `Handle::can_mut` is false, so burn never reuses the buffer in
//! place under a view. Ordering across streams (fusion runs its kernels on its own thread and
//! cubecl stream, attn launches on the caller's) is cubecl's: a handle records the stream that
//! wrote it, and binding it on another stream waits on that stream's event.

use super::Layout;
use crate::cubecl::zspace::metadata::Metadata;
use crate::inputs::{Inputs, OwnedInputs};
use crate::launch::Output;
use crate::tensor::contiguous_strides;
use crate::variant::{Alibi, InputType, Variant, VariantSpec};
use crate::{AttnError, ComputeClient, Element, Tensor};

use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn_autodiff::Autodiff;

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{Cube, CubeBackend, CubeDevice};
use burn_dispatch::DispatchDevice;
use burn_fusion::client::GlobalFusionClient;
use burn_fusion::custom::{CustomOpIr, HandleContainer, OperationIr, StreamId, TensorId, TensorIr};
use burn_fusion::{ExecutionError, Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_tensor::{DType, Device, Shape};

/// The burn this module is built against.
pub use burn_tensor;

/// burn's dtype for an attn element type.
pub fn burn_dtype<E: Element>() -> DType {
    match E::DTYPE {
        crate::DType::F32 => DType::F32,
        crate::DType::F16 => DType::F16,
        crate::DType::BF16 => DType::BF16,
    }
}

/// The cubecl device behind a burn device (an autodiff device answers for the one it wraps).
///
/// Errors: `Unsupported` for a device of another burn backend (Flex, remote, …).
pub fn cube_device(device: &Device) -> Result<CubeDevice, AttnError> {
    let device = device.clone().without_autodiff();
    #[allow(unreachable_patterns)] // Cube can be the only dispatch backend compiled in.
    match device.as_dispatch() {
        DispatchDevice::Cube(device) => Ok(device.clone()),
        other => Err(AttnError::Unsupported(format!(
            "burn device {other:?} is not a cubecl device (wgpu, CUDA, ROCm, Metal, CPU)"
        ))),
    }
}

/// The cubecl client of a burn device: the very client burn's kernels run on, so attn's calls
/// take it as is.
pub fn client(device: &Device) -> Result<ComputeClient, AttnError> {
    Ok(cube_device(device)?.client())
}

/// burn's cubecl backend, with or without fusion: how its float primitive becomes a `CubeTensor`
/// and back. Implemented for `CubeBackend` and for `Fusion<B>` over a backend whose primitive is
/// a `CubeTensor`; [`Cube`] is whichever of the two the build's features select.
pub trait CubeKind {
    /// The backend's float tensor primitive.
    type Primitive;
    /// The concrete cubecl tensor, once the work that writes it has been submitted.
    fn into_cube(p: Self::Primitive) -> Result<CubeTensor, AttnError>;
    /// Hands a cubecl tensor to the backend.
    fn from_cube(t: CubeTensor) -> Self::Primitive;
}

impl CubeKind for CubeBackend {
    type Primitive = CubeTensor;
    fn into_cube(p: CubeTensor) -> Result<CubeTensor, AttnError> {
        Ok(p)
    }
    fn from_cube(t: CubeTensor) -> CubeTensor {
        t
    }
}

impl<B> CubeKind for Fusion<B>
where
    B: FusionBackend<FloatTensorPrimitive = CubeTensor>,
    B::FusionRuntime: FusionRuntime<FusionDevice = CubeDevice>,
{
    type Primitive = FusionTensor<B::FusionRuntime>;

    fn into_cube(p: Self::Primitive) -> Result<CubeTensor, AttnError> {
        // Drains this stream's queue up to the tensor and takes its handle, as a read does (no
        // copy). `p` comes from a clone of the caller's tensor, so it is read-only here and
        // stays registered with the fusion server.
        let client = p.client.clone();
        client.resolve_tensor_float::<B>(p).map_err(|e| {
            AttnError::Launch(format!(
                "burn could not run the work that writes a tensor: {e:?}"
            ))
        })
    }

    fn from_cube(t: CubeTensor) -> Self::Primitive {
        let client = GlobalFusionClient::<B::FusionRuntime>::load(&t.device);
        let id = client.create_empty_handle();
        let out = TensorIr::uninit(id, t.meta.shape().clone(), t.dtype);
        let desc = CustomOpIr::new("attn::from_attn", &[], &[out]);
        let op = Publish::<B> {
            id,
            tensor: t,
            _backend: core::marker::PhantomData,
        };
        let mut outputs = client.register(StreamId::current(), OperationIr::Custom(desc), op);
        outputs.pop().expect("the operation declares one output")
    }
}

/// A fusion operation with no inputs that publishes an existing cubecl tensor under `id`.
struct Publish<B> {
    id: TensorId,
    tensor: CubeTensor,
    _backend: core::marker::PhantomData<fn() -> B>,
}

impl<B> core::fmt::Debug for Publish<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "attn::Publish({:?}, {:?})", self.id, self.tensor)
    }
}

impl<B> burn_fusion::stream::Operation<B::FusionRuntime> for Publish<B>
where
    B: FusionBackend<FloatTensorPrimitive = CubeTensor>,
    B::FusionRuntime: FusionRuntime<FusionDevice = CubeDevice>,
{
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) -> Result<(), ExecutionError> {
        handles.register_float_tensor::<B>(&self.id, self.tensor.clone());
        Ok(())
    }
}

/// The `CubeTensor` behind a burn tensor: no copy (under fusion, the pending work that writes it
/// is submitted first). An autodiff tensor is taken without its graph.
///
/// Errors: `Unsupported` for a tensor of another burn backend.
pub fn to_cube(t: &burn_tensor::Tensor<4>) -> Result<CubeTensor, AttnError> {
    let primitive = t
        .clone()
        .without_autodiff()
        .try_into_primitive::<Cube>()
        .map_err(|e| {
            AttnError::Unsupported(format!("burn tensor is not on a cubecl device: {e:?}"))
        })?;
    <Cube as CubeKind>::into_cube(primitive)
}

/// A burn tensor over a `CubeTensor` (no copy).
pub fn from_cube(t: CubeTensor) -> burn_tensor::Tensor<4> {
    burn_tensor::Tensor::<4>::from_primitive::<Cube>(<Cube as CubeKind>::from_cube(t))
}

/// Views a rank-4 burn tensor of dtype `E` as an attn tensor, `layout` saying whether its dims
/// are `[B, H, N, D]` or `[B, N, H, D]`: a clone of its cubecl handle with its own strides, no
/// copy. `client` (see [`client`]) is the one to launch with.
///
/// Errors: `Unsupported` for a tensor not on a cubecl device or stored tiled; `Input` for a
/// dtype other than `E`'s, a rank other than 4, or a head dim whose stride is not 1 (a
/// `swap_dims` involving the last dim: make it contiguous first, e.g. with `x * 1`).
pub fn to_attn<E: Element>(
    t: &burn_tensor::Tensor<4>,
    layout: Layout,
) -> Result<Tensor<E>, AttnError> {
    if t.dtype() != burn_dtype::<E>() {
        return Err(dtype_error::<E>(t.dtype()));
    }
    cube_to_attn(&to_cube(t)?, layout)
}

/// [`to_attn`] on a `CubeTensor` already at hand.
pub fn cube_to_attn<E: Element>(t: &CubeTensor, layout: Layout) -> Result<Tensor<E>, AttnError> {
    if t.dtype != burn_dtype::<E>() {
        return Err(dtype_error::<E>(t.dtype));
    }
    if t.meta.is_tiled() {
        return Err(AttnError::Unsupported(
            "burn tensor is stored tiled; attn reads row-major views".into(),
        ));
    }
    let (shape, strides) = match (
        <[usize; 4]>::try_from(t.meta.shape().as_slice()),
        <[usize; 4]>::try_from(&t.meta.strides()[..]),
    ) {
        (Ok(shape), Ok(strides)) => layout.to_bhnd(shape, strides),
        _ => {
            return Err(AttnError::Input {
                input: "burn tensor",
                reason: format!(
                    "shape {:?}; attention takes rank 4, [B, H, N, D] or [B, N, H, D]",
                    t.meta.shape().as_slice()
                ),
            })
        }
    };
    if strides[3] != 1 && shape[3] > 1 {
        return Err(AttnError::Input {
            input: "burn tensor",
            reason: format!(
                "head dim stride is {}; it must be 1 (make the tensor contiguous first)",
                strides[3]
            ),
        });
    }
    // Elements reachable from the view's start: the binding honours the handle's offsets, and
    // attn checks the view against this length before any launch.
    let len = t.handle.size_in_used() as usize / size_of::<E>();
    Ok(Tensor::from_raw_parts(
        t.handle.clone(),
        len,
        shape,
        strides,
    ))
}

/// Hands an attn tensor (e.g. `Output::o`, contiguous `[B, H, N, D]`) to burn without a copy,
/// on `device`, which must be the device whose client made the tensor's buffer.
///
/// Errors: `Unsupported` for a device that is not a cubecl device.
pub fn from_attn<E: Element>(
    t: &Tensor<E>,
    device: &Device,
) -> Result<burn_tensor::Tensor<4>, AttnError> {
    Ok(from_cube(attn_to_cube(t, cube_device(device)?)))
}

/// The `CubeTensor` over an attn tensor's buffer, with its view's shape and strides.
pub fn attn_to_cube<E: Element>(t: &Tensor<E>, device: CubeDevice) -> CubeTensor {
    let client = device.client();
    let shape = Shape::from(t.shape());
    let dtype = burn_dtype::<E>();
    let handle = t.handle().clone();
    if t.strides() == contiguous_strides(t.shape()) {
        CubeTensor::new_contiguous(client, device, shape, handle, dtype)
    } else {
        CubeTensor::new(
            client,
            handle,
            Metadata::new(shape, t.strides()),
            device,
            dtype,
        )
    }
}

fn dtype_error<E: Element>(found: DType) -> AttnError {
    AttnError::Input {
        input: "burn tensor",
        reason: format!(
            "dtype is {found:?}, the variant runs {:?} (convert with `t.cast(DType::{:?})`)",
            burn_dtype::<E>(),
            burn_dtype::<E>()
        ),
    }
}

/// Variant `V`'s attention of burn tensors `q`, `k`, `v` (dims as `layout` says), with run-time
/// `inputs`: O as a burn tensor `[B, Hq, Nq, Dv]`, no copy in or out.
///
/// Differentiable in burn's autodiff: when any of `q`, `k`, `v` takes part in a graph
/// ([`burn_tensor::Tensor::is_autodiff`]), the call is recorded as one operation whose backward
/// runs [`crate::backward()`] on the same buffers (the forward's O and LSE kept for it) and hands
/// dQ, dK and dV to burn's gradients in the inputs' own layout. For run-time inputs that learn
/// (sink logits, ALiBi slopes, declared `f32` inputs), see [`attention_learning`].
///
/// Errors: those of [`to_attn`] and of the forward, before anything is launched. The backward
/// runs inside burn's `backward()`, which has no error channel: an error there (none is expected
/// once the forward accepted the inputs) panics with its message.
pub fn attention<V: Variant>(
    qkv: [&burn_tensor::Tensor<4>; 3],
    layout: Layout,
    inputs: &Inputs,
) -> Result<burn_tensor::Tensor<4>, AttnError> {
    attention_learning::<V>(qkv, layout, inputs, &[])
}

/// A run-time input whose values come from a burn tensor and whose gradient goes back to it
/// ([`attention_learning`]).
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Learned {
    /// The sink logit per query head (`sinks: per_head`), `[Hq]`.
    Sinks,
    /// The ALiBi slope per query head (`alibi: given`), `[Hq]`.
    AlibiSlopes,
    /// A declared `f32` input the backward differentiates ([`crate::VariantSpec::learnable`]:
    /// not a `seq` table read at a computed position), by its name in the declaration, its
    /// values in row-major order.
    Input(&'static str),
}

/// The most learning inputs one call takes.
pub const MAX_LEARNED: usize = 4;

/// [`attention`], with run-time inputs that learn: each `(input, tensor)` of `learned` takes the
/// input's values from `tensor` (rank 1, f32; reshape a table to one dimension, row-major) in
/// place of `inputs`' own, and, when the call is recorded in burn's autodiff (any of `q`, `k`,
/// `v` or these tensors in a graph), its gradient from [`crate::backward()`] goes to `tensor`'s
/// node: a learnable relative bias, sink logits or ALiBi slopes trained by burn's optimisers.
/// The values are read to the host once per call (run-time inputs are uploaded with the call).
///
/// Errors, before anything is launched: `Input` for an input `V` does not declare or cannot
/// differentiate, one named twice, more than [`MAX_LEARNED`], a tensor of another dtype or rank;
/// and those of [`attention`].
pub fn attention_learning<V: Variant>(
    [q, k, v]: [&burn_tensor::Tensor<4>; 3],
    layout: Layout,
    inputs: &Inputs,
    learned: &[(Learned, &burn_tensor::Tensor<1>)],
) -> Result<burn_tensor::Tensor<4>, AttnError> {
    let device = q.device();
    let cube = cube_device(&device)?;
    let client = cube.client();
    if learned.len() > MAX_LEARNED {
        return Err(learned_error(format!(
            "{} learning inputs; one call takes at most {MAX_LEARNED}",
            learned.len()
        )));
    }
    let mut owned = OwnedInputs::of(inputs);
    for (i, (what, t)) in learned.iter().enumerate() {
        if learned[..i].iter().any(|(w, _)| w == what) {
            return Err(learned_error(format!("{what:?} is given twice")));
        }
        place_learned(&V::SPEC, &mut owned, *what, learned_values(t)?)?;
    }
    let tracking =
        [q, k, v].iter().any(|t| t.is_autodiff()) || learned.iter().any(|(_, t)| t.is_autodiff());
    if !tracking {
        let views = [
            to_attn::<V::Elem>(q, layout)?,
            to_attn::<V::Elem>(k, layout)?,
            to_attn::<V::Elem>(v, layout)?,
        ];
        let out = crate::forward::<V>(&client, &views[0], &views[1], &views[2], &owned.view())?;
        return Ok(from_cube(attn_to_cube(&out.o, cube)));
    }
    let unsupported =
        |e| AttnError::Unsupported(format!("burn tensor is not on a cubecl device: {e:?}"));
    let mut tracked = Vec::with_capacity(3);
    for t in [q, k, v] {
        tracked.push(
            t.clone()
                .autodiff()
                .try_into_primitive::<Autodiff<Cube>>()
                .map_err(unsupported)?,
        );
    }
    let mut views = Vec::with_capacity(3);
    for t in &tracked {
        let cube_tensor = <Cube as CubeKind>::into_cube(t.primitive().clone())?;
        views.push(cube_to_attn::<V::Elem>(&cube_tensor, layout)?);
    }
    let mut nodes: Vec<_> = tracked.iter().map(|t| t.node()).collect();
    for &(_, t) in learned {
        let p = t
            .clone()
            .autodiff()
            .try_into_primitive::<Autodiff<Cube>>()
            .map_err(unsupported)?;
        nodes.push(p.node());
    }
    let out = crate::forward::<V>(&client, &views[0], &views[1], &views[2], &owned.view())?;
    let o = <Cube as CubeKind>::from_cube(attn_to_cube(&out.o, cube.clone()));
    let state = AttentionState {
        qkv: [views[0].clone(), views[1].clone(), views[2].clone()],
        out,
        inputs: owned,
        learned: learned.iter().map(|(w, _)| *w).collect(),
        layout,
        device: cube,
    };
    Ok(match nodes.len() {
        3 => record::<V, 3>(nodes, state, o),
        4 => record::<V, 4>(nodes, state, o),
        5 => record::<V, 5>(nodes, state, o),
        6 => record::<V, 6>(nodes, state, o),
        _ => record::<V, 7>(nodes, state, o),
    })
}

/// The attention's operation with `N` parents (Q, K, V, then the learning inputs) in burn's
/// graph, its output `o`.
fn record<V: Variant, const N: usize>(
    nodes: Vec<NodeGuard>,
    state: AttentionState<V::Elem>,
    o: <Cube as CubeKind>::Primitive,
) -> burn_tensor::Tensor<4> {
    let nodes: [_; N] = nodes
        .try_into()
        .unwrap_or_else(|_| unreachable!("one node per parent"));
    let result = match AttentionOp::<V, N>(core::marker::PhantomData)
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, o),
        OpsKind::UnTracked(prep) => prep.finish(o),
    };
    burn_tensor::Tensor::<4>::from_primitive::<Autodiff<Cube>>(result)
}

fn learned_error(reason: String) -> AttnError {
    AttnError::Input {
        input: "learned",
        reason,
    }
}

/// A learning input's values: a rank-1 f32 burn tensor, read to the host.
fn learned_values(t: &burn_tensor::Tensor<1>) -> Result<Vec<f32>, AttnError> {
    if t.dtype() != DType::F32 {
        return Err(learned_error(format!(
            "a learning input's tensor is f32; this one is {:?}",
            t.dtype()
        )));
    }
    t.clone()
        .without_autodiff()
        .try_into_vec_as::<f32>()
        .map_err(|e| learned_error(format!("could not read a learning input's tensor: {e:?}")))
}

/// Puts a learning input's values where the launch reads that input.
fn place_learned(
    spec: &VariantSpec,
    owned: &mut OwnedInputs,
    what: Learned,
    values: Vec<f32>,
) -> Result<(), AttnError> {
    match what {
        Learned::Sinks if spec.score.sinks => owned.sinks = Some(values),
        Learned::AlibiSlopes if spec.score.alibi == Some(Alibi::Given) => {
            owned.alibi_slopes = Some(values)
        }
        Learned::Input(name) => {
            let floats = (0..spec.inputs.len()).filter(|&d| spec.inputs[d].ty == InputType::F32);
            let Some((i, decl)) = floats
                .enumerate()
                .find(|&(_, d)| spec.inputs[d].name == name)
            else {
                return Err(learned_error(format!(
                    "{} declares no f32 input `{name}`",
                    spec.name
                )));
            };
            if !spec.learnable(decl) {
                return Err(learned_error(format!(
                    "`{name}` has a `seq` dimension and is read at a computed position: its \
                     gradient is not computed"
                )));
            }
            if owned.floats.len() <= i {
                owned.floats.resize(i + 1, Vec::new());
            }
            owned.floats[i] = values;
        }
        _ => {
            return Err(learned_error(format!(
                "{} has no {what:?} to learn (sinks: per_head, alibi: given)",
                spec.name
            )))
        }
    }
    Ok(())
}

/// What [`attention`]'s backward keeps from its forward: the views of Q, K and V, O and the LSE,
/// the run-time inputs (the learning ones' values in place), which inputs learn, the inputs'
/// layout and the device.
#[derive(Clone, Debug)]
pub struct AttentionState<E> {
    qkv: [Tensor<E>; 3],
    out: Output<E>,
    inputs: OwnedInputs,
    learned: Vec<Learned>,
    layout: Layout,
    device: CubeDevice,
}

/// [`attention`] as an operation of burn's autodiff graph, with `N` parents.
struct AttentionOp<V, const N: usize>(core::marker::PhantomData<fn() -> V>);

impl<V, const N: usize> core::fmt::Debug for AttentionOp<V, N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "attn::attention")
    }
}

impl<V: Variant, const N: usize> Backward<Cube, N> for AttentionOp<V, N> {
    type State = AttentionState<V::Elem>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let state = ops.state;
        let d_out = <Cube as CubeKind>::into_cube(grads.consume::<Cube>(&ops.node))
            .and_then(|t| cube_to_attn::<V::Elem>(&t, Layout::Bhnd))
            .unwrap_or_else(|e| panic!("attn::attention backward: the output's gradient: {e}"));
        let client = state.device.client();
        let [q, k, v] = &state.qkv;
        let inputs = state.inputs.view();
        let g = crate::backward::<V>(&client, q, k, v, &state.out, &d_out, &inputs)
            .unwrap_or_else(|e| panic!("attn::attention backward: {e}"));
        let learned = state.learned.iter().map(|what| {
            let grad = match what {
                Learned::Sinks => g.d_sinks.clone(),
                Learned::AlibiSlopes => g.d_alibi_slopes.clone(),
                Learned::Input(name) => g
                    .d_inputs
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.clone()),
            };
            // Checked when the call was made: the variant computes this gradient.
            let grad = grad.unwrap_or_else(|| panic!("attn::attention backward: no {what:?}"));
            flat(&grad, state.device.clone())
        });
        let qkv = [g.dq, g.dk, g.dv]
            .into_iter()
            .map(|grad| in_layout(&grad, state.layout, state.device.clone()));
        for (parent, cube) in ops.parents.iter().zip(qkv.chain(learned)) {
            if let Some(node) = parent {
                grads.register::<Cube>(node.id, <Cube as CubeKind>::from_cube(cube));
            }
        }
    }
}

/// A contiguous f32 gradient `[1, 1, 1, n]` as a rank-1 `CubeTensor` `[n]` (no copy).
fn flat(t: &Tensor<f32>, device: CubeDevice) -> CubeTensor {
    let n = t.shape()[3];
    CubeTensor::new_contiguous(
        device.client(),
        device,
        Shape::from([n]),
        t.handle().clone(),
        DType::F32,
    )
}

/// A contiguous `[B, H, N, D]` attn tensor as a `CubeTensor` of the given layout: for
/// `Layout::Bnhd`, the `[B, N, H, D]` view of the same buffer (strides swapped, no copy).
fn in_layout<E: Element>(t: &Tensor<E>, layout: Layout, device: CubeDevice) -> CubeTensor {
    match layout {
        Layout::Bhnd => attn_to_cube(t, device),
        Layout::Bnhd => {
            let [b, h, n, d] = t.shape();
            let s = t.strides();
            CubeTensor::new(
                device.client(),
                t.handle().clone(),
                Metadata::new(Shape::from([b, n, h, d]), [s[0], s[2], s[1], s[3]]),
                device,
                burn_dtype::<E>(),
            )
        }
    }
}
