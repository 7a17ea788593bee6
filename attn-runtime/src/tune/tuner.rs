//! cubecl's tuner over a variant's candidates: the fastest cached shape, tuned on a miss.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use cubecl::tune::{LocalTuner, Tunable, TunableSet};
use cubecl_common::device::ServiceId;

use super::cache;
use super::candidates::{candidates, Candidate};
use super::key::{fingerprint, kind, TuneKey};
use super::prepared::PerVariant;
use super::verdict::{timed, PREFILL};
use crate::blueprint::Blueprint;
use crate::inputs::Packed;
use crate::launch::{
    check_loop_budget, copy_engine_reads, is_cpu_emulated, launch, select_candidate, Lse, Output,
};
use crate::problem::Problem;
use crate::tensor::{ComputeClient, Element, Tensor};
use crate::variant::Variant;
use crate::AttnError;

/// What a call does when the tuner has no answer for its key.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Policy {
    /// Use the cached winner (memory, then the persistent cache); on a miss, time every candidate
    /// now, cache the winner and run it. `attn-tune` at install fills the cache so that serving
    /// never misses on the tuned grid.
    Tune,
    /// Never tune and never read the cache: always the fallback shape.
    Fallback,
    /// Use the cached winner; on a miss, run the fallback at once and settle the key (read the
    /// persistent cache, or time the candidates) on a thread of its own, off the request path:
    /// later calls of the key run the winner. For servers, where a first call must not wait for
    /// tuning. [`wait_for_background_tuning`] waits for the threads. The thread's compilations
    /// and timing runs share the device with the calls, so a call made meanwhile waits for them
    /// (measured: `bench/RESULTS.md`).
    Background,
    /// Use what a tuning settled, here or at install (`attn-tune`); never tune in this process:
    /// on a miss the fallback runs and the call's shape is recorded in
    /// [`super::cache::misses_path`] for the next `attn-tune tune --misses`. For servers: no call
    /// ever waits for tuning.
    Deferred,
}

/// Set by [`set_policy`]: 0 unset, 1 tune, 2 fallback, 3 background, 4 deferred.
static POLICY: AtomicU8 = AtomicU8::new(0);

/// The policy for calls on `client`'s device: [`set_policy`]'s, else `ATTN_TUNE` (`on`, `off`,
/// `background` or `deferred`), else tune on GPUs and the fallback on CPU-emulated devices (llvmpipe), where timing
/// candidates costs minutes and the fallback is what the portable kernel wants anyway.
pub fn policy(client: &ComputeClient) -> Policy {
    policy_for(is_cpu_emulated(client))
}

/// [`policy`] for a device known to be CPU-emulated or not (the environment is read once).
pub(super) fn policy_for(cpu_emulated: bool) -> Policy {
    static FROM_ENV: OnceLock<Option<Policy>> = OnceLock::new();
    match POLICY.load(Ordering::Relaxed) {
        1 => return Policy::Tune,
        2 => return Policy::Fallback,
        3 => return Policy::Background,
        4 => return Policy::Deferred,
        _ => {}
    }
    let from_env = FROM_ENV.get_or_init(|| match std::env::var("ATTN_TUNE").as_deref() {
        Ok("off" | "0") => Some(Policy::Fallback),
        Ok("on" | "1") => Some(Policy::Tune),
        Ok("background") => Some(Policy::Background),
        Ok("deferred") => Some(Policy::Deferred),
        _ => None,
    });
    match from_env {
        Some(policy) => *policy,
        None if cpu_emulated => Policy::Fallback,
        None => Policy::Tune,
    }
}

/// Sets the policy for the rest of the process, over `ATTN_TUNE` and the device's default.
pub fn set_policy(policy: Policy) {
    let code = match policy {
        Policy::Tune => 1,
        Policy::Fallback => 2,
        Policy::Background => 3,
        Policy::Deferred => 4,
    };
    POLICY.store(code, Ordering::Relaxed);
}

