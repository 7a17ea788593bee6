//! [`KernelPlan`] → tokens. Infallible: everything was validated before.
//!
//! A variant becomes a unit struct implementing `attn::Variant` (its comptime facts and tile
//! candidates, which specialise the generic kernels in `attn-runtime`) and inherent `forward` /
//! `forward_into` launchers typed by its element type.

mod paths;

use proc_macro2::TokenStream;
use quote::{format_ident, quote};

use crate::plan::{KernelPlan, Phase};
use crate::spec::{Alignment, DType, Heads, Mask, Spec};

/// The items of one planned variant.
pub fn variant(plan: &KernelPlan) -> TokenStream {
    let attn = paths::attn();
    let option = paths::option();
    let result = paths::result();
    let spec = &plan.spec;
    let Spec {
        attrs, vis, name, ..
    } = spec;
    let name_str = name.to_string();
    let elem = elem_type(spec.dtype.value);
    let heads = match spec.heads.value {
        Heads::Mha => quote!(#attn::HeadGrouping::Mha),
        Heads::Mqa => quote!(#attn::HeadGrouping::Mqa),
        Heads::Gqa { group } => quote!(#attn::HeadGrouping::Gqa { group: #group }),
    };
    let dtype = format_ident!(
        "{}",
        match spec.dtype.value {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
        }
    );
    let mask = match spec.mask.value {
        Mask::None => quote!(#attn::MaskKind::None),
        Mask::Causal(Alignment::BottomRight) => {
            quote!(#attn::MaskKind::Causal(#attn::CausalAlignment::BottomRight))
        }
        Mask::Causal(Alignment::TopLeft) => {
            quote!(#attn::MaskKind::Causal(#attn::CausalAlignment::TopLeft))
        }
    };
    let scale = match &spec.scale {
        Some(s) => {
            let v = s.value;
            quote!(#option::Some(#v))
        }
        None => quote!(#option::None),
    };
    let head_dim = spec.head_dim.value;
    let tilings = plan.candidates.iter().map(|t| {
        let (q, kv) = (t.block_q, t.block_kv);
        quote!(#attn::Tiling { block_q: #q, block_kv: #kv })
    });
    let phases = plan
        .phases
        .iter()
        .map(phase_name)
        .collect::<Vec<_>>()
        .join(" → ");
    let kernel_doc = format!(
        "Runs `{name_str}`: one fused kernel ({phases}); returns O `[B, Hq, Nq, {head_dim}]` and the LSE `[B, Hq, Nq]`."
    );
    let into_doc = format!(
        "Runs `{name_str}` with a chosen tile shape into caller-owned, checked output buffers."
    );
    quote! {
        #(#attrs)*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        #vis struct #name;

        impl #attn::Variant for #name {
            type Elem = #elem;
            const SPEC: #attn::VariantSpec = #attn::VariantSpec {
                name: #name_str,
                heads: #heads,
                head_dim: #head_dim,
                dtype: #attn::DType::#dtype,
                mask: #mask,
                scale: #scale,
                tilings: &[#(#tilings),*],
            };
        }

        impl #name {
            #[doc = #kernel_doc]
            #vis fn forward(
                client: &#attn::ComputeClient,
                q: &#attn::Tensor<#elem>,
                k: &#attn::Tensor<#elem>,
                v: &#attn::Tensor<#elem>,
            ) -> #result<#attn::Output<#elem>, #attn::AttnError> {
                #attn::forward::<Self>(client, q, k, v)
            }

            #[doc = #into_doc]
            #vis fn forward_into(
                client: &#attn::ComputeClient,
                q: &#attn::Tensor<#elem>,
                k: &#attn::Tensor<#elem>,
                v: &#attn::Tensor<#elem>,
                tiling: #attn::Tiling,
                out: &#attn::Output<#elem>,
            ) -> #result<(), #attn::AttnError> {
                #attn::forward_into::<Self>(client, q, k, v, tiling, out)
            }
        }
    }
}

/// What a declaration with errors expands to besides the errors: the same public names, so the
/// rest of the user's crate still type-checks and only the real mistakes are reported.
pub fn stub(vis: &syn::Visibility, name: &syn::Ident) -> TokenStream {
    quote! {
        #[allow(dead_code)]
        #vis struct #name;
    }
}

fn elem_type(dtype: DType) -> TokenStream {
    let attn = paths::attn();
    match dtype {
        DType::F16 => quote!(#attn::f16),
        DType::BF16 => quote!(#attn::bf16),
        DType::F32 => quote!(f32),
    }
}

fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::LoadQ => "load Q",
        Phase::LoadKv => "load K/V",
        Phase::Scores => "scores",
        Phase::Mask => "mask",
        Phase::OnlineSoftmax => "online softmax",
        Phase::AccumulatePv => "P·V",
        Phase::Finish => "normalise, write O and LSE",
    }
}
