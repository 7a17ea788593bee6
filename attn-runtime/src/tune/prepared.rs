//! State worked out on a variant's first call on a device instead of on every launch, one map per
//! kind of state.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cubecl_common::device::ServiceId;

use crate::tensor::ComputeClient;

/// The map of a [`PerVariant`]: (device, variant type) to its state.
type Map<T> = HashMap<(ServiceId, TypeId), Arc<T>>;

/// `T` per (device, variant type).
pub(crate) struct PerVariant<T> {
    map: RwLock<Option<Map<T>>>,
}

impl<T> PerVariant<T> {
    /// An empty map.
    pub(crate) const fn new() -> Self {
        Self {
            map: RwLock::new(None),
        }
    }

    /// The state of variant `V` on `client`'s device, made by `make` on the first call there.
    pub(crate) fn get_or_try_init<V: 'static, E>(
        &self,
        client: &ComputeClient,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        let id = (client.service_id(), TypeId::of::<V>());
        let known = self.map.read().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = known.as_ref().and_then(|m| m.get(&id)) {
            return Ok(p.clone());
        }
        drop(known);
        let fresh = Arc::new(make()?);
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        Ok(map
            .get_or_insert_with(HashMap::new)
            .entry(id)
            .or_insert(fresh)
            .clone())
    }
}
