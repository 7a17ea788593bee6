//! The attn declaration language, as an ordinary library: syntax → validated [`Spec`] →
//! [`KernelPlan`] → tokens. The `attention!` macro is a thin shim over [`expand`]; tools and tests
//! call the same functions.

#![warn(missing_docs)]

pub mod check;
pub mod codegen;
pub mod ctxt;
pub mod derive;
pub mod expr;
pub mod keywords;
pub mod lower;
pub mod plan;
pub mod spec;
pub mod syntax;

pub use ctxt::Ctxt;
pub use plan::{plan, KernelPlan};
pub use spec::Spec;
pub use syntax::Declarations;

use proc_macro2::TokenStream;

/// Parses, validates and plans every variant of one `attention! { … }` body. All mistakes of all
/// variants come back together.
pub fn analyse(input: TokenStream) -> Result<Vec<KernelPlan>, (syn::Error, Vec<TokenStream>)> {
    let decls: Declarations = syn::parse2(input).map_err(|e| (e, Vec::new()))?;
    let cx = Ctxt::new();
    let specs: Vec<Option<Spec>> = decls
        .variants
        .iter()
        .map(|raw| {
            let spec = lower::lower(&cx, raw)?;
            check::check(&cx, &spec);
            Some(spec)
        })
        .collect();
    match cx.finish() {
        Ok(()) => Ok(specs
            .into_iter()
            .map(|s| plan(s.expect("no errors, so every spec lowered")))
            .collect()),
        Err(e) => {
            let stubs = decls
                .variants
                .iter()
                .map(|v| codegen::stub(&v.vis, &v.name))
                .collect();
            Err((e, stubs))
        }
    }
}

/// The whole expansion of an `attention! { … }` body: generated items, or compile errors plus
/// stubs with the same public names.
pub fn expand(input: TokenStream) -> TokenStream {
    match analyse(input) {
        Ok(plans) => plans.iter().map(codegen::variant).collect(),
        Err((error, stubs)) => {
            let mut out = error.to_compile_error();
            out.extend(stubs);
            out
        }
    }
}

/// Formats generated tokens as Rust source (used by the macro's debug output and by snapshots).
pub fn pretty(tokens: &TokenStream) -> String {
    match syn::parse2::<syn::File>(tokens.clone()) {
        Ok(file) => prettyplease::unparse(&file),
        Err(_) => tokens.to_string(),
    }
}
