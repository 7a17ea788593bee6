//! Every variant declared with `attention!` in the program, for `attn-tune` to find.

use super::grid::{tune_decode_variant, tune_variant, DecodeReport, Grid, KeyReport};
use super::key::fingerprint;
use crate::tensor::ComputeClient;
use crate::variant::{Variant, VariantSpec};
use crate::AttnError;

/// Tunes one variant over a grid on a device, reporting each point as it is done.
pub type TuneFn =
    fn(&ComputeClient, &Grid, &mut dyn FnMut(&KeyReport)) -> Result<Vec<KeyReport>, AttnError>;

/// Tunes one variant's decode plan over a grid's decode points on a device.
pub type TuneDecodeFn = fn(
    &ComputeClient,
    &Grid,
    &mut dyn FnMut(&DecodeReport),
) -> Result<Vec<DecodeReport>, AttnError>;

/// A declared variant as the tuner sees it (the macro submits one per declaration).
pub struct Registration {
    /// The variant's compile-time facts.
    pub spec: VariantSpec,
    /// Tunes the variant over a grid on a device.
    pub tune: TuneFn,
    /// Tunes the variant's decode plan over the grid's decode points.
    pub tune_decode: TuneDecodeFn,
}

impl Registration {
    /// The registration of `V`.
    pub const fn of<V: Variant>() -> Registration {
        Registration {
            spec: V::SPEC,
            tune: tune_variant::<V>,
            tune_decode: tune_decode_variant::<V>,
        }
    }
}

inventory::collect!(Registration);

/// Every variant linked into this program, by name (one declaration included twice appears once).
pub fn registered() -> Vec<&'static Registration> {
    let mut all: Vec<(String, &'static Registration)> = inventory::iter::<Registration>
        .into_iter()
        .map(|r| (fingerprint(&r.spec), r))
        .collect();
    all.sort_by(|a, b| (a.1.spec.name, &a.0).cmp(&(b.1.spec.name, &b.0)));
    all.dedup_by(|a, b| a.0 == b.0);
    all.into_iter().map(|(_, r)| r).collect()
}
