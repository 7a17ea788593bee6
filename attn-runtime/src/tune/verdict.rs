//! The tuner's pick against the fallback: a pick stays only when it beats the fallback by more
//! than the measurement's spread.
//!
//! cubecl's tuner keeps whichever candidate scored best in its own samples, however small the
//! lead; on a busy or noisy device that can be a shape slower than the fallback it replaced. So
//! once a key is tuned, the pick and the fallback are timed again, in turns, on the same inputs
//! ([`ROUNDS`] samples each, the order swapped every round so that neither profits from a warm
//! cache; a sample is the wall time of back-to-back calls and one sync, [`calls_per_sample`]). The pick is kept only when its upper quartile is under
//! the fallback's lower quartile: when three quarters of its samples beat three quarters of the
//! fallback's. Otherwise the fallback runs for that key, in this process and later ones: each
//! verdict is kept in the cache database beside the tuned shapes (namespace
//! `attn/<cubecl>/verdicts/<prefill|backward|decode>/<device>`), so a fresh process reads it and never
//! compiles a rejected pick. Beside them, each settled key's outcome — the candidate that runs —
//! is kept by name (`attn/<cubecl>/picks/<prefill|backward|decode>/<device>`): what
//! [`super::Policy::Deferred`] reads, never tuning itself.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use cubecl_common::device::ServiceId;
use cubecl_environment::persistence::{Namespace, Store, StoreKey, StoreOptions, StoreValue};
use serde::{Deserialize, Serialize};

use super::cache;
use super::decode::{DecodeKey, PlanChoice};
use super::key::TuneKey;
use crate::backward::BackwardPlan;
use crate::blueprint::Candidate;
use crate::tensor::ComputeClient;
use crate::AttnError;

/// Timed calls of each of the two, interleaved. Nine puts the quartiles on the 3rd and 7th
/// samples, so that two outliers on either side change nothing; the two together cost 18 calls
/// of the key, a few milliseconds at the sizes tuning is worth doing for.
pub const ROUNDS: usize = 9;

/// The least wall time one sample spans: back-to-back calls fill it, so that the sync that ends
/// a sample (tens of microseconds, and about as noisy) is a small part of it. Timed one call per
/// sample, a decode key of a 128-key window (under 0.1 ms a call) kept a pick by its verdict that
/// the report then re-timed at ×0.89 against the fallback: the samples measured the sync.
pub const SAMPLE_SPAN_S: f64 = 1e-3;

/// The most calls one sample takes (a sample of calls under 16 µs spans less than
/// [`SAMPLE_SPAN_S`]).
pub const MAX_CALLS_PER_SAMPLE: usize = 64;

/// Calls per sample for a call that took `once_s` seconds alone: enough to span
/// [`SAMPLE_SPAN_S`], at least one, at most [`MAX_CALLS_PER_SAMPLE`].
pub fn calls_per_sample(once_s: f64) -> usize {
    if once_s.is_nan() || once_s <= 0.0 {
        return MAX_CALLS_PER_SAMPLE;
    }
    ((SAMPLE_SPAN_S / once_s).ceil() as usize).clamp(1, MAX_CALLS_PER_SAMPLE)
}

/// What a key's timing said: the two medians and the quartiles the rule compares, in
/// nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Whether the pick runs (else the fallback does).
    pub keep: bool,
    /// Median of the pick's samples.
    pub pick_ns: u64,
    /// Median of the fallback's samples.
    pub fallback_ns: u64,
    /// Upper quartile of the pick's samples.
    pub pick_upper_ns: u64,
    /// Lower quartile of the fallback's samples.
    pub fallback_lower_ns: u64,
}

impl Verdict {
    /// The verdict on two sets of samples (seconds or any unit, the same for both).
    pub fn judge(pick: &[f64], fallback: &[f64]) -> Self {
        let sorted = |s: &[f64]| {
            let mut s = s.to_vec();
            s.sort_by(f64::total_cmp);
            s
        };
        let (p, f) = (sorted(pick), sorted(fallback));
        let at = |s: &[f64], q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        let ns = |x: f64| (x * 1e9).max(0.0) as u64;
        let (pick_upper, fallback_lower) = (at(&p, 0.75), at(&f, 0.25));
        Verdict {
            keep: pick_upper < fallback_lower,
            pick_ns: ns(at(&p, 0.5)),
            fallback_ns: ns(at(&f, 0.5)),
            pick_upper_ns: ns(pick_upper),
            fallback_lower_ns: ns(fallback_lower),
        }
    }
}

