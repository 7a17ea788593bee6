//! Parse → lower → check → plan, without the macro.

use attn_dsl::plan::{Phase, TileClass};
use attn_dsl::spec::{Alignment, DType, Heads, Mask, TileShape};
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
    assert_eq!(p.spec.heads.value, Heads::Gqa { group: 4 });
    assert_eq!(p.spec.head_dim.value, 128);
    assert_eq!(p.spec.dtype.value, DType::BF16);
    assert_eq!(p.spec.mask.value, Mask::Causal(Alignment::BottomRight));
    assert_eq!(p.spec.scale.unwrap().value, 0.125);
    assert_eq!(
        p.candidates,
        vec![
            TileShape {
                block_q: 64,
                block_kv: 16
            },
            TileShape {
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
    assert_eq!(p.spec.mask.value, Mask::None);
    assert!(p.spec.scale.is_none());
    assert_eq!(p.candidates, attn_dsl::plan::default_tiles(64));
    assert_eq!(p.tile_classes, vec![TileClass::Full, TileClass::Partial]);
    let first = p.candidates[0];
    assert!(
        first.shared_bytes(64) <= 32 * 1024,
        "the first default runs on every back end"
    );
}

#[test]
fn top_left_alignment() {
    let plans = attn_dsl::analyse(
        quote! { M { heads: mha, head_dim: 64, dtype: f32, mask: causal(top_left) } },
    )
    .unwrap_or_else(|(e, _)| panic!("{e}"));
    assert_eq!(plans[0].spec.mask.value, Mask::Causal(Alignment::TopLeft));
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
        Bad { heads: gqa(group = 1), head_dim: 96, dtype: f8, colour: red }
        AlsoBad { heads: mha, head_dim: 64 }
    });
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(errs.iter().any(|e| e.contains("write `heads: mha`")));
    assert!(errs
        .iter()
        .any(|e| e.contains("head_dim 96 is not supported")));
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
