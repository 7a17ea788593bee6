//! The expression language of `mask: |b, h, q, k| …` and `score: |s, b, h, q, k| …`: Rust syntax,
//! checked and typed here (every mistake at its token), then emitted three ways by
//! [`crate::codegen`]: as `#[cube]` code for the kernels, as plain Rust on `i64`/`f64` for the
//! float64 reference, and — for masks — as interval arithmetic that classifies a whole tile.

use proc_macro2::Span;
use syn::spanned::Spanned as _;
use syn::{BinOp, Expr, ExprClosure, Lit, Pat, UnOp};

use crate::ctxt::Ctxt;
use crate::keywords as kw;

/// The type of an expression.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Ty {
    /// `i32` on the device (`i64` on the host).
    Int,
    /// `f32` on the device (`f64` on the host).
    Float,
    /// `bool`.
    Bool,
}

impl Ty {
    /// The name users read in messages.
    pub fn name(self) -> &'static str {
        match self {
            Ty::Int => "i32",
            Ty::Float => "f32",
            Ty::Bool => "bool",
        }
    }
}

/// A closure parameter, by position.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Param {
    /// The logit (score expressions only).
    S,
    /// Batch entry or document.
    B,
    /// Query head.
    H,
    /// Query position.
    Q,
    /// Key position.
    K,
}

impl Param {
    /// The name generated code gives it.
    pub fn ident(self) -> &'static str {
        match self {
            Param::S => "s",
            Param::B => "b",
            Param::H => "h",
            Param::Q => "q",
            Param::K => "k",
        }
    }
}

pub use attn_types::{Inner, InputShape};

/// A run-time input declared in `inputs: { … }`.
#[derive(Clone, Debug)]
pub struct InputDecl {
    /// Its name.
    pub name: syn::Ident,
    /// Element type (`Int` or `Float`).
    pub ty: Ty,
    /// Shape: which of `b`, `h` and an inner index select a value.
    pub shape: InputShape,
    /// Position among the inputs of its element type (its slot, after the built-in ones).
    pub index: usize,
}

/// A read of a table input (`rel[h][(q - k).min(31)]`): the batch and head dimensions are
/// indexed by `b` and `h`, the inner one by `index` (clamped to its ends; 0 without one).
#[derive(Clone, Debug)]
pub struct TableRead {
    /// The input's declaration index.
    pub input: usize,
    /// The inner index, an `i32` expression.
    pub index: Typed,
    /// This read's number within its closure (the backward differentiates each read alone).
    pub read: usize,
}

/// An arithmetic or logical operator.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Op {
    /// `+`.
    Add,
    /// `-`.
    Sub,
    /// `*`.
    Mul,
    /// `/`.
    Div,
    /// `%`.
    Rem,
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `&&`.
    And,
    /// `||`.
    Or,
}

/// A built-in function, written as a method.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Func {
    /// `x.abs()`.
    Abs,
    /// `x.min(y)`.
    Min,
    /// `x.max(y)`.
    Max,
    /// `x.tanh()`.
    Tanh,
    /// `x.exp()`.
    Exp,
    /// `x.ln()`.
    Ln,
    /// `x.sqrt()`.
    Sqrt,
}

/// A typed expression node.
#[derive(Clone, Debug)]
pub enum Node {
    /// A closure parameter.
    Param(Param),
    /// An integer literal.
    Int(i64),
    /// A float literal.
    Float(f64),
    /// `true` / `false`.
    Bool(bool),
    /// A declared input, indexed by `b` or `h` when it is not a scalar.
    Input(usize),
    /// A read of a table input.
    Table(Box<TableRead>),
    /// `-x`.
    Neg(Box<Typed>),
    /// `!x`.
    Not(Box<Typed>),
    /// `a op b`.
    Binary(Op, Box<Typed>, Box<Typed>),
    /// `x as i32` / `x as f32`.
    Cast(Ty, Box<Typed>),
    /// `x.f(args)`.
    Call(Func, Box<Typed>, Vec<Typed>),
    /// `if c { a } else { b }`.
    If(Box<Typed>, Box<Typed>, Box<Typed>),
}

/// An expression with its type.
#[derive(Clone, Debug)]
pub struct Typed {
    /// The node.
    pub node: Node,
    /// Its type.
    pub ty: Ty,
}

