//! Bad input is refused with a typed error naming the problem, before anything is launched.

use attn::{AttnError, ComputeClient, Dim, Lse, Operand, Output, Tensor, Tiling, Variant};

attn::attention! {
    /// GQA 4, d 64.
    Gqa4 { heads: gqa(group = 4), head_dim: 64, dtype: f32, mask: causal }
    /// MHA, d 64.
    Mha { heads: mha, head_dim: 64, dtype: f32 }
    /// MQA, d 64.
    Mqa { heads: mqa, head_dim: 64, dtype: f32 }
    /// A tile no device has shared memory for at d 128 on small GPUs (128 keys × 128 × 2 × 4 B = 128 KiB).
    Huge { heads: mha, head_dim: 128, dtype: f32, tiles: [64 x 128] }
    /// f16, for the engine choice.
    Half { heads: mha, head_dim: 64, dtype: f16 }
    /// bf16, for back ends without it.
    Bf16 { heads: mha, head_dim: 64, dtype: bf16 }
    /// Packed documents with key lengths, sinks, given ALiBi slopes and declared inputs.
    Inputs4 {
        heads: mha, head_dim: 64, dtype: f32, mask: documents & key_lengths & |b, h, q, k| k < n,
        sinks: per_head, alibi: given, inputs: { n: i32, w: [f32; heads] },
        score: |s, b, h, q, k| s * w[h],
    }
    /// Tables: a document id per position, a learnable table of 8 per head.
    Tables {
        heads: mha, head_dim: 64, dtype: f32,
        inputs: { doc: [i32; batch, seq], rel: [f32; heads, 8] },
        mask: |b, h, q, k| doc[b][q] == doc[b][k],
        score: |s, b, h, q, k| s + rel[h][q - k],
    }
    /// Prefix-LM.
    Prefix { heads: mha, head_dim: 64, dtype: f32, mask: prefix_lm }
    /// V head dim 128 under QK head dim 64.
    SplitDims { heads: mha, head_dim: 64, value_dim: 128, dtype: f32 }
}

fn client() -> ComputeClient {
    attn::default_client()
}

fn t(client: &ComputeClient, shape: [usize; 4]) -> Tensor<f32> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
    if n == 0 {
        return Tensor::empty(client, shape);
    }
    Tensor::from_slice(client, &data, shape).expect("fills its shape")
}

fn run<V: Variant<Elem = f32>>(
    client: &ComputeClient,
    q: [usize; 4],
    k: [usize; 4],
    v: [usize; 4],
) -> AttnError {
    attn::forward::<V>(
        client,
        &t(client, q),
        &t(client, k),
        &t(client, v),
        &attn::Inputs::default(),
    )
    .expect_err("must be refused")
}

#[test]
fn wrong_head_dim_names_the_tensor_and_dimension() {
    let c = client();
    let e = run::<Mha>(&c, [1, 2, 8, 64], [1, 2, 8, 32], [1, 2, 8, 64]);
    assert_eq!(
        e,
        AttnError::DimMismatch {
            operand: Operand::K,
            dim: Dim::HeadDim,
            expected: 64,
            found: 32,
            why: "the variant's head_dim"
        }
    );
    assert!(
        e.to_string()
            .contains("head_dim (dim 3) is 32, expected 64"),
        "{e}"
    );
}

