//! The F(2×2, 3×3) forward of a batch smaller than the thread count (inference at batch 1), split by bands of
//! tile rows: each thread transforms the input rows of its band, multiplies its tiles with every output
//! channel's U and writes its band of every output plane. Nothing is computed twice, and each thread's
//! transformed tiles are its share of the image's, not all of them.
//!
//! It replaced a split by output channels, in which every thread transformed the whole input: on the reference
//! CNN's 28×28, 32→32 layer that repeated input transform took 34 µs against 55 µs for all the products, and
//! writing its 400 KB of tiles to L2 was most of it (the same transform writing to an L1-sized buffer took
//! 9 µs against 22; docs/PERFORMANCE.md §7).
//!
//! A tile's transforms and its column of every product are the same operations in the same order whichever
//! band holds it (the GEMM sums each output over the input channels in order, whatever its column block), so
//! the result is bitwise the chunked forward's, for any number of threads.

use super::{
    at_least, input_transform, output_plane, point_products, with_scratch, Epilogue, WinoShape,
};
use crate::kernels::elementwise::SyncPtr;
use rayon::prelude::*;

/// The tile rows `[i0, i1)` of band `b` of `parts`: contiguous, in order, sizes differing by at most one.
fn band_rows(th: usize, parts: usize, b: usize) -> (usize, usize) {
    (b * th / parts, (b + 1) * th / parts)
}

/// Forward of `s` (N below the thread count; each image in turn) on the packed U: `y` holds N·K planes of H×W
/// values, or of H/2 × W/2 with `ep.pool`. Every value of `y` is written.
pub(super) fn forward(
    s: &WinoShape,
    x: &[f32],
    (packed, plen): (&[f32], usize),
    ep: Epilogue,
    y: &mut [f32],
) {
    let (h, w, c, k) = (s.h, s.w, s.c, s.k);
    let (th, tw) = (s.th(), s.tw());
    let (ph, pw) = if ep.pool { (th, tw) } else { (h, w) };
    assert!(!ep.pool || (h.is_multiple_of(2) && w.is_multiple_of(2)));
    assert!(x.len() == s.n * c * h * w && y.len() == s.n * k * ph * pw);
    let parts = rayon::current_num_threads().min(th).max(1);
    for img in 0..s.n {
        let xi = &x[img * c * h * w..(img + 1) * c * h * w];
        let yi = &mut y[img * k * ph * pw..(img + 1) * k * ph * pw];
        let ylen = yi.len();
        let out = SyncPtr(yi.as_mut_ptr());
        (0..parts).into_par_iter().for_each(|b| {
            let (i0, i1) = band_rows(th, parts, b);
            let bt = i1 - i0; // tile rows of the band
            let t = bt * tw;
            // output rows of the band in each plane: tile rows for the pool's planes, 2 per tile row otherwise
            let (r0, r1) = if ep.pool {
                (i0, i1)
            } else {
                (2 * i0, (2 * i1).min(h))
            };
            with_scratch(|sc| {
                at_least(&mut sc.a, 16 * c * t);
                at_least(&mut sc.b, 16 * k * t);
                input_transform(s, xi, 1, (i0, bt), &mut sc.a, &mut sc.rows);
                point_products(0..k, c, t, (packed, plen), &sc.a, &mut sc.b);
                for kk in 0..k {
                    let (start, len) = (kk * ph * pw + r0 * pw, (r1 - r0) * pw);
                    assert!(start + len <= ylen, "band outside the output");
                    // SAFETY: within this image's output (asserted); rows r0..r1 of plane kk belong to this
                    // band alone, and `yi` outlives the parallel loop.
                    let plane = unsafe { out.slice(start, len) };
                    output_plane(s, &sc.b, k * t, kk * t, (i0, bt), kk, ep, plane);
                }
            })
        });
    }
}

#[cfg(test)]
mod tests {
    use super::band_rows;

    #[test]
    fn bands_cover_the_tile_rows_once_in_order() {
        for th in 1..20 {
            for parts in 1..=th.min(5) {
                let mut next = 0;
                for b in 0..parts {
                    let (i0, i1) = band_rows(th, parts, b);
                    assert_eq!(i0, next);
                    assert!(i1 > i0, "th {th}, parts {parts}: empty band {b}");
                    next = i1;
                }
                assert_eq!(next, th);
            }
        }
    }
}
