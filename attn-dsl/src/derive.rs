//! Symbolic differentiation of a score expression with respect to the logit `s` (or a declared
//! `f32` input), for the backward pass: `d_ds(body)` is an expression of the same language (so it compiles to `#[cube]`
//! code and to host code like any other), equal to `∂ score / ∂ s` wherever the score is
//! differentiable. Every construct of the language has such a derivative: integer and boolean
//! subexpressions and declared inputs do not depend on `s` (derivative 0), `abs`, `min`, `max`,
//! `if` and casts to `i32` are piecewise (their derivative is the active branch's, 0 for a
//! cast), `tanh`, `exp`, `ln`, `sqrt`, `+ − × ÷ %` follow the usual rules. Zeros and ones are
//! folded as the derivative is built, so `s * 0.5 + bias[h]` derives to `0.5`.

use crate::expr::{Func, Node, Op, Param, Ty, Typed};

/// What an expression is differentiated with respect to.
#[derive(Copy, Clone, Eq, PartialEq, Debug)]
pub enum Var {
    /// The logit `s`.
    S,
    /// Declared input number `i` (an `f32` one that is not a table; every element read alike).
    Input(usize),
    /// Table read number `n` of the closure: the one element it reads.
    Read(usize),
}

/// `∂ e / ∂ s` of a float expression (0 for any other).
pub fn d_ds(e: &Typed) -> Typed {
    derivative(e, Var::S)
}

/// `∂ e / ∂ var` of a float expression (0 for any other). For a declared input indexed by `b`
/// or `h`, the derivative with respect to the element the expression reads; for a table, with
/// respect to the element one read reads (a table's index is an integer: it does not depend on
/// any float).
pub fn derivative(e: &Typed, var: Var) -> Typed {
    let d = |x: &Typed| derivative(x, var);
    if e.ty != Ty::Float {
        return float(0.0);
    }
    match &e.node {
        Node::Param(Param::S) if var == Var::S => float(1.0),
        Node::Input(i) if var == Var::Input(*i) => float(1.0),
        Node::Table(t) if var == Var::Read(t.read) => float(1.0),
        Node::Param(_)
        | Node::Int(_)
        | Node::Float(_)
        | Node::Bool(_)
        | Node::Input(_)
        | Node::Table(_) => float(0.0),
        Node::Cast(..) => float(0.0),
        Node::Neg(x) => neg(d(x)),
        Node::Not(_) => float(0.0),
        Node::Binary(op, a, b) => {
            let (da, db) = (d(a), d(b));
            match op {
                Op::Add => add(da, db),
                Op::Sub => sub(da, db),
                Op::Mul => add(mul(da, (**b).clone()), mul((**a).clone(), db)),
                Op::Div => {
                    // (da·b − a·db) / b², written as da / b − a·db / b².
                    let b2 = mul((**b).clone(), (**b).clone());
                    sub(div(da, (**b).clone()), div(mul((**a).clone(), db), b2))
                }
                // a % b = a − trunc(a / b)·b, and trunc(a / b) = (a − a % b) / b is constant
                // almost everywhere.
                Op::Rem => {
                    let quotient = div(
                        binary(Op::Sub, (**a).clone(), (*e).clone(), Ty::Float),
                        (**b).clone(),
                    );
                    sub(da, mul(quotient, db))
                }
                _ => float(0.0),
            }
        }
        Node::Call(f, x, args) => {
            let dx = d(x);
            let x = (**x).clone();
            match f {
                Func::Tanh => {
                    let t = call(Func::Tanh, x, vec![]);
                    mul(sub(float(1.0), mul(t.clone(), t)), dx)
                }
                Func::Exp => mul(call(Func::Exp, x, vec![]), dx),
                Func::Ln => div(dx, x),
                Func::Sqrt => div(dx, mul(float(2.0), call(Func::Sqrt, x, vec![]))),
                Func::Abs => pick(binary(Op::Lt, x, float(0.0), Ty::Bool), neg(dx.clone()), dx),
                Func::Min | Func::Max => {
                    let y = args[0].clone();
                    let dy = d(&y);
                    let op = if *f == Func::Min { Op::Lt } else { Op::Gt };
                    pick(binary(op, x, y, Ty::Bool), dx, dy)
                }
            }
        }
        Node::If(c, a, b) => pick((**c).clone(), d(a), d(b)),
    }
}

fn float(v: f64) -> Typed {
    Typed {
        node: Node::Float(v),
        ty: Ty::Float,
    }
}

fn constant(e: &Typed) -> Option<f64> {
    match e.node {
        Node::Float(v) => Some(v),
        _ => None,
    }
}

fn binary(op: Op, a: Typed, b: Typed, ty: Ty) -> Typed {
    Typed {
        node: Node::Binary(op, Box::new(a), Box::new(b)),
        ty,
    }
}

fn add(a: Typed, b: Typed) -> Typed {
    match (constant(&a), constant(&b)) {
        (Some(x), Some(y)) => float(x + y),
        (Some(0.0), _) => b,
        (_, Some(0.0)) => a,
        _ => binary(Op::Add, a, b, Ty::Float),
    }
}

fn sub(a: Typed, b: Typed) -> Typed {
    match (constant(&a), constant(&b)) {
        (Some(x), Some(y)) => float(x - y),
        (_, Some(0.0)) => a,
        (Some(0.0), _) => neg(b),
        _ => binary(Op::Sub, a, b, Ty::Float),
    }
}

fn mul(a: Typed, b: Typed) -> Typed {
    match (constant(&a), constant(&b)) {
        (Some(x), Some(y)) => float(x * y),
        (Some(x), _) | (_, Some(x)) if x == 0.0 => float(0.0),
        (Some(1.0), _) => b,
        (_, Some(1.0)) => a,
        _ => binary(Op::Mul, a, b, Ty::Float),
    }
}

fn div(a: Typed, b: Typed) -> Typed {
    match (constant(&a), constant(&b)) {
        (Some(0.0), _) => float(0.0),
        (_, Some(1.0)) => a,
        _ => binary(Op::Div, a, b, Ty::Float),
    }
}

fn neg(a: Typed) -> Typed {
    match constant(&a) {
        Some(x) => float(-x),
        None => Typed {
            node: Node::Neg(Box::new(a)),
            ty: Ty::Float,
        },
    }
}

fn call(f: Func, x: Typed, args: Vec<Typed>) -> Typed {
    Typed {
        node: Node::Call(f, Box::new(x), args),
        ty: Ty::Float,
    }
}

fn pick(c: Typed, a: Typed, b: Typed) -> Typed {
    match (constant(&a), constant(&b)) {
        (Some(x), Some(y)) if x == y => a,
        _ => Typed {
            node: Node::If(Box::new(c), Box::new(a), Box::new(b)),
            ty: Ty::Float,
        },
    }
}
