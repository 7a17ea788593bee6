//! Raw declaration → [`Spec`]: each setting's value parsed by its own small parser, every mistake
//! recorded with the span of the offending token.

use proc_macro2::TokenStream;
use syn::parse::{ParseStream, Parser};
use syn::{Ident, LitInt, Token};

use crate::ctxt::Ctxt;
use crate::keywords as kw;
use crate::spec::{Alignment, DType, Heads, Mask, Spanned, Spec, TileShape};
use crate::syntax::RawVariant;

/// Interprets one raw variant; `None` when a required setting is missing or unreadable (the
/// reasons are in `cx`).
pub fn lower(cx: &Ctxt, raw: &RawVariant) -> Option<Spec> {
    let mut heads = None;
    let mut head_dim = None;
    let mut dtype = None;
    let mut mask = None;
    let mut scale = None;
    let mut tiles = None;
    let mut seen: Vec<&Ident> = Vec::new();
    for field in &raw.fields {
        let key = field.key.to_string();
        if seen.contains(&&field.key) {
            cx.error_at(
                field.key.span(),
                format!("`{key}` is set twice in `{}`; keep one", raw.name),
            );
            continue;
        }
        seen.push(&field.key);
        let value = field.value.clone();
        match key.as_str() {
            kw::KEY_HEADS => heads = parse_with(cx, value, parse_heads),
            kw::KEY_HEAD_DIM => head_dim = parse_with(cx, value, parse_head_dim),
            kw::KEY_DTYPE => dtype = parse_with(cx, value, parse_dtype),
            kw::KEY_MASK => mask = parse_with(cx, value, parse_mask),
            kw::KEY_SCALE => scale = parse_with(cx, value, parse_scale),
            kw::KEY_TILES => tiles = parse_with(cx, value, parse_tiles),
            _ => cx.error_at(
                field.key.span(),
                format!(
                    "unknown setting `{key}`; a variant takes {}",
                    list(kw::KEYS)
                ),
            ),
        }
    }
    let present = |k: &str| seen.iter().any(|i| *i == k);
    for required in kw::REQUIRED_KEYS {
        if !present(required) {
            cx.error_at(
                raw.name.span(),
                format!(
                    "`{}` is missing `{required}`; every variant sets {}",
                    raw.name,
                    list(kw::REQUIRED_KEYS)
                ),
            );
        }
    }
    Some(Spec {
        attrs: raw.attrs.clone(),
        vis: raw.vis.clone(),
        name: raw.name.clone(),
        heads: heads?,
        head_dim: head_dim?,
        dtype: dtype?,
        mask: mask.unwrap_or(Spanned {
            value: Mask::None,
            span: raw.name.span(),
        }),
        scale,
        tiles: tiles.unwrap_or_default(),
    })
}

