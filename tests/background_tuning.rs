//! `Policy::Background`: a call on a key the tuner has not settled runs the fallback at once (its
//! answer is the fallback's, bit for bit) and the key is settled on a thread of its own; later
//! calls run the winner. Then `Policy::Deferred` in a fresh process on that cache: the settled
//! key runs what the tuning kept, a new shape runs the fallback and is recorded for `attn-tune`.
//! Its own test binary: the policy is process-wide.

use attn::inputs::pack;
use attn::reference::{
    attention_f64, attention_naive, error_floor, random_vec, seeded_rng, widen, Verdict,
};
use attn::tune::{Policy, TuneKey};
use attn::{Output, Problem, Tensor, Variant};

attn::attention! {
    /// Several candidates, so there is something to tune.
    Tiled { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal, tiles: [64 x 32, 32 x 16, 16 x 8] }
}

#[test]
fn a_miss_runs_the_fallback_and_settles_in_the_background() {
    let client = attn::default_client();
    attn::tune::set_policy(Policy::Background);
    let dir = std::env::temp_dir().join(format!("attn-background-{}", std::process::id()));
    assert!(attn::tune::cache::use_dir(&dir), "no tuned call ran before");
    let (mut rng, _) = seeded_rng("background tuning");
    let (q_shape, kv_shape) = ([1, 4, 70, 64], [1, 2, 70, 64]);
    let qh: Vec<f32> = random_vec(&mut rng, q_shape.iter().product());
    let kh: Vec<f32> = random_vec(&mut rng, kv_shape.iter().product());
    let vh: Vec<f32> = random_vec(&mut rng, kv_shape.iter().product());
    let q = Tensor::from_slice(&client, &qh, q_shape).unwrap();
    let k = Tensor::from_slice(&client, &kh, kv_shape).unwrap();
    let v = Tensor::from_slice(&client, &vh, kv_shape).unwrap();
    let spec = Tiled::SPEC;
    let problem = Problem::new(&spec, &q, &k, &v).unwrap();
    let inputs = attn::Inputs::default();
    let packed = pack(&spec, &problem, &inputs).unwrap();
    let key = TuneKey::of(&spec, &problem, &packed);
    let candidates = attn::tune::candidates(&client, &spec, true).unwrap();
    assert!(candidates.len() > 1, "several candidates to tune");

    // The miss: the fallback's answer, returned without waiting for the tuner.
    let first = Tiled::forward(&client, &q, &k, &v).unwrap();
    let fallback = Output::empty(&client, problem.out_shape());
    attn::forward_with_tiling::<Tiled>(
        &client,
        &q,
        &k,
        &v,
        &inputs,
        candidates[0].tiling,
        &fallback,
    )
    .unwrap();
    assert_eq!(
        first.o.to_vec(&client),
        fallback.o.to_vec(&client),
        "the first call ran the fallback"
    );

    // The key settles off the request path; later calls run the winner, correctly.
    attn::tune::wait_for_background_tuning();
    let winner = attn::tune::chosen::<Tiled>(&client, &key).expect("the key was settled");
    assert!(candidates.contains(&winner), "{winner} is a candidate");
    let later = Tiled::forward(&client, &q, &k, &v).unwrap();
    let (qf, kf, vf) = (widen(&qh), widen(&kh), widen(&vh));
    let reference = attention_f64::<Tiled>(&problem, &packed, &inputs, &qf, &kf, &vf);
    let naive = attention_naive::<Tiled>(&problem, &packed, &inputs, &qf, &kf, &vf);
    let verdict = Verdict::new(
        &widen(&later.o.to_vec(&client)),
        &reference.o,
        &naive,
        error_floor::<f32>(),
    );
    assert!(verdict.passed(), "{verdict:?}");

    // Fresh processes on the same cache, under the deferred policy: the second finds the first's
    // record of the new shape and does not record it again.
    for _ in 0..2 {
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "deferred_process", "--ignored", "--nocapture"])
            .env("ATTN_TEST_CACHE", &dir)
            .env("ATTN_TEST_WINNER", winner.to_string())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&child.stdout).to_string()
            + &String::from_utf8_lossy(&child.stderr);
        assert!(
            child.status.success() && log.contains("1 passed"),
            "the deferred process failed:\n{log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The deferred half, in the fresh process the test above starts.
#[test]
#[ignore = "a child process of a_miss_runs_the_fallback_and_settles_in_the_background"]
fn deferred_process() {
    let dir = std::env::var_os("ATTN_TEST_CACHE").expect("started by the test above");
    let winner = std::env::var("ATTN_TEST_WINNER").unwrap();
    let client = attn::default_client();
    attn::tune::set_policy(Policy::Deferred);
    assert!(attn::tune::cache::use_dir(&dir));
    let candidates = attn::tune::candidates(&client, &Tiled::SPEC, true).unwrap();
    let winner = *candidates
        .iter()
        .find(|c| c.to_string() == winner)
        .expect("the winner is a candidate");
    let (mut rng, _) = seeded_rng("deferred tuning");
    let runs_as = |seq: usize, rng: &mut _| {
        let (q_shape, kv_shape) = ([1, 4, seq, 64], [1, 2, seq, 64]);
        let q =
            Tensor::from_slice(&client, &random_vec::<f32>(rng, 4 * seq * 64), q_shape).unwrap();
        let k =
            Tensor::from_slice(&client, &random_vec::<f32>(rng, 2 * seq * 64), kv_shape).unwrap();
        let v =
            Tensor::from_slice(&client, &random_vec::<f32>(rng, 2 * seq * 64), kv_shape).unwrap();
        let got = Tiled::forward(&client, &q, &k, &v)
            .unwrap()
            .o
            .to_vec(&client);
        let inputs = attn::Inputs::default();
        let with = |tiling| {
            let out = Output::empty(&client, [1, 4, seq, 64]);
            attn::forward_with_tiling::<Tiled>(&client, &q, &k, &v, &inputs, tiling, &out).unwrap();
            out.o.to_vec(&client)
        };
        (got, with(winner.tiling), with(candidates[0].tiling))
    };
    let misses = attn::tune::cache::misses_path();
    // The settled key: what the tuning kept runs, nothing is recorded.
    let (got, kept, _) = runs_as(70, &mut rng);
    assert_eq!(
        got, kept,
        "the settled key ran the kept candidate ({winner})"
    );
    let recorded = std::fs::read_to_string(&misses).unwrap_or_default();
    assert!(!recorded.contains("prefill 1 4 70 "), "{recorded}");
    // A shape no tuning saw: the fallback runs now and the shape is recorded, once (also over
    // processes).
    let (got, _, fallback) = runs_as(300, &mut rng);
    assert_eq!(got, fallback, "an unsettled key ran the fallback");
    runs_as(300, &mut rng);
    let recorded = std::fs::read_to_string(&misses).unwrap();
    assert_eq!(
        recorded.matches("prefill 1 4 300   # Tiled").count(),
        1,
        "{recorded}"
    );
}
