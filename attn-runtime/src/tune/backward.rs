//! Backward plans per device: cubecl's tuner over [`backward_plans`](crate::backward_plans),
//! keyed like the forward's tile shapes, under the same policy and the same verdict on its pick.

use std::sync::{Arc, Mutex};

use cubecl::tune::{LocalTuner, Tunable, TunableSet};
use cubecl_common::device::ServiceId;

use super::cache::{self, BACKWARD_TUNER_NAME, DETERMINISTIC_BACKWARD_TUNER_NAME};
use super::key::TuneKey;
use super::tuner::{policy_for, spawn_settling};
use super::verdict::{timed, BACKWARD};
use super::Policy;
use crate::backward::{run, tuned_plans, BackwardPlan, Grads};
use crate::inputs::{Inputs, OwnedInputs, Packed};
use crate::launch::{is_cpu_emulated, Output};
use crate::problem::Problem;
use crate::tensor::{ComputeClient, Element, Tensor};
use crate::variant::Variant;
use crate::AttnError;

/// One tuner for every variant's backward plans, apart from the forward's in the cache.
static TUNER: LocalTuner<TuneKey, ServiceId> = LocalTuner::new(BACKWARD_TUNER_NAME);
/// The tuner of deterministic mode: its own plans (none adding a gradient up with atomics) and
/// cache.
static DETERMINISTIC_TUNER: LocalTuner<TuneKey, ServiceId> =
    LocalTuner::new(DETERMINISTIC_BACKWARD_TUNER_NAME);

/// The tuner of the current mode ([`crate::backward::deterministic`]).
fn tuner() -> &'static LocalTuner<TuneKey, ServiceId> {
    if crate::backward::deterministic() {
        &DETERMINISTIC_TUNER
    } else {
        &TUNER
    }
}

/// A checked backward call, borrowed: what [`backward_tuned`] needs to run a plan and key it.
pub(crate) struct BackwardCall<'a, E: Element> {
    /// Q, K and V.
    pub qkv: [&'a Tensor<E>; 3],
    /// The forward's output and LSE.
    pub out: &'a Output<E>,
    /// The gradient of the loss with respect to O.
    pub d_out: &'a Tensor<E>,
    /// The run-time inputs.
    pub inputs: &'a Inputs<'a>,
    /// The checked problem.
    pub problem: &'a Problem,
    /// The packed inputs.
    pub packed: &'a Packed,
}

/// A call as the tuner sees it: owned handles, cheap to clone, the gradients of the plan that
/// ran left in `grads`.
#[derive(Clone)]
struct Call<E: Element> {
    client: ComputeClient,
    q: Tensor<E>,
    k: Tensor<E>,
    v: Tensor<E>,
    out: Output<E>,
    d_out: Tensor<E>,
    inputs: Arc<OwnedInputs>,
    key: TuneKey,
    grads: Arc<Mutex<Option<Grads<E>>>>,
}

impl<E: Element> Call<E> {
    /// The same call with a slot of its own: candidates timed by the tuner never fill the
    /// caller's.
    fn with_own_slot(&self) -> Self {
        Call {
            grads: Arc::new(Mutex::new(None)),
            ..self.clone()
        }
    }

    fn run<V: Variant<Elem = E>>(&self, plan: BackwardPlan) -> Result<Grads<E>, AttnError> {
        run::<V>(
            &self.client,
            [&self.q, &self.k, &self.v],
            &self.out,
            &self.d_out,
            &self.inputs.view(),
            plan,
        )
    }
}

type SetOf<E> = TunableSet<TuneKey, Call<E>, (), BackwardPlan>;

/// The tunable set of `V`: one tunable per plan; a plan a verdict rejected for the key runs the
/// default plan instead.
fn tunable_set<V: Variant>(plans: &[BackwardPlan]) -> SetOf<V::Elem> {
    let mut set = TunableSet::new(
        |call: &Call<V::Elem>| call.key.clone(),
        |_key: &TuneKey, call: &Call<V::Elem>| call.with_own_slot(),
    );
    let Some(&fallback) = plans.first() else {
        return set;
    };
    for &plan in plans {
        set = set.with(Tunable::identified(plan, move |call: Call<V::Elem>| {
            let runs = BACKWARD.choose(&call.client, &call.key, plan, fallback);
            let grads = call.run::<V>(runs).map_err(|e| e.to_string())?;
            *call.grads.lock().unwrap_or_else(|e| e.into_inner()) = Some(grads);
            Ok::<(), String>(())
        }));
    }
    set
}

/// Judges the tuner's pick for `call`'s key against the default plan unless a verdict exists;
/// returns what runs for the key from now on.
fn settle_verdict<V: Variant>(
    call: &Call<V::Elem>,
    pick: BackwardPlan,
    fallback: BackwardPlan,
) -> Result<BackwardPlan, AttnError> {
    let keep = BACKWARD.settle(&call.client, &call.key, pick, fallback, |plan, calls| {
        timed(&call.client, calls, || call.run::<V>(plan).map(drop))
    })?;
    Ok(if keep { pick } else { fallback })
}

