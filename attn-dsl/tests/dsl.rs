//! Parse → lower → check → plan, without the macro.

use attn_dsl::plan::{Phase, TileClass};
use attn_dsl::spec::{Alibi, CausalAlignment, DType, HeadGrouping, Tiling};
use quote::quote;

fn errors(tokens: proc_macro2::TokenStream) -> Vec<String> {
    match attn_dsl::analyse(tokens) {
        Ok(_) => Vec::new(),
        Err((e, _)) => e.into_iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn a_full_declaration_plans() {
    let plans = attn_dsl::analyse(quote! {
        /// Docs.
        pub Llama3 { heads: gqa(group = 4), head_dim: 128, dtype: bf16, mask: causal, scale: 0.125, tiles: [64 x 16, 32x16] }
    })
    .unwrap_or_else(|(e, _)| panic!("{e}"));
    assert_eq!(plans.len(), 1);
    let p = &plans[0];
    assert_eq!(p.spec.name, "Llama3");
    assert_eq!(p.spec.heads.value, HeadGrouping::Gqa { group: 4 });
    assert_eq!(p.spec.head_dim.value, 128);
    assert_eq!(p.spec.dtype.value, DType::BF16);
    assert_eq!(
        p.spec.mask.causal.unwrap().value,
        CausalAlignment::BottomRight
    );
    assert!(p.spec.mask.window.is_none() && p.spec.mask.custom.is_none());
    assert_eq!(p.spec.scale.unwrap().value, 0.125);
    assert_eq!(
        p.candidates,
        vec![
            Tiling {
                block_q: 64,
                block_kv: 16
            },
            Tiling {
                block_q: 32,
                block_kv: 16
            }
        ]
    );
    assert_eq!(
        p.tile_classes,
        vec![TileClass::Empty, TileClass::Full, TileClass::Partial]
    );
    assert_eq!(p.phases.first(), Some(&Phase::LoadQ));
    assert_eq!(p.phases.last(), Some(&Phase::Finish));
    assert_eq!(p.spec.attrs.len(), 1, "the doc comment is carried over");
}

#[test]
fn defaults_fill_mask_scale_and_tiles() {
    let plans = attn_dsl::analyse(quote! { M { heads: mqa, head_dim: 64, dtype: f16 } })
        .unwrap_or_else(|(e, _)| panic!("{e}"));
    let p = &plans[0];
    assert!(p.spec.mask.is_none());
    assert!(p.spec.scale.is_none());
    assert_eq!(p.candidates, attn_dsl::plan::default_tiles(64));
    assert_eq!(p.tile_classes, vec![TileClass::Full, TileClass::Partial]);
    let first = p.candidates[0];
    assert!(
        first.portable_shared_bytes(64, 64) <= 32 * 1024,
        "the first default runs on every back end"
    );
}

#[test]
fn top_left_alignment() {
    let plans = attn_dsl::analyse(
        quote! { M { heads: mha, head_dim: 64, dtype: f32, mask: causal(top_left) } },
    )
    .unwrap_or_else(|(e, _)| panic!("{e}"));
    assert_eq!(
        plans[0].spec.mask.causal.unwrap().value,
        CausalAlignment::TopLeft
    );
}

#[test]
fn several_variants_in_one_invocation() {
    let plans = attn_dsl::analyse(quote! {
        A { heads: mha, head_dim: 64, dtype: f32 }
        pub(crate) B { heads: gqa(group = 8), head_dim: 128, dtype: f16 }
    })
    .unwrap_or_else(|(e, _)| panic!("{e}"));
    assert_eq!(plans.len(), 2);
}

#[test]
fn every_mistake_is_reported_at_once() {
    let errs = errors(quote! {
        Bad { heads: gqa(group = 1), head_dim: 80, dtype: f8, colour: red }
        AlsoBad { heads: mha, head_dim: 64 }
    });
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(errs.iter().any(|e| e.contains("write `heads: mha`")));
    assert!(errs
        .iter()
        .any(|e| e.contains("head_dim 80 is not supported")));
    assert!(errs.iter().any(|e| e.contains("unknown dtype `f8`")));
    assert!(errs.iter().any(|e| e.contains("unknown setting `colour`")));
    assert!(errs
        .iter()
        .any(|e| e.contains("`AlsoBad` is missing `dtype`")));
}

#[test]
fn cross_field_rules() {
    let errs = errors(
        quote! { T { heads: mha, head_dim: 128, dtype: f16, tiles: [64 x 256, 32 x 16, 32 x 16] } },
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].contains("more than any GPU's 227 KiB"));
    assert!(errs[1].contains("listed twice"));
}

#[test]
fn an_invalid_declaration_expands_to_errors_and_stubs() {
    let out = attn_dsl::expand(quote! { pub Bad { heads: mha, head_dim: 80, dtype: f16 } pub Good { heads: mha, head_dim: 64, dtype: f16 } })
        .to_string();
    assert!(out.contains("compile_error"));
    assert!(out.contains("struct Bad"));
    assert!(out.contains("struct Good"));
    assert!(
        !out.contains("attn :: Variant"),
        "no generated code while the declaration has errors"
    );
}

#[test]
fn a_valid_declaration_expands_to_the_variant_and_its_launchers() {
    let out =
        attn_dsl::expand(quote! { pub V { heads: gqa(group = 2), head_dim: 64, dtype: f16 } });
    let text = attn_dsl::pretty(&out);
    assert!(text.contains("impl ::attn::Variant for V"), "{text}");
    assert!(text.contains("group: 2u32"), "{text}");
    assert!(text.contains("pub fn forward("), "{text}");
    assert!(text.contains("pub fn forward_into("), "{text}");
}

#[test]
fn mask_terms_score_modifications_and_inputs() {
    let plans = attn_dsl::analyse(quote! {
        G {
            heads: gqa(group = 2), head_dim: 192, value_dim: 128, dtype: bf16,
            mask: causal & window(left = 4095) & key_lengths & documents & |b, h, q, k| k < keep || q - k < limit[b],
            softcap: 50.0, alibi: given, sinks: per_head,
            inputs: { keep: i32, limit: [i32; batch], tilt: [f32; heads] },
            score: |s, b, h, q, k| s + tilt[h] * (q - k) as f32,
        }
    })
    .unwrap_or_else(|(e, _)| panic!("{e}"));
    let spec = &plans[0].spec;
    assert_eq!(spec.value_dim(), 128);
    let window = spec.mask.window.unwrap().value;
    assert_eq!(window.left.unwrap().value, 4095);
    assert!(window.right.is_none());
    assert!(spec.mask.key_lengths.is_some() && spec.mask.documents.is_some());
    assert!(spec.mask.custom.is_some() && spec.score.is_some());
    assert_eq!(spec.softcap.unwrap().value, 50.0);
    assert_eq!(spec.alibi.unwrap().value, Alibi::Given);
    assert!(spec.sinks.is_some());
    assert_eq!(spec.inputs.len(), 3);
    // Per element type, in declaration order.
    assert_eq!(
        spec.inputs.iter().map(|i| i.index).collect::<Vec<_>>(),
        vec![0, 1, 0]
    );
    assert!(
        plans[0].custom_bounds,
        "k < keep || q - k < limit[b] is boundable"
    );
    assert!(spec.has_inputs());
}

#[test]
fn interval_reasoning_bounds_what_it_can() {
    let bounds = |mask: proc_macro2::TokenStream| {
        let plans = attn_dsl::analyse(quote! {
            M { heads: mha, head_dim: 64, dtype: f32, inputs: { n: i32, w: [i32; batch] }, mask: #mask }
        })
        .unwrap_or_else(|(e, _)| panic!("{e}"));
        plans[0].custom_bounds
    };
    assert!(bounds(
        quote!(|b, h, q, k| q >= k && (q - k) < 256 || k < 4)
    ));
    assert!(bounds(quote!(
        |b, h, q, k| (q - k).abs() <= w[b] && k / 64 != q / 64
    )));
    assert!(bounds(quote!(|b, h, q, k| if k < n {
        true
    } else {
        q * 2 >= k.max(3)
    })));
    assert!(
        !bounds(quote!(|b, h, q, k| (q + k) % 3 == 0)),
        "`%` is not bounded"
    );
    assert!(
        !bounds(quote!(|b, h, q, k| (q as f32) < 2.5)),
        "floats are not bounded"
    );
    assert!(
        !bounds(quote!(|b, h, q, k| k / n < 2)),
        "division by a run-time value is not bounded"
    );
}

#[test]
fn expression_mistakes_point_at_their_tokens() {
    let errs = errors(quote! {
        E {
            heads: mha, head_dim: 64, dtype: f32,
            inputs: { bias: [f32; heads], n: i32 },
            mask: |b, h, q, k| q >= k && unknown < 3,
            score: |s, b, h, q, k| s + q,
        }
        F { heads: mha, head_dim: 64, dtype: f32, mask: |b, h, q, k| q + k, score: |s, b, h, q, k| s.pow(2) }
        G { heads: mha, head_dim: 64, dtype: f32, inputs: { w: [i32; batch] }, mask: |b, h, q, k| k < w[h] && q << 2 > k }
        H { heads: mha, head_dim: 64, dtype: f32, mask: |b, h, q| q > 0 }
    });
    let has = |needle: &str| errs.iter().any(|e| e.contains(needle));
    assert!(
        has("unknown name `unknown` in a mask expression"),
        "{errs:#?}"
    );
    assert!(
        has("`+` needs two numbers of one type; found f32 and i32"),
        "{errs:#?}"
    );
    assert!(
        has("a mask expression must be a bool; this is a i32"),
        "{errs:#?}"
    );
    assert!(has("unknown method `pow`"), "{errs:#?}");
    assert!(has("index it with the batch parameter `b`"), "{errs:#?}");
    assert!(
        has("`<<` is not supported in a mask expression"),
        "{errs:#?}"
    );
    assert!(has("a mask expression takes 4 parameters"), "{errs:#?}");
}

#[test]
fn conflicting_and_empty_masks() {
    let errs = errors(quote! {
        A { heads: mha, head_dim: 64, dtype: f32, mask: causal & prefix_lm }
        B { heads: mha, head_dim: 64, dtype: f32, mask: window(left = 0) }
        C { heads: mha, head_dim: 64, dtype: f32, mask: causal & window(left = 8, right = 8) }
        D { heads: mha, head_dim: 64, dtype: f32, mask: none & causal }
    });
    let has = |needle: &str| errs.iter().any(|e| e.contains(needle));
    assert!(has("`causal` conflicts with `prefix_lm`"), "{errs:#?}");
    assert!(has("a window side of 0 keys"), "{errs:#?}");
    assert!(
        has("conflicting masks: `causal` hides every key after the query"),
        "{errs:#?}"
    );
    assert!(has("`none` cannot be combined"), "{errs:#?}");
}

#[test]
fn hooks_and_inputs_are_generated_only_when_needed() {
    let plain = attn_dsl::pretty(&attn_dsl::expand(
        quote! { pub P { heads: mha, head_dim: 64, dtype: f16, mask: causal & window(left = 7) } },
    ));
    assert!(plain.contains("type Hooks = ::attn::NoHooks"), "{plain}");
    assert!(!plain.contains("Inputs<'a>"), "{plain}");
    let custom = attn_dsl::pretty(&attn_dsl::expand(quote! {
        pub C { heads: mha, head_dim: 64, dtype: f16, inputs: { n: i32 }, mask: |b, h, q, k| k < n }
    }));
    assert!(custom.contains("impl ::attn::Hooks for C"), "{custom}");
    assert!(custom.contains("pub struct CInputs<'a>"), "{custom}");
    assert!(custom.contains("fn host_mask("), "{custom}");
    assert!(custom.contains("fn classify("), "{custom}");
}

#[test]
fn every_head_dim_has_a_default_tile_every_back_end_runs() {
    for &d in attn_dsl::keywords::HEAD_DIMS {
        let tiles = attn_dsl::plan::default_tiles(d);
        assert!(
            tiles
                .iter()
                .any(|t| t.portable_shared_bytes(d, d) <= 32 * 1024 && t.block_q <= 1024),
            "head_dim {d}: no default shape fits 32 KiB of shared memory: {tiles:?}"
        );
    }
    // Long K/V steps first from head dim 192 on (measured: the accumulator round trip).
    assert_eq!(attn_dsl::plan::default_tiles(256)[0].block_kv, 64);
}

/// The derivative of a score expression with respect to `s`, folded as it is built: a linear
/// score derives to its constant slope, a score that does not depend on `s` (beyond adding to
/// it) to 1, and a nonlinear one keeps its structure (`tanh′ = 1 − tanh²`).
#[test]
fn score_derivatives_fold() {
    use attn_dsl::derive::d_ds;
    use attn_dsl::expr::{Func, Node, Op};
    let derive = |tokens: proc_macro2::TokenStream| {
        let plans = attn_dsl::analyse(tokens).unwrap_or_else(|(e, _)| panic!("{e}"));
        d_ds(&plans[0].spec.score.as_ref().expect("a score").body)
    };
    let linear = derive(quote! {
        V { heads: mha, head_dim: 64, dtype: f32, inputs: { bias: [f32; heads] },
            score: |s, b, h, q, k| s * 0.5 + bias[h] * (q - k) as f32 }
    });
    assert!(
        matches!(linear.node, Node::Float(x) if x == 0.5),
        "{linear:?}"
    );
    let shifted = derive(quote! {
        V { heads: mha, head_dim: 64, dtype: f32, score: |s, b, h, q, k| s - (q - k).abs() as f32 }
    });
    assert!(
        matches!(shifted.node, Node::Float(x) if x == 1.0),
        "{shifted:?}"
    );
    let tanh = derive(quote! {
        V { heads: mha, head_dim: 64, dtype: f32, score: |s, b, h, q, k| (s * 2.0).tanh() }
    });
    // (1 − tanh(2s)²) · 2.
    let Node::Binary(Op::Mul, outer, two) = &tanh.node else {
        panic!("{tanh:?}")
    };
    assert!(matches!(two.node, Node::Float(x) if x == 2.0), "{tanh:?}");
    let Node::Binary(Op::Sub, one, square) = &outer.node else {
        panic!("{tanh:?}")
    };
    assert!(matches!(one.node, Node::Float(x) if x == 1.0), "{tanh:?}");
    assert!(
        matches!(&square.node, Node::Binary(Op::Mul, a, _) if matches!(a.node, Node::Call(Func::Tanh, _, _))),
        "{tanh:?}"
    );
}
