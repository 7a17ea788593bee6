//! [`KernelPlan`] → tokens. Infallible: everything was validated before.
//!
//! A variant becomes a unit struct implementing `attn::Variant` (its comptime facts and tile
//! candidates, which specialise the generic kernels in `attn-runtime`, and the host form of its
//! expressions), a `#[cube]` implementation of `attn::Hooks` when it declares mask or score
//! expressions, a typed `…Inputs` struct when it needs run-time inputs, and inherent launchers
//! typed by its element type (`forward`, `forward_into`, `decode`, `backward`, …).

mod expr;
mod paths;

use proc_macro2::TokenStream;
use quote::{format_ident, quote};

use crate::expr::{Closure, InputDecl, InputShape, Node, Param, Ty, Typed};
use crate::plan::{KernelPlan, Phase};
use crate::spec::{Alibi, CausalAlignment, DType, HeadGrouping, Spec};

/// The items of one planned variant.
pub fn variant(plan: &KernelPlan) -> TokenStream {
    let attn = paths::attn();
    let spec = &plan.spec;
    let Spec {
        attrs, vis, name, ..
    } = spec;
    let has_hooks = spec.mask.custom.is_some() || spec.score.is_some();
    let host_fns = host_fns(plan);
    let inputs_items = if spec.has_inputs() {
        inputs_struct(spec, &format_ident!("{}Inputs", name))
    } else {
        quote!()
    };
    if spec.also.is_empty() {
        let elem = elem_type(spec.dtype.value);
        let methods = launchers(plan, &elem);
        let spec_tokens = variant_spec(plan, spec.dtype.value);
        let hooks_type = if has_hooks {
            quote!(Self)
        } else {
            quote!(#attn::NoHooks)
        };
        let hooks_impl = if has_hooks {
            hooks(plan, &quote!(#name))
        } else {
            quote!()
        };
        return quote! {
            #(#attrs)*
            #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
            #vis struct #name;

            impl #attn::Variant for #name {
                type Elem = #elem;
                type Hooks = #hooks_type;
                const SPEC: #attn::VariantSpec = #spec_tokens;
                #host_fns
            }

            #hooks_impl

            // Found by `attn-tune` (tuning at install) through the program-wide registry.
            #attn::__private::inventory::submit! { #attn::tune::Registration::of::<#name>() }

            #inputs_items

            impl #name {
                #methods
            }
        };
    }
    // Several element types: one type taking its element type as a parameter (the first declared
    // by default), one `Variant` per element type over shared hooks.
    let dtypes: Vec<DType> = std::iter::once(spec.dtype.value)
        .chain(spec.also.iter().map(|d| d.value))
        .collect();
    let first = elem_type(spec.dtype.value);
    let methods = launchers(plan, &quote!(E));
    let hooks_name = format_ident!("{}Hooks", name);
    let (hooks_type, hooks_items) = if has_hooks {
        let hooks_impl = hooks(plan, &quote!(#hooks_name));
        let doc = format!(
            "The `#[cube]` mask and score expressions of `{name}`, shared by its element types."
        );
        (
            quote!(#hooks_name),
            quote! {
                #[doc = #doc]
                #[derive(Clone, Copy, Debug, Default)]
                #vis struct #hooks_name;

                #hooks_impl
            },
        )
    } else {
        (quote!(#attn::NoHooks), quote!())
    };
    let names: Vec<String> = dtypes
        .iter()
        .map(|d| format!("`{}`", dtype_name(*d)))
        .collect();
    let type_doc = format!(
        " Declared for {}: `{name}` alone is `{name}<{}>`; `{name}<E>` names the others.",
        names.join(", "),
        dtype_name(spec.dtype.value)
    );
    let impls = dtypes.iter().map(|&dtype| {
        let elem = elem_type(dtype);
        let spec_tokens = variant_spec(plan, dtype);
        quote! {
            impl #attn::Variant for #name<#elem> {
                type Elem = #elem;
                type Hooks = #hooks_type;
                const SPEC: #attn::VariantSpec = #spec_tokens;
                #host_fns
            }

            #attn::__private::inventory::submit! { #attn::tune::Registration::of::<#name<#elem>>() }
        }
    });
    quote! {
        #(#attrs)*
        #[doc = ""]
        #[doc = #type_doc]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        #vis struct #name<E = #first>(::core::marker::PhantomData<fn() -> E>);

        #(#impls)*

        impl #name<#first> {
            /// The spec of the first declared element type, which the plain name stands for
            /// (`Name::SPEC`; `<Name<E> as Variant>::SPEC` for the others).
            #vis const SPEC: #attn::VariantSpec = <Self as #attn::Variant>::SPEC;
        }

        #hooks_items

        #inputs_items

        impl<E: #attn::Element> #name<E>
        where
            Self: #attn::Variant<Elem = E>,
        {
            #methods
        }
    }
}

/// The inherent launchers (`forward`, `forward_into`, `decode`, `backward`, …), their tensors of
/// element type `elem`.
fn launchers(plan: &KernelPlan, elem: &TokenStream) -> TokenStream {
    let attn = paths::attn();
    let result = paths::result();
    let spec = &plan.spec;
    let Spec { vis, name, .. } = spec;
    let name_str = name.to_string();
    let phases = plan
        .phases
        .iter()
        .map(phase_name)
        .collect::<Vec<_>>()
        .join(" → ");
    let value_dim = spec.value_dim();
    let kernel_doc = format!(
        "Runs `{name_str}`: one fused kernel ({phases}); returns O `[B, Hq, Nq, {value_dim}]` and the LSE `[B, Hq, Nq]`."
    );
    let into_doc = format!(
        "Runs `{name_str}` with the tuned tile shape into caller-owned, checked output buffers (contiguous O `[B, Hq, Nq, {value_dim}]`, LSE `[B, Hq, Nq]`)."
    );
    let tiling_doc = format!(
        "Runs `{name_str}` with a chosen tile shape into caller-owned, checked output buffers (tuning, tests, benchmarks)."
    );
    let decode_into_doc = format!(
        "Runs `{name_str}`'s decode with the tuned plan into caller-owned, checked output buffers."
    );
    let decode_doc = format!(
        "Runs `{name_str}` for new query tokens `q` `[B, Hq, Nq, {}]` against a K/V cache (paged or contiguous): GQA-packed, split over the keys; returns O and the LSE.",
        spec.head_dim.value
    );
    let backward_doc = format!(
        "The gradients of `{name_str}`'s attention of `q`, `k`, `v` given its forward output `out` and the loss's gradient `d_out` `[B, Hq, Nq, {value_dim}]`: dQ, and dK, dV summed over each K/V head's query group; deterministic."
    );
    let (inputs_param, inputs_value) = if spec.has_inputs() {
        let inputs_name = format_ident!("{}Inputs", name);
        (
            quote!(inputs: &#inputs_name<'_>,),
            quote!(&inputs.to_inputs()),
        )
    } else {
        (quote!(), quote!(&#attn::Inputs::default()))
    };
    quote! {
        #[doc = #kernel_doc]
        #vis fn forward(
            client: &#attn::ComputeClient,
            q: &#attn::Tensor<#elem>,
            k: &#attn::Tensor<#elem>,
            v: &#attn::Tensor<#elem>,
            #inputs_param
        ) -> #result<#attn::Output<#elem>, #attn::AttnError> {
            #attn::forward::<Self>(client, q, k, v, #inputs_value)
        }

        #[doc = #into_doc]
        #vis fn forward_into(
            client: &#attn::ComputeClient,
            q: &#attn::Tensor<#elem>,
            k: &#attn::Tensor<#elem>,
            v: &#attn::Tensor<#elem>,
            #inputs_param
            out: &#attn::Output<#elem>,
        ) -> #result<(), #attn::AttnError> {
            #attn::forward_into::<Self>(client, q, k, v, #inputs_value, out)
        }

        #[doc = #tiling_doc]
        #vis fn forward_with_tiling(
            client: &#attn::ComputeClient,
            q: &#attn::Tensor<#elem>,
            k: &#attn::Tensor<#elem>,
            v: &#attn::Tensor<#elem>,
            #inputs_param
            tiling: #attn::Tiling,
            out: &#attn::Output<#elem>,
        ) -> #result<(), #attn::AttnError> {
            #attn::forward_with_tiling::<Self>(client, q, k, v, #inputs_value, tiling, out)
        }

        #[doc = #decode_doc]
        #vis fn decode(
            client: &#attn::ComputeClient,
            q: &#attn::Tensor<#elem>,
            cache: &#attn::KvCache<#elem>,
            #inputs_param
        ) -> #result<#attn::Output<#elem>, #attn::AttnError> {
            #attn::decode::<Self>(client, q, cache, #inputs_value)
        }

        #[doc = #decode_into_doc]
        #vis fn decode_into(
            client: &#attn::ComputeClient,
            q: &#attn::Tensor<#elem>,
            cache: &#attn::KvCache<#elem>,
            #inputs_param
            out: &#attn::Output<#elem>,
        ) -> #result<(), #attn::AttnError> {
            #attn::decode_into::<Self>(client, q, cache, #inputs_value, out)
        }

        #[doc = #backward_doc]
        #vis fn backward(
            client: &#attn::ComputeClient,
            q: &#attn::Tensor<#elem>,
            k: &#attn::Tensor<#elem>,
            v: &#attn::Tensor<#elem>,
            out: &#attn::Output<#elem>,
            d_out: &#attn::Tensor<#elem>,
            #inputs_param
        ) -> #result<#attn::Grads<#elem>, #attn::AttnError> {
            #attn::backward::<Self>(client, q, k, v, out, d_out, #inputs_value)
        }
    }
}

