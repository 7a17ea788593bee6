//! Numerics: every variant family against the float64 reference on random inputs (fresh seed per
//! run, printed), over odd lengths, Nq ≠ Nk, batch > 1, group sizes 1, 2, 4, 8 and MQA, causal and
//! not, f32 and f16 (and bf16 where the back end has it). Outputs are poisoned with NaN before each
//! run, so an element the kernel failed to write fails the check.

use attn::reference::{
    attention_f64, attention_naive, error_floor, max_abs_error, random_vec, seeded_rng, widen,
    Verdict,
};
use attn::{ComputeClient, Element, Lse, Output, Problem, Tensor, Tiling, Variant};

attn::attention! {
    /// MHA, no mask, f32.
    MhaF32 { heads: mha, head_dim: 64, dtype: f32 }
    /// MHA, causal (bottom-right), f32.
    MhaCausalF32 { heads: mha, head_dim: 64, dtype: f32, mask: causal }
    /// MHA, no mask, f16.
    MhaF16 { heads: mha, head_dim: 64, dtype: f16 }
    /// MHA, causal (bottom-right), f16.
    MhaCausalF16 { heads: mha, head_dim: 64, dtype: f16, mask: causal }
    /// MHA, causal top-left, f32.
    MhaTopLeftF32 { heads: mha, head_dim: 64, dtype: f32, mask: causal(top_left) }
    /// GQA 2, d 128, f32, causal.
    Gqa2F32 { heads: gqa(group = 2), head_dim: 128, dtype: f32, mask: causal }
    /// GQA 4, d 128, f16.
    Gqa4F16 { heads: gqa(group = 4), head_dim: 128, dtype: f16 }
    /// GQA 4, d 128, f16, causal.
    Gqa4CausalF16 { heads: gqa(group = 4), head_dim: 128, dtype: f16, mask: causal }
    /// GQA 8, d 128, f32.
    Gqa8F32 { heads: gqa(group = 8), head_dim: 128, dtype: f32 }
    /// GQA 5 (a group size that is not a power of two), d 64, f16, causal.
    Gqa5F16 { heads: gqa(group = 5), head_dim: 64, dtype: f16, mask: causal }
    /// MQA, d 128, f32, causal.
    MqaCausalF32 { heads: mqa, head_dim: 128, dtype: f32, mask: causal }
    /// MQA, d 64, f16.
    MqaF16 { heads: mqa, head_dim: 64, dtype: f16 }
    /// MHA in bf16 (checked where the back end supports bf16).
    MhaBf16 { heads: mha, head_dim: 64, dtype: bf16, mask: causal }
    /// Several tile candidates, to check each gives the same answer.
    Tiled { heads: gqa(group = 2), head_dim: 64, dtype: f32, mask: causal, tiles: [64 x 32, 32 x 16, 16 x 8, 128 x 32, 1 x 1] }
}

fn client() -> ComputeClient {
    attn::default_client()
}

/// How inputs are laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// `[B, H, N, D]`.
    Bhnd,
    /// `[B, N, H, D]`, viewed through strides.
    Bnhd,
}

/// Uploads `[B, H, N, D]`-ordered host data in the given layout.
fn upload<E: Element>(
    client: &ComputeClient,
    data: &[E],
    shape: [usize; 4],
    layout: Layout,
) -> Tensor<E> {
    match layout {
        Layout::Bhnd => Tensor::from_slice(client, data, shape).expect("fills its shape"),
        Layout::Bnhd => {
            let [b, h, n, d] = shape;
            let mut t = vec![data[0]; data.len()];
            for ib in 0..b {
                for ih in 0..h {
                    for i in 0..n {
                        let src = ((ib * h + ih) * n + i) * d;
                        let dst = ((ib * n + i) * h + ih) * d;
                        t[dst..dst + d].copy_from_slice(&data[src..src + d]);
                    }
                }
            }
            Tensor::from_slice_bnhd(client, &t, [b, n, h, d]).expect("fills its shape")
        }
    }
}

