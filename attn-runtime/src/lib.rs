//! The attn runtime: fused attention kernels, their launch on cubecl back ends, input validation
//! and (with the `testing` feature) the float64 reference every test compares against.
//!
//! Users normally reach this crate through the `attn` facade and the types that
//! `attn::attention!` generates; the items here are what those types call.

pub mod error;
pub mod kernels;
pub mod launch;
pub mod problem;
pub mod tensor;
pub mod variant;

#[cfg(feature = "codegen")]
pub mod codegen;
#[cfg(feature = "testing")]
pub mod reference;

pub use error::{AttnError, Dim, Operand};
pub use launch::{forward, forward_into, runnable_tilings, select_tiling, Lse, Output};
pub use problem::Problem;
pub use tensor::{supports, ComputeClient, Element, Tensor};
pub use variant::{CausalAlignment, DType, HeadGrouping, MaskKind, Tiling, Variant, VariantSpec};

/// cubecl itself, for code that needs a device or a client.
pub use cubecl;
pub use half::{bf16, f16};

/// The client of the default device of the best back end compiled in (CUDA before wgpu).
pub fn default_client() -> ComputeClient {
    cubecl::Device::default().client()
}

/// Waits until every queued kernel on `client` has finished; errors the device reports surface here.
pub fn sync(client: &ComputeClient) -> Result<(), AttnError> {
    cubecl::future::block_on(client.sync()).map_err(|e| AttnError::Launch(format!("{e:?}")))
}
