//! CUDA tensors from any engine, by device pointer: the DLPack fields (pointer, shape, strides,
//! element type, device).
//!
//! cubecl 0.12 cannot adopt memory it did not allocate, so [`import`] copies the view's span into
//! a buffer of attn's client (device to device) and [`export`] copies a result into the caller's
//! memory; `examples/raw_cuda.rs` measures what the copies cost. These two functions are the one
//! place a zero-copy path goes once cubecl can wrap foreign allocations.
//!
//! The caller's side of the contract:
//! - `ptr` is a device pointer on the device behind `client`, valid in that device's primary
//!   context (the one cubecl, PyTorch, candle and cudarc use by default);
//! - the memory holds the tensor when [`import`] is called: work on the caller's own streams that
//!   writes it has completed (synchronise those streams first);
//! - the memory needs to live only for the call: [`import`] returns once its copy has completed,
//!   [`export`] waits for attn's queued work on the tensor, copies, and returns once the copy has
//!   completed, so the caller may reuse or free its memory right after either returns.

use cubecl_cuda::CudaRuntime;
use cubecl_runtime::runtime::Runtime;
use cudarc::driver::result as cu;

/// The CUDA driver bindings attn links (for callers that allocate or copy device memory themselves).
pub use cudarc;

use super::span;
use crate::error::{AttnError, Operand};
use crate::tensor::{contiguous_strides, ComputeClient, Element, Tensor};

/// A CUDA tensor owned by someone else, viewed as `[batch, heads, seq, head_dim]`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CudaView {
    /// The device address of element `[0, 0, 0, 0]` (DLPack's `data + byte_offset`).
    pub ptr: u64,
    /// The shape, `[batch, heads, seq, head_dim]`.
    pub shape: [usize; 4],
    /// Strides in elements; the last must be 1. A `[B, N, H, D]` tensor is
    /// `Layout::Bnhd.to_bhnd(shape, strides)`.
    pub strides: [usize; 4],
    /// The CUDA device ordinal the memory lives on.
    pub device: usize,
}

/// Copies the tensor `view` describes into a new attn [`Tensor`] on `client` (same strides; the
/// view's span is copied, device to device), checked first: no empty dimension, a contiguous last
/// dimension, a non-null pointer aligned to the element.
///
/// # Safety
/// `view.ptr` must address at least `span(shape, strides)` elements of `E` on the device behind
/// `client`, written and not freed while the call runs (see the module docs).
pub unsafe fn import<E: Element>(
    client: &ComputeClient,
    view: &CudaView,
    operand: Operand,
) -> Result<Tensor<E>, AttnError> {
    check_view::<E>(view, operand)?;
    let len = span(view.shape, view.strides);
    let tensor = Tensor::from_raw_parts(
        client.empty(len * size_of::<E>()),
        len,
        view.shape,
        view.strides,
    );
    let dst = device_ptr(client, &tensor)?;
    copy(view.device, dst, view.ptr, len * size_of::<E>())?;
    Ok(tensor)
}

/// Copies `tensor` (contiguous, as attn's outputs are) into the caller's memory at `dst`, after
/// attn's queued work has finished; returns once the copy has completed.
///
/// # Safety
/// `dst` must address room for every element of `tensor` on the device behind `client`, on
/// CUDA device `device`, not in use by other work while the call runs.
pub unsafe fn export<E: Element>(
    client: &ComputeClient,
    tensor: &Tensor<E>,
    dst: u64,
    device: usize,
) -> Result<(), AttnError> {
    let shape = tensor.shape();
    if tensor.strides() != contiguous_strides(shape) {
        return Err(AttnError::OutputLayout {
            operand: Operand::O,
            needed: shape.iter().product(),
        });
    }
    if dst == 0 || !dst.is_multiple_of(size_of::<E>() as u64) {
        return Err(AttnError::Input {
            input: "dst",
            reason: format!("device pointer {dst:#x} is null or not aligned to its element"),
        });
    }
    crate::sync(client)?;
    let src = device_ptr(client, tensor)?;
    copy(
        device,
        dst,
        src,
        shape.iter().product::<usize>() * size_of::<E>(),
    )
}

fn check_view<E: Element>(view: &CudaView, operand: Operand) -> Result<(), AttnError> {
    const DIMS: [crate::Dim; 4] = [
        crate::Dim::Batch,
        crate::Dim::Heads,
        crate::Dim::Seq,
        crate::Dim::HeadDim,
    ];
    if let Some(i) = view.shape.iter().position(|&n| n == 0) {
        return Err(AttnError::EmptyDim {
            operand,
            dim: DIMS[i],
        });
    }
    if view.strides[3] != 1 {
        return Err(AttnError::NotContiguous {
            operand,
            stride: view.strides[3],
        });
    }
    if view.ptr == 0 || !view.ptr.is_multiple_of(size_of::<E>() as u64) {
        return Err(AttnError::Input {
            input: "ptr",
            reason: format!(
                "{operand}: device pointer {:#x} is null or not aligned to its {}-byte element",
                view.ptr,
                size_of::<E>()
            ),
        });
    }
    Ok(())
}

/// The device address of the first element of `tensor`'s buffer.
fn device_ptr<E: Element>(client: &ComputeClient, tensor: &Tensor<E>) -> Result<u64, AttnError> {
    let resource = client
        .get_resource::<<CudaRuntime as Runtime>::Server>(tensor.handle().clone())
        .map_err(|e| AttnError::Unsupported(format!("not a CUDA buffer of this client: {e}")))?;
    Ok(resource.resource().ptr)
}

/// A device-to-device copy in `device`'s primary context, complete when this returns.
fn copy(device: usize, dst: u64, src: u64, bytes: usize) -> Result<(), AttnError> {
    let failed = |what: &str, e: cu::DriverError| AttnError::Launch(format!("{what}: {e:?}"));
    // SAFETY: the pointers and sizes are the caller's contract (see `import`/`export`); the
    // context is the device's primary one, which cubecl itself runs in.
    unsafe {
        if cu::ctx::get_current()
            .map_err(|e| failed("cuCtxGetCurrent", e))?
            .is_none()
        {
            let dev = cu::device::get(device as i32).map_err(|e| failed("cuDeviceGet", e))?;
            let ctx =
                cu::primary_ctx::retain(dev).map_err(|e| failed("cuDevicePrimaryCtxRetain", e))?;
            cu::ctx::set_current(ctx).map_err(|e| failed("cuCtxSetCurrent", e))?;
        }
        cu::memcpy_dtod_sync(dst, src, bytes).map_err(|e| failed("cuMemcpyDtoD", e))?;
    }
    // A device-to-device copy does not wait on the host: wait for it.
    cu::ctx::synchronize().map_err(|e| failed("cuCtxSynchronize", e))
}
