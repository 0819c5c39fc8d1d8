//! Winograd F(4×4, 3×3) for 3×3 convolutions (stride 1, padding 1, one group, planes at most [`MAX_W`] wide),
//! f32 on AVX-512. [`crate::nn::Conv2d`] uses it for the training passes of planes at least
//! [`crate::nn::conv::WINOGRAD4_MIN_W`] wide (the reference CNN's 28×28 layer).
//!
//! Each 4×4 output tile comes from a 6×6 input tile, `Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A` with the interpolation points
//! 0, ±1, ±2 (Lavin & Gray 2015, arXiv:1509.09308): 36 products per tile and channel pair for 16 outputs, against
//! F(2×2, 3×3)'s 16 for 4 ([`super`]), so the GEMM work is 4× smaller than the direct convolution's
//! instead of 2.25×, and the transformed tiles take 2.25 floats per output instead of 4. The price is rounding:
//! the transforms multiply by up to 8 and G by 1/6 and 1/24, so the error against an f64 convolution is a few
//! times F(2×2)'s (the tests bound both). Inference keeps F(2×2), whose fused output passes (BatchNorm affine,
//! ReLU, 2×2 max pool) match one pool window per tile.
//!
//! The chunk drivers (scratch, the per-point GEMMs, the fixed-order gradient sums) are [`super`]'s,
//! with 36 GEMMs instead of 16; this module has the transforms:
//! - forward: `M[p] (K×T) = U[p] (K×C) · V[p] (C×T)`, `U = G g Gᵀ`, `V = Bᵀ d B`, then `Y = Aᵀ M A`;
//! - data gradient: `dV[p] = U[p]ᵀ · dM[p]` with `dM = A dY Aᵀ`, then dx = Σ_tiles `B dV Bᵀ` (overlapping by two);
//! - weight gradient: `dU[p] = Σ_tiles dM[p] · V[p]ᵀ`, then `dg = Gᵀ dU G` (in f64).
//!
//! The tile transforms are vectorised over the tiles of a tile row: a padded input row of at most 32 values
//! (two vectors) is split into its four residues mod 4 by permutes, so that column j of every tile of the row
//! is one vector (residue j mod 4, shifted by one lane for j ≥ 4).

#![allow(unsafe_code)]
// the tile algebra reads best with explicit row/column indices
#![allow(clippy::needless_range_loop)]

use super::{pack_weights, run_backward, run_forward, Transforms, WinoShape};
use crate::kernels::gemm_avx512 as simd;

/// Widest plane this module handles: a padded row (W + 2 values, from column −1) fits in two vectors.
pub const MAX_W: usize = 28;
/// Products per tile.
const P: usize = 36;

/// Whether the F(4×4) kernels take this shape (AVX-512F, planes at most [`MAX_W`] wide).
pub fn applies(s: &WinoShape) -> bool {
    simd::available() && s.w >= 1 && s.w <= MAX_W && s.h >= 1 && s.c > 0 && s.k > 0
}

fn th(s: &WinoShape) -> usize {
    s.h.div_ceil(4)
}
fn tw(s: &WinoShape) -> usize {
    s.w.div_ceil(4)
}
fn tiles(s: &WinoShape) -> usize {
    th(s) * tw(s)
}

