//! Tuning the decode plan: per device and key, the fastest of a few plans around the heuristic
//! ([`crate::decode::default_plan`], the fallback): split counts from a quarter to four times
//! the heuristic's, at 64 and 128 keys per step.

use std::sync::Arc;

use cubecl::tune::{LocalTuner, Tunable, TunableSet};
use cubecl::AutotuneKey;
use cubecl_common::device::ServiceId;
use serde::{Deserialize, Serialize};

use super::cache;
use super::key::fingerprint;
use super::prepared::PerVariant;
use super::tuner::{policy_for, spawn_settling};
use super::verdict::{timed, DECODE};
use crate::decode::{
    check_plan, default_plan, launch_decode, units_plan, warpgroup_plan, DecodeKernel, DecodePlan,
    DecodeProblem,
};
use crate::kv_cache::KvCache;
use crate::launch::{is_cpu_emulated, Lse, Output};
use crate::tensor::{ComputeClient, Element, Tensor};
use crate::variant::Variant;
use crate::AttnError;

/// One decode tuning decision's scope: the variant, the packed rows per K/V head, and buckets of
/// `B × Hkv` and of the longest key length. The device is cubecl's part of the cache namespace.
#[derive(AutotuneKey, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DecodeKey {
    /// The variant's name and a hash of its compile-time facts.
    pub variant: String,
    /// Query rows per K/V head (group × query tokens).
    pub group_rows: usize,
    /// Sequences × K/V heads.
    #[autotune(anchor(exp(min = 1, max = 1024, base = 4)))]
    pub batch_heads: usize,
    /// The longest key length.
    #[autotune(anchor(exp(min = 256, max = 262144, base = 4)))]
    pub keys: usize,
    /// Whether the cache is paged.
    pub paged: bool,
    /// Whether the cache stores K and V in e4m3.
    pub fp8: bool,
}

/// A plan relative to a heuristic's: the warpgroup kernel's plan at `units` keys per step
/// ([`warpgroup_plan`]) or the CUDA-core kernel's at `units` units ([`units_plan`]), its split
/// count times `num / den`. [`PlanChoice::HEURISTIC`] is [`default_plan`] itself, whichever
/// kernel it picks. Stable names (`s1x1_u128`, `s2x1_wg64`, `default`) key the cache.
#[derive(Copy, Clone, Eq, PartialEq, Hash, Debug, Serialize, Deserialize)]
pub struct PlanChoice {
    /// Split-count factor, numerator.
    pub num: u32,
    /// Split-count factor, denominator.
    pub den: u32,
    /// Units per cube (CUDA-core kernel) or keys per step (warpgroup kernel); 0 for the
    /// heuristic.
    pub units: u32,
    /// The warpgroup kernel.
    pub warpgroup: bool,
}

impl std::fmt::Display for PlanChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Self::HEURISTIC {
            return write!(f, "default");
        }
        let kernel = if self.warpgroup { "wg" } else { "u" };
        write!(f, "s{}x{}_{kernel}{}", self.num, self.den, self.units)
    }
}

impl PlanChoice {
    /// The heuristic's own plan ([`default_plan`]): the fallback.
    pub const HEURISTIC: PlanChoice = PlanChoice {
        num: 1,
        den: 1,
        units: 0,
        warpgroup: false,
    };

    /// The plan this choice makes for `call`.
    pub fn plan(
        &self,
        client: &ComputeClient,
        call: &DecodeProblem,
    ) -> Result<DecodePlan, AttnError> {
        if *self == Self::HEURISTIC {
            return default_plan(client, call);
        }
        let mut plan = if self.warpgroup {
            warpgroup_plan(client, call, self.units)
        } else {
            let mut plan = units_plan(client, call)?;
            if let DecodeKernel::Units(tiling) = &mut plan.kernel {
                tiling.units = self.units;
            }
            plan
        };
        plan.splits = (plan.splits * self.num as usize / self.den as usize).max(1);
        Ok(plan)
    }
}

