//! fp8 (e4m3) K/V caches: the format, its scales, and the host's encoder and decoder — the same
//! rounding as the kernels' ([`crate::kernels::common::fp8`]), bit for bit, so a test can check
//! what a cache holds and a reference can read it.
//!
//! e4m3 (OCP FP8, the `E4M3FN` of PyTorch and cuDNN): a sign, 4 exponent bits (bias 7), 3
//! mantissa bits, no infinities; the largest finite value is 448, the smallest normal 2⁻⁶, the
//! smallest subnormal 2⁻⁹. A cache stores `e4m3(x · (1 / scale))` per K/V head (the inverse
//! rounded to f32 once, the product rounded to f32) and reads `stored · scale`: the scales map
//! the values' range onto e4m3's. Values past `±448 · scale`
//! saturate to `±448 · scale`; so do non-finite ones.

use crate::error::AttnError;

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// `2¹⁴`: adding it to a value below `2⁻⁶` rounds the value to a multiple of `2⁻⁹` (e4m3's
/// subnormal step), to nearest even, in the float adder itself.
pub(crate) const SUBNORMAL_MAGIC: f32 = 16384.0;

/// The exponent bias between f32 (127) and e4m3 (7), in the e4m3 code's exponent position.
pub(crate) const REBIAS: u32 = 120 << 3;

/// The e4m3 byte of `x`: rounded to nearest even, saturated at ±448 (non-finite values too).
pub fn encode(x: f32) -> u8 {
    let sign = (x.to_bits() >> 24) & 0x80;
    let a = x.abs();
    let a = if a <= E4M3_MAX { a } else { E4M3_MAX };
    let code = if a < 0.015625 {
        (a + SUBNORMAL_MAGIC).to_bits() - SUBNORMAL_MAGIC.to_bits()
    } else {
        let bits = a.to_bits();
        ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - REBIAS
    };
    // `a ≤ 448` keeps the code at most 0x7E (448's).
    (code | sign) as u8
}

/// The value of e4m3 byte `b` (0x7F and 0xFF, e4m3's NaN, are never written by [`encode`]).
pub fn decode(b: u8) -> f32 {
    let magnitude = u32::from(b & 0x7F);
    let value = if magnitude < 8 {
        magnitude as f32 * 0.001953125
    } else {
        f32::from_bits((magnitude << 20) + (120 << 23))
    };
    if b & 0x80 != 0 {
        -value
    } else {
        value
    }
}

/// The scales of an fp8 cache: one per K/V head for K and for V (a cache stores
/// `e4m3(x · (1 / scale))` and reads `stored · scale`). Take them from calibration, as FlashAttention 3, cuDNN and vLLM take
/// their descale factors; `uniform` gives every head the same pair.
#[derive(Clone, Debug, PartialEq)]
pub struct KvScales {
    /// K's scale per K/V head.
    pub k: Vec<f32>,
    /// V's scale per K/V head.
    pub v: Vec<f32>,
}

impl KvScales {
    /// The same K scale and V scale for every one of `heads_kv` heads.
    pub fn uniform(heads_kv: usize, k: f32, v: f32) -> Self {
        Self {
            k: vec![k; heads_kv],
            v: vec![v; heads_kv],
        }
    }

    /// Scales that store values up to `k_max` (K) and `v_max` (V) in magnitude without
    /// saturating: `max / 448`.
    pub fn for_range(heads_kv: usize, k_max: f32, v_max: f32) -> Self {
        Self::uniform(heads_kv, k_max / E4M3_MAX, v_max / E4M3_MAX)
    }

    /// One positive, finite scale per head for K and for V.
    pub(crate) fn check(&self, heads_kv: usize) -> Result<(), AttnError> {
        for (name, scales) in [("k", &self.k), ("v", &self.v)] {
            if scales.len() != heads_kv {
                return Err(AttnError::KvCache {
                    field: "scales",
                    reason: format!(
                        "{} {name} scales for {heads_kv} K/V heads; give one per head",
                        scales.len()
                    ),
                });
            }
            if let Some((h, s)) = scales
                .iter()
                .enumerate()
                .find(|(_, s)| !(s.is_finite() && **s > 0.0))
            {
                return Err(AttnError::KvCache {
                    field: "scales",
                    reason: format!(
                        "{name} scale of head {h} is {s}; scales are positive and finite"
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{decode, encode, E4M3_MAX};

    /// Every byte but NaN's decodes to a value that encodes back to it, and the values are
    /// e4m3's: 2⁻⁹ steps below 2⁻⁶, 3 mantissa bits above, 448 at the top.
    #[test]
    fn every_code_round_trips() {
        for b in 0..=255u8 {
            if b & 0x7F == 0x7F {
                continue;
            }
            let x = decode(b);
            assert_eq!(encode(x), b, "{b:#04x} decodes to {x}");
        }
        assert_eq!(decode(0x7E), E4M3_MAX);
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0x08), 2f32.powi(-6));
        assert_eq!(decode(0x3F), 1.875);
        assert_eq!(decode(0xC4), -3.0);
    }

    /// Between two neighbouring codes a value rounds to the nearer, a tie to the even code;
    /// past 448 it saturates, as do infinities and NaN.
    #[test]
    fn rounding_is_to_nearest_even_and_saturates() {
        for b in 0..0x7Eu8 {
            let (lo, hi) = (decode(b), decode(b + 1));
            let mid = (lo + hi) / 2.0;
            let even = if b % 2 == 0 { b } else { b + 1 };
            assert_eq!(encode(mid), even, "tie between {lo} and {hi}");
            assert_eq!(encode(lo + (hi - lo) * 0.25), b);
            assert_eq!(encode(lo + (hi - lo) * 0.75), b + 1);
            assert_eq!(encode(-(lo + (hi - lo) * 0.75)), (b + 1) | 0x80);
        }
        for x in [449.0, 1e9, f32::INFINITY, f32::NAN] {
            assert_eq!(encode(x), 0x7E, "{x}");
        }
        assert_eq!(encode(f32::NEG_INFINITY), 0xFE);
    }
}