/// One tuner for every variant: its cache namespace is the same in every build, and variants keep
/// apart through the key (the variant's name) and the candidate list's checksum.
static TUNER: LocalTuner<TuneKey, ServiceId> = LocalTuner::new("attn-prefill");

/// A call as the tuner sees it: owned handles, cheap to clone.
#[derive(Clone)]
struct Call<E: Element> {
    client: ComputeClient,
    problem: Problem,
    packed: Arc<Packed>,
    q: Tensor<E>,
    k: Tensor<E>,
    v: Tensor<E>,
    out: Output<E>,
    key: TuneKey,
}

impl<E: Element> Call<E> {
    /// The same call writing into fresh buffers: candidates are timed there, never in the
    /// caller's output.
    fn with_scratch_output(&self) -> Self {
        let mut call = self.clone();
        call.out = Output {
            o: Tensor::empty(&self.client, self.problem.out_shape()),
            lse: Lse::empty(&self.client, self.problem.lse_shape()),
        };
        call
    }
}

/// Runs `candidate` on `call`.
fn run<V: Variant>(call: &Call<V::Elem>, candidate: Candidate) -> Result<(), AttnError> {
    let blueprint = Blueprint::new(&V::SPEC, candidate, &call.problem, &call.packed);
    launch::<V>(
        &call.client,
        &blueprint,
        &call.problem,
        &call.packed,
        &call.q,
        &call.k,
        &call.v,
        &call.out,
    )
}

/// The tunable set of `V` on the device behind `client`: one tunable per candidate, identified
/// by it. A candidate a verdict rejected for the call's key runs the fallback instead
/// ([`verdict`](super::verdict)), so a fresh process whose cache holds that pick never compiles it.
fn tunable_set<V: Variant>(
    candidates: &[Candidate],
) -> TunableSet<TuneKey, Call<V::Elem>, (), Candidate> {
    let mut set = TunableSet::new(
        |call: &Call<V::Elem>| call.key.clone(),
        |_key: &TuneKey, call: &Call<V::Elem>| call.with_scratch_output(),
    );
    let Some(&fallback) = candidates.first() else {
        return set;
    };
    for &candidate in candidates {
        set = set.with(Tunable::identified(
            candidate,
            move |call: Call<V::Elem>| {
                let runs = PREFILL.choose(&call.client, &call.key, candidate, fallback);
                run::<V>(&call, runs).map_err(|e| e.to_string())
            },
        ));
    }
    set
}

/// Judges the tuner's pick for `call`'s key against the fallback (timed into scratch outputs)
/// unless a verdict exists; returns what runs for the key from now on.
fn settle_verdict<V: Variant>(
    call: &Call<V::Elem>,
    pick: Candidate,
    fallback: Candidate,
) -> Result<Candidate, AttnError> {
    let scratch = call.with_scratch_output();
    let keep = PREFILL.settle(&call.client, &call.key, pick, fallback, |c, calls| {
        timed(&call.client, calls, || run::<V>(&scratch, c))
    })?;
    Ok(if keep { pick } else { fallback })
}