/// The choices, the heuristic itself first: the CUDA-core kernel at 64 and 128 units and the
/// warpgroup kernel at 64 and 128 keys per step, each at a quarter to four times its
/// heuristic's split count. A choice the device cannot run fails its check and is not timed.
pub fn plan_choices() -> Vec<PlanChoice> {
    let mut choices = vec![PlanChoice::HEURISTIC];
    for warpgroup in [false, true] {
        for units in [64, 128] {
            for (num, den) in [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4)] {
                choices.push(PlanChoice {
                    num,
                    den,
                    units,
                    warpgroup,
                });
            }
        }
    }
    choices
}

static TUNER: LocalTuner<DecodeKey, ServiceId> = LocalTuner::new(cache::DECODE_TUNER_NAME);

/// A decode call as the tuner sees it.
#[derive(Clone)]
struct Call<E: Element> {
    client: ComputeClient,
    problem: Arc<DecodeProblem>,
    q: Tensor<E>,
    cache: Arc<KvCache<E>>,
    out: Output<E>,
    key: DecodeKey,
}

fn tunable_set<V: Variant>() -> TunableSet<DecodeKey, Call<V::Elem>, (), PlanChoice> {
    let mut set = TunableSet::new(
        |call: &Call<V::Elem>| call.key.clone(),
        |_key: &DecodeKey, call: &Call<V::Elem>| {
            // Candidates are timed into scratch buffers, never the caller's.
            let mut call = call.clone();
            call.out = Output {
                o: Tensor::empty(&call.client, call.problem.out_shape()),
                lse: Lse::empty(&call.client, call.problem.lse_shape()),
            };
            call
        },
    );
    let fallback = PlanChoice::HEURISTIC;
    for choice in plan_choices() {
        set = set.with(Tunable::identified(choice, move |call: Call<V::Elem>| {
            let runs = DECODE.choose(&call.client, &call.key, choice, fallback);
            call.run::<V>(runs).map_err(|e| e.to_string())
        }));
    }
    set
}

impl<E: Element> Call<E> {
    fn run<V: Variant<Elem = E>>(&self, choice: PlanChoice) -> Result<(), AttnError> {
        let plan = choice.plan(&self.client, &self.problem)?;
        check_plan(&self.client, &self.problem, plan)?;
        launch_decode::<V>(
            &self.client,
            &self.problem,
            plan,
            &self.q,
            &self.cache,
            &self.out,
        )
    }
}

/// Judges the tuner's pick for `call`'s key against the heuristic's plan unless a verdict exists;
/// returns the choice that runs for the key from now on.
fn settle_verdict<V: Variant>(
    call: &Call<V::Elem>,
    pick: PlanChoice,
) -> Result<PlanChoice, AttnError> {
    let fallback = PlanChoice::HEURISTIC;
    let keep = DECODE.settle(&call.client, &call.key, pick, fallback, |choice, calls| {
        timed(&call.client, calls, || call.run::<V>(choice))
    })?;
    Ok(if keep { pick } else { fallback })
}

/// What decode calls of a variant on a device need besides the tuner, worked out on the first call
/// there instead of on every launch: the key's variant field and whether the device is llvmpipe.
struct Prepared {
    variant: String,
    cpu_emulated: bool,
}

static PREPARED: PerVariant<Prepared> = PerVariant::new();

fn prepared<V: Variant>(client: &ComputeClient) -> Arc<Prepared> {
    let made: Result<_, std::convert::Infallible> =
        PREPARED.get_or_try_init::<V, _>(client, || {
            Ok(Prepared {
                variant: fingerprint(&V::SPEC),
                cpu_emulated: is_cpu_emulated(client),
            })
        });
    match made {
        Ok(p) => p,
        Err(never) => match never {},
    }
}

/// The key of a checked decode call of `V`.
pub(crate) fn decode_key<V: Variant>(
    client: &ComputeClient,
    call: &DecodeProblem,
    cache: &KvCache<V::Elem>,
) -> DecodeKey {
    key_of(prepared::<V>(client).variant.clone(), call, cache)
}

/// The key of a checked decode call, given the variant's key field.
fn key_of<E: Element>(variant: String, call: &DecodeProblem, cache: &KvCache<E>) -> DecodeKey {
    DecodeKey::new(
        variant,
        call.group_rows(),
        call.problem.batch * call.problem.heads_kv,
        call.max_len,
        cache.is_paged(),
        cache.is_fp8(),
    )
}