/// The `VariantSpec` constant of the variant at element type `dtype`.
fn variant_spec(plan: &KernelPlan, dtype: DType) -> TokenStream {
    let attn = paths::attn();
    let option = paths::option();
    let spec = &plan.spec;
    let name_str = spec.name.to_string();
    let heads = match spec.heads.value {
        HeadGrouping::Mha => quote!(#attn::HeadGrouping::Mha),
        HeadGrouping::Mqa => quote!(#attn::HeadGrouping::Mqa),
        HeadGrouping::Gqa { group } => quote!(#attn::HeadGrouping::Gqa { group: #group }),
    };
    let dtype = format_ident!(
        "{}",
        match dtype {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
        }
    );
    let opt_f64 = |v: Option<f64>| match v {
        Some(v) => quote!(#option::Some(#v)),
        None => quote!(#option::None),
    };
    let opt_u32 = |v: Option<u32>| match v {
        Some(v) => quote!(#option::Some(#v)),
        None => quote!(#option::None),
    };
    let m = &spec.mask;
    let causal = m.causal.is_some();
    let align = match m.alignment() {
        CausalAlignment::BottomRight => quote!(#attn::CausalAlignment::BottomRight),
        CausalAlignment::TopLeft => quote!(#attn::CausalAlignment::TopLeft),
    };
    let window = match m.window {
        Some(w) => {
            let left = opt_u32(w.value.left.map(|l| l.value));
            let right = opt_u32(w.value.right.map(|r| r.value));
            quote!(#option::Some(#attn::Window { left: #left, right: #right }))
        }
        None => quote!(#option::None),
    };
    let key_lengths = m.key_lengths.is_some();
    let documents = m.documents.is_some();
    let prefix_lm = m.prefix_lm.is_some();
    let custom_mask = m.custom.is_some();
    let custom_bounds = plan.custom_bounds;
    let softcap = opt_f64(spec.softcap.map(|s| s.value));
    let alibi = match spec.alibi.map(|a| a.value) {
        Some(Alibi::Geometric) => quote!(#option::Some(#attn::Alibi::Geometric)),
        Some(Alibi::Given) => quote!(#option::Some(#attn::Alibi::Given)),
        None => quote!(#option::None),
    };
    let custom_score = spec.score.is_some();
    let sinks = spec.sinks.is_some();
    let inputs = spec.inputs.iter().map(|d| {
        let name = d.name.to_string();
        let ty = match d.ty {
            Ty::Float => quote!(#attn::InputType::F32),
            _ => quote!(#attn::InputType::I32),
        };
        let shape = expr::shape_tokens(d.shape);
        quote!(#attn::InputDecl { name: #name, ty: #ty, shape: #shape })
    });
    let score_reads = spec.score.as_ref().map_or(Vec::new(), |c| {
        let mut reads = Vec::new();
        collect_reads(&c.body, &mut reads);
        reads.sort_by_key(|r| r.read);
        reads
            .iter()
            .map(|r| {
                let input = r.input as u32;
                let index = match r.index.node {
                    Node::Param(Param::Q) => quote!(Query),
                    Node::Param(Param::K) => quote!(Key),
                    _ => quote!(Computed),
                };
                quote!(#attn::ScoreRead { input: #input, index: #attn::ReadIndex::#index })
            })
            .collect()
    });
    let scale = opt_f64(spec.scale.map(|s| s.value));
    let head_dim = spec.head_dim.value;
    let value_dim = spec.value_dim();
    let tilings = plan.candidates.iter().map(|t| {
        let (q, kv) = (t.block_q, t.block_kv);
        quote!(#attn::Tiling { block_q: #q, block_kv: #kv })
    });
    quote! {
        #attn::VariantSpec {
            name: #name_str,
            heads: #heads,
            head_dim: #head_dim,
            value_dim: #value_dim,
            dtype: #attn::DType::#dtype,
            mask: #attn::MaskSpec {
                causal: #causal,
                align: #align,
                window: #window,
                key_lengths: #key_lengths,
                documents: #documents,
                prefix_lm: #prefix_lm,
                custom: #custom_mask,
                custom_bounds: #custom_bounds,
            },
            score: #attn::ScoreSpec {
                softcap: #softcap,
                alibi: #alibi,
                custom: #custom_score,
                sinks: #sinks,
            },
            inputs: &[#(#inputs),*],
            score_reads: &[#(#score_reads),*],
            scale: #scale,
            tilings: &[#(#tilings),*],
        }
    }
}

/// Which inputs an expression reads: `(any i32 input, any f32 input)`.
fn reads_inputs(e: &Typed, inputs: &[InputDecl]) -> (bool, bool) {
    let merge = |a: (bool, bool), b: (bool, bool)| (a.0 || b.0, a.1 || b.1);
    match &e.node {
        Node::Input(i) => (inputs[*i].ty != Ty::Float, inputs[*i].ty == Ty::Float),
        // A table's place is read from the `i32` buffer.
        Node::Table(t) => merge(
            (true, inputs[t.input].ty == Ty::Float),
            reads_inputs(&t.index, inputs),
        ),
        Node::Neg(x) | Node::Not(x) | Node::Cast(_, x) => reads_inputs(x, inputs),
        Node::Binary(_, a, b) => merge(reads_inputs(a, inputs), reads_inputs(b, inputs)),
        Node::Call(_, x, args) => args.iter().fold(reads_inputs(x, inputs), |acc, a| {
            merge(acc, reads_inputs(a, inputs))
        }),
        Node::If(c, a, b) => merge(
            reads_inputs(c, inputs),
            merge(reads_inputs(a, inputs), reads_inputs(b, inputs)),
        ),
        _ => (false, false),
    }
}

/// The derivatives of a score expression with respect to each declared `f32` input that is not
/// a table, by the input's declaration index (`None` for the others).
fn input_derivatives(body: &Typed, inputs: &[InputDecl]) -> Vec<Option<Typed>> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, decl)| {
            (decl.ty == Ty::Float && !decl.shape.is_table())
                .then(|| crate::derive::derivative(body, crate::derive::Var::Input(i)))
        })
        .collect()
}

/// The score expression's table reads, in read order: each read's derivative and the read
/// itself (with its index expression).
fn read_derivatives(body: &Typed) -> Vec<(Typed, crate::expr::TableRead)> {
    let mut reads = Vec::new();
    collect_reads(body, &mut reads);
    reads.sort_by_key(|r| r.read);
    reads
        .into_iter()
        .map(|r| {
            (
                crate::derive::derivative(body, crate::derive::Var::Read(r.read)),
                r,
            )
        })
        .collect()
}

fn collect_reads(e: &Typed, out: &mut Vec<crate::expr::TableRead>) {
    match &e.node {
        Node::Table(t) => {
            out.push((**t).clone());
            collect_reads(&t.index, out);
        }
        Node::Neg(x) | Node::Not(x) | Node::Cast(_, x) => collect_reads(x, out),
        Node::Binary(_, a, b) => {
            collect_reads(a, out);
            collect_reads(b, out);
        }
        Node::Call(_, x, args) => {
            collect_reads(x, out);
            for a in args {
                collect_reads(a, out);
            }
        }
        Node::If(c, a, b) => {
            collect_reads(c, out);
            collect_reads(a, out);
            collect_reads(b, out);
        }
        Node::Param(_) | Node::Int(_) | Node::Float(_) | Node::Bool(_) | Node::Input(_) => {}
    }
}

/// `Hooks::score_read_grad` and `Hooks::read_position`: each table read's derivative and inner
/// position, selected by read number.
fn cube_read_grads(
    body: Option<&Typed>,
    inputs: &[InputDecl],
    run_inputs: &TokenStream,
) -> TokenStream {
    let reads = body.map_or_else(Vec::new, read_derivatives);
    let grads: Vec<&Typed> = reads.iter().map(|(d, _)| d).collect();
    let [s, b, h, q, k, inp] = grad_params(&grads, inputs);
    let which = if reads.is_empty() {
        format_ident!("_read")
    } else {
        format_ident!("read")
    };
    let mut value = quote!(0.0f32);
    for (d, r) in reads.iter().rev() {
        let n = r.read as u32;
        let d = expr::cube(d, inputs);
        value = quote!(select(#which == #n, #d, #value));
    }
    let indices: Vec<&Typed> = reads.iter().map(|(_, r)| &r.index).collect();
    let [_, pb, ph, pq, pk, pinp] = grad_params(&indices, inputs);
    let helpers = paths::expr_helpers();
    let mut position = quote!(0i32);
    for (_, r) in reads.iter().rev() {
        let n = r.read as u32;
        let i = expr::cube(&r.index, inputs);
        let len = expr::cube_table_len(inputs[r.input].shape);
        position = quote!(select(#which == #n, #helpers::table_clamp(#i, #len), #position));
    }
    // The inner length of a `seq` table reads the buffer too.
    let pinp = if reads
        .iter()
        .any(|(_, r)| inputs[r.input].shape.inner == crate::expr::Inner::Seq)
    {
        format_ident!("inputs")
    } else {
        pinp
    };
    quote! {
        fn score_read_grad(#s: f32, #b: i32, #h: i32, #q: i32, #k: i32, #inp: &#run_inputs, #which: u32) -> f32 {
            #value
        }
        fn read_position(#pb: i32, #ph: i32, #pq: i32, #pk: i32, #pinp: &#run_inputs, #which: u32) -> u32 {
            #position as u32
        }
    }
}

/// `Variant::host_score_read_grad` and `Variant::host_read_index`, the host forms of
/// [`cube_read_grads`].
fn host_read_grads(body: &Typed, inputs: &[InputDecl]) -> TokenStream {
    let attn = paths::attn();
    let reads = read_derivatives(body);
    if reads.is_empty() {
        return quote!();
    }
    let grads: Vec<&Typed> = reads.iter().map(|(d, _)| d).collect();
    let [s, b, h, q, k, inp] = grad_params(&grads, inputs);
    let arms = reads.iter().map(|(d, r)| {
        let n = r.read;
        let d = expr::host(d, inputs);
        quote!(#n => #d,)
    });
    let places = reads.iter().map(|(_, r)| {
        let n = r.read;
        let at = expr::host_table_at(r, inputs);
        quote!(#n => #at,)
    });
    quote! {
        fn host_score_read_grad(#s: f64, #b: i64, #h: i64, #q: i64, #k: i64, #inp: &#attn::Inputs, read: usize) -> f64 {
            match read {
                #(#arms)*
                _ => 0.0,
            }
        }
        #[allow(unused_variables)]
        fn host_read_index(b: i64, h: i64, q: i64, k: i64, inputs: &#attn::Inputs, read: usize) -> usize {
            match read {
                #(#places)*
                _ => 0,
            }
        }
    }
}

/// The parameter names of a function whose body is `bodies` (a leading `_` on the unused).
fn grad_params(bodies: &[&Typed], inputs: &[InputDecl]) -> [proc_macro2::Ident; 6] {
    let used = |p: Param| bodies.iter().any(|b| crate::expr::mentions(b, p, inputs));
    let reads = bodies.iter().any(|b| {
        let (i, f) = reads_inputs(b, inputs);
        i || f
    });
    [
        named(used(Param::S), "s"),
        named(used(Param::B), "b"),
        named(used(Param::H), "h"),
        named(used(Param::Q), "q"),
        named(used(Param::K), "k"),
        named(reads, "inputs"),
    ]
}

/// `Hooks::score_input_grad`: `∂ score / ∂ input` for declared input number `input` (0 for an
/// `i32` input or without a score expression).
fn cube_input_grads(
    body: Option<&Typed>,
    inputs: &[InputDecl],
    run_inputs: &TokenStream,
) -> TokenStream {
    let derivatives = body.map_or_else(Vec::new, |b| input_derivatives(b, inputs));
    let present: Vec<(usize, &Typed)> = derivatives
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.as_ref().map(|d| (i, d)))
        .collect();
    let bodies: Vec<&Typed> = present.iter().map(|(_, d)| *d).collect();
    let [s, b, h, q, k, inp] = grad_params(&bodies, inputs);
    let which = if present.is_empty() {
        format_ident!("_input")
    } else {
        format_ident!("input")
    };
    let mut value = quote!(0.0f32);
    for (i, d) in present.iter().rev() {
        let i = *i as u32;
        let d = expr::cube(d, inputs);
        value = quote!(select(#which == #i, #d, #value));
    }
    quote! {
        fn score_input_grad(#s: f32, #b: i32, #h: i32, #q: i32, #k: i32, #inp: &#run_inputs, #which: u32) -> f32 {
            #value
        }
    }
}

/// `Variant::host_score_input_grad`, the host form of [`cube_input_grads`].
fn host_input_grads(body: &Typed, inputs: &[InputDecl]) -> TokenStream {
    let attn = paths::attn();
    let derivatives = input_derivatives(body, inputs);
    let present: Vec<(usize, &Typed)> = derivatives
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.as_ref().map(|d| (i, d)))
        .collect();
    if present.is_empty() {
        return quote!();
    }
    let bodies: Vec<&Typed> = present.iter().map(|(_, d)| *d).collect();
    let [s, b, h, q, k, inp] = grad_params(&bodies, inputs);
    let arms = present.iter().map(|(i, d)| {
        let d = expr::host(d, inputs);
        quote!(#i => #d,)
    });
    quote! {
        fn host_score_input_grad(#s: f64, #b: i64, #h: i64, #q: i64, #k: i64, #inp: &#attn::Inputs, input: usize) -> f64 {
            match input {
                #(#arms)*
                _ => 0.0,
            }
        }
    }
}

/// A parameter's name, with a leading `_` when the expression does not use it.
fn named(used: bool, name: &str) -> proc_macro2::Ident {
    if used {
        format_ident!("{name}")
    } else {
        format_ident!("_{name}")
    }
}

/// `host_mask`, `host_score` and `host_classify`: the expressions on the host, for the float64
/// reference and for testing the tile classifier.
fn host_fns(plan: &KernelPlan) -> TokenStream {
    let spec = &plan.spec;
    let attn = paths::attn();
    let inputs = &spec.inputs;
    let params = |c: &Closure| {
        let (ints, floats) = reads_inputs(&c.body, inputs);
        [
            named(c.uses(Param::B), "b"),
            named(c.uses(Param::H), "h"),
            named(c.uses(Param::Q), "q"),
            named(c.uses(Param::K), "k"),
            named(ints || floats, "inputs"),
        ]
    };
    let mask = spec.mask.custom.as_ref().map(|c| {
        let [b, h, q, k, inp] = params(c);
        let body = expr::host(&c.body, inputs);
        quote! {
            fn host_mask(#b: i64, #h: i64, #q: i64, #k: i64, #inp: &#attn::Inputs) -> bool {
                #body
            }
        }
    });
    let score = spec.score.as_ref().map(|c| {
        let [b, h, q, k, inp] = params(c);
        let s = named(c.uses(Param::S), "s");
        let body = expr::host(&c.body, inputs);
        let grad = crate::derive::d_ds(&c.body);
        let grad_used = |p: Param| crate::expr::mentions(&grad, p, inputs);
        let [gs, gb, gh, gq, gk] = [Param::S, Param::B, Param::H, Param::Q, Param::K]
            .map(|p| named(grad_used(p), p.ident()));
        let (gi, gf) = reads_inputs(&grad, inputs);
        let ginp = named(gi || gf, "inputs");
        let grad_body = expr::host(&grad, inputs);
        let input_grads = host_input_grads(&c.body, inputs);
        let read_grads = host_read_grads(&c.body, inputs);
        quote! {
            fn host_score(#s: f64, #b: i64, #h: i64, #q: i64, #k: i64, #inp: &#attn::Inputs) -> f64 {
                #body
            }
            fn host_score_grad(#gs: f64, #gb: i64, #gh: i64, #gq: i64, #gk: i64, #ginp: &#attn::Inputs) -> f64 {
                #grad_body
            }
            #input_grads
            #read_grads
        }
    });
    let classify = spec.mask.custom.as_ref().filter(|_| plan.custom_bounds).map(|c| {
        let [b, h, _, _, inp] = params(c);
        let [q_lo, q_hi] = ["q_lo", "q_hi"].map(|n| named(c.uses(Param::Q), n));
        let [k_lo, k_hi] = ["k_lo", "k_hi"].map(|n| named(c.uses(Param::K), n));
        let mut iv = expr::Intervals::new(inputs, true);
        let (may, must) = iv.emit(&c.body);
        let stmts = &iv.stmts;
        quote! {
            fn host_classify(#b: i64, #h: i64, #q_lo: i64, #q_hi: i64, #k_lo: i64, #k_hi: i64, #inp: &#attn::Inputs) -> u32 {
                #(#stmts)*
                if !#may { #attn::TILE_EMPTY } else if #must { #attn::TILE_FULL } else { #attn::TILE_PARTIAL }
            }
        }
    });
    quote!(#mask #score #classify)
}

/// The variant's `#[cube]` hooks: its mask, its score modification and the mask's tile
/// classification, compiled into the kernels through `attn::Hooks`, implemented for `target`.
fn hooks(plan: &KernelPlan, target: &TokenStream) -> TokenStream {
    let attn = paths::attn();
    let cubecl = paths::cubecl();
    let spec = &plan.spec;
    let inputs = &spec.inputs;
    let run_inputs = quote!(#attn::RunInputs);
    let buffers = |e: Option<&Typed>| {
        let (ints, floats) = e.map_or((false, false), |e| reads_inputs(e, inputs));
        named(ints || floats, "inputs")
    };
    let mask_body = spec.mask.custom.as_ref().map(|c| &c.body);
    let mask = {
        let used = |p| spec.mask.custom.as_ref().is_some_and(|c| c.uses(p));
        let [b, h, q, k] =
            [Param::B, Param::H, Param::Q, Param::K].map(|p| named(used(p), p.ident()));
        let inp = buffers(mask_body);
        let body = mask_body.map_or(quote!(true), |e| expr::cube(e, inputs));
        quote! {
            fn mask(#b: i32, #h: i32, #q: i32, #k: i32, #inp: &#run_inputs) -> bool {
                #body
            }
        }
    };
    let score = {
        let c = spec.score.as_ref();
        let used = |p| c.is_some_and(|c| c.uses(p));
        let [s, b, h, q, k] = [Param::S, Param::B, Param::H, Param::Q, Param::K]
            .map(|p| named(used(p) || (p == Param::S && c.is_none()), p.ident()));
        let inp = buffers(c.map(|c| &c.body));
        let body = c.map_or(quote!(s), |c| expr::cube(&c.body, inputs));
        // ∂ score / ∂ s, for the backward pass.
        let grad = c.map(|c| crate::derive::d_ds(&c.body));
        let grad_used = |p: Param| {
            grad.as_ref()
                .is_some_and(|g| crate::expr::mentions(g, p, inputs))
        };
        let [gs, gb, gh, gq, gk] = [Param::S, Param::B, Param::H, Param::Q, Param::K]
            .map(|p| named(grad_used(p), p.ident()));
        let ginp = buffers(grad.as_ref());
        let grad_body = grad
            .as_ref()
            .map_or(quote!(1.0f32), |g| expr::cube(g, inputs));
        let input_grads = cube_input_grads(c.map(|c| &c.body), inputs, &run_inputs);
        let read_grads = cube_read_grads(c.map(|c| &c.body), inputs, &run_inputs);
        quote! {
            fn score(#s: f32, #b: i32, #h: i32, #q: i32, #k: i32, #inp: &#run_inputs) -> f32 {
                #body
            }
            fn score_grad(#gs: f32, #gb: i32, #gh: i32, #gq: i32, #gk: i32, #ginp: &#run_inputs) -> f32 {
                #grad_body
            }
            #input_grads
            #read_grads
        }
    };
    let classify = match mask_body.filter(|_| plan.custom_bounds) {
        Some(e) => {
            let c = spec.mask.custom.as_ref().expect("a mask body");
            let [b, h] = [Param::B, Param::H].map(|p| named(c.uses(p), p.ident()));
            let [q_lo, q_hi] = ["q_lo", "q_hi"].map(|n| named(c.uses(Param::Q), n));
            let [k_lo, k_hi] = ["k_lo", "k_hi"].map(|n| named(c.uses(Param::K), n));
            let inp = buffers(Some(e));
            let mut iv = expr::Intervals::new(inputs, false);
            let (may, must) = iv.emit(e);
            let stmts = &iv.stmts;
            quote! {
                fn classify(#b: i32, #h: i32, tile: #attn::TileBounds, #inp: &#run_inputs) -> u32 {
                    let #q_lo = tile.q_lo;
                    let #q_hi = tile.q_hi;
                    let #k_lo = tile.k_lo;
                    let #k_hi = tile.k_hi;
                    #(#stmts)*
                    select(!#may, #attn::TILE_EMPTY, select(#must, #attn::TILE_FULL, #attn::TILE_PARTIAL))
                }
            }
        }
        None => {
            let full_or_partial = if spec.mask.custom.is_some() {
                quote!(#attn::TILE_PARTIAL)
            } else {
                quote!(#attn::TILE_FULL)
            };
            quote! {
                fn classify(_b: i32, _h: i32, _tile: #attn::TileBounds, _inputs: &#run_inputs) -> u32 {
                    #full_or_partial
                }
            }
        }
    };
    quote! {
        const _: () = {
            use #cubecl;
            use #cubecl::prelude::*;

            #[cubecl::cube]
            impl #attn::Hooks for #target {
                #mask
                #score
                #classify
            }
        };
    }
}

/// How an input of `shape` lies in its slice, for the generated docs: "row-major `[B, Hq, 32]`".
fn layout(shape: InputShape) -> String {
    let dims = shape.dims(["B", "Hq", "max(Nq, Nk)"]);
    let what = match (shape.per_batch, shape.per_head, shape.inner) {
        (true, false, crate::expr::Inner::None) => "one value per sequence",
        (false, true, crate::expr::Inner::None) => "one value per query head",
        _ => "row-major",
    };
    format!("{what}, `[{}]`", dims.join(", "))
}

/// The typed run-time inputs of a variant: exactly the fields its declaration needs.
fn inputs_struct(spec: &Spec, inputs_name: &proc_macro2::Ident) -> TokenStream {
    let attn = paths::attn();
    let option = paths::option();
    let vis = &spec.vis;
    let mut fields = Vec::new();
    let mut builtin = Vec::new();
    let mut add = |field: &str, ty: TokenStream, doc: &str| {
        let f = format_ident!("{field}");
        fields.push(quote!(#[doc = #doc] pub #f: #ty,));
        builtin.push(quote!(#f: #option::Some(self.#f),));
    };
    if spec.mask.key_lengths.is_some() {
        add(
            "key_lengths",
            quote!(&'a [i32]),
            "Key length per sequence, `[B]`: keys at or past it are masked.",
        );
    }
    if spec.mask.documents.is_some() {
        add(
            "q_offsets",
            quote!(&'a [i32]),
            "Start of each document among the packed queries, and the total: `[docs + 1]`.",
        );
        add(
            "k_offsets",
            quote!(&'a [i32]),
            "Start of each document among the packed keys, and the total: `[docs + 1]`.",
        );
    }
    if spec.mask.prefix_lm.is_some() {
        add(
            "prefix_lengths",
            quote!(&'a [i32]),
            "Prefix length per sequence, `[B]`: keys inside it are visible to every query.",
        );
    }
    if spec.sinks.is_some() {
        add(
            "sinks",
            quote!(&'a [f32]),
            "Sink logit per query head, `[Hq]`.",
        );
    }
    if spec.alibi.is_some_and(|a| a.value == Alibi::Given) {
        add(
            "alibi_slopes",
            quote!(&'a [f32]),
            "ALiBi slope per query head, `[Hq]`.",
        );
    }
    let mut ints = Vec::new();
    let mut floats = Vec::new();
    for d in &spec.inputs {
        let f = &d.name;
        let scalar = match d.ty {
            Ty::Float => quote!(f32),
            _ => quote!(i32),
        };
        let (ty, value, doc) = if d.shape == InputShape::SCALAR {
            (
                scalar,
                quote!(::core::slice::from_ref(&self.#f)),
                format!("`{f}`, as the declaration's expressions read it."),
            )
        } else {
            (
                quote!(&'a [#scalar]),
                quote!(self.#f),
                format!("`{f}`: {}.", layout(d.shape)),
            )
        };
        fields.push(quote!(#[doc = #doc] pub #f: #ty,));
        if d.ty == Ty::Float {
            floats.push(value);
        } else {
            ints.push(value);
        }
    }
    let doc = format!("Run-time inputs of `{}`.", spec.name);
    let lifetime_use = if fields.iter().any(|f| f.to_string().contains("'a")) {
        quote!()
    } else {
        quote!(#[doc(hidden)] pub _lifetime: ::core::marker::PhantomData<&'a ()>,)
    };
    quote! {
        #[doc = #doc]
        #[derive(Clone, Copy, Debug)]
        #vis struct #inputs_name<'a> {
            #(#fields)*
            #lifetime_use
        }

        impl<'a> #inputs_name<'a> {
            /// The same inputs in the runtime's untyped form.
            #vis fn to_inputs(&self) -> #attn::Inputs<'_> {
                #attn::Inputs {
                    #(#builtin)*
                    ints: ::std::vec![#(#ints),*],
                    floats: ::std::vec![#(#floats),*],
                    ..::core::default::Default::default()
                }
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

/// The declaration's word for `dtype`.
fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
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