/// Runs `V` with the tuned shape for this call's key (see [`Policy`]) into `out`; returns the
/// candidate that ran. Every input has been checked; `out` has the problem's shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_tuned<V: Variant>(
    client: &ComputeClient,
    problem: &Problem,
    packed: Packed,
    q: &Tensor<V::Elem>,
    k: &Tensor<V::Elem>,
    v: &Tensor<V::Elem>,
    out: &Output<V::Elem>,
) -> Result<Candidate, AttnError> {
    let prepared = prepared::<V>(client)?;
    if !copy_engine_reads(q, k, v, out) {
        // Strides the copy engine cannot describe (not multiples of 16 bytes, rare): the next
        // family's untuned pick, never a tuned warpgroup entry run on another kernel.
        let candidate = prepared.without_copy_engine;
        tracing::debug!(
            variant = V::SPEC.name,
            candidate = %candidate,
            "operands the copy engine cannot read: untuned call"
        );
        let blueprint = Blueprint::new(&V::SPEC, candidate, problem, &packed);
        launch::<V>(client, &blueprint, problem, &packed, q, k, v, out)?;
        return Ok(candidate);
    }
    let list = &prepared.candidates;
    let fallback = list[0];
    // A candidate the call cannot run on this device (llvmpipe's loop limit) would fail under the
    // tuner, which treats a cached winner's failure as fatal: such a call runs the fallback.
    let all_run = !prepared.cpu_emulated
        || list
            .iter()
            .all(|c| check_loop_budget(client, problem, c.tiling).is_ok());
    if policy_for(prepared.cpu_emulated) == Policy::Fallback || list.len() == 1 || !all_run {
        tracing::trace!(variant = V::SPEC.name, candidate = %fallback, "untuned call");
        let blueprint = Blueprint::new(&V::SPEC, fallback, problem, &packed);
        launch::<V>(client, &blueprint, problem, &packed, q, k, v, out)?;
        return Ok(fallback);
    }
    cache::init();
    let (id, set) = set_for::<V>(client);
    let key = TuneKey::from_parts(
        prepared.variant.clone(),
        prepared.kind.clone(),
        &V::SPEC,
        problem,
        &packed,
    );
    let call = Call {
        client: client.clone(),
        problem: *problem,
        packed: Arc::new(packed),
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        out: out.clone(),
        key: key.clone(),
    };
    let known = TUNER.fastest_identity(&id, &set, &key);
    if known.is_none() && policy_for(prepared.cpu_emulated) == Policy::Deferred {
        let runs = PREFILL
            .remembered(client, &key, list.iter().copied())
            .unwrap_or_else(|| {
                cache::record_miss(format!(
                    "prefill {} {} {}   # {}",
                    problem.batch,
                    problem.heads_q,
                    problem.seq_q,
                    V::SPEC.name
                ));
                fallback
            });
        tracing::trace!(variant = V::SPEC.name, candidate = %runs, "deferred-tuning call");
        let blueprint = Blueprint::new(&V::SPEC, runs, problem, &call.packed);
        launch::<V>(client, &blueprint, problem, &call.packed, q, k, v, out)?;
        return Ok(runs);
    }
    if known.is_none() && policy_for(prepared.cpu_emulated) == Policy::Background {
        tracing::info!(
            variant = V::SPEC.name,
            key = ?key,
            candidate = %fallback,
            "attn: no tuned tile shape in this process for this key: the fallback runs now, the key is settled in the background"
        );
        let blueprint = Blueprint::new(&V::SPEC, fallback, problem, &call.packed);
        launch::<V>(client, &blueprint, problem, &call.packed, q, k, v, out)?;
        settle_in_background::<V>(id, set, call.with_scratch_output(), fallback);
        return Ok(fallback);
    }
    if known.is_none() {
        tracing::info!(
            variant = V::SPEC.name,
            key = ?key,
            "attn: no tuned tile shape in this process for this key: read from the tuning cache, or timed now"
        );
    }
    if let Some(pick) = known {
        TUNER.execute(&id, client, set, call);
        return Ok(PREFILL.choose(client, &key, pick, fallback));
    }
    TUNER.execute(&id, client, set.clone(), call.clone());
    let pick = TUNER.fastest_identity(&id, &set, &key).unwrap_or(fallback);
    let runs = settle_verdict::<V>(&call, pick, fallback)?;
    tracing::info!(variant = V::SPEC.name, tile = %runs.tiling.name(), "attn: tuned tile shape");
    if runs != pick {
        // The tuner ran its pick into the output; the verdict sent it back: the answer is the
        // candidate that runs from now on.
        run::<V>(&call, runs)?;
    }
    Ok(runs)
}