/// A checked `mask` or `score` closure.
#[derive(Clone, Debug)]
pub struct Closure {
    /// The body.
    pub body: Typed,
    /// Whether each of [`Param`]'s parameters is used (by `Param as usize`).
    pub used: [bool; 5],
    /// The input each table read reads, by read number.
    pub reads: Vec<usize>,
    /// Where the user wrote it.
    pub span: Span,
}

impl Closure {
    /// Whether parameter `p` appears in the body.
    pub fn uses(&self, p: Param) -> bool {
        self.used[p as usize]
    }
}

/// What kind of closure is being checked.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum ClosureKind {
    /// `|b, h, q, k| -> bool`.
    Mask,
    /// `|s, b, h, q, k| -> f32`.
    Score,
}

impl ClosureKind {
    fn params(self) -> &'static [Param] {
        match self {
            ClosureKind::Mask => &[Param::B, Param::H, Param::Q, Param::K],
            ClosureKind::Score => &[Param::S, Param::B, Param::H, Param::Q, Param::K],
        }
    }

    fn what(self) -> &'static str {
        match self {
            ClosureKind::Mask => "a mask expression",
            ClosureKind::Score => "a score expression",
        }
    }

    fn result(self) -> Ty {
        match self {
            ClosureKind::Mask => Ty::Bool,
            ClosureKind::Score => Ty::Float,
        }
    }

    fn shape(self) -> &'static str {
        match self {
            ClosureKind::Mask => "|b, h, q, k| …",
            ClosureKind::Score => "|s, b, h, q, k| …",
        }
    }
}

/// Checks a closure against the inputs the variant declares; `None` when it has mistakes (they
/// are in `cx`).
pub fn check_closure(
    cx: &Ctxt,
    closure: &ExprClosure,
    kind: ClosureKind,
    inputs: &[InputDecl],
) -> Option<Closure> {
    let expected = kind.params();
    if closure.inputs.len() != expected.len() {
        cx.error_spanned_by(
            &closure.inputs,
            format!(
                "{} takes {} parameters: `{}`; found {}",
                kind.what(),
                expected.len(),
                kind.shape(),
                closure.inputs.len()
            ),
        );
        return None;
    }
    let mut names = Vec::new();
    for (pat, &param) in closure.inputs.iter().zip(expected) {
        match pat {
            Pat::Ident(p) if p.by_ref.is_none() && p.mutability.is_none() && p.subpat.is_none() => {
                names.push((p.ident.clone(), param));
            }
            Pat::Wild(_) => {}
            other => {
                cx.error_spanned_by(other, "a parameter is a plain name (or `_`)");
                return None;
            }
        }
    }
    for (name, _) in &names {
        if let Some(input) = inputs.iter().find(|i| i.name == *name) {
            cx.error_at(
                name.span(),
                format!(
                    "parameter `{name}` hides the input `{}` of the same name; rename one",
                    input.name
                ),
            );
        }
    }
    let mut checker = Checker {
        cx,
        kind,
        params: names,
        inputs,
        used: [false; 5],
        reads: Vec::new(),
    };
    let body = checker.expr(&closure.body)?;
    if body.ty != kind.result() {
        cx.error_spanned_by(
            &closure.body,
            format!(
                "{} must be a {}; this is a {}",
                kind.what(),
                kind.result().name(),
                body.ty.name()
            ),
        );
        return None;
    }
    Some(Closure {
        body,
        used: checker.used,
        reads: checker.reads,
        span: closure.span(),
    })
}

struct Checker<'a> {
    cx: &'a Ctxt,
    kind: ClosureKind,
    params: Vec<(syn::Ident, Param)>,
    inputs: &'a [InputDecl],
    used: [bool; 5],
    reads: Vec<usize>,
}