/// Runs `V` on one random problem with one tiling and checks O and LSE against float64.
fn check_with<V: Variant>(
    client: &ComputeClient,
    [batch, heads_q, heads_kv, seq_q, seq_k]: [usize; 5],
    layout: Layout,
    tiling: Tiling,
) {
    let spec = V::SPEC;
    let d = spec.head_dim as usize;
    let label = format!(
        "{} B{batch} H{heads_q}/{heads_kv} Nq{seq_q} Nk{seq_k} {layout:?} {}",
        spec.name,
        tiling.name()
    );
    let (mut rng, _) = seeded_rng(&label);
    let q_shape = [batch, heads_q, seq_q, d];
    let kv_shape = [batch, heads_kv, seq_k, d];
    let qh: Vec<V::Elem> = random_vec(&mut rng, q_shape.iter().product());
    let kh: Vec<V::Elem> = random_vec(&mut rng, kv_shape.iter().product());
    let vh: Vec<V::Elem> = random_vec(&mut rng, kv_shape.iter().product());
    let q = upload(client, &qh, q_shape, layout);
    let k = upload(client, &kh, kv_shape, layout);
    let v = upload(client, &vh, kv_shape, layout);

    let problem = Problem::new(&spec, &q, &k, &v).expect("valid problem");
    let poison_o = vec![V::Elem::from_f64(f64::NAN); problem.out_shape().iter().product()];
    let lse_shape = problem.lse_shape();
    let poison_lse = vec![f32::NAN; lse_shape.iter().product()];
    let out = Output {
        o: Tensor::from_slice(client, &poison_o, problem.out_shape()).expect("fills its shape"),
        lse: Lse {
            tensor: Tensor::from_slice(
                client,
                &poison_lse,
                [lse_shape[0], lse_shape[1], lse_shape[2], 1],
            )
            .expect("fills its shape"),
        },
    };
    attn::forward_into::<V>(client, &q, &k, &v, tiling, &out).expect("launch");

    let (qf, kf, vf) = (widen(&qh), widen(&kh), widen(&vh));
    let reference = attention_f64(&spec, &problem, &qf, &kf, &vf);
    let naive = attention_naive::<V::Elem>(&spec, &problem, &qf, &kf, &vf);
    let o = widen(&out.o.to_vec(client));
    assert!(
        o.iter().all(|x| !x.is_nan()),
        "{label}: an output element was not written (NaN poison left)"
    );
    let verdict = Verdict::new(&o, &reference.o, &naive, error_floor::<V::Elem>());
    assert!(
        verdict.passed(),
        "{label}: max |O − f64| = {:.3e} > bound {:.3e} (naive {}: {:.3e})",
        verdict.kernel_error,
        verdict.bound,
        <V::Elem as Element>::DTYPE.name(),
        verdict.naive_error
    );

    let lse: Vec<f64> = out.lse.to_vec(client).into_iter().map(f64::from).collect();
    for (i, (&got, &want)) in lse.iter().zip(&reference.lse).enumerate() {
        if want == f64::NEG_INFINITY {
            assert_eq!(
                got,
                f64::NEG_INFINITY,
                "{label}: LSE row {i} sees no key, so must be −∞"
            );
            let row = &o[i * d..(i + 1) * d];
            assert!(
                row.iter().all(|&x| x == 0.0),
                "{label}: O row {i} sees no key, so must be 0"
            );
        }
    }
    let lse_error = max_abs_error(&lse, &reference.lse);
    assert!(
        lse_error <= 2e-3,
        "{label}: max |LSE − f64| = {lse_error:.3e}"
    );
}

fn check<V: Variant>(client: &ComputeClient, dims: [usize; 5]) {
    let tiling = attn::select_tiling(client, &V::SPEC).expect("a runnable tiling");
    check_with::<V>(client, dims, Layout::Bhnd, tiling);
}

