//! The `attention!` macro. A thin shim: all the work is in `attn-dsl`.

#![warn(missing_docs)]

use proc_macro::TokenStream;

/// Declares attention variants; see the `attn` crate's documentation for the syntax.
///
/// Set `ATTN_DEBUG_EXPAND=1` while building to print the pretty-printed expansion.
#[proc_macro]
pub fn attention(input: TokenStream) -> TokenStream {
    let output = attn_dsl::expand(input.into());
    if std::env::var_os("ATTN_DEBUG_EXPAND").is_some() {
        eprintln!("{}", attn_dsl::pretty(&output));
    }
    output.into()
}
