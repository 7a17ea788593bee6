//! Absolute paths of everything generated code names, built in one place.

use proc_macro2::TokenStream;
use quote::quote;

/// The facade crate users depend on.
pub fn attn() -> TokenStream {
    quote!(::attn)
}

/// cubecl, as the facade re-exports it for generated `#[cube]` code.
pub fn cubecl() -> TokenStream {
    quote!(::attn::__private::cubecl)
}

/// The slot numbers of the packed run-time inputs.
pub fn slots() -> TokenStream {
    quote!(::attn::slots)
}

/// The `#[cube]` helpers expressions call (`min_i32`, `abs_f32`, …).
pub fn expr_helpers() -> TokenStream {
    quote!(::attn::hooks::ops)
}

/// `::core::option::Option`.
pub fn option() -> TokenStream {
    quote!(::core::option::Option)
}

/// `::core::result::Result`.
pub fn result() -> TokenStream {
    quote!(::core::result::Result)
}