#[test]
fn batch_and_length_mismatches() {
    let c = client();
    let e = run::<Mha>(&c, [2, 2, 8, 64], [1, 2, 8, 64], [1, 2, 8, 64]);
    assert!(
        matches!(
            e,
            AttnError::DimMismatch {
                operand: Operand::K,
                dim: Dim::Batch,
                expected: 2,
                found: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let e = run::<Mha>(&c, [1, 2, 8, 64], [1, 2, 8, 64], [1, 2, 9, 64]);
    assert!(
        matches!(
            e,
            AttnError::DimMismatch {
                operand: Operand::V,
                dim: Dim::Seq,
                expected: 8,
                found: 9,
                ..
            }
        ),
        "{e:?}"
    );
    let e = run::<Mha>(&c, [1, 2, 8, 64], [1, 2, 8, 64], [1, 3, 8, 64]);
    assert!(
        matches!(
            e,
            AttnError::DimMismatch {
                operand: Operand::V,
                dim: Dim::Heads,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn head_counts_must_fit_the_grouping() {
    let c = client();
    let e = run::<Gqa4>(&c, [1, 6, 8, 64], [1, 2, 8, 64], [1, 2, 8, 64]);
    assert!(
        matches!(e, AttnError::HeadGrouping { hq: 6, hkv: 2, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("gqa(group = 4)"), "{e}");
    let e = run::<Mha>(&c, [1, 4, 8, 64], [1, 2, 8, 64], [1, 2, 8, 64]);
    assert!(
        matches!(e, AttnError::HeadGrouping { hq: 4, hkv: 2, .. }),
        "{e:?}"
    );
    let e = run::<Mqa>(&c, [1, 4, 8, 64], [1, 2, 8, 64], [1, 2, 8, 64]);
    assert!(e.to_string().contains("exactly 1 head"), "{e}");
}

#[test]
fn empty_dimensions_are_refused() {
    let c = client();
    let e = run::<Mha>(&c, [1, 2, 0, 64], [1, 2, 8, 64], [1, 2, 8, 64]);
    assert_eq!(
        e,
        AttnError::EmptyDim {
            operand: Operand::Q,
            dim: Dim::Seq
        }
    );
    let e = run::<Mha>(&c, [1, 2, 8, 64], [1, 2, 0, 64], [1, 2, 0, 64]);
    assert_eq!(
        e,
        AttnError::EmptyDim {
            operand: Operand::K,
            dim: Dim::Seq
        }
    );
    let e = run::<Mha>(&c, [0, 2, 8, 64], [0, 2, 8, 64], [0, 2, 8, 64]);
    assert_eq!(
        e,
        AttnError::EmptyDim {
            operand: Operand::Q,
            dim: Dim::Batch
        }
    );
}

#[test]
fn views_must_be_contiguous_in_head_dim_and_inside_their_buffer() {
    let c = client();
    let good = t(&c, [1, 2, 8, 64]);
    let strided = Tensor::<f32>::from_raw_parts(
        good.handle().clone(),
        good.buffer_len(),
        [1, 2, 8, 32],
        [1024, 512, 64, 2],
    );
    let e = Mha::forward(&c, &good, &good, &strided).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::NotContiguous {
                operand: Operand::V,
                stride: 2
            }
        ),
        "{e:?}"
    );
    let too_long = Tensor::<f32>::from_raw_parts(
        good.handle().clone(),
        good.buffer_len(),
        [1, 2, 16, 64],
        [2048, 1024, 64, 1],
    );
    let e = Mha::forward(&c, &too_long, &good, &good).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::OutOfBounds {
                operand: Operand::Q,
                needed: 2048,
                len: 1024,
                ..
            }
        ),
        "{e:?}"
    );
}

/// A buffer of more than 2³² elements needs 64-bit offsets: refused with a typed error before
/// anything launches on a back end without them (wgpu's WGSL), run with them where they exist
/// (CUDA). The buffer here claims that length over a small allocation the view stays inside.
#[test]
fn buffers_past_32_bit_offsets_need_a_back_end_with_64_bit_ones() {
    let c = client();
    let (mut rng, _) = attn::reference::seeded_rng("buffers past 32-bit offsets");
    let shape = [1, 2, 37, 64];
    let data: Vec<f32> = attn::reference::random_vec(&mut rng, shape.iter().product());
    let q = Tensor::from_slice(&c, &data, shape).expect("fills its shape");
    let past = (u32::MAX as usize) + 1;
    let claims = Tensor::<f32>::from_raw_parts(q.handle().clone(), past, q.shape(), q.strides());
    let ran = Mha::forward(&c, &claims, &q, &q);
    if c.properties()
        .supports_address(attn::cubecl::prelude::AddressType::U64)
    {
        let wide = ran.expect("64-bit offsets run it");
        let narrow = Mha::forward(&c, &q, &q, &q).expect("runs");
        assert_eq!(wide.o.to_vec(&c), narrow.o.to_vec(&c));
    } else {
        let e = ran.expect_err("must be refused");
        assert!(
            matches!(e, AttnError::TooLarge { found, .. } if found == past),
            "{e:?}"
        );
    }
}

#[test]
fn output_buffers_are_checked() {
    let c = client();
    let q = t(&c, [1, 2, 8, 64]);
    let tiling = attn::select_tiling(&c, &Mha::SPEC).unwrap();
    let wrong = Output {
        o: Tensor::empty(&c, [1, 2, 9, 64]),
        lse: Lse::empty(&c, [1, 2, 8]),
    };
    let e = Mha::forward_with_tiling(&c, &q, &q, &q, tiling, &wrong).unwrap_err();
    assert_eq!(
        e,
        AttnError::DimMismatch {
            operand: Operand::O,
            dim: Dim::Seq,
            expected: 8,
            found: 9,
            why: "the output follows q's shape"
        }
    );
    let wrong_lse = Output {
        o: Tensor::empty(&c, [1, 2, 8, 64]),
        lse: Lse::empty(&c, [1, 2, 7]),
    };
    let e = Mha::forward_with_tiling(&c, &q, &q, &q, tiling, &wrong_lse).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::DimMismatch {
                operand: Operand::Lse,
                dim: Dim::Seq,
                expected: 8,
                found: 7,
                ..
            }
        ),
        "{e:?}"
    );
    // A strided view of a big enough buffer is still refused: the kernels write densely.
    let big = Tensor::<f32>::empty(&c, [1, 2, 16, 64]);
    let strided = Tensor::<f32>::from_raw_parts(
        big.handle().clone(),
        big.buffer_len(),
        [1, 2, 8, 64],
        [2048, 1024, 128, 1],
    );
    let view = Output {
        o: strided,
        lse: Lse::empty(&c, [1, 2, 8]),
    };
    let e = Mha::forward_with_tiling(&c, &q, &q, &q, tiling, &view).unwrap_err();
    assert_eq!(
        e,
        AttnError::OutputLayout {
            operand: Operand::O,
            needed: 1024
        }
    );
}

#[test]
fn tiles_the_device_cannot_run_are_refused() {
    let c = client();
    let smem = c.properties().hardware.max_shared_memory_size;
    let q = t(&c, [1, 1, 4, 128]);
    let result = Huge::forward(&c, &q, &q, &q);
    if smem < 128 * 1024 {
        let e = result.unwrap_err();
        assert!(e.to_string().contains("shared memory"), "{e}");
    } else {
        result.expect("fits this device");
    }
    let absurd = Tiling {
        block_q: 1 << 20,
        block_kv: 1,
    };
    let out = Output {
        o: Tensor::empty(&c, [1, 1, 4, 128]),
        lse: Lse::empty(&c, [1, 1, 4]),
    };
    let e = Huge::forward_with_tiling(&c, &q, &q, &q, absurd, &out).unwrap_err();
    assert!(e.to_string().contains("units per cube"), "{e}");
}

#[test]
fn unsupported_dtype_is_an_error_not_a_crash() {
    let c = client();
    if attn::supports::<attn::bf16>(&c) {
        return;
    }
    let data = vec![attn::bf16::from_f32(0.5); 2 * 4 * 64];
    let q = Tensor::from_slice(&c, &data, [1, 2, 4, 64]).unwrap();
    let e = Bf16::forward(&c, &q, &q, &q).unwrap_err();
    assert!(matches!(e, AttnError::Unsupported(_)), "{e:?}");
}

#[test]
fn f32_and_devices_without_tensor_cores_use_the_portable_kernel() {
    use attn::blueprint::{family_for, Family};
    let c = client();
    let tiling = attn::select_tiling(&c, &Mha::SPEC).unwrap();
    assert_eq!(
        family_for(&c, &Mha::SPEC, tiling, true).unwrap(),
        Family::Portable,
        "f32 always runs the portable kernel"
    );
    let f16_cores =
        c.features().matmul.cmma.iter().any(|m| {
            m.a_type == attn::cubecl::ir::ElemType::Float(attn::cubecl::ir::FloatKind::F16)
        });
    if !f16_cores {
        let tiling = attn::select_tiling(&c, &Half::SPEC).unwrap();
        assert_eq!(
            family_for(&c, &Half::SPEC, tiling, true).unwrap(),
            Family::Portable
        );
    }
}

#[test]
fn host_data_must_fill_its_shape() {
    let c = client();
    let e = Tensor::from_slice(&c, &[0.5f32; 10], [1, 1, 2, 64]).unwrap_err();
    assert_eq!(
        e,
        AttnError::DataLength {
            shape: [1, 1, 2, 64],
            expected: 128,
            found: 10
        }
    );
    let e = Tensor::from_slice_bnhd(&c, &[0.5f32; 130], [1, 2, 1, 64]).unwrap_err();
    assert!(e.to_string().contains("130 elements"), "{e}");
}

/// Every run-time input is checked against the problem before anything launches.
#[test]
fn run_time_inputs_are_checked() {
    let c = client();
    let (q, k, v) = (
        t(&c, [1, 2, 10, 64]),
        t(&c, [1, 2, 10, 64]),
        t(&c, [1, 2, 10, 64]),
    );
    let good = Inputs4Inputs {
        key_lengths: &[3, 4],
        q_offsets: &[0, 4, 10],
        k_offsets: &[0, 6, 10],
        sinks: &[0.0, 1.0],
        alibi_slopes: &[0.5, 0.25],
        n: 3,
        w: &[1.0, 2.0],
    };
    Inputs4::forward(&c, &q, &k, &v, &good).expect("valid inputs run");
    let input_error = |inputs: Inputs4Inputs| match Inputs4::forward(&c, &q, &k, &v, &inputs) {
        Err(AttnError::Input { input, reason }) => (input, reason),
        other => panic!("expected an input error, got {other:?}"),
    };
    let (input, reason) = input_error(Inputs4Inputs {
        q_offsets: &[0, 5, 4, 10],
        k_offsets: &[0, 1, 2, 10],
        ..good
    });
    assert_eq!(input, "q_offsets");
    assert!(reason.contains("decreases from 5 to 4"), "{reason}");
    let (input, reason) = input_error(Inputs4Inputs {
        q_offsets: &[0, 4, 9],
        ..good
    });
    assert_eq!(input, "q_offsets");
    assert!(
        reason.contains("ends at 9, but q's sequence length is 10"),
        "{reason}"
    );
    let (input, reason) = input_error(Inputs4Inputs {
        k_offsets: &[1, 6, 10],
        ..good
    });
    assert_eq!(input, "k_offsets");
    assert!(reason.contains("starts at 1"), "{reason}");
    let (input, reason) = input_error(Inputs4Inputs {
        k_offsets: &[0, 10],
        ..good
    });
    assert_eq!(input, "k_offsets");
    assert!(
        reason.contains("1 documents of keys but 2 of queries"),
        "{reason}"
    );
    let (input, reason) = input_error(Inputs4Inputs {
        key_lengths: &[7, 4],
        ..good
    });
    assert_eq!(input, "key_lengths");
    assert!(reason.contains("entry 0 is 7"), "{reason}");
    let (input, reason) = input_error(Inputs4Inputs {
        key_lengths: &[1, 1, 1],
        ..good
    });
    assert_eq!(input, "key_lengths");
    assert!(reason.contains("one per sequence (2) expected"), "{reason}");
    let (input, reason) = input_error(Inputs4Inputs {
        sinks: &[0.0, f32::NAN],
        ..good
    });
    assert_eq!(input, "sinks");
    assert!(reason.contains("must be finite"), "{reason}");
    let (input, reason) = input_error(Inputs4Inputs {
        alibi_slopes: &[0.5],
        ..good
    });
    assert_eq!(input, "alibi_slopes");
    assert!(
        reason.contains("one per query head (2) expected"),
        "{reason}"
    );
    let (input, reason) = input_error(Inputs4Inputs {
        w: &[1.0, 2.0, 3.0],
        ..good
    });
    assert_eq!(input, "w");
    assert!(
        reason.contains("holds 3 values; one per query head (2) expected"),
        "{reason}"
    );

    // Tables: one value per position (the longer of Q's and K's sequences) of each sequence,
    // and per head the declared count; finite floats.
    let (q3, k3, v3) = (
        t(&c, [2, 2, 10, 64]),
        t(&c, [2, 2, 12, 64]),
        t(&c, [2, 2, 12, 64]),
    );
    let doc = vec![1; 2 * 12];
    let rel = vec![0.5; 2 * 8];
    let tables = TablesInputs {
        doc: &doc,
        rel: &rel,
    };
    Tables::forward(&c, &q3, &k3, &v3, &tables).expect("valid tables run");
    let table_error = |inputs: TablesInputs| match Tables::forward(&c, &q3, &k3, &v3, &inputs) {
        Err(AttnError::Input { input, reason }) => (input, reason),
        other => panic!("expected an input error, got {other:?}"),
    };
    let (input, reason) = table_error(TablesInputs {
        doc: &doc[..20],
        ..tables
    });
    assert_eq!(input, "doc");
    assert!(
        reason.contains(
            "holds 20 values; `[i32; batch, seq]`: 2 sequences × 12 positions = 24 values expected"
        ),
        "{reason}"
    );
    let (input, reason) = table_error(TablesInputs {
        rel: &rel[..8],
        ..tables
    });
    assert_eq!(input, "rel");
    assert!(
        reason.contains("`[f32; heads, 8]`: 2 query heads × 8 = 16 values expected"),
        "{reason}"
    );
    let bad = [0.5, f32::INFINITY].repeat(8);
    let (input, reason) = table_error(TablesInputs {
        rel: &bad,
        ..tables
    });
    assert_eq!(input, "rel");
    assert!(reason.contains("must be finite"), "{reason}");

    // One grid row per document: at most 65 535 of them.
    let many: Vec<i32> = (0..=70_000).map(|i| i.min(10)).collect();
    let e = Inputs4::forward(
        &c,
        &q,
        &k,
        &v,
        &Inputs4Inputs {
            q_offsets: &many,
            k_offsets: &many,
            ..good
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::TooLarge {
                what: "the number of documents",
                ..
            }
        ),
        "{e}"
    );

    // Packed documents are one sequence: batch 1.
    let (q2, k2, v2) = (
        t(&c, [2, 2, 10, 64]),
        t(&c, [2, 2, 10, 64]),
        t(&c, [2, 2, 10, 64]),
    );
    match Inputs4::forward(&c, &q2, &k2, &v2, &good) {
        Err(AttnError::Input {
            input: "q_offsets",
            reason,
        }) => assert!(reason.contains("batch 1"), "{reason}"),
        other => panic!("expected the batch to be refused, got {other:?}"),
    }
}

#[test]
fn inputs_a_variant_does_not_declare_are_refused() {
    let c = client();
    let (q, k, v) = (
        t(&c, [1, 2, 10, 64]),
        t(&c, [1, 2, 10, 64]),
        t(&c, [1, 2, 10, 64]),
    );
    let stray = attn::Inputs {
        key_lengths: Some(&[3]),
        ..Default::default()
    };
    match attn::forward::<Mha>(&c, &q, &k, &v, &stray) {
        Err(AttnError::Input {
            input: "key_lengths",
            reason,
        }) => {
            assert!(
                reason.contains("does not declare `key_lengths`"),
                "{reason}"
            )
        }
        other => panic!("expected a stray input to be refused, got {other:?}"),
    }
    match attn::forward::<Prefix>(&c, &q, &k, &v, &attn::Inputs::default()) {
        Err(AttnError::Input {
            input: "prefix_lengths",
            reason,
        }) => {
            assert!(reason.contains("none was given"), "{reason}")
        }
        other => panic!("expected a missing input to be refused, got {other:?}"),
    }
}

#[test]
fn value_dim_is_checked_separately() {
    let c = client();
    let e = run::<SplitDims>(&c, [1, 2, 8, 64], [1, 2, 8, 64], [1, 2, 8, 64]);
    assert_eq!(
        e,
        AttnError::DimMismatch {
            operand: Operand::V,
            dim: Dim::HeadDim,
            expected: 128,
            found: 64,
            why: "the variant's value_dim"
        }
    );
}
