//! `exp` and `ln` in f64 on lanes of 8, branch-free so that a loop over lanes vectorises (libm's are a call per
//! value): the per-pixel softmax of a segmentation loss takes one exponential per class and pixel and one
//! logarithm per pixel.
//!
//! e^x = 2^k · e^r with k = round(x·log₂e) and r = x − k·ln 2 (ln 2 split in two parts, so r is exact to
//! about 2⁻¹⁰⁶), |r| ≤ ½ln 2; e^r by its Taylor series to degree 13 (truncation below 10⁻¹⁷ relative), and 2^k
//! built from the exponent bits in two factors, so that results down to the subnormal range come out right.
//! Within 2 ulp of libm's value where the result is normal (the test sweeps [−745, 709.7]), within
//! 2·2⁻¹⁰⁷⁴ where it is subnormal (below e⁻⁷⁰⁸, which no softmax weight notices); 0 below −745.2, +∞ above 709.8, NaN
//! for NaN.

/// Lanes per call.
pub const LANES: usize = 8;

const LOG2E: f64 = std::f64::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO to about 2⁻¹⁰⁶ (fdlibm's split), with LN2_HI's low 32 bits zero, so that k·LN2_HI is
/// exact for |k| < 2²⁰. (`LN_2 − LN2_HI` would lose ln 2's bits beyond f64's 53: a relative error of k·2⁻⁵⁴.)
const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
/// 1.5·2⁵²: adding it to an integer-valued f64 of magnitude below 2⁵¹ leaves that integer in the low bits.
const MAGIC: f64 = 6_755_399_441_055_744.0;

/// 2^j for integer-valued `j` in [−1022, 1023], from the exponent bits.
#[inline(always)]
fn pow2(j: f64) -> f64 {
    f64::from_bits((j + (1023.0 + MAGIC)).to_bits() << 52)
}

/// `x[i] = e^x[i]` for each lane. Written as passes over the lanes, each a loop LLVM vectorises whole. With
/// `FMA` (a body compiled for FMA: `isa_fn!`'s AVX2 and AVX-512 versions) the polynomial's steps are fused
/// multiply-adds, one rounding each instead of two and half the instructions; without, a multiply and an add
/// (`mul_add` would be a libm call there).
#[inline(always)]
pub fn exp_lanes<const FMA: bool>(x: &mut [f64; LANES]) {
    let mut k = [0f64; LANES];
    let mut r = [0f64; LANES];
    for l in 0..LANES {
        let c = x[l].clamp(-746.0, 710.0); // NaN passes through clamp
        k[l] = (c * LOG2E + 0.5).floor();
        r[l] = (c - k[l] * LN2_HI) - k[l] * LN2_LO;
    }
    // Horner, degree 13
    let mut p = [1.0f64 / 6_227_020_800.0; LANES];
    for d in [
        479_001_600.0,
        39_916_800.0,
        3_628_800.0,
        362_880.0,
        40_320.0,
        5_040.0,
        720.0,
        120.0,
        24.0,
        6.0,
        2.0,
        1.0,
        1.0,
    ] {
        for l in 0..LANES {
            p[l] = if FMA {
                p[l].mul_add(r[l], 1.0 / d)
            } else {
                p[l] * r[l] + 1.0 / d
            };
        }
    }
    for l in 0..LANES {
        // 2^k in two factors (k in [−1077, 1025] after the clamp): each within the normal exponents
        let k1 = (k[l] * 0.5).floor();
        let e = p[l] * pow2(k1) * pow2(k[l] - k1);
        let a = x[l];
        let e = if a > 709.8 { f64::INFINITY } else { e };
        x[l] = if a < -745.2 { 0.0 } else { e };
    }
}

/// √2, the top of the mantissa range [√½, √2) of [`ln_lanes`].
const SQRT2: f64 = std::f64::consts::SQRT_2;

/// `x[i] = ln x[i]` for each lane: x = m·2^e with m in [√½, √2), ln m = 2·atanh(s) with s = (m − 1)/(m + 1)
/// (|s| ≤ 0.172) by its series to s²¹, and e·ln 2 added in two parts. Within 2 ulp of libm's for positive
/// normal and subnormal x (the test sweeps 1e-310 to 1e300), within 4 ulp of the tiny results near x = 1
/// (relative 1e-15, where the quotient's rounding is not cancelled); −∞ at ±0, NaN below 0 and for NaN, +∞
/// at +∞.
#[inline(always)]
pub fn ln_lanes<const FMA: bool>(x: &mut [f64; LANES]) {
    let mut e = [0f64; LANES];
    let mut m = [0f64; LANES];
    for l in 0..LANES {
        let v = x[l];
        // subnormals: scale into the normal range first
        let sub = v < f64::MIN_POSITIVE;
        let v = if sub { v * 18_014_398_509_481_984.0 } else { v }; // 2^54
        let bits = v.to_bits();
        // the biased exponent as an f64 by the 2⁵² trick (an integer-to-float conversion would not vectorise
        // without AVX-512 DQ)
        let biased = f64::from_bits(0x4330_0000_0000_0000 | ((bits >> 52) & 0x7ff))
            - 4_503_599_627_370_496.0;
        let ex = biased - 1023.0 - if sub { 54.0 } else { 0.0 };
        let mant = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
        let big = mant > SQRT2;
        m[l] = if big { mant * 0.5 } else { mant };
        e[l] = if big { ex + 1.0 } else { ex };
    }
    // passes over the lanes, each a loop that vectorises whole (a loop per lane around the series would not)
    let mut s = [0f64; LANES];
    let mut z = [0f64; LANES];
    for l in 0..LANES {
        s[l] = (m[l] - 1.0) / (m[l] + 1.0);
        z[l] = s[l] * s[l];
    }
    let mut p = [1.0f64 / 21.0; LANES];
    for d in [19.0, 17.0, 15.0, 13.0, 11.0, 9.0, 7.0, 5.0, 3.0, 1.0] {
        for l in 0..LANES {
            p[l] = if FMA {
                p[l].mul_add(z[l], 1.0 / d)
            } else {
                p[l] * z[l] + 1.0 / d
            };
        }
    }
    for l in 0..LANES {
        let lnm = 2.0 * s[l] * p[l];
        let r = e[l] * LN2_HI + (lnm + e[l] * LN2_LO);
        let v = x[l];
        let r = if v == f64::INFINITY { v } else { r };
        let r = if v == 0.0 { f64::NEG_INFINITY } else { r };
        x[l] = if v < 0.0 || v.is_nan() { f64::NAN } else { r };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units in the last place between `got` and libm's `want`.
    fn ulps(got: f64, want: f64) -> f64 {
        if got == want {
            return 0.0;
        }
        let ulp = if want == 0.0 {
            f64::from_bits(1)
        } else {
            let b = want.abs().to_bits();
            f64::from_bits(b + 1) - f64::from_bits(b)
        };
        (got - want).abs() / ulp
    }

    #[test]
    fn within_two_ulp_of_libm_over_the_whole_range() {
        let mut worst = (0.0, 0.0);
        let mut x = -745.0;
        while x < 709.7 {
            let mut lanes = [0.0; LANES];
            for (i, l) in lanes.iter_mut().enumerate() {
                *l = x + i as f64 * 1.37e-3;
            }
            let want: Vec<f64> = lanes.iter().map(|v| v.exp()).collect();
            exp_lanes::<false>(&mut lanes);
            for (i, (g, w)) in lanes.iter().zip(&want).enumerate() {
                let u = ulps(*g, *w);
                // subnormal results keep fewer bits; compare those absolutely
                let ok = if *w < f64::MIN_POSITIVE {
                    (g - w).abs() <= 2.0 * f64::from_bits(1)
                } else {
                    u <= 2.0
                };
                assert!(
                    ok,
                    "exp({}) = {g}, libm {w} ({u} ulp)",
                    x + i as f64 * 1.37e-3
                );
                if *w >= f64::MIN_POSITIVE && u > worst.0 {
                    worst = (u, x);
                }
            }
            x += 0.0917;
        }
        assert!(worst.0 <= 2.0, "{worst:?}");
    }

    #[test]
    fn ln_within_two_ulp_of_libm() {
        let mut x = 1e-310f64;
        while x < 1e300 {
            let mut lanes = [0.0; LANES];
            for (i, l) in lanes.iter_mut().enumerate() {
                *l = x * (1.0 + i as f64 * 0.0731);
            }
            let want: Vec<f64> = lanes.iter().map(|v| v.ln()).collect();
            ln_lanes::<false>(&mut lanes);
            for (g, w) in lanes.iter().zip(&want) {
                assert!(ulps(*g, *w) <= 2.0, "ln: got {g}, libm {w}");
            }
            x *= 1.37;
        }
        // near 1, where ln is small and the cancellation would show
        for i in 0..2000 {
            let v = 1.0 + (i as f64 - 1000.0) * 1e-6;
            let mut l = [v; LANES];
            ln_lanes::<false>(&mut l);
            assert!(
                ulps(l[0], v.ln()) <= 4.0,
                "ln({v}) = {}, libm {}",
                l[0],
                v.ln()
            );
        }
        let mut l = [
            0.0,
            -0.0,
            -1.0,
            f64::INFINITY,
            f64::NAN,
            1.0,
            2.0,
            f64::MIN_POSITIVE,
        ];
        ln_lanes::<false>(&mut l);
        assert_eq!(&l[..2], &[f64::NEG_INFINITY, f64::NEG_INFINITY]);
        assert!(l[2].is_nan() && l[4].is_nan());
        assert_eq!((l[3], l[5]), (f64::INFINITY, 0.0));
        assert!(
            ulps(l[6], std::f64::consts::LN_2) <= 1.0 && ulps(l[7], f64::MIN_POSITIVE.ln()) <= 1.0
        );
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn fused_multiply_adds_agree_within_an_ulp() {
        if !std::arch::is_x86_feature_detected!("fma") {
            return;
        }
        #[target_feature(enable = "fma")]
        unsafe fn fused(e: &mut [f64; LANES], l: &mut [f64; LANES]) {
            exp_lanes::<true>(e);
            ln_lanes::<true>(l);
        }
        let mut x = -700.0;
        while x < 700.0 {
            let base: [f64; LANES] = std::array::from_fn(|i| x + i as f64 * 0.173);
            let (mut e1, mut e2) = (base, base);
            let pos: [f64; LANES] = std::array::from_fn(|i| (x + 701.0) * (1.0 + i as f64 * 0.01));
            let (mut l1, mut l2) = (pos, pos);
            exp_lanes::<false>(&mut e1);
            ln_lanes::<false>(&mut l1);
            // SAFETY: FMA was detected above.
            unsafe { fused(&mut e2, &mut l2) };
            for i in 0..LANES {
                assert!(ulps(e2[i], base[i].exp()) <= 2.0, "fused exp({})", base[i]);
                assert!(ulps(l2[i], pos[i].ln()) <= 2.0, "fused ln({})", pos[i]);
                assert!(ulps(e1[i], e2[i]) <= 2.0 && ulps(l1[i], l2[i]) <= 2.0);
            }
            x += 3.7;
        }
    }

    #[test]
    fn special_values() {
        let mut l = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NAN,
            800.0,
        ];
        exp_lanes::<false>(&mut l);
        assert_eq!(&l[..2], &[1.0, 1.0]);
        assert!(ulps(l[2], 1f64.exp()) <= 2.0 && ulps(l[3], (-1f64).exp()) <= 2.0);
        assert_eq!(&l[4..6], &[0.0, f64::INFINITY]);
        assert!(l[6].is_nan());
        assert_eq!(l[7], f64::INFINITY);
        let mut l = [
            -746.0, -1000.0, -745.0, 709.0, 709.78, -700.5, 1e-300, -1e-300,
        ];
        exp_lanes::<false>(&mut l);
        assert_eq!(&l[..2], &[0.0, 0.0]);
        assert!(l[2] > 0.0 && l[3].is_finite() && l[4].is_finite());
        for (g, x) in l[5..].iter().zip([-700.5f64, 1e-300, -1e-300]) {
            assert!(ulps(*g, x.exp()) <= 2.0);
        }
    }
}
