//! Device tensors of Q, K, V and O: a buffer handle with a 4-D `[batch, heads, seq, head_dim]`
//! view described by strides, so `[batch, seq, heads, head_dim]` storage is accepted as is.

use std::marker::PhantomData;

use cubecl::features::TypeUsage;
use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::error::AttnError;
use crate::variant::DType;

/// Element types attention runs on: f16, bf16 and f32 (accumulation is always f32).
pub trait Element: Float + CubeElement + Copy {
    /// The declaration's name for this type.
    const DTYPE: DType;
    /// Exact widening to f64 (for references and error measurement).
    fn to_f64(self) -> f64;
    /// Rounds an f64 to this type.
    fn from_f64(value: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(value: f64) -> Self {
        value as f32
    }
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
    fn from_f64(value: f64) -> Self {
        half::f16::from_f64(value)
    }
}

impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
    fn from_f64(value: f64) -> Self {
        half::bf16::from_f64(value)
    }
}

/// Whether the device behind `client` can load, store and compute with `E`.
pub fn supports<E: Element>(client: &ComputeClient) -> bool {
    let uses = E::supported_uses(client);
    uses.contains(TypeUsage::Buffer) && uses.contains(TypeUsage::Conversion)
}

/// The client type every call takes: a handle on one device of one back end.
pub type ComputeClient = cubecl::client::Client;

/// A 4-D tensor on a device, viewed as `[batch, heads, seq, head_dim]`.
#[derive(Clone, Debug)]
pub struct Tensor<E> {
    handle: Handle,
    len: usize,
    shape: [usize; 4],
    strides: [usize; 4],
    _elem: PhantomData<E>,
}

impl<E: Element> Tensor<E> {
    /// Uploads `data`, laid out contiguously as `[batch, heads, seq, head_dim]`; refuses data
    /// whose length is not the product of `shape`.
    pub fn from_slice(
        client: &ComputeClient,
        data: &[E],
        shape: [usize; 4],
    ) -> Result<Self, AttnError> {
        check_len(data.len(), shape)?;
        let handle = client.create_from_slice(E::as_bytes(data));
        Ok(Self::from_raw_parts(
            handle,
            data.len(),
            shape,
            contiguous_strides(shape),
        ))
    }

    /// Uploads `data`, laid out contiguously as `[batch, seq, heads, head_dim]` (the layout of
    /// most model code), and views it as `[batch, heads, seq, head_dim]` without a copy; refuses
    /// data whose length is not the product of `shape_bnhd`.
    pub fn from_slice_bnhd(
        client: &ComputeClient,
        data: &[E],
        shape_bnhd: [usize; 4],
    ) -> Result<Self, AttnError> {
        check_len(data.len(), shape_bnhd)?;
        let [b, n, h, d] = shape_bnhd;
        let s = contiguous_strides(shape_bnhd);
        let handle = client.create_from_slice(E::as_bytes(data));
        Ok(Self::from_raw_parts(
            handle,
            data.len(),
            [b, h, n, d],
            [s[0], s[2], s[1], s[3]],
        ))
    }

    /// Wraps an existing buffer of `len` elements, viewed with `shape` and `strides` (in elements,
    /// `[batch, heads, seq, head_dim]` order). The view is checked against `len` before any launch.
    pub fn from_raw_parts(
        handle: Handle,
        len: usize,
        shape: [usize; 4],
        strides: [usize; 4],
    ) -> Self {
        Self {
            handle,
            len,
            shape,
            strides,
            _elem: PhantomData,
        }
    }

    /// Overwrites the whole buffer with `data` in place (same device memory, enqueued on the
    /// client's stream): how a replayed graph's inputs are refreshed. Refuses data whose length
    /// is not the buffer's.
    pub fn write(&self, client: &ComputeClient, data: &[E]) -> Result<(), AttnError> {
        if data.len() != self.len {
            return Err(AttnError::DataLength {
                shape: self.shape,
                expected: self.len,
                found: data.len(),
            });
        }
        client.write(
            &self.handle,
            cubecl::bytes::Bytes::from_bytes_vec(E::as_bytes(data).to_vec()),
        );
        Ok(())
    }

    /// A new, uninitialised contiguous tensor.
    pub fn empty(client: &ComputeClient, shape: [usize; 4]) -> Self {
        let len = shape.iter().product::<usize>();
        let handle = client.empty(len.max(1) * size_of::<E>());
        Self::from_raw_parts(handle, len, shape, contiguous_strides(shape))
    }

    /// Shape as `[batch, heads, seq, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// Strides in elements, in the order of [`Tensor::shape`].
    pub fn strides(&self) -> [usize; 4] {
        self.strides
    }

    /// Elements in the underlying buffer.
    pub fn buffer_len(&self) -> usize {
        self.len
    }

    /// The device buffer.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Reads the tensor back, contiguous in `[batch, heads, seq, head_dim]` order.
    pub fn to_vec(&self, client: &ComputeClient) -> Vec<E> {
        let bytes = client.read_one_unchecked(self.handle.clone());
        let raw = E::from_bytes(&bytes);
        if self.strides == contiguous_strides(self.shape) {
            return raw[..self.shape.iter().product::<usize>()].to_vec();
        }
        let [b, h, n, d] = self.shape;
        let s = self.strides;
        let mut out = Vec::with_capacity(b * h * n * d);
        for ib in 0..b {
            for ih in 0..h {
                for i_n in 0..n {
                    let base = ib * s[0] + ih * s[1] + i_n * s[2];
                    out.extend((0..d).map(|c| raw[base + c * s[3]]));
                }
            }
        }
        out
    }
}

/// Host data must fill its shape exactly.
fn check_len(len: usize, shape: [usize; 4]) -> Result<(), AttnError> {
    let expected = shape.iter().product::<usize>();
    if len == expected {
        Ok(())
    } else {
        Err(AttnError::DataLength {
            shape,
            expected,
            found: len,
        })
    }
}

/// Row-major strides of a contiguous 4-D shape.
pub fn contiguous_strides(shape: [usize; 4]) -> [usize; 4] {
    [
        shape[1] * shape[2] * shape[3],
        shape[2] * shape[3],
        shape[3],
        1,
    ]
}