impl Checker<'_> {
    fn unsupported(&self, tokens: impl quote::ToTokens, what: &str) -> Option<Typed> {
        self.cx.error_spanned_by(
            tokens,
            format!(
                "{what} is not supported in {}; expressions may use {}",
                self.kind.what(),
                kw::EXPR_FORMS
            ),
        );
        None
    }

    fn typed(node: Node, ty: Ty) -> Option<Typed> {
        Some(Typed { node, ty })
    }

    fn expr(&mut self, e: &Expr) -> Option<Typed> {
        match e {
            Expr::Paren(p) => self.expr(&p.expr),
            Expr::Group(g) => self.expr(&g.expr),
            Expr::Lit(l) => self.literal(&l.lit),
            Expr::Path(p) => self.name(p),
            Expr::Index(ix) => self.index(ix),
            Expr::Unary(u) => self.unary(u),
            Expr::Binary(b) => self.binary(b),
            Expr::Cast(c) => self.cast(c),
            Expr::MethodCall(m) => self.method(m),
            Expr::If(i) => self.if_else(i),
            Expr::Block(b) if b.block.stmts.len() == 1 => match &b.block.stmts[0] {
                syn::Stmt::Expr(inner, None) => self.expr(inner),
                other => self.unsupported(other, "a statement"),
            },
            Expr::Call(c) => self.unsupported(
                &c.func,
                "a function call (write built-ins as methods, e.g. `x.abs()`)",
            ),
            other => self.unsupported(other, "this kind of expression"),
        }
    }

    fn literal(&mut self, lit: &Lit) -> Option<Typed> {
        match lit {
            Lit::Int(i) => {
                if !matches!(i.suffix(), "" | "i32") {
                    self.cx.error_at(
                        i.span(),
                        format!("integer literals are i32; found suffix `{}`", i.suffix()),
                    );
                    return None;
                }
                match i.base10_parse::<i32>() {
                    Ok(v) => Self::typed(Node::Int(v as i64), Ty::Int),
                    Err(e) => {
                        self.cx.syn_error(e);
                        None
                    }
                }
            }
            Lit::Float(f) => {
                if !matches!(f.suffix(), "" | "f32") {
                    self.cx.error_at(
                        f.span(),
                        format!("float literals are f32; found suffix `{}`", f.suffix()),
                    );
                    return None;
                }
                match f.base10_parse::<f64>() {
                    Ok(v) => Self::typed(Node::Float(v), Ty::Float),
                    Err(e) => {
                        self.cx.syn_error(e);
                        None
                    }
                }
            }
            Lit::Bool(b) => Self::typed(Node::Bool(b.value), Ty::Bool),
            other => self.unsupported(other, "this literal"),
        }
    }

    fn name(&mut self, p: &syn::ExprPath) -> Option<Typed> {
        let Some(ident) = p.path.get_ident() else {
            return self.unsupported(p, "a path");
        };
        if let Some((_, param)) = self.params.iter().find(|(n, _)| n == ident) {
            self.used[*param as usize] = true;
            let ty = if *param == Param::S {
                Ty::Float
            } else {
                Ty::Int
            };
            return Self::typed(Node::Param(*param), ty);
        }
        if let Some(input) = self.inputs.iter().position(|i| i.name == *ident) {
            let decl = &self.inputs[input];
            if decl.shape != InputShape::SCALAR {
                self.cx.error_at(
                    ident.span(),
                    format!(
                        "`{ident}` is declared `{}`: index it, as in `{ident}{}`",
                        decl.shape.declared(decl.ty.name()),
                        index_example(decl.shape)
                    ),
                );
                return None;
            }
            return Self::typed(Node::Input(input), decl.ty);
        }
        let params: Vec<String> = self.params.iter().map(|(n, _)| n.to_string()).collect();
        let inputs: Vec<String> = self.inputs.iter().map(|i| i.name.to_string()).collect();
        self.cx.error_at(
            ident.span(),
            format!(
                "unknown name `{ident}` in {}; it may use the parameters ({}){}",
                self.kind.what(),
                params.join(", "),
                if inputs.is_empty() {
                    " — declare run-time values in `inputs: { name: i32, … }`".to_string()
                } else {
                    format!(" and the inputs ({})", inputs.join(", "))
                }
            ),
        );
        None
    }

    fn index(&mut self, ix: &syn::ExprIndex) -> Option<Typed> {
        // `x[i][j]` nests as `(x[i])[j]`: collect the indices, outermost first.
        let mut indices = vec![&*ix.index];
        let mut base = &*ix.expr;
        while let Expr::Index(inner) = base {
            indices.push(&*inner.index);
            base = &*inner.expr;
        }
        indices.reverse();
        let Expr::Path(base) = base else {
            return self.unsupported(base, "indexing anything but a declared input");
        };
        let Some(ident) = base.path.get_ident() else {
            return self.unsupported(base, "a path");
        };
        let Some(input) = self.inputs.iter().position(|i| i.name == *ident) else {
            self.cx.error_at(
                ident.span(),
                format!("`{ident}` is not a declared input; only inputs declared with dimensions (`[f32; heads]`, `[i32; seq]`, `[f32; heads, 32]`) can be indexed"),
            );
            return None;
        };
        let decl = &self.inputs[input];
        let shape = decl.shape;
        let mut wanted = Vec::new();
        if shape.per_batch {
            wanted.push(Some(Param::B));
        }
        if shape.per_head {
            wanted.push(Some(Param::H));
        }
        if shape.inner != Inner::None {
            wanted.push(None);
        }
        if indices.len() != wanted.len() {
            let declared = shape.declared(decl.ty.name());
            let at = indices.get(wanted.len()).copied().unwrap_or(&ix.index);
            let message = if wanted.is_empty() {
                format!("`{ident}` is a single value: write `{ident}` without an index")
            } else {
                format!(
                    "`{ident}` is declared `{declared}`: it takes {}, as in `{ident}{}`; found {}",
                    count(wanted.len()),
                    index_example(shape),
                    indices.len()
                )
            };
            self.cx.error_spanned_by(at, message);
            return None;
        }
        let mut inner = None;
        for (index, want) in indices.iter().zip(&wanted) {
            match want {
                Some(param) => {
                    let ok = match index {
                        Expr::Path(p) => p
                            .path
                            .get_ident()
                            .and_then(|i| self.params.iter().find(|(n, _)| n == i))
                            .is_some_and(|(_, found)| found == param),
                        _ => false,
                    };
                    if !ok {
                        let position = self
                            .params
                            .iter()
                            .find(|(_, p)| p == param)
                            .map_or(param.ident().to_string(), |(n, _)| n.to_string());
                        let (per, what) = if *param == Param::B {
                            ("batch entry", "batch")
                        } else {
                            ("query head", "head")
                        };
                        self.cx.error_spanned_by(
                            index,
                            format!(
                                "`{ident}` holds one value per {per} along this dimension: index it with the {what} parameter `{position}`"
                            ),
                        );
                        return None;
                    }
                    self.used[*param as usize] = true;
                }
                None => {
                    let e = self.expr(index)?;
                    if e.ty != Ty::Int {
                        self.cx.error_spanned_by(
                            index,
                            format!(
                                "an index is an i32; this is a {} (convert with `as i32`)",
                                e.ty.name()
                            ),
                        );
                        return None;
                    }
                    inner = Some(e);
                }
            }
        }
        if !shape.is_table() {
            return Self::typed(Node::Input(input), decl.ty);
        }
        let read = self.reads.len();
        self.reads.push(input);
        let index = inner.unwrap_or(Typed {
            node: Node::Int(0),
            ty: Ty::Int,
        });
        Self::typed(
            Node::Table(Box::new(TableRead { input, index, read })),
            decl.ty,
        )
    }

    fn unary(&mut self, u: &syn::ExprUnary) -> Option<Typed> {
        let inner = self.expr(&u.expr)?;
        match (&u.op, inner.ty) {
            (UnOp::Neg(_), Ty::Int | Ty::Float) => {
                let ty = inner.ty;
                Self::typed(Node::Neg(Box::new(inner)), ty)
            }
            (UnOp::Not(_), Ty::Bool) => Self::typed(Node::Not(Box::new(inner)), Ty::Bool),
            (UnOp::Neg(_), ty) => {
                self.cx
                    .error_spanned_by(u, format!("`-` does not apply to a {}", ty.name()));
                None
            }
            (UnOp::Not(_), ty) => {
                self.cx
                    .error_spanned_by(u, format!("`!` applies to a bool; this is a {}", ty.name()));
                None
            }
            (other, _) => self.unsupported(other, "this operator"),
        }
    }

    fn binary(&mut self, b: &syn::ExprBinary) -> Option<Typed> {
        let op = match b.op {
            BinOp::Add(_) => Op::Add,
            BinOp::Sub(_) => Op::Sub,
            BinOp::Mul(_) => Op::Mul,
            BinOp::Div(_) => Op::Div,
            BinOp::Rem(_) => Op::Rem,
            BinOp::Eq(_) => Op::Eq,
            BinOp::Ne(_) => Op::Ne,
            BinOp::Lt(_) => Op::Lt,
            BinOp::Le(_) => Op::Le,
            BinOp::Gt(_) => Op::Gt,
            BinOp::Ge(_) => Op::Ge,
            BinOp::And(_) => Op::And,
            BinOp::Or(_) => Op::Or,
            ref other => {
                let text = quote::quote!(#other).to_string();
                return self.unsupported(other, &format!("`{text}`"));
            }
        };
        let lhs = self.expr(&b.left);
        let rhs = self.expr(&b.right);
        let (lhs, rhs) = (lhs?, rhs?);
        let text = {
            let o = &b.op;
            quote::quote!(#o).to_string()
        };
        let ty = match op {
            Op::And | Op::Or => {
                if lhs.ty != Ty::Bool || rhs.ty != Ty::Bool {
                    self.cx.error_spanned_by(
                        b.op,
                        format!(
                            "`{text}` joins two bools; found {} and {}",
                            lhs.ty.name(),
                            rhs.ty.name()
                        ),
                    );
                    return None;
                }
                Ty::Bool
            }
            _ => {
                if lhs.ty != rhs.ty || lhs.ty == Ty::Bool {
                    let hint = if lhs.ty != rhs.ty && lhs.ty != Ty::Bool && rhs.ty != Ty::Bool {
                        "; convert one side with `as i32` or `as f32`"
                    } else {
                        ""
                    };
                    self.cx.error_spanned_by(
                        b.op,
                        format!(
                            "`{text}` needs two numbers of one type; found {} and {}{hint}",
                            lhs.ty.name(),
                            rhs.ty.name()
                        ),
                    );
                    return None;
                }
                if op == Op::Rem && lhs.ty == Ty::Float {
                    self.cx
                        .error_spanned_by(b.op, "`%` applies to i32 values only");
                    return None;
                }
                match op {
                    Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Rem => lhs.ty,
                    _ => Ty::Bool,
                }
            }
        };
        Self::typed(Node::Binary(op, Box::new(lhs), Box::new(rhs)), ty)
    }

    fn cast(&mut self, c: &syn::ExprCast) -> Option<Typed> {
        let inner = self.expr(&c.expr)?;
        let target = match &*c.ty {
            syn::Type::Path(p) if p.path.is_ident(kw::INPUT_I32) => Ty::Int,
            syn::Type::Path(p) if p.path.is_ident(kw::INPUT_F32) => Ty::Float,
            other => {
                self.cx
                    .error_spanned_by(other, "expressions convert only to `i32` or `f32`");
                return None;
            }
        };
        if inner.ty == Ty::Bool {
            self.cx
                .error_spanned_by(&c.expr, "a bool cannot be converted to a number");
            return None;
        }
        Self::typed(Node::Cast(target, Box::new(inner)), target)
    }

    fn method(&mut self, m: &syn::ExprMethodCall) -> Option<Typed> {
        let func = match m.method.to_string().as_str() {
            "abs" => Func::Abs,
            "min" => Func::Min,
            "max" => Func::Max,
            "tanh" => Func::Tanh,
            "exp" => Func::Exp,
            "ln" => Func::Ln,
            "sqrt" => Func::Sqrt,
            other => {
                self.cx.error_at(
                    m.method.span(),
                    format!(
                        "unknown method `{other}`; expressions may call {}",
                        kw::EXPR_METHODS
                            .iter()
                            .map(|m| format!("`{m}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                return None;
            }
        };
        let receiver = self.expr(&m.receiver);
        let args: Vec<Option<Typed>> = m.args.iter().map(|a| self.expr(a)).collect();
        let receiver = receiver?;
        let args: Vec<Typed> = args.into_iter().collect::<Option<_>>()?;
        let arity = usize::from(matches!(func, Func::Min | Func::Max));
        if args.len() != arity {
            self.cx.error_at(
                m.method.span(),
                format!(
                    "`{}` takes {arity} argument(s); found {}",
                    m.method,
                    args.len()
                ),
            );
            return None;
        }
        let float_only = matches!(func, Func::Tanh | Func::Exp | Func::Ln | Func::Sqrt);
        let receiver_ok = match receiver.ty {
            Ty::Float => true,
            Ty::Int => !float_only,
            Ty::Bool => false,
        };
        if !receiver_ok {
            self.cx.error_at(
                m.method.span(),
                format!(
                    "`{}` applies to {}; this is a {}{}",
                    m.method,
                    if float_only {
                        "f32 values"
                    } else {
                        "i32 or f32 values"
                    },
                    receiver.ty.name(),
                    if receiver.ty == Ty::Int {
                        " (convert with `as f32`)"
                    } else {
                        ""
                    }
                ),
            );
            return None;
        }
        if let Some(arg) = args.iter().find(|a| a.ty != receiver.ty) {
            self.cx.error_spanned_by(
                &m.args,
                format!(
                    "`{}` needs an argument of the receiver's type {}; found {}",
                    m.method,
                    receiver.ty.name(),
                    arg.ty.name()
                ),
            );
            return None;
        }
        let ty = receiver.ty;
        Self::typed(Node::Call(func, Box::new(receiver), args), ty)
    }

    fn if_else(&mut self, i: &syn::ExprIf) -> Option<Typed> {
        let Some((_, else_branch)) = &i.else_branch else {
            self.cx
                .error_spanned_by(i, "an `if` in an expression needs an `else` branch");
            return None;
        };
        let cond = self.expr(&i.cond);
        let then = match i.then_branch.stmts.as_slice() {
            [syn::Stmt::Expr(e, None)] => self.expr(e),
            _ => {
                self.cx.error_spanned_by(
                    &i.then_branch,
                    "each branch of an `if` is a single expression",
                );
                None
            }
        };
        let other = self.expr(else_branch);
        let (cond, then, other) = (cond?, then?, other?);
        if cond.ty != Ty::Bool {
            self.cx.error_spanned_by(
                &i.cond,
                format!("an `if` condition is a bool; found {}", cond.ty.name()),
            );
            return None;
        }
        if then.ty != other.ty {
            self.cx.error_spanned_by(
                else_branch,
                format!(
                    "both branches of an `if` have one type; found {} and {}",
                    then.ty.name(),
                    other.ty.name()
                ),
            );
            return None;
        }
        let ty = then.ty;
        Self::typed(
            Node::If(Box::new(cond), Box::new(then), Box::new(other)),
            ty,
        )
    }
}

/// "one index", "2 indices".
fn count(n: usize) -> String {
    if n == 1 {
        "one index".to_string()
    } else {
        format!("{n} indices")
    }
}

/// How an input of `shape` is indexed, for messages: `[b][h][i]`.
fn index_example(shape: InputShape) -> String {
    let mut out = String::new();
    if shape.per_batch {
        out.push_str("[b]");
    }
    if shape.per_head {
        out.push_str("[h]");
    }
    match shape.inner {
        Inner::None => {}
        Inner::Seq => out.push_str("[k]"),
        Inner::Fixed(_) => out.push_str("[(q - k).min(31)]"),
    }
    out
}

/// Whether interval reasoning can bound `e` over a tile: integer and boolean operations only,
/// with division by positive literals; `%` and floats make the tile's class unknown.
pub fn boundable(e: &Typed) -> bool {
    match &e.node {
        Node::Param(p) => *p != Param::S,
        Node::Int(_) | Node::Bool(_) => true,
        Node::Float(_) | Node::Cast(..) => false,
        Node::Input(_) => e.ty != Ty::Float,
        // A table's values are not known when tiles are classified.
        Node::Table(_) => false,
        Node::Neg(x) | Node::Not(x) => boundable(x),
        Node::Binary(Op::Rem, ..) => false,
        Node::Binary(Op::Div, a, b) => boundable(a) && matches!(b.node, Node::Int(v) if v > 0),
        Node::Binary(_, a, b) => a.ty != Ty::Float && boundable(a) && boundable(b),
        Node::Call(f, x, args) => {
            matches!(f, Func::Abs | Func::Min | Func::Max)
                && x.ty == Ty::Int
                && boundable(x)
                && args.iter().all(boundable)
        }
        Node::If(c, a, b) => boundable(c) && boundable(a) && boundable(b),
    }
}

/// Whether parameter `p` appears in `e`, reading a declared input indexed by it included.
pub fn mentions(e: &Typed, p: Param, inputs: &[InputDecl]) -> bool {
    let m = |x: &Typed| mentions(x, p, inputs);
    match &e.node {
        Node::Param(q) => *q == p,
        Node::Input(i) => {
            let shape = inputs[*i].shape;
            (shape.per_batch && p == Param::B) || (shape.per_head && p == Param::H)
        }
        Node::Table(t) => {
            let shape = inputs[t.input].shape;
            (shape.per_batch && p == Param::B) || (shape.per_head && p == Param::H) || m(&t.index)
        }
        Node::Int(_) | Node::Float(_) | Node::Bool(_) => false,
        Node::Neg(x) | Node::Not(x) | Node::Cast(_, x) => m(x),
        Node::Binary(_, a, b) => m(a) || m(b),
        Node::Call(_, x, args) => m(x) || args.iter().any(m),
        Node::If(c, a, b) => m(c) || m(a) || m(b),
    }
}