/// Keys being settled in the background (their debug form), so a burst of calls of one key
/// starts one thread.
static SETTLING: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
/// The background threads not yet waited for.
static THREADS: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Settles `call`'s key on a thread of its own (the tuner reads the persistent cache or times the
/// candidates, into scratch outputs), unless a thread already does.
fn settle_in_background<V: Variant>(
    id: ServiceId,
    set: SetOf<V>,
    call: Call<V::Elem>,
    fallback: Candidate,
) {
    let key = call.key.clone();
    spawn_settling(format!("{key:?}"), move || {
        let client = call.client.clone();
        TUNER.execute(&id, &client, set.clone(), call.clone());
        let pick = TUNER.fastest_identity(&id, &set, &key).unwrap_or(fallback);
        match settle_verdict::<V>(&call, pick, fallback) {
            Ok(runs) => {
                tracing::info!(variant = V::SPEC.name, candidate = %runs, "attn: key settled in the background")
            }
            Err(e) => {
                tracing::warn!(variant = V::SPEC.name, error = %e, "attn: the pick could not be judged; it runs until it is")
            }
        }
    });
}

/// Runs `work`, which settles `key`, on a thread of its own that [`wait_for_background_tuning`]
/// waits for; nothing when a thread already settles that key.
pub(super) fn spawn_settling(key: String, work: impl FnOnce() + Send + 'static) {
    {
        let mut settling = SETTLING.lock().unwrap_or_else(|e| e.into_inner());
        if settling.contains(&key) {
            return;
        }
        settling.push(key.clone());
    }
    let thread = std::thread::spawn(move || {
        work();
        let mut settling = SETTLING.lock().unwrap_or_else(|e| e.into_inner());
        settling.retain(|k| k != &key);
    });
    THREADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(thread);
}

/// Waits until every key [`Policy::Background`] started settling is settled (for tests, tools and
/// a clean shutdown).
pub fn wait_for_background_tuning() {
    loop {
        let pending: Vec<_> =
            std::mem::take(&mut *THREADS.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.is_empty() {
            return;
        }
        for thread in pending {
            let _ = thread.join();
        }
    }
}

/// The candidate that runs for `key` in this process, if the tuner settled the key here: its
/// pick, or the fallback where the pick did not beat it beyond the spread.
pub fn chosen<V: Variant>(client: &ComputeClient, key: &TuneKey) -> Option<Candidate> {
    let (id, set) = set_for::<V>(client);
    let pick = TUNER.fastest_identity(&id, &set, key)?;
    let fallback = prepared::<V>(client).ok()?.candidates[0];
    Some(PREFILL.choose(client, key, pick, fallback))
}

/// `V`'s tunable set on `client`'s device, built once per device and process.
type SetOf<V> = Arc<TunableSet<TuneKey, Call<<V as Variant>::Elem>, (), Candidate>>;

fn set_for<V: Variant>(client: &ComputeClient) -> (ServiceId, SetOf<V>) {
    let id = client.service_id();
    let set = TUNER.init(&id, {
        let client = client.clone();
        move || {
            let candidates = prepared::<V>(&client).map(|p| p.candidates.clone());
            tunable_set::<V>(&candidates.unwrap_or_default())
        }
    });
    (id, set)
}

/// What calls of a variant on a device need besides the tuner, worked out on the first call
/// there instead of on every launch.
struct Prepared {
    /// The candidates for operands the copy engine reads, the fallback first.
    candidates: Vec<Candidate>,
    /// The untuned pick for operands it cannot read.
    without_copy_engine: Candidate,
    /// The key's `variant` field.
    variant: String,
    /// The key's `kind` field.
    kind: String,
    /// Whether the device is llvmpipe (loop limit; no tuning by default).
    cpu_emulated: bool,
}

/// [`Prepared`] per device and variant type.
static PREPARED: PerVariant<Prepared> = PerVariant::new();

fn prepared<V: Variant>(client: &ComputeClient) -> Result<Arc<Prepared>, AttnError> {
    PREPARED.get_or_try_init::<V, _>(client, || {
        Ok(Prepared {
            candidates: candidates(client, &V::SPEC, true)?,
            without_copy_engine: select_candidate(client, &V::SPEC, false)?,
            variant: fingerprint(&V::SPEC),
            kind: kind(&V::SPEC),
            cpu_emulated: is_cpu_emulated(client),
        })
    })
}