/// G (6×3).
const G: [[f64; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `U[p][k][c] = (G g Gᵀ)[p]`, p = 6·r + q, computed in f64 and rounded once.
fn transform_weights(w: &[f32], k: usize, c: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * c * 9, "weights of shape (K, C, 3, 3)");
    let mut u = vec![0f32; P * k * c];
    for kk in 0..k {
        for cc in 0..c {
            let g = &w[(kk * c + cc) * 9..(kk * c + cc + 1) * 9];
            let mut t = [[0f64; 3]; 6]; // G g
            for r in 0..6 {
                for s in 0..3 {
                    t[r][s] = (0..3).map(|i| G[r][i] * g[i * 3 + s] as f64).sum();
                }
            }
            for r in 0..6 {
                for q in 0..6 {
                    let v: f64 = (0..3).map(|s| t[r][s] * G[q][s]).sum();
                    u[((r * 6 + q) * k + kk) * c + cc] = v as f32;
                }
            }
        }
    }
    u
}

/// Forward: `y (N, K, H, W) = conv3x3(x (N, C, H, W), w (K, C, 3, 3)) (+ bias)`, then max(·, 0) when `relu`;
/// with `moments`, each output plane's (mean, M2) (n-major, as [`crate::kernels::moments::plane_moments_into`]). Every element of `y` is
/// written. Panics unless [`applies`] and on inconsistent lengths.
pub fn forward(
    s: WinoShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    moments: Option<&mut [(f64, f64)]>,
    y: &mut [f32],
) {
    assert!(applies(&s), "F(4x4, 3x3) does not take {s:?}");
    let (is, os) = (s.c * s.h * s.w, s.k * s.h * s.w);
    assert_eq!(x.len(), s.n * is, "input length");
    assert_eq!(y.len(), s.n * os, "output length");
    if let Some(b) = bias {
        assert_eq!(b.len(), s.k, "bias length");
    }
    if let Some(m) = &moments {
        assert_eq!(m.len(), s.n * s.k, "moments length");
    }
    if s.n == 0 {
        return;
    }
    let u = transform_weights(w, s.k, s.c);
    let packed = pack_weights(&u, s.k, s.c, false);
    run_forward(
        &s,
        &Transforms {
            points: P,
            tiles: tiles(&s),
            input: &|imgs, xc, v, _| input_transform(&s, xc, imgs, v),
        },
        x,
        (&packed.0, packed.1),
        os,
        y,
        moments,
        &|imgs, ks, m, yc| output_transform(&s, m, imgs, ks, bias, relu, yc),
    );
}

/// Backward: writes dx (when given; every element) and adds the weight gradient to `dw` (K, C, 3, 3) and, when
/// given, Σ dy per output channel to `db`. The weight and bias gradients are summed in a fixed order (bitwise the
/// same for any number of threads).
pub fn backward(
    s: WinoShape,
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f64]>,
) {
    assert!(applies(&s), "F(4x4, 3x3) does not take {s:?}");
    let (is, os) = (s.c * s.h * s.w, s.k * s.h * s.w);
    assert_eq!(x.len(), s.n * is, "input length");
    assert_eq!(dy.len(), s.n * os, "dy length");
    assert_eq!(dw.len(), s.k * s.c * 9, "dweight length");
    if let Some(d) = &dx {
        assert_eq!(d.len(), x.len(), "dx length");
    }
    if let Some(d) = &db {
        assert_eq!(d.len(), s.k, "dbias length");
    }
    if s.n == 0 {
        return;
    }
    let packed_t = dx.is_some().then(|| {
        let u = transform_weights(w, s.k, s.c);
        pack_weights(&u, s.k, s.c, true)
    });
    let (du, dbs) = run_backward(
        &s,
        &Transforms {
            points: P,
            tiles: tiles(&s),
            input: &|imgs, xc, v, _| input_transform(&s, xc, imgs, v),
        },
        x,
        dy,
        packed_t.as_ref(),
        dx,
        db.is_some(),
        &|imgs, gc, dm, _| dy_transform(&s, gc, imgs, dm),
        &|imgs, dv, dxc, _| input_adjoint(&s, dv, imgs, dxc),
    );
    // dg = Gᵀ dU G, in f64
    for kk in 0..s.k {
        for cc in 0..s.c {
            let d = |r: usize, q: usize| du[((r * 6 + q) * s.k + kk) * s.c + cc] as f64;
            let mut t = [[0f64; 6]; 3]; // Gᵀ dU
            for a in 0..3 {
                for q in 0..6 {
                    t[a][q] = (0..6).map(|r| G[r][a] * d(r, q)).sum();
                }
            }
            let out = &mut dw[(kk * s.c + cc) * 9..(kk * s.c + cc + 1) * 9];
            for a in 0..3 {
                for b in 0..3 {
                    let v: f64 = (0..6).map(|q| t[a][q] * G[q][b]).sum();
                    out[a * 3 + b] += v as f32;
                }
            }
        }
    }
    if let Some(db) = db {
        for (d, v) in db.iter_mut().zip(&dbs) {
            *d += *v;
        }
    }
}

