//! e4m3 in kernels: four values per `u32` word (the first in the low byte), decoded to f32 and
//! encoded with the host's rounding ([`crate::fp8`], bit for bit), by integer arithmetic that
//! every back end has.

use cubecl::prelude::*;

use super::F32x4;
use crate::fp8::{E4M3_MAX, REBIAS, SUBNORMAL_MAGIC};

/// The value of the e4m3 code in the low byte of `b` (the rest of `b` ignored).
#[cube]
pub fn e4m3_value(b: u32) -> f32 {
    let magnitude = b & 0x7F;
    let normal = f32::reinterpret((magnitude << 20) + (120u32 << 23));
    let subnormal = f32::cast_from(magnitude) * 0.001953125f32;
    let value = select(magnitude < 8, subnormal, normal);
    select((b & 0x80) != 0, -value, value)
}

/// The four values of a word.
#[cube]
pub fn unpack(word: u32) -> F32x4 {
    let mut out = F32x4::new(0.0);
    #[unroll]
    for e in 0..4u32 {
        out.insert(e as usize, e4m3_value(word >> (8 * e)));
    }
    out
}

/// The e4m3 code of `x` (rounded to nearest even, saturated at ±448, non-finite values too).
#[cube]
pub fn e4m3_code(x: f32) -> u32 {
    let sign = (u32::reinterpret(x) >> 24) & 0x80;
    let mut a = x.abs();
    a = select(a <= E4M3_MAX, a, E4M3_MAX);
    let sub = u32::reinterpret(a + SUBNORMAL_MAGIC) - comptime!(SUBNORMAL_MAGIC.to_bits());
    let bits = u32::reinterpret(a);
    let rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20;
    // Below 2⁻⁶ the subnormal step; above, the rounded f32 bits rebiased (wrapping below 2⁻⁶,
    // where the select drops it).
    let normal = rounded - REBIAS;
    // `a ≤ 448` keeps the code at most 0x7E (448's).
    select(a < 0.015625f32, sub, normal) | sign
}

/// Four values packed into a word, each `x · inverse_scale` encoded (the product rounded to f32
/// first, as the host's encoder takes it).
#[cube]
pub fn pack(values: F32x4, inverse_scale: f32) -> u32 {
    let mut word = 0u32.runtime();
    #[unroll]
    for e in 0..4u32 {
        word |= e4m3_code(values.extract(e as usize) * inverse_scale) << (8 * e);
    }
    word
}
