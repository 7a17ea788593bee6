//! The tuned decode path (its own process: it sets the tuning policy and the cache folder for the
//! whole process): every plan the tuner may choose, then the tuned `decode` itself (which times
//! them on a miss and stores the winner), each against the float64 reference on fresh random
//! inputs.

use attn::decode::{check_plan, DecodeProblem};
use attn::reference::{
    decode_f64, decode_naive, error_floor, max_abs_error, random_vec, seeded_rng, widen, Verdict,
};
use attn::{ComputeClient, Inputs, KvCache, Output, Tensor};

attn::attention! {
    /// GQA 4, causal, f32.
    Gqa4Causal { heads: gqa(group = 4), head_dim: 64, dtype: f32, mask: causal }
}

/// Compares one result with float64; panics with both errors when it is off.
fn check(
    client: &ComputeClient,
    out: &Output<f32>,
    reference: (&[f64], &[f64], &[f64]),
    label: &str,
) {
    let (ref_o, ref_lse, naive) = reference;
    let o = widen(&out.o.to_vec(client));
    let verdict = Verdict::new(&o, ref_o, naive, error_floor::<f32>());
    assert!(
        verdict.passed(),
        "{label}: max |O − f64| = {:.3e} > bound {:.3e}",
        verdict.kernel_error,
        verdict.bound
    );
    let lse: Vec<f64> = out.lse.to_vec(client).into_iter().map(f64::from).collect();
    let lse_error = max_abs_error(&lse, ref_lse);
    assert!(
        lse_error <= 2e-3,
        "{label}: max |LSE − f64| = {lse_error:.3e}"
    );
}

#[test]
fn tuned_decode_and_every_plan_choice_match_the_reference() {
    let client = attn::default_client();
    attn::tune::set_policy(attn::tune::Policy::Tune);
    let dir = std::env::temp_dir().join(format!("attn-decode-tune-{}", std::process::id()));
    assert!(attn::tune::cache::use_dir(&dir), "no tuned call ran before");
    let (mut rng, _) = seeded_rng("tuned decode");
    let (batch, heads_kv, heads_q, d, capacity) = (2, 2, 8, 64, 1100);
    let lengths = vec![317, 1090];
    let shape = [batch, heads_kv, capacity, d];
    let kh: Vec<f32> = random_vec(&mut rng, shape.iter().product());
    let vh: Vec<f32> = random_vec(&mut rng, shape.iter().product());
    let cache = KvCache::from_contiguous_parts(
        Tensor::from_slice(&client, &kh, shape).unwrap(),
        Tensor::from_slice(&client, &vh, shape).unwrap(),
        lengths,
    )
    .unwrap();
    let qh: Vec<f32> = random_vec(&mut rng, batch * heads_q * d);
    let q = Tensor::from_slice(&client, &qh, [batch, heads_q, 1, d]).unwrap();
    let none = Inputs::default();
    let call = DecodeProblem::new::<Gqa4Causal>(&q, &cache, &none).unwrap();
    let (qf, kf, vf) = (widen(&qh), widen(&kh), widen(&vh));
    let reference = decode_f64::<Gqa4Causal>(&call, &none, &qf, &kf, &vf);
    let naive = decode_naive::<Gqa4Causal>(&call, &none, &qf, &kf, &vf);
    let expected = (&reference.o[..], &reference.lse[..], &naive[..]);

    let mut ran = 0;
    for choice in attn::tune::plan_choices() {
        let Ok(plan) = choice.plan(&client, &call) else {
            continue;
        };
        if check_plan(&client, &call, plan).is_err() {
            continue;
        }
        let out = Output {
            o: Tensor::empty(&client, call.problem.out_shape()),
            lse: attn::Lse::empty(&client, call.problem.lse_shape()),
        };
        attn::decode_with_plan::<Gqa4Causal>(&client, &q, &cache, &none, plan, &out).unwrap();
        check(
            &client,
            &out,
            expected,
            &format!("choice {choice} = {}", plan.name()),
        );
        ran += 1;
    }
    assert!(ran >= 4, "only {ran} plan choices ran");

    // The tuned call times the choices on this miss, stores the winner, and runs it.
    let out = attn::decode::<Gqa4Causal>(&client, &q, &cache, &none).unwrap();
    check(&client, &out, expected, "tuned");
    let stored = attn::tune::cache::summary(&client);
    assert!(
        stored.ours >= 1,
        "the call tuned and stored its key: {stored:?}"
    );
    let again = attn::decode::<Gqa4Causal>(&client, &q, &cache, &none).unwrap();
    check(&client, &again, expected, "tuned, settled");
    let _ = std::fs::remove_dir_all(&dir);
}