/// V[p][c][t] = (Bᵀ d B)[p] for every 6×6 input tile of `imgs` images (zero padding).
fn input_transform(s: &WinoShape, x: &[f32], imgs: usize, v: &mut [f32]) {
    let (h, w, c) = (s.h, s.w, s.c);
    let t_all = imgs * tiles(s);
    assert!(x.len() >= imgs * c * h * w && v.len() >= P * c * t_all);
    for img in 0..imgs {
        for ch in 0..c {
            let plane = &x[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
            let dst = ch * t_all + img * tiles(s);
            // SAFETY: AVX-512F is available (`applies`); reads are masked to the plane's h × w values, stores to
            // p·C·T + dst + ty·tw + j with j < tw (masked), below P·C·T.
            unsafe { x86::input_plane(plane, h, w, th(s), tw(s), v, c * t_all, dst) };
        }
    }
}

/// y = Aᵀ M A for every tile (+ bias, then ReLU when `relu`), every element of the `imgs` images written: `m`
/// holds the products of the output channels `ks` only, and `y` their planes (image-major).
fn output_transform(
    s: &WinoShape,
    m: &[f32],
    imgs: usize,
    ks: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    let (h, w, k) = (s.h, s.w, ks.len());
    let t_all = imgs * tiles(s);
    assert!(y.len() >= imgs * k * h * w && m.len() >= P * k * t_all);
    for img in 0..imgs {
        for kk in 0..k {
            let plane = &mut y[(img * k + kk) * h * w..(img * k + kk + 1) * h * w];
            let src = kk * t_all + img * tiles(s);
            let b = bias.map_or(0.0, |b| b[ks.start + kk]);
            // SAFETY: AVX-512F is available; loads within the 36 planes of M (masked to tw lanes), stores masked
            // to the plane's h rows and w columns.
            unsafe { x86::output_plane(m, k * t_all, src, th(s), tw(s), h, w, b, relu, plane) };
        }
    }
}

/// dM[p][k][t] = (A dY Aᵀ)[p] for every 4×4 tile of dy (zero past the edges).
fn dy_transform(s: &WinoShape, dy: &[f32], imgs: usize, dm: &mut [f32]) {
    let (h, w, k) = (s.h, s.w, s.k);
    let t_all = imgs * tiles(s);
    assert!(dy.len() >= imgs * k * h * w && dm.len() >= P * k * t_all);
    for img in 0..imgs {
        for kk in 0..k {
            let plane = &dy[(img * k + kk) * h * w..(img * k + kk + 1) * h * w];
            let dst = kk * t_all + img * tiles(s);
            // SAFETY: as in `input_transform`.
            unsafe { x86::dy_plane(plane, h, w, th(s), tw(s), dm, k * t_all, dst) };
        }
    }
}

/// dx = Σ_tiles B dV Bᵀ, written to every element of the `imgs` images' dx.
fn input_adjoint(s: &WinoShape, dv: &[f32], imgs: usize, dx: &mut [f32]) {
    let (h, w, c) = (s.h, s.w, s.c);
    let t_all = imgs * tiles(s);
    assert!(dx.len() >= imgs * c * h * w && dv.len() >= P * c * t_all);
    for img in 0..imgs {
        for ch in 0..c {
            let plane = &mut dx[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
            let src = ch * t_all + img * tiles(s);
            // SAFETY: as in `output_transform`.
            unsafe { x86::adjoint_plane(dv, c * t_all, src, th(s), tw(s), h, w, plane) };
        }
    }
}

mod kernels;
use kernels::x86;

#[cfg(test)]
mod tests {
    use super::super::tests as wtests;
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                ((*g as f64) - w).abs() <= tol * scale,
                "{what}[{i}]: got {g}, want {w} (tolerance {} )",
                tol * scale
            );
        }
    }

    #[test]
    fn matches_an_f64_direct_convolution_forward_and_backward() {
        if !simd::available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(5);
        // planes of every width 1..=28 over the cases (partial tiles, one-lane rows, the CNN's 28 and 14)
        for &(n, c, k, h, w) in &[
            (7, 8, 8, 28, 28),  // 4 chunks of 2 images, the last partial
            (37, 3, 4, 14, 14), // 7 chunks of 6 images, over more than one group of chunks
            (2, 8, 16, 28, 28),
            (3, 9, 5, 14, 14),
            (2, 3, 4, 7, 7),
            (1, 2, 3, 1, 1),
            (5, 4, 2, 5, 13),
            (2, 16, 8, 9, 27),
            (1, 5, 7, 30, 2),
            (3, 2, 2, 4, 17),
        ] {
            let s = WinoShape { n, c, k, h, w };
            let (x, wt, bias) = wtests::conv_case(&mut rng, s);
            let dy: Vec<f32> = (0..n * k * h * w)
                .map(|_| rng.gen::<f32>() * 2.0 - 1.0)
                .collect();
            let (mut yr, dxr, dwr, dbr) = wtests::reference(s, &x, &wt, &dy);
            for (o, v) in yr.iter_mut().enumerate() {
                *v += bias[(o / (h * w)) % k] as f64;
            }
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut y = vec![f32::NAN; yr.len()];
                    let mut pm = vec![(f64::NAN, f64::NAN); n * k];
                    forward(s, &x, &wt, Some(&bias), false, Some(&mut pm), &mut y);
                    close(&y, &yr, 1e-5, &format!("y {s:?}"));
                    for (i, pl) in y.chunks(h * w).enumerate() {
                        let want = crate::kernels::moments::plane_moments(crate::Isa::Avx512, pl);
                        assert_eq!(pm[i], want, "plane moments {s:?} plane {i}");
                    }
                    let mut yrl = vec![f32::NAN; yr.len()];
                    forward(s, &x, &wt, Some(&bias), true, None, &mut yrl);
                    for (a, b) in yrl.iter().zip(&y) {
                        assert_eq!(a.to_bits(), b.max(0.0).to_bits(), "relu {s:?}");
                    }
                    let mut dx = vec![f32::NAN; x.len()];
                    let mut dw = vec![0.5f32; wt.len()];
                    let mut db = vec![0.25f64; k];
                    backward(s, &x, &dy, &wt, Some(&mut dx), &mut dw, Some(&mut db));
                    close(&dx, &dxr, 1e-5, &format!("dx {s:?}"));
                    let dw0: Vec<f32> = dw.iter().map(|v| v - 0.5).collect();
                    close(&dw0, &dwr, 1e-5, &format!("dw {s:?}"));
                    for (g, r) in db.iter().zip(&dbr) {
                        assert!(
                            (g - 0.25 - r).abs() < 1e-9 * r.abs().max(1.0),
                            "db {g} vs {r}"
                        );
                    }
                    let mut dw2 = vec![0f32; wt.len()];
                    backward(s, &x, &dy, &wt, None, &mut dw2, None);
                    close(&dw2, &dwr, 1e-5, &format!("dw (no dx) {s:?}"));
                });
            }
        }
    }

    #[test]
    fn gradients_are_bitwise_reproducible_for_any_thread_count() {
        if !simd::available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        wtests::assert_reproducible(
            backward,
            WinoShape {
                n: 37,
                c: 8,
                k: 16,
                h: 14,
                w: 14,
            },
        );
    }
}
