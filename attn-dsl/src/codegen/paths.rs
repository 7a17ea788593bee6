//! Absolute paths of everything generated code names, built in one place.

use proc_macro2::TokenStream;
use quote::quote;

/// The facade crate users depend on.
pub fn attn() -> TokenStream {
    quote!(::attn)
}

/// `::core::option::Option`.
pub fn option() -> TokenStream {
    quote!(::core::option::Option)
}

/// `::core::result::Result`.
pub fn result() -> TokenStream {
    quote!(::core::result::Result)
}
