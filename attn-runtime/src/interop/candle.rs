//! candle tensors in and out (feature `candle`): candle CPU tensors of f32, f16 or bf16, rank 4,
//! in `[B, H, N, D]` or `[B, N, H, D]` order, uploaded to attn's client with the fewest host copies,
//! and attn's results back as candle tensors.
//!
//! - [`to_attn`]: a contiguous tensor (any start offset) is uploaded straight from candle's
//!   storage; a strided view with a contiguous head dim whose span is at most
//!   [`MAX_SPAN_RATIO`] × its elements (a transpose, a `narrow`, a broadcast over heads) is
//!   uploaded as is, keeping candle's strides; anything else is packed once (`contiguous`) first.
//! - [`from_attn`]: reads an attn tensor back and moves it into a candle tensor (`from_vec`: no
//!   further copy on the CPU).
//!
//! candle's CUDA tensors are not taken here: candle's `cuda` feature needs the CUDA toolkit at
//! build time. Their device pointer (`Storage::Cuda(s)` → `s.as_cuda_slice::<E>()` →
//! `cudarc::driver::DevicePtr::device_ptr(slice, &s.device.cuda_stream())`, plus the layout's
//! start offset) is what [`super::cuda::import`] takes, after the candle stream is synchronised.

use super::{span, Layout};
use crate::{AttnError, ComputeClient, Element, Tensor};

/// The candle this module is built against (a user's crate names its own `candle-core` of the same version).
pub use candle_core;
use candle_core::{Storage, WithDType};

/// A strided view is uploaded as is (with candle's strides) when the storage span it covers
/// holds at most this many times its element count; beyond that one host copy packs it.
pub const MAX_SPAN_RATIO: usize = 2;

/// Element types that both attn and candle store: `f32`, `half::f16`, `half::bf16`.
pub trait CandleElement: Element + WithDType {}
impl<E: Element + WithDType> CandleElement for E {}

/// The candle dtype of `E` (both traits have a `DTYPE`, so spelled out).
fn candle_dtype<E: CandleElement>() -> candle_core::DType {
    <E as WithDType>::DTYPE
}

/// A candle error while converting, as an attn error.
fn candle_error(what: &'static str, e: candle_core::Error) -> AttnError {
    AttnError::Input {
        input: what,
        reason: e.to_string(),
    }
}

/// Checks device, dtype and rank; returns the candle dims.
fn check<E: CandleElement>(t: &candle_core::Tensor) -> Result<[usize; 4], AttnError> {
    if !t.device().is_cpu() {
        return Err(AttnError::Unsupported(format!(
            "candle tensor on {:?}: only Device::Cpu tensors are converted (move it with \
             `t.to_device(&candle_core::Device::Cpu)?`)",
            t.device().location()
        )));
    }
    if t.dtype() != candle_dtype::<E>() {
        return Err(AttnError::Input {
            input: "candle tensor",
            reason: format!(
                "dtype is {:?}, the variant runs {:?} (convert with `t.to_dtype(DType::{:?})?`)",
                t.dtype(),
                candle_dtype::<E>(),
                candle_dtype::<E>()
            ),
        });
    }
    let (d0, d1, d2, d3) = t.dims4().map_err(|_| AttnError::Input {
        input: "candle tensor",
        reason: format!(
            "rank {} (shape {:?}); attention takes rank 4, [B, H, N, D] or [B, N, H, D]",
            t.rank(),
            t.dims()
        ),
    })?;
    Ok([d0, d1, d2, d3])
}

/// Uploads a rank-4 candle CPU tensor of dtype `E` as an attn tensor, `layout` saying whether
/// its dims are `[B, H, N, D]` or `[B, N, H, D]`. Zero host copies when it is contiguous or a
/// compact strided view with a unit head-dim stride; one otherwise.
///
/// Errors: `Unsupported` for a tensor not on `Device::Cpu`; `Input` for a dtype other than
/// `E`'s or a rank other than 4. Shapes are checked against the variant at launch as usual.
pub fn to_attn<E: CandleElement>(
    client: &ComputeClient,
    t: &candle_core::Tensor,
    layout: Layout,
) -> Result<Tensor<E>, AttnError> {
    let dims = check::<E>(t)?;
    let count: usize = dims.iter().product();
    {
        // The read guard on candle's storage lives to the end of this block: no candle op on
        // `t` (or on a tensor sharing its storage) may run inside it.
        let (storage, l) = t.storage_and_layout();
        let cpu = match &*storage {
            Storage::Cpu(cpu) => cpu,
            _ => unreachable!("checked: the tensor is on Device::Cpu"),
        };
        let data: &[E] = cpu
            .as_slice::<E>()
            .map_err(|e| candle_error("candle tensor", e))?;
        let start = l.start_offset();
        if count == 0 {
            // attn refuses it at launch, naming the operand and the empty dimension.
            return Ok(Tensor::empty(
                client,
                layout.to_bhnd(dims, stride4(l.stride())).0,
            ));
        }
        if l.is_contiguous() {
            let slice = &data[start..start + count];
            return match layout {
                Layout::Bhnd => Tensor::from_slice(client, slice, dims),
                Layout::Bnhd => Tensor::from_slice_bnhd(client, slice, dims),
            };
        }
        let (shape, strides) = layout.to_bhnd(dims, stride4(l.stride()));
        let reach = span(shape, strides);
        if strides[3] == 1
            && reach <= MAX_SPAN_RATIO.saturating_mul(count)
            && start + reach <= data.len()
        {
            let window = &data[start..start + reach];
            let bytes = <E as cubecl::CubeElement>::as_bytes(window);
            let handle = client.create_from_slice(bytes);
            return Ok(Tensor::from_raw_parts(handle, reach, shape, strides));
        }
    }
    // One host copy packs the view (candle's strided copy), then the contiguous path.
    let packed = t
        .contiguous()
        .map_err(|e| candle_error("candle tensor", e))?;
    to_attn(client, &packed, layout)
}

/// Reads an attn tensor back into a candle tensor `[B, H, N, D]` (contiguous) on `device`.
/// No copy beyond attn's read-back on `Device::Cpu`; one host-to-device copy elsewhere.
pub fn from_attn<E: CandleElement>(
    client: &ComputeClient,
    t: &Tensor<E>,
    device: &candle_core::Device,
) -> Result<candle_core::Tensor, AttnError> {
    candle_core::Tensor::from_vec(t.to_vec(client), &t.shape(), device)
        .map_err(|e| candle_error("attn output", e))
}

/// A candle stride list of a rank-4 tensor as an array.
fn stride4(s: &[usize]) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}
