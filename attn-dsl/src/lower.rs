//! Raw declaration → [`Spec`]: each setting's value parsed by its own small parser, every mistake
//! recorded with the span of the offending token.

use proc_macro2::TokenStream;
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::{Ident, LitInt, Token};

use crate::ctxt::Ctxt;
use crate::expr::{check_closure, ClosureKind, Inner, InputDecl, InputShape, Ty};
use crate::keywords as kw;
use crate::spec::{
    Alibi, CausalAlignment, DType, HeadGrouping, MaskDecl, Spanned, Spec, Tiling, WindowDecl,
};
use crate::syntax::RawVariant;

/// Interprets one raw variant; `None` when a required setting is missing or unreadable (the
/// reasons are in `cx`).
pub fn lower(cx: &Ctxt, raw: &RawVariant) -> Option<Spec> {
    let mut heads = None;
    let mut head_dim = None;
    let mut value_dim = None;
    let mut dtype = None;
    let mut mask = None;
    let mut score = None;
    let mut softcap = None;
    let mut alibi = None;
    let mut sinks = None;
    let mut scale = None;
    let mut tiles = None;
    // Inputs first: the expressions of `mask` and `score` refer to them wherever they are written.
    let inputs = raw
        .fields
        .iter()
        .find(|f| f.key == kw::KEY_INPUTS)
        .and_then(|f| parse_with(cx, f.value.clone(), parse_inputs))
        .unwrap_or_default();
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
            kw::KEY_VALUE_DIM => value_dim = parse_with(cx, value, parse_value_dim),
            kw::KEY_MASK => mask = parse_with(cx, value, |i, cx| parse_mask(i, cx, &inputs)),
            kw::KEY_SCORE => score = parse_with(cx, value, |i, cx| parse_score(i, cx, &inputs)),
            kw::KEY_SOFTCAP => softcap = parse_with(cx, value, parse_softcap),
            kw::KEY_ALIBI => alibi = parse_with(cx, value, parse_alibi),
            kw::KEY_SINKS => sinks = parse_with(cx, value, parse_sinks),
            kw::KEY_INPUTS => {}
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
        value_dim,
        dtype: dtype.as_ref()?.first().copied()?,
        also: dtype?.into_iter().skip(1).collect(),
        mask: mask.unwrap_or_default(),
        score,
        softcap,
        alibi,
        sinks,
        inputs,
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
    parser: impl FnOnce(ParseStream, &Ctxt) -> syn::Result<Option<T>>,
) -> Option<T> {
    match (|input: ParseStream| parser(input, cx)).parse2(tokens) {
        Ok(value) => value,
        Err(e) => {
            cx.syn_error(e);
            None
        }
    }
}

