//! The raw declaration: what the user wrote, every node with its span, nothing interpreted yet.
//!
//! ```text
//! attention! {
//!     /// Docs.
//!     pub Name { key: value, key: value, ... }
//!     ...
//! }
//! ```

use proc_macro2::{TokenStream, TokenTree};
use syn::parse::{Parse, ParseStream};
use syn::{braced, Attribute, Ident, Token, Visibility};

/// Everything inside one `attention! { … }`.
pub struct Declarations {
    /// The declared variants, in order.
    pub variants: Vec<RawVariant>,
}

/// One declared variant before interpretation.
pub struct RawVariant {
    /// Outer attributes (doc comments among them).
    pub attrs: Vec<Attribute>,
    /// Visibility of the generated type.
    pub vis: Visibility,
    /// The variant's name.
    pub name: Ident,
    /// Its settings.
    pub fields: Vec<RawField>,
}

/// `key: value`, the value kept as tokens for the setting's own parser.
pub struct RawField {
    /// The setting's name.
    pub key: Ident,
    /// The tokens up to the next top-level comma.
    pub value: TokenStream,
}

impl Parse for Declarations {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut variants = Vec::new();
        while !input.is_empty() {
            variants.push(input.parse()?);
        }
        if variants.is_empty() {
            return Err(input.error(
                "expected a variant: `pub Name { heads: mha, head_dim: 128, dtype: f16 }`",
            ));
        }
        Ok(Self { variants })
    }
}

impl Parse for RawVariant {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        let name: Ident = input.parse()?;
        let content;
        braced!(content in input);
        let mut fields = Vec::new();
        while !content.is_empty() {
            fields.push(content.parse()?);
            if content.is_empty() {
                break;
            }
            content.parse::<Token![,]>()?;
        }
        Ok(Self {
            attrs,
            vis,
            name,
            fields,
        })
    }
}

impl Parse for RawField {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let key: Ident = input.call(syn::ext::IdentExt::parse_any)?;
        input
            .parse::<Token![:]>()
            .map_err(|e| syn::Error::new(e.span(), format!("expected `:` after `{key}`")))?;
        let mut value = TokenStream::new();
        // A closure's parameter list (`|b, h, q, k|`) holds commas of its own: it starts at the
        // value's start or after a mask term's `&`, and runs to the next `|`.
        let mut term_start = true;
        while !input.is_empty() && !input.peek(Token![,]) {
            let tt: TokenTree = input.parse()?;
            let opens_closure =
                term_start && matches!(&tt, TokenTree::Punct(p) if p.as_char() == '|');
            term_start = matches!(&tt, TokenTree::Punct(p) if p.as_char() == '&');
            value.extend([tt]);
            if opens_closure {
                while !input.is_empty() && !input.peek(Token![|]) {
                    value.extend([input.parse::<TokenTree>()?]);
                }
            }
        }
        if value.is_empty() {
            return Err(syn::Error::new(key.span(), format!("`{key}` has no value")));
        }
        Ok(Self { key, value })
    }
}