/// Runs a checked decode call with the tuned plan for its key (the heuristic's plan when the
/// policy says so, on CPU-emulated devices by default); returns the plan that ran.
pub(crate) fn decode_tuned<V: Variant>(
    client: &ComputeClient,
    call: DecodeProblem,
    q: &Tensor<V::Elem>,
    cache: &KvCache<V::Elem>,
    out: &Output<V::Elem>,
) -> Result<DecodePlan, AttnError> {
    let base = default_plan(client, &call)?;
    let facts = prepared::<V>(client);
    if policy_for(facts.cpu_emulated) == super::Policy::Fallback {
        launch_decode::<V>(client, &call, base, q, cache, out)?;
        return Ok(base);
    }
    cache::init();
    let key = key_of(facts.variant.clone(), &call, cache);
    let id = client.service_id();
    let set = TUNER.init(&id, tunable_set::<V>);
    // A key this process has settled runs its plan directly: no copy of the cache for the tuner.
    if let Some(pick) = TUNER.fastest_identity(&id, &set, &key) {
        // A key covers calls the pick may not fit (pages of another size under the same key, a
        // cache the copy engine cannot read): those run the heuristic's plan.
        let plan = DECODE
            .choose(client, &key, pick, PlanChoice::HEURISTIC)
            .plan(client, &call)
            .ok()
            .filter(|plan| check_plan(client, &call, *plan).is_ok())
            .unwrap_or(base);
        launch_decode::<V>(client, &call, plan, q, cache, out)?;
        return Ok(plan);
    }
    if policy_for(facts.cpu_emulated) == super::Policy::Deferred {
        let remembered = DECODE
            .remembered(client, &key, plan_choices())
            .and_then(|choice| choice.plan(client, &call).ok())
            .filter(|plan| check_plan(client, &call, *plan).is_ok());
        let plan = remembered.unwrap_or_else(|| {
            let p = &call.problem;
            cache::record_miss(format!(
                "decode {} {} {} {}   # {}",
                p.batch,
                p.heads_q,
                call.max_len.max(1),
                p.seq_q,
                V::SPEC.name
            ));
            base
        });
        launch_decode::<V>(client, &call, plan, q, cache, out)?;
        return Ok(plan);
    }
    let background = policy_for(facts.cpu_emulated) == super::Policy::Background;
    if background {
        // The heuristic's plan now; the key is settled on a thread of its own, into scratch
        // buffers (the caller's output is written here, before the thread starts).
        launch_decode::<V>(client, &call, base, q, cache, out)?;
    }
    let tuned = Call {
        client: client.clone(),
        problem: Arc::new(call),
        q: q.clone(),
        cache: Arc::new(cache.clone()),
        out: out.clone(),
        key: key.clone(),
    };
    let scratch = || Call {
        out: Output {
            o: Tensor::empty(client, tuned.problem.out_shape()),
            lse: Lse::empty(client, tuned.problem.lse_shape()),
        },
        ..tuned.clone()
    };
    if background {
        let settling = scratch();
        spawn_settling(format!("decode {key:?}"), move || {
            let client = settling.client.clone();
            TUNER.execute(&id, &client, set.clone(), settling.clone());
            let pick = TUNER
                .fastest_identity(&id, &set, &settling.key)
                .unwrap_or(PlanChoice::HEURISTIC);
            if let Err(e) = settle_verdict::<V>(&settling, pick) {
                tracing::warn!(variant = V::SPEC.name, error = %e, "attn: the decode pick could not be judged; it runs until it is");
            }
        });
        return Ok(base);
    }
    TUNER.execute(&id, client, set.clone(), tuned.clone());
    let pick = TUNER
        .fastest_identity(&id, &set, &key)
        .unwrap_or(PlanChoice::HEURISTIC);
    // Judged on scratch buffers: the caller's output already holds the pick's answer.
    let choice = settle_verdict::<V>(&scratch(), pick)?;
    if choice != pick {
        // The verdict sent the pick back: the answer is the plan that runs from now on.
        tuned.run::<V>(choice)?;
    }
    tracing::info!(variant = V::SPEC.name, plan = %choice, "attn: tuned decode plan");
    choice.plan(client, &tuned.problem)
}