fn parse_heads(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Spanned<HeadGrouping>>> {
    let name: Ident = input.parse()?;
    let span = name.span();
    let value = match name.to_string().as_str() {
        kw::HEADS_MHA => HeadGrouping::Mha,
        kw::HEADS_MQA => HeadGrouping::Mqa,
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
                _ => HeadGrouping::Gqa { group },
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
    dimension(input, cx, kw::KEY_HEAD_DIM)
}

fn parse_value_dim(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Spanned<u32>>> {
    dimension(input, cx, kw::KEY_VALUE_DIM)
}

/// A head dimension the kernels support.
fn dimension(input: ParseStream, cx: &Ctxt, key: &str) -> syn::Result<Option<Spanned<u32>>> {
    let lit: LitInt = input.parse()?;
    let value: u32 = lit.base10_parse()?;
    if !kw::HEAD_DIMS.contains(&value) {
        let supported: Vec<String> = kw::HEAD_DIMS.iter().map(u32::to_string).collect();
        cx.error_at(
            lit.span(),
            format!(
                "{key} {value} is not supported yet; supported: {}",
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

/// `f16`, `bf16` or `f32`, or several joined by `|` (the first is the default); a type named twice
/// is an error at its second mention.
fn parse_dtype(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Vec<Spanned<DType>>>> {
    let mut all: Vec<Spanned<DType>> = Vec::new();
    loop {
        let name: Ident = input.parse()?;
        let value = match name.to_string().as_str() {
            kw::DTYPE_F16 => DType::F16,
            kw::DTYPE_BF16 => DType::BF16,
            kw::DTYPE_F32 => DType::F32,
            other => {
                return Err(syn::Error::new(
                    name.span(),
                    format!(
                        "unknown dtype `{other}`; write {}, or several joined by `|` (accumulation is always f32)",
                        alternatives(kw::DTYPES)
                    ),
                ))
            }
        };
        if all.iter().any(|d| d.value == value) {
            cx.error_at(
                name.span(),
                format!("dtype `{name}` is named twice; each element type once"),
            );
        } else {
            all.push(Spanned {
                value,
                span: name.span(),
            });
        }
        if !input.peek(syn::Token![|]) {
            break;
        }
        input.parse::<syn::Token![|]>()?;
    }
    Ok(Some(all))
}

/// `none`, or terms joined by `&`; a closure term comes last (its body runs to the end).
fn parse_mask(
    input: ParseStream,
    cx: &Ctxt,
    inputs: &[InputDecl],
) -> syn::Result<Option<MaskDecl>> {
    let mut mask = MaskDecl::default();
    let mut ok = true;
    loop {
        if input.peek(Token![|]) {
            let closure = parse_closure(input)?;
            match check_closure(cx, &closure, ClosureKind::Mask, inputs) {
                Some(c) => mask.custom = Some(c),
                None => ok = false,
            }
            break;
        }
        let name: Ident = input.call(syn::ext::IdentExt::parse_any)?;
        let span = name.span();
        let twice = |cx: &Ctxt| {
            cx.error_at(span, format!("mask term `{name}` is written twice"));
        };
        match name.to_string().as_str() {
            kw::MASK_NONE => mask.none = Some(span),
            kw::MASK_CAUSAL => {
                let align = if input.peek(syn::token::Paren) {
                    let args;
                    syn::parenthesized!(args in input);
                    let align: Ident = args.parse()?;
                    match align.to_string().as_str() {
                        kw::ALIGN_BOTTOM_RIGHT => CausalAlignment::BottomRight,
                        kw::ALIGN_TOP_LEFT => CausalAlignment::TopLeft,
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
                } else {
                    CausalAlignment::BottomRight
                };
                if mask.causal.is_some() {
                    twice(cx);
                }
                mask.causal = Some(Spanned { value: align, span });
            }
            kw::MASK_WINDOW => {
                if !input.peek(syn::token::Paren) {
                    return Err(syn::Error::new(
                        span,
                        "`window` needs its size: `window(left = 4095)` or `window(left = L, right = R)`",
                    ));
                }
                let args;
                syn::parenthesized!(args in input);
                match parse_window(&args, cx, span)? {
                    Some(w) => {
                        if mask.window.is_some() {
                            twice(cx);
                        }
                        mask.window = Some(Spanned { value: w, span });
                    }
                    None => ok = false,
                }
            }
            kw::MASK_KEY_LENGTHS => mask.key_lengths = Some(span),
            kw::MASK_DOCUMENTS => mask.documents = Some(span),
            kw::MASK_PREFIX_LM => mask.prefix_lm = Some(span),
            other => {
                return Err(syn::Error::new(
                    span,
                    format!("unknown mask `{other}`; write {}", kw::MASK_FORMS),
                ))
            }
        }
        if input.is_empty() {
            break;
        }
        input.parse::<Token![&]>().map_err(|e| {
            syn::Error::new(
                e.span(),
                "mask terms are joined with `&`, as in `causal & window(left = 4095)`",
            )
        })?;
    }
    if let Some(span) = mask.none {
        if !mask.is_none() {
            cx.error_at(span, "`none` cannot be combined with other mask terms");
            ok = false;
        }
    }
    Ok(ok.then_some(mask))
}

/// A closure, with a message that names the expected shape when it is not one.
fn parse_closure(input: ParseStream) -> syn::Result<syn::ExprClosure> {
    let expr: syn::Expr = input.parse()?;
    match expr {
        syn::Expr::Closure(c) => Ok(c),
        other => Err(syn::Error::new_spanned(
            other,
            "expected a closure such as `|b, h, q, k| q >= k`",
        )),
    }
}

/// `left = L, right = R` (either may be left out, not both; each at least 1).
fn parse_window(
    args: ParseStream,
    cx: &Ctxt,
    span: proc_macro2::Span,
) -> syn::Result<Option<WindowDecl>> {
    let mut window = WindowDecl {
        left: None,
        right: None,
    };
    let mut ok = true;
    while !args.is_empty() {
        let side: Ident = args.parse()?;
        args.parse::<Token![=]>()?;
        let lit: LitInt = args.parse()?;
        let value: u32 = lit.base10_parse()?;
        if value == 0 {
            cx.error_at(
                lit.span(),
                format!("a window side of 0 keys hides nothing new: leave `{side}` out, or use `causal` for `right = 0`"),
            );
            ok = false;
        }
        let sized = Some(Spanned {
            value,
            span: lit.span(),
        });
        match side.to_string().as_str() {
            kw::WINDOW_LEFT => window.left = sized,
            kw::WINDOW_RIGHT => window.right = sized,
            other => {
                return Err(syn::Error::new(
                    side.span(),
                    format!(
                        "unknown window side `{other}`; write `{}` and/or `{}`",
                        kw::WINDOW_LEFT,
                        kw::WINDOW_RIGHT
                    ),
                ))
            }
        }
        if args.is_empty() {
            break;
        }
        args.parse::<Token![,]>()?;
    }
    if window.left.is_none() && window.right.is_none() {
        cx.error_at(
            span,
            "`window` needs at least one side: `window(left = 4095)`",
        );
        ok = false;
    }
    Ok(ok.then_some(window))
}

fn parse_score(
    input: ParseStream,
    cx: &Ctxt,
    inputs: &[InputDecl],
) -> syn::Result<Option<crate::expr::Closure>> {
    let closure = parse_closure(input)?;
    Ok(check_closure(cx, &closure, ClosureKind::Score, inputs))
}

fn parse_alibi(input: ParseStream, _cx: &Ctxt) -> syn::Result<Option<Spanned<Alibi>>> {
    let name: Ident = input.parse()?;
    let value = match name.to_string().as_str() {
        kw::ALIBI_GEOMETRIC => Alibi::Geometric,
        kw::ALIBI_GIVEN => Alibi::Given,
        other => {
            return Err(syn::Error::new(
                name.span(),
                format!(
                    "unknown ALiBi slopes `{other}`; write `{}` (standard slopes) or `{}` (per head at run time)",
                    kw::ALIBI_GEOMETRIC,
                    kw::ALIBI_GIVEN
                ),
            ))
        }
    };
    Ok(Some(Spanned {
        value,
        span: name.span(),
    }))
}

fn parse_sinks(input: ParseStream, _cx: &Ctxt) -> syn::Result<Option<proc_macro2::Span>> {
    let name: Ident = input.parse()?;
    if name != kw::SINKS_PER_HEAD {
        return Err(syn::Error::new(
            name.span(),
            format!("unknown sinks `{name}`; write `{}`", kw::SINKS_PER_HEAD),
        ));
    }
    Ok(Some(name.span()))
}

/// `{ name: i32, name: [f32; heads], … }`.
fn parse_inputs(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Vec<InputDecl>>> {
    let content;
    syn::braced!(content in input);
    let mut decls: Vec<InputDecl> = Vec::new();
    let mut ok = true;
    while !content.is_empty() {
        let name: Ident = content.parse()?;
        content.parse::<Token![:]>()?;
        let (ty_name, shape) = if content.peek(syn::token::Bracket) {
            let inner;
            syn::bracketed!(inner in content);
            let ty: Ident = inner.parse()?;
            inner.parse::<Token![;]>()?;
            (ty, parse_shape(&inner)?)
        } else {
            (content.parse::<Ident>()?, InputShape::SCALAR)
        };
        let ty = match ty_name.to_string().as_str() {
            kw::INPUT_I32 => Ty::Int,
            kw::INPUT_F32 => Ty::Float,
            other => {
                return Err(syn::Error::new(
                    ty_name.span(),
                    format!("unknown input type `{other}`; write {}", kw::INPUT_FORMS),
                ))
            }
        };
        if decls.iter().any(|d| d.name == name) {
            cx.error_at(name.span(), format!("input `{name}` is declared twice"));
            ok = false;
        } else if kw::RESERVED_INPUT_NAMES.contains(&name.to_string().as_str()) {
            cx.error_at(
                name.span(),
                format!("`{name}` is the name of a built-in input; choose another"),
            );
            ok = false;
        }
        let index = decls.iter().filter(|d| d.ty == ty).count();
        decls.push(InputDecl {
            name,
            ty,
            shape,
            index,
        });
        if content.is_empty() {
            break;
        }
        content.parse::<Token![,]>()?;
    }
    Ok(ok.then_some(decls))
}

/// The dimensions of `[T; …]`: `batch`, then `heads`, then `seq` or a count, at least one.
fn parse_shape(input: ParseStream) -> syn::Result<InputShape> {
    let mut shape = InputShape::SCALAR;
    // 0: before batch, 1: after batch, 2: after heads, 3: after the inner dimension.
    let mut stage = 0;
    loop {
        let lookahead = input.lookahead1();
        if lookahead.peek(LitInt) {
            let lit: LitInt = input.parse()?;
            if stage == 3 {
                return Err(syn::Error::new(
                    lit.span(),
                    "an input has one inner dimension at most",
                ));
            }
            let n = lit.base10_parse::<u32>()?;
            if !(1..=kw::MAX_TABLE_LEN).contains(&n) {
                return Err(syn::Error::new(
                    lit.span(),
                    format!(
                        "a table's count lies between 1 and {}; found {n}",
                        kw::MAX_TABLE_LEN
                    ),
                ));
            }
            shape.inner = Inner::Fixed(n);
            stage = 3;
        } else if lookahead.peek(Ident::peek_any) {
            let dim: Ident = input.call(syn::ext::IdentExt::parse_any)?;
            let (at, next) = match dim.to_string().as_str() {
                kw::EXTENT_BATCH => (0, 1),
                kw::EXTENT_HEADS => (1, 2),
                kw::EXTENT_SEQ => (2, 3),
                other => {
                    return Err(syn::Error::new(
                        dim.span(),
                        format!("unknown dimension `{other}`; write {}", kw::INPUT_DIMS),
                    ))
                }
            };
            if stage > at {
                return Err(syn::Error::new(
                    dim.span(),
                    format!(
                        "`{dim}` comes too late: dimensions go in the order {}",
                        kw::INPUT_DIMS
                    ),
                ));
            }
            match next {
                1 => shape.per_batch = true,
                2 => shape.per_head = true,
                _ => shape.inner = Inner::Seq,
            }
            stage = next;
        } else {
            return Err(lookahead.error());
        }
        if input.is_empty() {
            return Ok(shape);
        }
        input.parse::<Token![,]>()?;
    }
}

fn parse_scale(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Spanned<f64>>> {
    positive(input, cx, "the softmax scale")
}

fn parse_softcap(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Spanned<f64>>> {
    positive(input, cx, "the softcap")
}

/// A positive, finite number.
fn positive(input: ParseStream, cx: &Ctxt, what: &str) -> syn::Result<Option<Spanned<f64>>> {
    let lookahead = input.lookahead1();
    let (value, span) = if lookahead.peek(syn::LitFloat) {
        let lit: syn::LitFloat = input.parse()?;
        (lit.base10_parse::<f64>()?, lit.span())
    } else if lookahead.peek(LitInt) {
        let lit: LitInt = input.parse()?;
        (lit.base10_parse::<f64>()?, lit.span())
    } else if input.peek(Token![-]) {
        let minus: Token![-] = input.parse()?;
        cx.error_at(minus.span, format!("{what} must be positive"));
        let _: TokenStream = input.parse()?;
        return Ok(None);
    } else {
        return Err(lookahead.error());
    };
    if !(value.is_finite() && value > 0.0) {
        cx.error_at(span, format!("{what} must be positive and finite"));
        return Ok(None);
    }
    Ok(Some(Spanned { value, span }))
}

fn parse_tiles(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Vec<Spanned<Tiling>>>> {
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
fn parse_tile(input: ParseStream, cx: &Ctxt) -> syn::Result<Option<Spanned<Tiling>>> {
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
        value: Tiling { block_q, block_kv },
        span,
    }))
}
