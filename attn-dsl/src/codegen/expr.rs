//! Checked expressions → tokens, three ways: `#[cube]` code on `i32`/`f32` for the kernels, plain
//! Rust on `i64`/`f64` for the float64 reference, and interval arithmetic that bounds a mask over
//! a whole tile (for tile classification).

use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::{format_ident, quote};

use super::paths;
use crate::expr::{Func, Inner, InputDecl, InputShape, Node, Op, Param, TableRead, Ty, Typed};

fn param(p: Param) -> Ident {
    Ident::new(p.ident(), Span::call_site())
}

fn op_tokens(op: Op) -> TokenStream {
    match op {
        Op::Add => quote!(+),
        Op::Sub => quote!(-),
        Op::Mul => quote!(*),
        Op::Div => quote!(/),
        Op::Rem => quote!(%),
        Op::Eq => quote!(==),
        Op::Ne => quote!(!=),
        Op::Lt => quote!(<),
        Op::Le => quote!(<=),
        Op::Gt => quote!(>),
        Op::Ge => quote!(>=),
        Op::And => quote!(&&),
        Op::Or => quote!(||),
    }
}

/// The slot expression of input `decl` in the packed buffers, as a `usize` index.
fn slot_index(decl: &InputDecl) -> TokenStream {
    let slots = paths::slots();
    let index = decl.index as u32;
    let first = match decl.ty {
        Ty::Float => quote!(#slots::FIRST_CUSTOM_FLOAT),
        _ => quote!(#slots::FIRST_CUSTOM_INT),
    };
    let at = if decl.shape.per_batch {
        quote!((b as u32))
    } else if decl.shape.per_head {
        quote!((h as u32))
    } else {
        quote!(0u32)
    };
    quote!(((#first + #index) * inputs.slot_len + #at) as usize)
}

/// The `#[cube]` place of a table read in its buffer, as a `usize` index.
fn cube_table_at(t: &TableRead, inputs: &[InputDecl]) -> TokenStream {
    let helpers = paths::expr_helpers();
    let shape = inputs[t.input].shape;
    let outer = match (shape.per_batch, shape.per_head) {
        (true, true) => quote!((b * #helpers::table_heads(inputs) + h)),
        (true, false) => quote!(b),
        (false, true) => quote!(h),
        (false, false) => quote!(0i32),
    };
    let len = cube_table_len(shape);
    let i = cube(&t.index, inputs);
    let table = t.input as u32;
    quote!(#helpers::table_at(inputs, #outer, #i, #len, #table))
}

/// The `#[cube]` length of a table's inner dimension, as an `i32`.
pub fn cube_table_len(shape: InputShape) -> TokenStream {
    let helpers = paths::expr_helpers();
    match shape.inner {
        Inner::Fixed(n) => {
            let n = Literal::i32_suffixed(n as i32);
            quote!(#n)
        }
        Inner::Seq => quote!(#helpers::table_positions(inputs)),
        Inner::None => quote!(1i32),
    }
}

/// `attn::InputShape { … }` as a constant expression.
pub fn shape_tokens(shape: InputShape) -> TokenStream {
    let attn = paths::attn();
    let (per_batch, per_head) = (shape.per_batch, shape.per_head);
    let inner = match shape.inner {
        Inner::None => quote!(#attn::Inner::None),
        Inner::Seq => quote!(#attn::Inner::Seq),
        Inner::Fixed(n) => quote!(#attn::Inner::Fixed(#n)),
    };
    quote!(#attn::InputShape { per_batch: #per_batch, per_head: #per_head, inner: #inner })
}

/// The host place of a table read in its table (`inputs.ints[n]` or `inputs.floats[n]`).
pub fn host_table_at(t: &TableRead, inputs: &[InputDecl]) -> TokenStream {
    let attn = paths::attn();
    let shape = inputs[t.input].shape;
    let b = if shape.per_batch {
        quote!(b)
    } else {
        quote!(0i64)
    };
    let h = if shape.per_head {
        quote!(h)
    } else {
        quote!(0i64)
    };
    let i = host(&t.index, inputs);
    let shape = shape_tokens(shape);
    quote!(#attn::inputs::table_entry(#shape, inputs, [#b, #h, #i]))
}

/// `#[cube]` code of an expression (parameters `s, b, h, q, k` and the run-time `inputs` in
/// scope).
pub fn cube(e: &Typed, inputs: &[InputDecl]) -> TokenStream {
    let helpers = paths::expr_helpers();
    match &e.node {
        Node::Param(p) => {
            let p = param(*p);
            quote!(#p)
        }
        Node::Int(v) => {
            let lit = Literal::i32_suffixed(*v as i32);
            quote!(#lit)
        }
        Node::Float(v) => {
            let lit = Literal::f32_suffixed(*v as f32);
            quote!(#lit)
        }
        Node::Bool(v) => quote!(#v),
        Node::Input(i) => {
            let decl = &inputs[*i];
            let at = slot_index(decl);
            match decl.ty {
                Ty::Float => quote!(inputs.floats[#at]),
                _ => quote!(inputs.ints[#at]),
            }
        }
        Node::Table(t) => {
            let at = cube_table_at(t, inputs);
            match inputs[t.input].ty {
                Ty::Float => quote!(inputs.floats[#at]),
                _ => quote!(inputs.ints[#at]),
            }
        }
        Node::Neg(x) => {
            let x = cube(x, inputs);
            quote!((-#x))
        }
        Node::Not(x) => {
            let x = cube(x, inputs);
            quote!((!#x))
        }
        Node::Binary(op, a, b) => {
            let (a, b, op) = (cube(a, inputs), cube(b, inputs), op_tokens(*op));
            quote!((#a #op #b))
        }
        Node::Cast(ty, x) => {
            let x = cube(x, inputs);
            match ty {
                Ty::Float => quote!(f32::cast_from(#x)),
                _ => quote!(i32::cast_from(#x)),
            }
        }
        Node::Call(f, x, args) => {
            let recv = cube(x, inputs);
            let args: Vec<TokenStream> = args.iter().map(|a| cube(a, inputs)).collect();
            let suffix = if x.ty == Ty::Float { "f32" } else { "i32" };
            match f {
                Func::Abs | Func::Min | Func::Max => {
                    let name = format_ident!(
                        "{}_{suffix}",
                        match f {
                            Func::Abs => "abs",
                            Func::Min => "min",
                            _ => "max",
                        }
                    );
                    quote!(#helpers::#name(#recv #(, #args)*))
                }
                Func::Tanh => quote!((#recv).tanh()),
                Func::Exp => quote!((#recv).exp()),
                Func::Ln => quote!((#recv).ln()),
                Func::Sqrt => quote!((#recv).sqrt()),
            }
        }
        Node::If(c, a, b) => {
            let (c, a, b) = (cube(c, inputs), cube(a, inputs), cube(b, inputs));
            quote!(select(#c, #a, #b))
        }
    }
}

/// Plain Rust of an expression on the host: `i64` indices, `f64` logits (parameters `s, b, h, q,
/// k` and `inputs: &attn::Inputs` in scope).
pub fn host(e: &Typed, inputs: &[InputDecl]) -> TokenStream {
    match &e.node {
        Node::Param(p) => {
            let p = param(*p);
            quote!(#p)
        }
        Node::Int(v) => {
            let lit = Literal::i64_suffixed(*v);
            quote!(#lit)
        }
        Node::Float(v) => {
            let lit = Literal::f64_suffixed(*v);
            quote!(#lit)
        }
        Node::Bool(v) => quote!(#v),
        Node::Input(i) => {
            let decl = &inputs[*i];
            let index = decl.index;
            let at = if decl.shape.per_batch {
                quote!((b as usize))
            } else if decl.shape.per_head {
                quote!((h as usize))
            } else {
                quote!(0usize)
            };
            match decl.ty {
                Ty::Float => quote!((inputs.floats[#index][#at] as f64)),
                _ => quote!((inputs.ints[#index][#at] as i64)),
            }
        }
        Node::Table(t) => {
            let index = inputs[t.input].index;
            let at = host_table_at(t, inputs);
            match inputs[t.input].ty {
                Ty::Float => quote!((inputs.floats[#index][#at] as f64)),
                _ => quote!((inputs.ints[#index][#at] as i64)),
            }
        }
        Node::Neg(x) => {
            let x = host(x, inputs);
            quote!((-#x))
        }
        Node::Not(x) => {
            let x = host(x, inputs);
            quote!((!#x))
        }
        Node::Binary(op, a, b) => {
            let (a, b, op) = (host(a, inputs), host(b, inputs), op_tokens(*op));
            quote!((#a #op #b))
        }
        Node::Cast(ty, x) => {
            let x = host(x, inputs);
            match ty {
                // The device rounds to f32 on the way; so does the reference.
                Ty::Float => quote!(((#x) as f32 as f64)),
                _ => quote!(((#x) as i64)),
            }
        }
        Node::Call(f, x, args) => {
            let recv = host(x, inputs);
            let args: Vec<TokenStream> = args.iter().map(|a| host(a, inputs)).collect();
            let name = format_ident!(
                "{}",
                match f {
                    Func::Abs => "abs",
                    Func::Min => "min",
                    Func::Max => "max",
                    Func::Tanh => "tanh",
                    Func::Exp => "exp",
                    Func::Ln => "ln",
                    Func::Sqrt => "sqrt",
                }
            );
            quote!((#recv).#name(#(#args),*))
        }
        Node::If(c, a, b) => {
            let (c, a, b) = (host(c, inputs), host(a, inputs), host(b, inputs));
            quote!((if #c { #a } else { #b }))
        }
    }
}

/// Interval arithmetic of a mask over a tile, as statements: integers become `(lo, hi)` bounds,
/// booleans `(may, must)` — whether some pair / every pair of the tile makes it true. Emitted as
/// `#[cube]` code for the kernels and as host code (on `i64`) for testing the classifier against
/// brute force. Only for expressions [`crate::expr::boundable`] accepts.
pub struct Intervals<'a> {
    inputs: &'a [InputDecl],
    host: bool,
    /// The statements so far.
    pub stmts: Vec<TokenStream>,
    next: usize,
}

impl<'a> Intervals<'a> {
    /// An empty emitter of `#[cube]` code (`host = false`) or host code.
    pub fn new(inputs: &'a [InputDecl], host: bool) -> Self {
        Self {
            inputs,
            host,
            stmts: Vec::new(),
            next: 0,
        }
    }

    fn fresh(&mut self) -> (Ident, Ident) {
        let n = self.next;
        self.next += 1;
        (format_ident!("lo_{n}"), format_ident!("hi_{n}"))
    }

    fn bind(&mut self, lo: TokenStream, hi: TokenStream) -> (Ident, Ident) {
        let (l, h) = self.fresh();
        self.stmts.push(quote!(let #l = #lo; let #h = #hi;));
        (l, h)
    }

    fn select(&self, c: TokenStream, a: TokenStream, b: TokenStream) -> TokenStream {
        if self.host {
            quote!((if #c { #a } else { #b }))
        } else {
            quote!(select(#c, #a, #b))
        }
    }

    fn min(&self, a: TokenStream, b: TokenStream) -> TokenStream {
        if self.host {
            quote!((#a).min(#b))
        } else {
            let helpers = paths::expr_helpers();
            quote!(#helpers::min_i32(#a, #b))
        }
    }

    fn max(&self, a: TokenStream, b: TokenStream) -> TokenStream {
        if self.host {
            quote!((#a).max(#b))
        } else {
            let helpers = paths::expr_helpers();
            quote!(#helpers::max_i32(#a, #b))
        }
    }

    fn zero(&self) -> TokenStream {
        if self.host {
            quote!(0i64)
        } else {
            quote!(0i32)
        }
    }

    /// Emits the bounds of `e`; returns the names of `(lo, hi)` (ints) or `(may, must)` (bools).
    pub fn emit(&mut self, e: &Typed) -> (Ident, Ident) {
        match &e.node {
            Node::Param(Param::Q) => self.bind(quote!(q_lo), quote!(q_hi)),
            Node::Param(Param::K) => self.bind(quote!(k_lo), quote!(k_hi)),
            Node::Param(p) => {
                let p = param(*p);
                self.bind(quote!(#p), quote!(#p))
            }
            Node::Int(_) | Node::Bool(_) | Node::Input(_) => {
                let v = if self.host {
                    host(e, self.inputs)
                } else {
                    cube(e, self.inputs)
                };
                self.bind(v.clone(), v)
            }
            Node::Neg(x) => {
                let (l, h) = self.emit(x);
                self.bind(quote!(-#h), quote!(-#l))
            }
            Node::Not(x) => {
                let (may, must) = self.emit(x);
                self.bind(quote!(!#must), quote!(!#may))
            }
            Node::Binary(op, a, b) => {
                let (al, ah) = self.emit(a);
                let (bl, bh) = self.emit(b);
                match op {
                    Op::Add => self.bind(quote!(#al + #bl), quote!(#ah + #bh)),
                    Op::Sub => self.bind(quote!(#al - #bh), quote!(#ah - #bl)),
                    Op::Mul => {
                        let [p0, p1, p2, p3] = [
                            quote!(#al * #bl),
                            quote!(#al * #bh),
                            quote!(#ah * #bl),
                            quote!(#ah * #bh),
                        ];
                        let lo = self.min(
                            self.min(p0.clone(), p1.clone()),
                            self.min(p2.clone(), p3.clone()),
                        );
                        let hi = self.max(self.max(p0, p1), self.max(p2, p3));
                        self.bind(lo, hi)
                    }
                    // Division by a positive literal is monotone.
                    Op::Div => self.bind(quote!(#al / #bl), quote!(#ah / #bl)),
                    Op::Rem => unreachable!("`%` is not boundable"),
                    Op::Lt => self.bind(quote!(#al < #bh), quote!(#ah < #bl)),
                    Op::Le => self.bind(quote!(#al <= #bh), quote!(#ah <= #bl)),
                    Op::Gt => self.bind(quote!(#ah > #bl), quote!(#al > #bh)),
                    Op::Ge => self.bind(quote!(#ah >= #bl), quote!(#al >= #bh)),
                    Op::Eq => self.bind(
                        quote!(#al <= #bh && #bl <= #ah),
                        quote!(#al == #ah && #bl == #bh && #al == #bl),
                    ),
                    Op::Ne => self.bind(
                        quote!(!(#al == #ah && #bl == #bh && #al == #bl)),
                        quote!(!(#al <= #bh && #bl <= #ah)),
                    ),
                    Op::And => self.bind(quote!(#al && #bl), quote!(#ah && #bh)),
                    Op::Or => self.bind(quote!(#al || #bl), quote!(#ah || #bh)),
                }
            }
            Node::Call(f, x, args) => {
                let (l, h) = self.emit(x);
                match f {
                    Func::Abs => {
                        let zero = self.zero();
                        let inner = self.select(quote!(#h <= #zero), quote!(-#h), zero.clone());
                        let lo = self.select(quote!(#l >= #zero), quote!(#l), inner);
                        let hi = self.max(quote!(-#l), quote!(#h));
                        self.bind(lo, hi)
                    }
                    Func::Min => {
                        let (bl, bh) = self.emit(&args[0]);
                        let (lo, hi) = (
                            self.min(quote!(#l), quote!(#bl)),
                            self.min(quote!(#h), quote!(#bh)),
                        );
                        self.bind(lo, hi)
                    }
                    Func::Max => {
                        let (bl, bh) = self.emit(&args[0]);
                        let (lo, hi) = (
                            self.max(quote!(#l), quote!(#bl)),
                            self.max(quote!(#h), quote!(#bh)),
                        );
                        self.bind(lo, hi)
                    }
                    _ => unreachable!("float functions are not boundable"),
                }
            }
            Node::If(c, a, b) => {
                let (may, must) = self.emit(c);
                let (al, ah) = self.emit(a);
                let (bl, bh) = self.emit(b);
                if a.ty == Ty::Bool {
                    self.bind(
                        quote!((#may && #al) || (!#must && #bl)),
                        quote!((#must && #ah) || (!#may && #bh) || (#ah && #bh)),
                    )
                } else {
                    let lo_mix = self.min(quote!(#al), quote!(#bl));
                    let hi_mix = self.max(quote!(#ah), quote!(#bh));
                    let lo_else = self.select(quote!(!#may), quote!(#bl), lo_mix);
                    let hi_else = self.select(quote!(!#may), quote!(#bh), hi_mix);
                    let lo = self.select(quote!(#must), quote!(#al), lo_else);
                    let hi = self.select(quote!(#must), quote!(#ah), hi_else);
                    self.bind(lo, hi)
                }
            }
            Node::Float(_) | Node::Cast(..) => unreachable!("floats are not boundable"),
            Node::Table(_) => unreachable!("tables are not boundable"),
        }
    }
}
