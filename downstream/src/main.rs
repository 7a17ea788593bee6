//! A user's crate: declares a variant, runs it on the default device, checks it against float64.
//!
//! `cargo run --release` (the GPU-less default back end) or `cargo run --release --features cuda`.
//! Built against crates.io's cubecl, so on Hopper the warpgroup kernel is not compiled in: the
//! run says so once (a `tracing` warning) and the tensor-core kernel answers.

use attn::blueprint::{family_for, WARPGROUP_BUILT};
use attn::inputs::pack;
use attn::reference::{
    attention_f64, attention_naive, error_floor, random_vec, seeded_rng, widen, Verdict,
};
use attn::{Problem, Tensor, Variant};

attn::attention! {
    /// Llama-3's attention, small: GQA 4, causal.
    pub Llama { heads: gqa(group = 4), head_dim: 64, dtype: f16, mask: causal }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool, attn::AttnError> {
    let client = attn::default_client();
    let (b, hq, hkv, n, d) = (2, 8, 2, 333, 64);
    let (mut rng, seed) = seeded_rng("downstream");
    let q_host: Vec<attn::f16> = random_vec(&mut rng, b * hq * n * d);
    let k_host: Vec<attn::f16> = random_vec(&mut rng, b * hkv * n * d);
    let v_host: Vec<attn::f16> = random_vec(&mut rng, b * hkv * n * d);
    let q = Tensor::from_slice(&client, &q_host, [b, hq, n, d])?;
    let k = Tensor::from_slice(&client, &k_host, [b, hkv, n, d])?;
    let v = Tensor::from_slice(&client, &v_host, [b, hkv, n, d])?;
    let tiling = attn::select_tiling(&client, &Llama::SPEC)?;
    println!(
        "device {}; warpgroup kernel built: {WARPGROUP_BUILT}; runs {:?} with tile {}",
        client.properties().identity.name,
        family_for(&client, &Llama::SPEC, tiling, true)?,
        tiling.name()
    );
    let out = Llama::forward(&client, &q, &k, &v)?;
    let o: Vec<f64> = widen(&out.o.to_vec(&client));

    let none = attn::Inputs::default();
    let problem = Problem::new(&Llama::SPEC, &q, &k, &v)?;
    let packed = pack(&Llama::SPEC, &problem, &none)?;
    let (qw, kw, vw) = (widen(&q_host), widen(&k_host), widen(&v_host));
    let reference = attention_f64::<Llama>(&problem, &packed, &none, &qw, &kw, &vw);
    let naive = attention_naive::<Llama>(&problem, &packed, &none, &qw, &kw, &vw);
    let verdict = Verdict::new(&o, &reference.o, &naive, error_floor::<attn::f16>());
    println!(
        "seed {seed}: max error {:.2e} (bound {:.2e}, naive f16 {:.2e}): {}",
        verdict.kernel_error,
        verdict.bound,
        verdict.naive_error,
        if verdict.passed() { "ok" } else { "FAILED" }
    );
    Ok(verdict.passed())
}
