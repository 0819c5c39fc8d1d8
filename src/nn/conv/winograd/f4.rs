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

/// Off x86-64 the transforms are never reached: the Winograd path applies only with AVX-512F (`applies`).
#[cfg(not(nv_x86))]
#[allow(clippy::too_many_arguments)]
mod x86 {
    pub unsafe fn input_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    pub unsafe fn output_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: f32,
        _: bool,
        _: &mut [f32],
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    pub unsafe fn dy_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    pub unsafe fn adjoint_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
}

#[cfg(nv_x86)]
#[allow(clippy::too_many_arguments)]
mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn idx(v: [i32; 16]) -> __m512i {
        _mm512_loadu_si512(v.as_ptr() as *const _)
    }

    /// Lanes m = 0..7 of residue `r` of a 32-value row: element 4m + r of the pair (lo, hi).
    #[inline(always)]
    unsafe fn residue(lo: __m512, hi: __m512, r: i32) -> __m512 {
        let mut ix = [0i32; 16];
        for (m, v) in ix.iter_mut().enumerate().take(8) {
            *v = 4 * m as i32 + r;
        }
        _mm512_permutex2var_ps(lo, idx(ix), hi)
    }

    /// v shifted down one lane: lane m holds v[m + 1] (the last lane is don't-care).
    #[inline(always)]
    unsafe fn next(v: __m512) -> __m512 {
        let i = _mm512_castps_si512(v);
        _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(i, i))
    }

    /// v shifted up one lane: lane m holds v[m − 1], lane 0 zero.
    #[inline(always)]
    unsafe fn prev(v: __m512) -> __m512 {
        let i = _mm512_castps_si512(v);
        _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(i, _mm512_setzero_si512()))
    }

    /// (Bᵀ d) for the six values d: the input transform's 1-D step.
    #[inline(always)]
    unsafe fn bt(d: [__m512; 6]) -> [__m512; 6] {
        let (c4, c5, c2) = (
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(-5.0),
            _mm512_set1_ps(2.0),
        );
        let s12 = _mm512_add_ps(d[1], d[2]);
        let s34 = _mm512_add_ps(d[3], d[4]);
        let m12 = _mm512_sub_ps(d[1], d[2]);
        let m43 = _mm512_sub_ps(d[4], d[3]);
        let m31 = _mm512_sub_ps(d[3], d[1]);
        let m42 = _mm512_sub_ps(d[4], d[2]);
        [
            _mm512_fmadd_ps(c4, d[0], _mm512_fmadd_ps(c5, d[2], d[4])),
            _mm512_fnmadd_ps(c4, s12, s34),
            _mm512_fmadd_ps(c4, m12, m43),
            _mm512_fmadd_ps(c2, m31, m42),
            _mm512_fnmadd_ps(c2, m31, m42),
            _mm512_fmadd_ps(c4, d[1], _mm512_fmadd_ps(c5, d[3], d[5])),
        ]
    }

    /// (B v): the adjoint of [`bt`] (Bᵀ's columns).
    #[inline(always)]
    unsafe fn b(v: [__m512; 6]) -> [__m512; 6] {
        let (c4, c5, c2) = (
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(-5.0),
            _mm512_set1_ps(2.0),
        );
        let s12 = _mm512_add_ps(v[1], v[2]);
        let s34 = _mm512_add_ps(v[3], v[4]);
        let m21 = _mm512_sub_ps(v[2], v[1]);
        let m43 = _mm512_sub_ps(v[4], v[3]);
        let m12 = _mm512_sub_ps(v[1], v[2]);
        let m34 = _mm512_sub_ps(v[3], v[4]);
        [
            _mm512_mul_ps(c4, v[0]),
            // 4(v2 − v1 + v5) + 2(v4 − v3)
            _mm512_fmadd_ps(c4, _mm512_add_ps(m21, v[5]), _mm512_mul_ps(c2, m43)),
            // −5 v0 − 4(v1 + v2) − (v3 + v4)
            _mm512_sub_ps(
                _mm512_fmadd_ps(
                    c5,
                    v[0],
                    _mm512_mul_ps(c4, _mm512_sub_ps(_mm512_setzero_ps(), s12)),
                ),
                s34,
            ),
            // (v1 − v2) + 2(v3 − v4) − 5 v5
            _mm512_fmadd_ps(c5, v[5], _mm512_fmadd_ps(c2, m34, m12)),
            _mm512_add_ps(_mm512_add_ps(v[0], s12), s34),
            v[5],
        ]
    }

    /// (Aᵀ m) for six values: the output transform's 1-D step (four outputs).
    #[inline(always)]
    unsafe fn at(m: [__m512; 6]) -> [__m512; 4] {
        let (c2, c4, c8) = (
            _mm512_set1_ps(2.0),
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(8.0),
        );
        let s12 = _mm512_add_ps(m[1], m[2]);
        let d12 = _mm512_sub_ps(m[1], m[2]);
        let s34 = _mm512_add_ps(m[3], m[4]);
        let d34 = _mm512_sub_ps(m[3], m[4]);
        [
            _mm512_add_ps(_mm512_add_ps(m[0], s12), s34),
            _mm512_fmadd_ps(c2, d34, d12),
            _mm512_fmadd_ps(c4, s34, s12),
            _mm512_add_ps(_mm512_fmadd_ps(c8, d34, d12), m[5]),
        ]
    }

    /// (A d) for four values: the dy transform's 1-D step (six outputs).
    #[inline(always)]
    unsafe fn a(d: [__m512; 4]) -> [__m512; 6] {
        let (c2, c4) = (_mm512_set1_ps(2.0), _mm512_set1_ps(4.0));
        let s02 = _mm512_add_ps(d[0], d[2]);
        let s13 = _mm512_add_ps(d[1], d[3]);
        let u = _mm512_fmadd_ps(c4, d[2], d[0]);
        let v = _mm512_mul_ps(c2, _mm512_fmadd_ps(c4, d[3], d[1]));
        [
            d[0],
            _mm512_add_ps(s02, s13),
            _mm512_sub_ps(s02, s13),
            _mm512_add_ps(u, v),
            _mm512_sub_ps(u, v),
            d[3],
        ]
    }

    /// The tile row's six vectors p = 6·pr + pc, pc = 0..6 (the planes of p are `pstride` apart from `base`).
    #[inline(always)]
    unsafe fn load6(base: *const f32, pstride: usize, pr: usize, lanes: __mmask16) -> [__m512; 6] {
        let mut row = [_mm512_setzero_ps(); 6];
        for (pc, v) in row.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_ps(lanes, base.add((pr * 6 + pc) * pstride));
        }
        row
    }

    /// Stores `o` as the tile row's six vectors p = 6·pr + pc (the inverse of [`load6`]).
    #[inline(always)]
    unsafe fn store6(base: *mut f32, pstride: usize, pr: usize, lanes: __mmask16, o: [__m512; 6]) {
        for (pc, v) in o.into_iter().enumerate() {
            _mm512_mask_storeu_ps(base.add((pr * 6 + pc) * pstride), lanes, v);
        }
    }

    fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// The four residues mod 4 of padded row `r` (columns −1..31, zero outside 0..w): lane m of residue k is
    /// column 4m + k − 1. Zero vectors for rows outside 0..h.
    #[inline(always)]
    unsafe fn input_row(plane: &[f32], r: isize, h: usize, w: usize) -> [__m512; 4] {
        if r < 0 || r as usize >= h {
            return [_mm512_setzero_ps(); 4];
        }
        let row = plane.as_ptr().add(r as usize * w);
        // lanes l ↔ column l − 1 (lo) and l + 15 (hi)
        let lo_mask = mask((w + 1).min(16)) & !1;
        let hi_mask = mask(w.saturating_sub(15));
        let lo = _mm512_maskz_loadu_ps(lo_mask, row.wrapping_sub(1));
        let hi = _mm512_maskz_loadu_ps(hi_mask, row.wrapping_add(15));
        [
            residue(lo, hi, 0),
            residue(lo, hi, 1),
            residue(lo, hi, 2),
            residue(lo, hi, 3),
        ]
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_plane(
        plane: &[f32],
        h: usize,
        w: usize,
        th: usize,
        tw: usize,
        v: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        debug_assert!(w <= super::MAX_W && plane.len() >= h * w);
        debug_assert!(35 * pstride + dst + (th - 1) * tw + tw <= v.len());
        let sm = mask(tw);
        let out = v.as_mut_ptr();
        // rows −1.. of the current tile row, reused across the two rows shared with the next
        let mut rows: [[__m512; 4]; 6] = [[_mm512_setzero_ps(); 4]; 6];
        for (i, rw) in rows.iter_mut().enumerate() {
            *rw = input_row(plane, i as isize - 1, h, w);
        }
        for ty in 0..th {
            if ty > 0 {
                rows[0] = rows[4];
                rows[1] = rows[5];
                for i in 2..6 {
                    rows[i] = input_row(plane, (4 * ty + i) as isize - 1, h, w);
                }
            }
            // vertical: Bᵀ over the six rows, per residue
            let mut t = [[_mm512_setzero_ps(); 4]; 6];
            for k in 0..4 {
                let col = bt([
                    rows[0][k], rows[1][k], rows[2][k], rows[3][k], rows[4][k], rows[5][k],
                ]);
                for pr in 0..6 {
                    t[pr][k] = col[pr];
                }
            }
            // horizontal: column j of tile m is residue j mod 4 at lane m + j / 4
            let base = out.add(dst + ty * tw);
            for pr in 0..6 {
                let r = t[pr];
                let o = bt([r[0], r[1], r[2], r[3], next(r[0]), next(r[1])]);
                store6(base, pstride, pr, sm, o);
            }
        }
    }

    /// Interleaves four vectors (lanes m) into a row: out[4m + r] = v[r][m], as two vectors (columns 0..16, 16..32).
    #[inline(always)]
    unsafe fn interleave4(v: [__m512; 4]) -> (__m512, __m512) {
        let mut ia = [0i32; 16];
        for l in 0..16 {
            ia[l] = if l % 2 == 0 {
                (l / 2) as i32
            } else {
                16 + (l / 2) as i32
            };
        }
        let p01 = _mm512_permutex2var_ps(v[0], idx(ia), v[1]); // v0[0] v1[0] v0[1] v1[1] ...
        let p23 = _mm512_permutex2var_ps(v[2], idx(ia), v[3]);
        let (mut il, mut ih) = ([0i32; 16], [0i32; 16]);
        for l in 0..16 {
            let (m, r) = (l / 4, l % 4);
            let pick = |m: usize| {
                if r < 2 {
                    (2 * m + r) as i32
                } else {
                    16 + (2 * m + r - 2) as i32
                }
            };
            il[l] = pick(m);
            ih[l] = pick(m + 4);
        }
        (
            _mm512_permutex2var_ps(p01, idx(il), p23),
            _mm512_permutex2var_ps(p01, idx(ih), p23),
        )
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn output_plane(
        m: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        h: usize,
        w: usize,
        bias: f32,
        relu: bool,
        plane: &mut [f32],
    ) {
        debug_assert!(35 * pstride + src + (th - 1) * tw + tw <= m.len());
        debug_assert!(plane.len() >= h * w);
        let lm = mask(tw);
        let (mlo, mhi) = (mask(w.min(16)), mask(w.saturating_sub(16)));
        let (vb, zero) = (_mm512_set1_ps(bias), _mm512_setzero_ps());
        let out = plane.as_mut_ptr();
        for ty in 0..th {
            let base = m.as_ptr().add(src + ty * tw);
            // horizontal first: per pr, Aᵀ over the six pc
            let mut hz = [[_mm512_setzero_ps(); 4]; 6];
            for pr in 0..6 {
                let row = load6(base, pstride, pr, lm);
                hz[pr] = at(row);
            }
            // vertical: Aᵀ over the six pr, per output column r: yq[r][q]
            let mut yq = [[_mm512_setzero_ps(); 4]; 4];
            for r in 0..4 {
                yq[r] = at([hz[0][r], hz[1][r], hz[2][r], hz[3][r], hz[4][r], hz[5][r]]);
            }
            for q in 0..4 {
                let yrow = 4 * ty + q;
                if yrow >= h {
                    break;
                }
                let (mut lo, mut hi) = interleave4([yq[0][q], yq[1][q], yq[2][q], yq[3][q]]);
                lo = _mm512_add_ps(lo, vb);
                hi = _mm512_add_ps(hi, vb);
                if relu {
                    lo = _mm512_max_ps(lo, zero);
                    hi = _mm512_max_ps(hi, zero);
                }
                let o = out.add(yrow * w);
                _mm512_mask_storeu_ps(o, mlo, lo);
                _mm512_mask_storeu_ps(o.wrapping_add(16), mhi, hi);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dy_plane(
        plane: &[f32],
        h: usize,
        w: usize,
        th: usize,
        tw: usize,
        dm: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        debug_assert!(35 * pstride + dst + (th - 1) * tw + tw <= dm.len());
        let sm = mask(tw);
        let (mlo, mhi) = (mask(w.min(16)), mask(w.saturating_sub(16)));
        let out = dm.as_mut_ptr();
        for ty in 0..th {
            // the tile row's four dy rows, each split into residues mod 4 (lane m ↔ column 4m + r)
            let mut d = [[_mm512_setzero_ps(); 4]; 4];
            for q in 0..4 {
                let r = 4 * ty + q;
                if r < h {
                    let row = plane.as_ptr().add(r * w);
                    let lo = _mm512_maskz_loadu_ps(mlo, row);
                    let hi = _mm512_maskz_loadu_ps(mhi, row.wrapping_add(16));
                    for k in 0..4 {
                        d[q][k] = residue(lo, hi, k as i32);
                    }
                }
            }
            // vertical: A over the four rows, per residue
            let mut t = [[_mm512_setzero_ps(); 4]; 6];
            for k in 0..4 {
                let col = a([d[0][k], d[1][k], d[2][k], d[3][k]]);
                for pr in 0..6 {
                    t[pr][k] = col[pr];
                }
            }
            let base = out.add(dst + ty * tw);
            for pr in 0..6 {
                let o = a(t[pr]);
                store6(base, pstride, pr, sm, o);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn adjoint_plane(
        dv: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        h: usize,
        w: usize,
        plane: &mut [f32],
    ) {
        debug_assert!(35 * pstride + src + (th - 1) * tw + tw <= dv.len());
        debug_assert!(plane.len() >= h * w);
        let lm = mask(tw);
        let (mlo, mhi) = (mask(w.min(16)), mask(w.saturating_sub(16)));
        let out = plane.as_mut_ptr();
        // accumulated padded rows −1.. of the current tile row: residues mod 4 of columns −1..
        let mut acc = [[_mm512_setzero_ps(); 4]; 6];
        let zero = _mm512_setzero_ps();
        // writes padded row r (index r + 1 in the plane's padded numbering) if it is a real row
        let emit = |r: isize, s: [__m512; 4]| {
            if r < 0 || r as usize >= h {
                return;
            }
            // z[l] = column l − 1: interleave the residues, then drop column −1
            let (zl, zh) = interleave4(s);
            let lo = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                _mm512_castps_si512(zh),
                _mm512_castps_si512(zl),
            ));
            let hi = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                _mm512_castps_si512(zero),
                _mm512_castps_si512(zh),
            ));
            let o = out.add(r as usize * w);
            _mm512_mask_storeu_ps(o, mlo, lo);
            _mm512_mask_storeu_ps(o.wrapping_add(16), mhi, hi);
        };
        for ty in 0..th {
            let base = dv.as_ptr().add(src + ty * tw);
            // horizontal: B over pc, then each window column j to residue j mod 4 at lane m + j / 4
            let mut sres = [[_mm512_setzero_ps(); 4]; 6];
            for pr in 0..6 {
                let row = load6(base, pstride, pr, lm);
                let wv = b(row);
                sres[pr] = [
                    _mm512_add_ps(wv[0], prev(wv[4])),
                    _mm512_add_ps(wv[1], prev(wv[5])),
                    wv[2],
                    wv[3],
                ];
            }
            // vertical: B over pr gives the window's six rows 4ty − 1 + i
            for k in 0..4 {
                let col = b([
                    sres[0][k], sres[1][k], sres[2][k], sres[3][k], sres[4][k], sres[5][k],
                ]);
                for i in 0..6 {
                    acc[i][k] = _mm512_add_ps(acc[i][k], col[i]);
                }
            }
            // rows 4ty − 1 .. 4ty + 2 are complete (the next tile row starts at 4ty + 3)
            for i in 0..4 {
                emit((4 * ty + i) as isize - 1, acc[i]);
            }
            acc[0] = acc[4];
            acc[1] = acc[5];
            for row in acc.iter_mut().skip(2) {
                *row = [zero; 4];
            }
        }
        // the last two window rows
        emit((4 * th) as isize - 1, acc[0]);
        emit((4 * th) as isize, acc[1]);
    }
}

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
