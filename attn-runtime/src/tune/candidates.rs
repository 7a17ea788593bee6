//! The tile shapes worth timing on a device, pruned before anything launches.

use std::fmt;

use crate::launch::{check_tiling, engine_for, select_tiling, Engine};
use crate::tensor::ComputeClient;
use crate::variant::{Tiling, VariantSpec};
use crate::AttnError;

/// A tile shape and the kernel family that runs it on the device.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug)]
pub struct Candidate {
    /// The tile shape.
    pub tiling: Tiling,
    /// The kernel family.
    pub engine: Engine,
}

impl fmt::Display for Candidate {
    /// The stable name the persistent cache is keyed on: `wg_q128_kv128`, `tc_q64_kv16`,
    /// `portable_q32_kv32`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.engine {
            Engine::Warpgroup => "wg",
            Engine::TensorCores => "tc",
            Engine::Portable => "portable",
        };
        write!(f, "{family}_{}", self.tiling.name())
    }
}

/// The candidates of `spec` on this device, the fallback first.
///
/// The fallback is the shape [`select_tiling`] picks (the first declared shape the device's tensor
/// cores run, else the first it runs at all), so an untuned call and the tuner's first candidate
/// agree. Pruned: shapes over the device's shared memory or units per cube, and shapes that would
/// run on a slower kernel family than the fallback's (warpgroup, then 16×16×16 tensor cores, then
/// portable: several times slower each; timing them only lengthens tuning). The kernels have no mask-block granularity,
/// so no shape is pruned for the mask. Errors only when no declared shape runs on the device.
pub fn candidates(client: &ComputeClient, spec: &VariantSpec) -> Result<Vec<Candidate>, AttnError> {
    let fallback = select_tiling(client, spec)?;
    let candidate = |tiling| Candidate {
        tiling,
        engine: engine_for(client, spec, tiling),
    };
    let first = candidate(fallback);
    let mut list = vec![first];
    for &tiling in spec.tilings {
        let c = candidate(tiling);
        let runs = check_tiling(client, spec, tiling).is_ok();
        let same_family = c.engine.rank() >= first.engine.rank();
        if runs && same_family && !list.contains(&c) {
            list.push(c);
        }
    }
    Ok(list)
}