/// A verdict's place in the store: the key, and the two it compared by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Judged {
    key: String,
    pick: String,
    fallback: String,
}

/// Verdicts on one tuner's picks, by device: the process's memory over the cache database.
pub(super) struct Verdicts<K, P> {
    /// What is judged (`prefill`, `backward`): a namespace of its own in the cache.
    name: &'static str,
    /// By device (cubecl's service id: cheap to get on every call), key and the two compared.
    memory: Mutex<HashMap<(ServiceId, K, P, P), bool>>,
    /// By device kind (the hardware identity the tuned shapes are kept under).
    stores: Mutex<HashMap<String, Store<Judged, Verdict>>>,
    /// What runs for each settled key (its debug form), by name, per device kind.
    picks: Mutex<HashMap<String, Store<String, String>>>,
}

/// The verdicts of the prefill tuner.
pub(super) static PREFILL: LazyLock<Verdicts<TuneKey, Candidate>> =
    LazyLock::new(|| Verdicts::new("prefill"));
/// The verdicts of the backward tuner.
pub(super) static BACKWARD: LazyLock<Verdicts<TuneKey, BackwardPlan>> =
    LazyLock::new(|| Verdicts::new("backward"));
/// The verdicts of the decode tuner.
pub(super) static DECODE: LazyLock<Verdicts<DecodeKey, PlanChoice>> =
    LazyLock::new(|| Verdicts::new("decode"));

impl<K, P> Verdicts<K, P>
where
    K: Clone + Eq + Hash + std::fmt::Debug,
    P: Copy + Eq + Hash + std::fmt::Display,
{
    fn new(name: &'static str) -> Self {
        Verdicts {
            name,
            memory: Mutex::new(HashMap::new()),
            stores: Mutex::new(HashMap::new()),
            picks: Mutex::new(HashMap::new()),
        }
    }

    /// What runs for `key` on `client`'s device as a tuning here or at install settled it, found
    /// among `among` by name; `None` where no tuning settled the key (or settled it on a candidate
    /// `among` lacks).
    pub(super) fn remembered(
        &self,
        client: &ComputeClient,
        key: &K,
        among: impl IntoIterator<Item = P>,
    ) -> Option<P> {
        let name = self.with_picks(client, |store| store.get(&format!("{key:?}")).cloned())?;
        among.into_iter().find(|p| p.to_string() == name)
    }

    /// Keeps `runs` as what runs for `key` (see [`Self::remembered`]).
    fn remember(&self, client: &ComputeClient, key: &K, runs: P) {
        self.with_picks(client, |store| {
            let key = format!("{key:?}");
            match store.get(&key) {
                Some(kept) if *kept == runs.to_string() => return,
                // Settled again on another outcome: the newer one stands.
                Some(_) => drop(store.remove(&key)),
                None => {}
            }
            if let Err(e) = store.insert(key, runs.to_string()) {
                tracing::debug!(reason = e.reason(), "attn: pick not kept");
            }
        });
    }

    fn with_picks<T>(
        &self,
        client: &ComputeClient,
        f: impl FnOnce(&mut Store<String, String>) -> T,
    ) -> T {
        with_device_store(&self.picks, "picks", self.name, client, f)
    }

    /// Which of `pick` and `fallback` runs for `key` on `client`'s device: the pick when no
    /// verdict says otherwise (none yet: the key is being tuned, or was tuned before verdicts
    /// existed and is judged on its next tuning), the fallback when one rejected the pick.
    pub(super) fn choose(&self, client: &ComputeClient, key: &K, pick: P, fallback: P) -> P {
        if pick == fallback {
            return pick;
        }
        match self.read(client, key, pick, fallback) {
            Some(false) => fallback,
            _ => pick,
        }
    }

    /// The verdict on `pick` for `key`, if one was reached here or kept in the cache.
    fn read(&self, client: &ComputeClient, key: &K, pick: P, fallback: P) -> Option<bool> {
        let memo = (client.service_id(), key.clone(), pick, fallback);
        if let Some(&keep) = lock(&self.memory).get(&memo) {
            return Some(keep);
        }
        let judged = judged(key, pick, fallback);
        let keep = self
            .with_store(client, |store| store.get(&judged).copied())
            .map(|v| v.keep)?;
        lock(&self.memory).insert(memo, keep);
        Some(keep)
    }

    /// Judges `pick` against `fallback` for `key` unless a verdict exists: `time(p, calls)` runs
    /// `calls` calls of `p` back to back and waits for them, returning the seconds per call.
    /// Returns whether the pick stays.
    pub(super) fn settle(
        &self,
        client: &ComputeClient,
        key: &K,
        pick: P,
        fallback: P,
        mut time: impl FnMut(P, usize) -> Result<f64, AttnError>,
    ) -> Result<bool, AttnError> {
        if pick == fallback {
            self.remember(client, key, pick);
            return Ok(true);
        }
        if let Some(keep) = self.read(client, key, pick, fallback) {
            self.remember(client, key, if keep { pick } else { fallback });
            return Ok(keep);
        }
        // One untimed call each: compiled, loaded and warm before the samples. Their times (a
        // call that compiled is slow, which only makes the samples smaller) size the samples.
        let once = time(pick, 1)?.min(time(fallback, 1)?);
        let calls = calls_per_sample(once);
        let (mut picks, mut fallbacks) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            if round % 2 == 0 {
                picks.push(time(pick, calls)?);
                fallbacks.push(time(fallback, calls)?);
            } else {
                fallbacks.push(time(fallback, calls)?);
                picks.push(time(pick, calls)?);
            }
        }
        let verdict = Verdict::judge(&picks, &fallbacks);
        tracing::info!(
            key = ?key,
            pick = %pick,
            fallback = %fallback,
            pick_ms = verdict.pick_ns as f64 * 1e-6,
            fallback_ms = verdict.fallback_ns as f64 * 1e-6,
            keep = verdict.keep,
            "attn: the tuned pick against the fallback"
        );
        self.with_store(client, |store| {
            if let Err(e) = store.insert(judged(key, pick, fallback), verdict) {
                tracing::debug!(reason = e.reason(), "attn: verdict not kept");
            }
        });
        lock(&self.memory).insert(
            (client.service_id(), key.clone(), pick, fallback),
            verdict.keep,
        );
        self.remember(client, key, if verdict.keep { pick } else { fallback });
        Ok(verdict.keep)
    }

    fn with_store<T>(
        &self,
        client: &ComputeClient,
        f: impl FnOnce(&mut Store<Judged, Verdict>) -> T,
    ) -> T {
        with_device_store(&self.stores, "verdicts", self.name, client, f)
    }
}

