//! Moments of contiguous planes: what a layer that has just written a plane (still in L1) hands to a following
//! BatchNorm, so that the BatchNorm's statistics need no pass of their own.

use super::lanes;
use crate::ctx::Isa;

/// (mean, M2) of one contiguous plane, two-pass (a sum, then Σ(x-shift) and Σ(x-shift)² around the rounded
/// mean): what a layer that has just written the plane (still in L1) hands to a following BatchNorm, so the
/// BatchNorm's statistics need no pass of their own (`moments_from_planes` in `norm::batch`).
pub fn plane_moments(isa: Isa, x: &[f32]) -> (f64, f64) {
    if x.is_empty() {
        return (0.0, 0.0);
    }
    let m = x.len() as f64;
    let shift = (lanes::sum(isa, x) / m) as f32;
    let (s1, s2) = lanes::shifted_moments(isa, x, shift);
    moments_from_shifted(shift as f64, s1, s2, m)
}

/// [`plane_moments`] of each `plane`-value plane of `y` into `out` (one entry per plane).
/// (The callers are AVX-512 kernels: the reductions run with AVX-512's instruction set.)
pub fn plane_moments_into(y: &[f32], plane: usize, out: &mut [(f64, f64)]) {
    for (m, pl) in out.iter_mut().zip(y.chunks(plane)) {
        *m = plane_moments(Isa::Avx512, pl);
    }
}

/// (mean, M2) from the shifted sums Σ(x-shift), Σ(x-shift)² over m values.
pub fn moments_from_shifted(shift: f64, s1: f64, s2: f64, m: f64) -> (f64, f64) {
    let dm = s1 / m;
    let mean = shift + dm;
    let m2 = (s2 - s1 * dm).max(0.0);
    (mean, m2)
}

/// The (mean, M2) of every (n, c) plane of an (N, C, H, W) tensor, n-major.
pub type PlaneMoments = Vec<(f64, f64)>;