/// Runs a checked backward call with the tuned plan for its key (see [`Policy`]). `plans` are the
/// plans these operands allow, the default first; `readable`: whether the copy engine reads them
/// (else the call is not tuned: the tuned plans assume it does).
pub(crate) fn backward_tuned<V: Variant>(
    client: &ComputeClient,
    call: BackwardCall<'_, V::Elem>,
    plans: &[BackwardPlan],
    readable: bool,
) -> Result<Grads<V::Elem>, AttnError> {
    let fallback = plans[0];
    let direct = |plan| run::<V>(client, call.qkv, call.out, call.d_out, call.inputs, plan);
    let policy = policy_for(is_cpu_emulated(client));
    if !readable || plans.len() == 1 || policy == Policy::Fallback {
        return direct(fallback);
    }
    cache::init();
    let (id, set) = set_for::<V>(client);
    let key = TuneKey::of(&V::SPEC, call.problem, call.packed);
    let known = tuner().fastest_identity(&id, &set, &key);
    if let Some(pick) = known {
        return direct(BACKWARD.choose(client, &key, pick, fallback));
    }
    if policy == Policy::Deferred {
        let plan = BACKWARD
            .remembered(client, &key, plans.iter().copied())
            .unwrap_or_else(|| {
                let p = call.problem;
                cache::record_miss(format!(
                    "prefill {} {} {}   # {} (backward: attn-tune tune --backward)",
                    p.batch,
                    p.heads_q,
                    p.seq_q,
                    V::SPEC.name
                ));
                fallback
            });
        return direct(plan);
    }
    let [q, k, v] = call.qkv;
    let tuned = Call {
        client: client.clone(),
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        out: call.out.clone(),
        d_out: call.d_out.clone(),
        inputs: Arc::new(OwnedInputs::of(call.inputs)),
        key: key.clone(),
        grads: Arc::new(Mutex::new(None)),
    };
    if policy == Policy::Background {
        tracing::info!(
            variant = V::SPEC.name,
            key = ?key,
            plan = %fallback,
            "attn: no tuned backward plan in this process for this key: the default runs now, the key is settled in the background"
        );
        let grads = direct(fallback)?;
        let settling = tuned.with_own_slot();
        spawn_settling(format!("backward {key:?}"), move || {
            let client = settling.client.clone();
            tuner().execute(&id, &client, set.clone(), settling.clone());
            let pick = tuner()
                .fastest_identity(&id, &set, &key)
                .unwrap_or(fallback);
            match settle_verdict::<V>(&settling, pick, fallback) {
                Ok(plan) => {
                    tracing::info!(variant = V::SPEC.name, %plan, "attn: backward key settled in the background")
                }
                Err(e) => {
                    tracing::warn!(variant = V::SPEC.name, error = %e, "attn: the backward pick could not be judged; it runs until it is")
                }
            }
        });
        return Ok(grads);
    }
    tracing::info!(
        variant = V::SPEC.name,
        key = ?key,
        "attn: no tuned backward plan in this process for this key: read from the tuning cache, or timed now"
    );
    tuner().execute(&id, client, set.clone(), tuned.clone());
    let pick = tuner()
        .fastest_identity(&id, &set, &key)
        .unwrap_or(fallback);
    let plan = settle_verdict::<V>(&tuned, pick, fallback)?;
    tracing::info!(variant = V::SPEC.name, %plan, "attn: tuned backward plan");
    let ran = tuned.grads.lock().unwrap_or_else(|e| e.into_inner()).take();
    match ran {
        // The tuner ran its pick into this call's slot, and the pick stays.
        Some(grads) if plan == pick => Ok(grads),
        // The verdict sent the pick back: the answer is the plan that runs from now on.
        _ => direct(plan),
    }
}

/// The backward plan that runs for `key` in this process, if the tuner settled the key here.
pub fn chosen_backward<V: Variant>(client: &ComputeClient, key: &TuneKey) -> Option<BackwardPlan> {
    let fallback = *tuned_plans(client, &V::SPEC, true).first()?;
    let (id, set) = set_for::<V>(client);
    let pick = tuner().fastest_identity(&id, &set, key)?;
    Some(BACKWARD.choose(client, key, pick, fallback))
}

/// `V`'s tunable set on `client`'s device (the plans of its fastest family, for operands the copy
/// engine reads: the only calls tuned), built once per device and process.
fn set_for<V: Variant>(client: &ComputeClient) -> (ServiceId, Arc<SetOf<V::Elem>>) {
    let id = client.service_id();
    let set = tuner().init(&id, {
        let client = client.clone();
        move || tunable_set::<V>(&tuned_plans(&client, &V::SPEC, true))
    });
    (id, set)
}