/// `a`, `b` or `c`.
fn list(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

/// `a`, `b` or `c` (alternatives).
fn alternatives(words: &[&str]) -> String {
    list(words).replace(" and ", " or ")
}

/// Runs a value parser; a parse error becomes a recorded error and `None`.
fn parse_with<T>(
    cx: &Ctxt,
    tokens: TokenStream,
    parser: fn(ParseStream, &Ctxt) -> syn::Result<Option<T>>,
) -> Option<T> {
    match (|input: ParseStream| parser(input, cx)).parse2(tokens) {
        Ok(value) => value,
        Err(e) => {
            cx.syn_error(e);
            None
        }
    }
}

fn parse_heads(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Spanned<Heads>>> {
    let name: Ident = input.parse()?;
    let span = name.span();
    let value = match name.to_string().as_str() {
        kw::HEADS_MHA => Heads::Mha,
        kw::HEADS_MQA => Heads::Mqa,
        kw::HEADS_GQA => {
            if input.is_empty() {
                return Err(syn::Error::new(
                    span,
                    format!("`gqa` needs its group size: `gqa({} = 4)`", kw::GQA_GROUP),
                ));
            }
            let args;
            syn::parenthesized!(args in input);
            let arg: Ident = args.parse()?;
            if arg != kw::GQA_GROUP {
                return Err(syn::Error::new(
                    arg.span(),
                    format!(
                        "unknown argument `{arg}`; write `gqa({} = G)`",
                        kw::GQA_GROUP
                    ),
                ));
            }
            args.parse::<Token![=]>()?;
            let lit: LitInt = args.parse()?;
            let group: u32 = lit.base10_parse()?;
            match group {
                0 => {
                    cx.error_at(
                        lit.span(),
                        "a group has at least one query head; `gqa(group = 0)` is impossible",
                    );
                    return Ok(None);
                }
                1 => {
                    cx.error_at(
                        lit.span(),
                        "`gqa(group = 1)` is multi-head attention: write `heads: mha`",
                    );
                    return Ok(None);
                }
                _ => Heads::Gqa { group },
            }
        }
        other => {
            return Err(syn::Error::new(
                span,
                format!("unknown head grouping `{other}`; write {}", kw::HEADS_FORMS),
            ));
        }
    };
    Ok(Some(Spanned { value, span }))
}

fn parse_head_dim(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Spanned<u32>>> {
    let lit: LitInt = input.parse()?;
    let value: u32 = lit.base10_parse()?;
    if !kw::HEAD_DIMS.contains(&value) {
        let supported: Vec<String> = kw::HEAD_DIMS.iter().map(u32::to_string).collect();
        cx.error_at(
            lit.span(),
            format!(
                "head_dim {value} is not supported yet; supported: {}",
                supported.join(", ")
            ),
        );
        return Ok(None);
    }
    Ok(Some(Spanned {
        value,
        span: lit.span(),
    }))
}

fn parse_dtype(input: ParseStream, _cx: &Ctxt) -> syn::Result<Option<Spanned<DType>>> {
    let name: Ident = input.parse()?;
    let value = match name.to_string().as_str() {
        kw::DTYPE_F16 => DType::F16,
        kw::DTYPE_BF16 => DType::BF16,
        kw::DTYPE_F32 => DType::F32,
        other => {
            return Err(syn::Error::new(
                name.span(),
                format!(
                    "unknown dtype `{other}`; write {} (accumulation is always f32)",
                    alternatives(kw::DTYPES)
                ),
            ))
        }
    };
    Ok(Some(Spanned {
        value,
        span: name.span(),
    }))
}

fn parse_mask(input: ParseStream, _cx: &Ctxt) -> syn::Result<Option<Spanned<Mask>>> {
    let name: Ident = input.call(syn::ext::IdentExt::parse_any)?;
    let span = name.span();
    let value = match name.to_string().as_str() {
        kw::MASK_NONE => Mask::None,
        kw::MASK_CAUSAL if input.is_empty() => Mask::Causal(Alignment::BottomRight),
        kw::MASK_CAUSAL => {
            let args;
            syn::parenthesized!(args in input);
            let align: Ident = args.parse()?;
            match align.to_string().as_str() {
                kw::ALIGN_BOTTOM_RIGHT => Mask::Causal(Alignment::BottomRight),
                kw::ALIGN_TOP_LEFT => Mask::Causal(Alignment::TopLeft),
                other => {
                    return Err(syn::Error::new(
                        align.span(),
                        format!(
                            "unknown causal alignment `{other}`; write `{}` or `{}`",
                            kw::ALIGN_BOTTOM_RIGHT,
                            kw::ALIGN_TOP_LEFT
                        ),
                    ))
                }
            }
        }
        other => {
            return Err(syn::Error::new(
                span,
                format!("unknown mask `{other}`; write {}", kw::MASK_FORMS),
            ))
        }
    };
    Ok(Some(Spanned { value, span }))
}

fn parse_scale(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Spanned<f64>>> {
    let lookahead = input.lookahead1();
    let (value, span) = if lookahead.peek(syn::LitFloat) {
        let lit: syn::LitFloat = input.parse()?;
        (lit.base10_parse::<f64>()?, lit.span())
    } else if lookahead.peek(LitInt) {
        let lit: LitInt = input.parse()?;
        (lit.base10_parse::<f64>()?, lit.span())
    } else if input.peek(Token![-]) {
        let minus: Token![-] = input.parse()?;
        cx.error_at(minus.span, "the softmax scale must be positive");
        let _: TokenStream = input.parse()?;
        return Ok(None);
    } else {
        return Err(lookahead.error());
    };
    if !(value.is_finite() && value > 0.0) {
        cx.error_at(span, "the softmax scale must be positive and finite");
        return Ok(None);
    }
    Ok(Some(Spanned { value, span }))
}

fn parse_tiles(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Vec<Spanned<TileShape>>>> {
    let content;
    let bracket = syn::bracketed!(content in input);
    let mut tiles = Vec::new();
    let mut ok = true;
    while !content.is_empty() {
        match parse_tile(&content, cx)? {
            Some(tile) => tiles.push(tile),
            None => ok = false,
        }
        if content.is_empty() {
            break;
        }
        content.parse::<Token![,]>()?;
    }
    if tiles.is_empty() && ok {
        cx.error_at(
            bracket.span.join(),
            "`tiles` lists at least one shape, such as `[64 x 16]`",
        );
        return Ok(None);
    }
    Ok(ok.then_some(tiles))
}

/// `Q x KV`. The lexer reads `64x16` as one literal with suffix `x16`; both spellings are accepted.
fn parse_tile(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Spanned<TileShape>>> {
    let q: LitInt = input.parse()?;
    let (block_q, block_kv, kv_span) = if q.suffix() == "" {
        let sep: Ident = input.parse()?;
        if sep != kw::TILE_SEPARATOR {
            return Err(syn::Error::new(
                sep.span(),
                format!(
                    "expected `{}` between the tile's query rows and keys, as in `64 x 16`",
                    kw::TILE_SEPARATOR
                ),
            ));
        }
        let kv: LitInt = input.parse()?;
        (
            q.base10_parse::<u32>()?,
            kv.base10_parse::<u32>()?,
            kv.span(),
        )
    } else {
        let suffix = q.suffix();
        let kv = suffix
            .strip_prefix(kw::TILE_SEPARATOR)
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| syn::Error::new(q.span(), "expected a tile shape such as `64 x 16`"))?;
        (
            q.base10_digits()
                .parse::<u32>()
                .map_err(|e| syn::Error::new(q.span(), e))?,
            kv,
            q.span(),
        )
    };
    let span = q.span();
    let mut ok = true;
    for (what, value, (lo, hi), at) in [
        ("query rows", block_q, kw::TILE_Q_RANGE, span),
        ("keys", block_kv, kw::TILE_KV_RANGE, kv_span),
    ] {
        if !value.is_power_of_two() || value < lo || value > hi {
            cx.error_at(
                at,
                format!("a tile's {what} must be a power of two from {lo} to {hi}; found {value}"),
            );
            ok = false;
        }
    }
    Ok(ok.then_some(Spanned {
        value: TileShape { block_q, block_kv },
        span,
    }))
}
