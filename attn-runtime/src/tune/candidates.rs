//! The tile shapes worth timing on a device, pruned before anything launches.

pub use crate::blueprint::Candidate;
use crate::launch::select_candidate;
use crate::tensor::ComputeClient;
use crate::variant::VariantSpec;
use crate::AttnError;

/// The candidates of `spec` on this device for operands the copy engine reads (`copy_engine`)
/// or not, the fallback first.
///
/// The fallback is the candidate [`select_candidate`] picks (the first declared shape the device's
/// fastest family runs), so an untuned call and the tuner's first candidate agree. Pruned: shapes
/// no family runs on the device, and shapes that would run on a slower kernel family than the
/// fallback's (warpgroup, then 16×16×16 tensor cores, then portable: several times slower each;
/// timing them only lengthens tuning). The kernels have no mask-block granularity, so no shape is
/// pruned for the mask. Errors only when no declared shape runs on the device.
pub fn candidates(
    client: &ComputeClient,
    spec: &VariantSpec,
    copy_engine: bool,
) -> Result<Vec<Candidate>, AttnError> {
    let first = select_candidate(client, spec, copy_engine)?;
    let mut list = vec![first];
    for &tiling in spec.tilings {
        if let Ok(c) = Candidate::on(client, spec, tiling, copy_engine) {
            if c.family.rank() >= first.family.rank() && !list.contains(&c) {
                list.push(c);
            }
        }
    }
    Ok(list)
}