/// Runs `f` on the store of `client`'s device kind in `stores` (namespace
/// `attn/<cubecl>/<kind>/<name>/<device>`), opened on first use.
fn with_device_store<K, V, T>(
    stores: &Mutex<HashMap<String, Store<K, V>>>,
    kind: &str,
    name: &str,
    client: &ComputeClient,
    f: impl FnOnce(&mut Store<K, V>) -> T,
) -> T
where
    K: StoreKey,
    V: StoreValue,
{
    cache::init();
    let hardware = client.hardware_identity().to_string();
    let mut stores = lock(stores);
    let store = stores.entry(hardware.clone()).or_insert_with(|| {
        Store::new(StoreOptions::new().storage(Namespace::scoped(
            "attn",
            format!("{kind}/{name}/{hardware}"),
        )))
    });
    f(store)
}

fn judged<K: std::fmt::Debug, P: std::fmt::Display>(key: &K, pick: P, fallback: P) -> Judged {
    Judged {
        key: format!("{key:?}"),
        pick: pick.to_string(),
        fallback: fallback.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds per call of `calls` calls of `run` issued back to back, to the end of the last on the
/// device.
pub(super) fn timed(
    client: &ComputeClient,
    calls: usize,
    mut run: impl FnMut() -> Result<(), AttnError>,
) -> Result<f64, AttnError> {
    let calls = calls.max(1);
    let start = Instant::now();
    for _ in 0..calls {
        run()?;
    }
    crate::sync(client)?;
    Ok(start.elapsed().as_secs_f64() / calls as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pick_stays_only_beyond_the_spread() {
        // Clearly faster: every sample of the pick beats every sample of the fallback.
        let pick = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.02, 0.98];
        let fallback = [1.5, 1.6, 1.4, 1.5, 1.55, 1.45, 1.5, 1.52, 1.48];
        assert!(Verdict::judge(&pick, &fallback).keep);
        // Swapped: never.
        assert!(!Verdict::judge(&fallback, &pick).keep);
        // A faster median inside the spread: the fallback stays.
        let noisy_pick = [0.8, 1.3, 0.9, 1.2, 0.95, 1.25, 0.97, 1.1, 1.0];
        let noisy_fallback = [1.0, 1.2, 0.9, 1.3, 1.05, 1.1, 0.95, 1.25, 1.02];
        let v = Verdict::judge(&noisy_pick, &noisy_fallback);
        assert!(v.pick_ns < v.fallback_ns, "the pick's median is lower");
        assert!(!v.keep, "but not by more than the spread: {v:?}");
        // Equal: the fallback stays.
        assert!(!Verdict::judge(&pick, &pick).keep);
    }

    /// A sample spans a millisecond of back-to-back calls, one call when a call is longer.
    #[test]
    fn samples_span_a_millisecond() {
        assert_eq!(calls_per_sample(2e-3), 1);
        assert_eq!(calls_per_sample(1e-3), 1);
        assert_eq!(calls_per_sample(0.3e-3), 4);
        assert_eq!(calls_per_sample(80e-6), 13);
        assert_eq!(calls_per_sample(1e-7), MAX_CALLS_PER_SAMPLE);
        assert_eq!(calls_per_sample(0.0), MAX_CALLS_PER_SAMPLE);
        assert_eq!(calls_per_sample(f64::NAN), MAX_CALLS_PER_SAMPLE);
    }

    /// Verdicts reach the cache database: a fresh set of verdicts (a new process's) reads them,
    /// and a key nobody judged runs the tuner's pick.
    #[cfg(feature = "wgpu")]
    #[test]
    fn verdicts_are_kept_in_the_cache_and_read_back() {
        use crate::blueprint::Family;
        use attn_types::Tiling;
        let dir = std::env::temp_dir().join(format!("attn-verdicts-{}", std::process::id()));
        assert!(cache::use_dir(&dir), "nothing used the cache before");
        let client = crate::default_client();
        let key = |seq| TuneKey {
            variant: "Test#0".into(),
            dtype: "f16".into(),
            head_dim: 64,
            value_dim: 64,
            group: 1,
            kind: "causal".into(),
            seq_q: seq,
            seq_k: seq,
            batch_heads: 64,
        };
        let tile = |block_q, block_kv| Candidate {
            tiling: Tiling { block_q, block_kv },
            family: Family::Portable,
        };
        let (fallback, pick) = (tile(64, 32), tile(32, 32));
        let verdicts = Verdicts::new("test");
        // The pick takes twice the fallback's time on one key and half of it on another; calls
        // of 20 µs and 10 µs are sampled 64 at a time (after one each alone).
        let mut sizes = Vec::new();
        let slower = |c: Candidate, calls: usize| {
            sizes.push(calls);
            Ok(if c == pick { 20e-6 } else { 10e-6 })
        };
        assert!(!verdicts
            .settle(&client, &key(1024), pick, fallback, slower)
            .unwrap());
        assert_eq!(sizes[..2], [1, 1]);
        assert!(sizes[2..].iter().all(|&n| n == MAX_CALLS_PER_SAMPLE));
        assert_eq!(sizes.len(), 2 + 2 * ROUNDS);
        let faster = |c: Candidate, _: usize| Ok(if c == pick { 1e-3 } else { 2e-3 });
        assert!(verdicts
            .settle(&client, &key(4096), pick, fallback, faster)
            .unwrap());
        let mut calls = 0;
        let counted = |_: Candidate, _: usize| {
            calls += 1;
            Ok(1.0)
        };
        assert!(
            !verdicts
                .settle(&client, &key(1024), pick, fallback, counted)
                .unwrap(),
            "a settled key keeps its verdict"
        );
        assert_eq!(calls, 0, "and is not timed again");
        let fresh = Verdicts::new("test");
        assert_eq!(fresh.choose(&client, &key(1024), pick, fallback), fallback);
        assert_eq!(fresh.choose(&client, &key(4096), pick, fallback), pick);
        assert_eq!(fresh.choose(&client, &key(256), pick, fallback), pick);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn quartiles_are_the_third_and_seventh_of_nine() {
        let pick: Vec<f64> = (1..=9).map(f64::from).collect();
        let v = Verdict::judge(&pick, &pick);
        assert_eq!(v.pick_upper_ns, 7_000_000_000);
        assert_eq!(v.fallback_lower_ns, 3_000_000_000);
        assert_eq!(v.pick_ns, 5_000_000_000);
    }
}