const LENGTHS: [usize; 4] = [1, 17, 128, 1000];

/// Every (Nq, Nk) pair of the length grid, batch 2, two heads.
fn length_grid<V: Variant>() {
    let client = client();
    if !attn::supports::<V::Elem>(&client) {
        println!(
            "{}: {} unsupported on this back end, skipped",
            V::SPEC.name,
            V::SPEC.dtype.name()
        );
        return;
    }
    for nq in LENGTHS {
        for nk in LENGTHS {
            check::<V>(&client, [2, 2, 2, nq, nk]);
        }
    }
}

#[test]
fn mha_f32_length_grid() {
    length_grid::<MhaF32>();
}

#[test]
fn mha_causal_f32_length_grid() {
    length_grid::<MhaCausalF32>();
}

#[test]
fn mha_f16_length_grid() {
    length_grid::<MhaF16>();
}

#[test]
fn mha_causal_f16_length_grid() {
    length_grid::<MhaCausalF16>();
}

#[test]
fn causal_top_left() {
    let client = client();
    for (nq, nk) in [(17, 17), (128, 17), (17, 128), (100, 257)] {
        check::<MhaTopLeftF32>(&client, [1, 3, 3, nq, nk]);
    }
}

#[test]
fn group_sizes_and_mqa() {
    let client = client();
    check::<Gqa2F32>(&client, [2, 4, 2, 129, 300]);
    check::<Gqa2F32>(&client, [1, 2, 1, 300, 129]);
    check::<Gqa4F16>(&client, [2, 8, 2, 17, 1000]);
    check::<Gqa4CausalF16>(&client, [1, 4, 1, 200, 200]);
    check::<Gqa8F32>(&client, [1, 16, 2, 65, 33]);
    check::<Gqa5F16>(&client, [2, 10, 2, 45, 70]);
    check::<MqaCausalF32>(&client, [2, 5, 1, 77, 150]);
    check::<MqaF16>(&client, [1, 7, 1, 1, 1000]);
}

#[test]
fn bnhd_layout_through_strides() {
    let client = client();
    let tiling = attn::select_tiling(&client, &Gqa4F16::SPEC).unwrap();
    check_with::<Gqa4F16>(&client, [2, 8, 2, 33, 90], Layout::Bnhd, tiling);
    let tiling = attn::select_tiling(&client, &MhaCausalF32::SPEC).unwrap();
    check_with::<MhaCausalF32>(&client, [1, 3, 3, 50, 61], Layout::Bnhd, tiling);
}

/// Bottom-right causal with Nq > Nk: the first Nq − Nk rows see no key.
#[test]
fn fully_masked_rows_are_zero_with_negative_infinite_lse() {
    let client = client();
    check::<MhaCausalF32>(&client, [1, 2, 2, 40, 9]);
    check::<MqaCausalF32>(&client, [1, 3, 1, 33, 1]);
}

/// Every runnable tile candidate gives the reference answer (the tuner relies on this).
#[test]
fn every_tile_candidate_matches_the_reference() {
    let client = client();
    for tiling in attn::runnable_tilings(&client, &Tiled::SPEC) {
        check_with::<Tiled>(&client, [1, 4, 2, 70, 45], Layout::Bhnd, tiling);
    }
}

#[test]
fn bf16_where_supported() {
    length_grid::<MhaBf16>();
}

/// A long, odd length: 3001 queries against 3001 keys (188 K/V steps), causal.
#[test]
fn long_odd_length() {
    let client = client();
    check::<MhaCausalF32>(&client, [1, 1, 1, 3001, 3001]);
}

#[test]
fn a_second_length_needs_no_new_declaration() {
    // Sequence lengths are run-time values: the same variant serves every length.
    let client = client();
    for n in [3, 31, 257] {
        check::<MhaCausalF32>(&client, [1, 1, 1, n, n]);
    }
}
