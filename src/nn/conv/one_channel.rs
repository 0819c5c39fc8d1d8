//! 3×3 convolution with stride 1 and padding 1 of a single-channel input (the first layer of a network on
//! grayscale images), forward and weight/bias gradient, f32 on AVX-512.
//!
//! With one input channel the general paths do little arithmetic per byte: the implicit-GEMM forward has a
//! reduction of only 9 and copies its output out of a padded layout, and Winograd would multiply 1×K matrices.
//! Here each output row is 9 broadcast-weight FMAs per output channel over 16-lane vectors of three shifted
//! input rows, written once, and the weight gradient is 9 lane-wise dot products per output channel, reduced
//! once per image. Summation order per output: taps in row-major order (0..9), then the bias.

#![allow(unsafe_code)]

use crate::kernels::elementwise::SyncPtr;
use crate::kernels::gemm_avx512 as simd;
use rayon::prelude::*;

/// (N, 1, H, W) input, K output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OneChannelShape {
    pub n: usize,
    pub k: usize,
    pub h: usize,
    pub w: usize,
}

impl OneChannelShape {
    /// (H·W, K), after checking that the kernels can run and that a row fits their two vectors.
    fn checked(&self) -> (usize, usize) {
        assert!(available(), "needs AVX-512F");
        assert!(
            self.w <= MAX_WIDTH && self.w > 0 && self.h > 0,
            "width 1..={MAX_WIDTH}"
        );
        (self.h * self.w, self.k)
    }
}

/// Whether the kernels can run here (AVX-512F).
pub fn available() -> bool {
    simd::available()
}

/// Widest row the kernels handle: two 16-lane vectors per row.
pub const MAX_WIDTH: usize = 32;

/// Forward: `y (N, K, H, W)`, every element written. `w` is (K, 1, 3, 3). With `affine = Some((a, b))` each
/// output channel's value v (after the bias) becomes v·a + b (a rounded product, then a rounded sum: an eval
/// BatchNorm applied in the same pass, see [`super::winograd::forward_affine`]) before the ReLU.
pub fn forward(
    s: OneChannelShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
    y: &mut [f32],
) {
    forward_impl(s, x, w, bias, affine, relu, None, false, y)
}

/// [`forward`] writing `y` channel-last, (N, H, W, K), for a channel-last convolution after it (see
/// [`super::winograd::channel_last`]): each output row is computed as [`forward`] computes it, then transposed.
/// K must be a multiple of 16.
pub fn forward_channel_last(
    s: OneChannelShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
    y: &mut [f32],
) {
    assert!(
        s.k.is_multiple_of(16),
        "channel-last output in multiples of 16 channels"
    );
    forward_impl(s, x, w, bias, affine, relu, None, true, y)
}

/// [`forward`] (no affine, no ReLU) that also reduces every output plane to its (mean, M2) while it is in
/// cache (`moments`: N·K entries, n-major), for a following training BatchNorm (see
/// [`super::winograd::forward_with_moments`]).
pub fn forward_with_moments(
    s: OneChannelShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    moments: &mut [(f64, f64)],
) {
    assert_eq!(moments.len(), s.n * s.k, "one (mean, M2) per output plane");
    forward_impl(s, x, w, bias, None, false, Some(moments), false, y)
}

#[allow(clippy::too_many_arguments)]
fn forward_impl(
    s: OneChannelShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
    moments: Option<&mut [(f64, f64)]>,
    channel_last: bool,
    y: &mut [f32],
) {
    let (hw, k) = s.checked();
    assert_eq!(x.len(), s.n * hw, "input length");
    assert_eq!(y.len(), s.n * k * hw, "output length");
    assert_eq!(w.len(), k * 9, "weight length");
    if let Some(b) = bias {
        assert_eq!(b.len(), k, "bias length");
    }
    if let Some((a, b)) = affine {
        assert!(a.len() == k && b.len() == k, "affine length");
    }
    if s.n == 0 || k == 0 {
        return;
    }
    if channel_last {
        return forward_channel_last_impl(s, x, w, bias, affine, relu, y);
    }
    let min = (4096 / (k * hw)).max(1);
    let mom = crate::kernels::elementwise::optional_chunks(moments, k, s.n);
    y.par_chunks_mut(k * hw)
        .zip(x.par_chunks(hw))
        .zip(mom)
        .with_min_len(min)
        .for_each_init(Vec::new, |pad, ((yi, xi), mi)| {
            padded(xi, s.h, s.w, pad);
            // SAFETY: AVX-512F is available (asserted); the padded plane has (h + 2) rows of MAX_WIDTH + 2
            // values, reads are at rows i..i+3 < h + 2 and columns < w + 2 (masked), writes are masked to the
            // w values of rows < h of each of the k output planes (yi has k·h·w values).
            unsafe { x86::forward_image(pad, s.h, s.w, w, bias, affine, relu, yi) };
            if let Some(mi) = mi {
                crate::kernels::moments::plane_moments_into(yi, hw, mi);
            }
        });
}

/// The channel-last forward: each pixel's K outputs as vectors over output channels, the taps in the same
/// order and with the same operations as the planar kernel (which vectorises over the pixels of a row), so the
/// values are bitwise its values. Below one image per thread, each image's rows are split over the threads.
fn forward_channel_last_impl(
    s: OneChannelShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
    y: &mut [f32],
) {
    let (hw, k) = (s.h * s.w, s.k);
    // the weights tap-major, `wt[tap·k + o] = w[o·9 + tap]`, so that a tap's K weights are contiguous
    let wt: Vec<f32> = (0..9 * k).map(|i| w[(i % k) * 9 + i / k]).collect();
    let threads = rayon::current_num_threads();
    let image = |xi: &[f32], yi: &mut [f32], pad: &mut Vec<f32>| {
        padded(xi, s.h, s.w, pad);
        let out = &SyncPtr(yi.as_mut_ptr());
        let parts = if s.n < threads { threads.min(s.h) } else { 1 };
        let pad: &[f32] = pad;
        let ep = (bias, affine, relu);
        (0..parts).into_par_iter().for_each(|b| {
            let rows = (b * s.h / parts, (b + 1) * s.h / parts);
            // SAFETY: AVX-512F is available (asserted); the padded plane has (h + 2) rows of MAX_WIDTH + 2
            // values and the taps of output (i, x) read row i + di < h + 2 at column x + dj < w + 2; the stores
            // are the K values of the pixels of rows `rows` of this image (k·h·w values), which no other part
            // writes, and the image's output outlives the loop.
            unsafe { x86::forward_rows_cl(pad, rows, s.w, &wt, ep, out.0) };
        });
    };
    if s.n < threads {
        let mut pad = Vec::new();
        for (yi, xi) in y.chunks_mut(k * hw).zip(x.chunks(hw)) {
            image(xi, yi, &mut pad);
        }
    } else {
        y.par_chunks_mut(k * hw)
            .zip(x.par_chunks(hw))
            .for_each_init(Vec::new, |pad, (yi, xi)| image(xi, yi, pad));
    }
}

/// Adds the weight gradient (K, 1, 3, 3) to `dw` and, when given, Σ dy per channel to `db`. The per-image sums
/// are accumulated in f64, in image order, so the result does not depend on the number of threads.
pub fn backward_params(
    s: OneChannelShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: Option<&mut [f64]>,
) {
    let (hw, k) = s.checked();
    assert_eq!(dy.len(), s.n * k * hw, "dy length");
    backward_params_with(s, x, Dy::<fn(usize, &mut [f32])>::Whole(dy), dw, db)
}

/// [`backward_params`] with dy produced plane by plane: `fill(p, out)` writes plane p (= n·K + kk) of dy into
/// `out` (H·W values). Each image's K planes go into a per-thread buffer that stays in cache, so a dy that
/// is computed from other tensors (a BatchNorm's dx) is never written out whole.
pub fn backward_params_from_planes(
    s: OneChannelShape,
    x: &[f32],
    fill: impl Fn(usize, &mut [f32]) + Sync,
    dw: &mut [f32],
    db: Option<&mut [f64]>,
) {
    backward_params_with(s, x, Dy::Planes(fill), dw, db)
}

/// Where the weight gradient's dy comes from.
enum Dy<'a, F> {
    Whole(&'a [f32]),
    Planes(F),
}

/// The weight and bias gradients, image by image.
fn backward_params_with<F: Fn(usize, &mut [f32]) + Sync>(
    s: OneChannelShape,
    x: &[f32],
    dy: Dy<'_, F>,
    dw: &mut [f32],
    db: Option<&mut [f64]>,
) {
    let (hw, k) = s.checked();
    assert_eq!(x.len(), s.n * hw, "input length");
    assert_eq!(dw.len(), k * 9, "dweight length");
    if s.n == 0 || k == 0 {
        return;
    }
    // per image: k·9 weight sums and k bias sums, in f64
    let per: Vec<Vec<f64>> = x
        .par_chunks(hw)
        .enumerate()
        .map_init(
            || (Vec::new(), Vec::<f32>::new()),
            |(pad, buf), (n, xi)| {
                padded(xi, s.h, s.w, pad);
                let gi: &[f32] = match &dy {
                    Dy::Whole(d) => &d[n * k * hw..(n + 1) * k * hw],
                    Dy::Planes(fill) => {
                        buf.resize(k * hw, 0.0);
                        for (kk, plane) in buf.chunks_mut(hw).enumerate() {
                            fill(n * k + kk, plane);
                        }
                        &buf[..]
                    }
                };
                let mut out = vec![0f64; k * 10];
                // SAFETY: as in `forward`; dy reads are masked to the w values of rows < h of each plane
                // (gi has k·h·w values).
                unsafe { x86::wgrad_image(pad, s.h, s.w, gi, k, &mut out) };
                out
            },
        )
        .collect();
    let mut acc = vec![0f64; k * 10];
    for p in &per {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += *v;
        }
    }
    for (o, d) in dw.iter_mut().enumerate() {
        *d += acc[(o / 9) * 10 + o % 9] as f32;
    }
    if let Some(db) = db {
        for (o, d) in db.iter_mut().enumerate() {
            *d += acc[o * 10 + 9];
        }
    }
}

/// The input gradient: `dx (N, 1, H, W)` (every element written) from `dy (N, K, H, W)` and `w (K, 1, 3, 3)`.
pub fn backward_data(s: OneChannelShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (hw, k) = s.checked();
    assert_eq!(dy.len(), s.n * k * hw, "dy length");
    assert_eq!(dx.len(), s.n * hw, "dx length");
    assert_eq!(w.len(), k * 9, "weight length");
    if k == 0 {
        dx.fill(0.0);
        return;
    }
    dx.par_chunks_mut(hw)
        .zip(dy.par_chunks(k * hw))
        .for_each_init(Vec::new, |pads: &mut Vec<f32>, (dxi, gi)| {
            let plane = (s.h + 2) * (MAX_WIDTH + 2);
            pads.resize(k * plane, 0.0);
            let mut one = Vec::new();
            for (o, g) in gi.chunks_exact(hw).enumerate() {
                padded(g, s.h, s.w, &mut one);
                pads[o * plane..(o + 1) * plane].copy_from_slice(&one);
            }
            // SAFETY: AVX-512F is available (asserted); reads stay in the k padded planes (rows < h + 2,
            // columns < w + 2, masked), writes are masked to the h rows of w values of dxi.
            unsafe { x86::data_image(pads, s.h, s.w, w, dxi) };
        });
}

/// The plane with a zero border: (h + 2) rows of MAX_WIDTH + 2 values, the input at rows 1..=h, columns 1..=w.
fn padded(x: &[f32], h: usize, w: usize, pad: &mut Vec<f32>) {
    let pw = MAX_WIDTH + 2;
    pad.clear();
    pad.resize((h + 2) * pw, 0.0);
    for (r, row) in x.chunks_exact(w).enumerate() {
        pad[(r + 1) * pw + 1..(r + 1) * pw + 1 + w].copy_from_slice(row);
    }
}

#[cfg(nv_x86)]
mod x86 {
    use super::MAX_WIDTH;
    use std::arch::x86_64::*;

    use crate::kernels::gemm_avx512::lane_mask as mask;

    /// The upper 8 lanes of a 16-lane vector.
    #[inline(always)]
    unsafe fn hi256(v: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))
    }

    /// dx of one image: Σ over output channels o and taps of w[o][8 - tap] · (dy[o] shifted by the tap), from
    /// the padded dy planes (`pads`: k planes of (h + 2) × (MAX_WIDTH + 2)).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn data_image(pads: &[f32], h: usize, w: usize, wt: &[f32], dx: &mut [f32]) {
        let (m0, m1) = (mask(w), mask(w.saturating_sub(16)));
        let k = wt.len() / 9;
        let plane = (h + 2) * (MAX_WIDTH + 2);
        let zero = _mm512_setzero_ps();
        let dp = dx.as_mut_ptr();
        for i in 0..h {
            let (mut a0, mut a1) = (zero, zero);
            for o in 0..k {
                let t = taps(&pads[o * plane..(o + 1) * plane], i, m0, m1);
                for (tap, v) in t.iter().enumerate() {
                    let c = _mm512_set1_ps(*wt.get_unchecked(o * 9 + 8 - tap));
                    a0 = _mm512_fmadd_ps(v[0], c, a0);
                    a1 = _mm512_fmadd_ps(v[1], c, a1);
                }
            }
            _mm512_mask_storeu_ps(dp.add(i * w), m0, a0);
            if w > 16 {
                _mm512_mask_storeu_ps(dp.add(i * w + 16), m1, a1);
            }
        }
    }

    /// The 9 shifted input vectors (two halves each) of output row i: tap (di, dj) reads padded row i + di
    /// from column dj.
    #[inline(always)]
    unsafe fn taps(pad: &[f32], i: usize, m0: __mmask16, m1: __mmask16) -> [[__m512; 2]; 9] {
        let pw = MAX_WIDTH + 2;
        let p = pad.as_ptr();
        let mut t = [[_mm512_setzero_ps(); 2]; 9];
        for di in 0..3 {
            for dj in 0..3 {
                let q = p.add((i + di) * pw + dj);
                t[di * 3 + dj] = [
                    _mm512_maskz_loadu_ps(m0, q),
                    _mm512_maskz_loadu_ps(m1, q.add(16)),
                ];
            }
        }
        t
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn forward_image(
        pad: &[f32],
        h: usize,
        w: usize,
        wt: &[f32],
        bias: Option<&[f32]>,
        affine: Option<(&[f32], &[f32])>,
        relu: bool,
        y: &mut [f32],
    ) {
        let (m0, m1) = (mask(w), mask(w.saturating_sub(16)));
        let k = wt.len() / 9;
        let zero = _mm512_setzero_ps();
        let yp = y.as_mut_ptr();
        for i in 0..h {
            let t = taps(pad, i, m0, m1);
            for o in 0..k {
                let (mut a0, mut a1) = (zero, zero);
                for (tap, v) in t.iter().enumerate() {
                    let c = _mm512_set1_ps(*wt.get_unchecked(o * 9 + tap));
                    a0 = _mm512_fmadd_ps(v[0], c, a0);
                    a1 = _mm512_fmadd_ps(v[1], c, a1);
                }
                if let Some(b) = bias {
                    let vb = _mm512_set1_ps(*b.get_unchecked(o));
                    a0 = _mm512_add_ps(a0, vb);
                    a1 = _mm512_add_ps(a1, vb);
                }
                if let Some((a, b)) = affine {
                    let (va, vb) = (
                        _mm512_set1_ps(*a.get_unchecked(o)),
                        _mm512_set1_ps(*b.get_unchecked(o)),
                    );
                    a0 = _mm512_add_ps(_mm512_mul_ps(a0, va), vb);
                    a1 = _mm512_add_ps(_mm512_mul_ps(a1, va), vb);
                }
                if relu {
                    a0 = _mm512_max_ps(a0, zero);
                    a1 = _mm512_max_ps(a1, zero);
                }
                let out = yp.add((o * h + i) * w);
                _mm512_mask_storeu_ps(out, m0, a0);
                if w > 16 {
                    _mm512_mask_storeu_ps(out.add(16), m1, a1);
                }
            }
        }
    }

    /// Rows `r0..r1` of the channel-last forward: `y[(i·w + x)·k + o]` for every output pixel (i, x) of those
    /// rows, from the padded plane and the tap-major weights `wt` (9 × k, k a multiple of 16). Per output: the
    /// nine taps' fused multiply-adds from zero in tap order, then bias, affine and ReLU, as [`forward_image`].
    #[allow(clippy::type_complexity)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn forward_rows_cl(
        pad: &[f32],
        (r0, r1): (usize, usize),
        w: usize,
        wt: &[f32],
        ep: (Option<&[f32]>, Option<(&[f32], &[f32])>, bool),
        y: *mut f32,
    ) {
        let k = wt.len() / 9;
        for i in r0..r1 {
            let mut x0 = 0;
            while x0 < w {
                let quad = x0 + 4 <= w;
                let mut kk = 0;
                while kk < k {
                    let two = kk + 32 <= k;
                    match (quad, two) {
                        (true, true) => {
                            pixels_cl::<4, 2>(pad, i, x0, wt, kk, ep, y.add((i * w + x0) * k))
                        }
                        (true, false) => {
                            pixels_cl::<4, 1>(pad, i, x0, wt, kk, ep, y.add((i * w + x0) * k))
                        }
                        (false, true) => {
                            pixels_cl::<1, 2>(pad, i, x0, wt, kk, ep, y.add((i * w + x0) * k))
                        }
                        (false, false) => {
                            pixels_cl::<1, 1>(pad, i, x0, wt, kk, ep, y.add((i * w + x0) * k))
                        }
                    }
                    kk += if two { 32 } else { 16 };
                }
                x0 += if quad { 4 } else { 1 };
            }
        }
    }

    /// P pixels from (i, x0) on, output channels kk..kk + 16·NV: see [`forward_rows_cl`].
    #[allow(clippy::type_complexity)]
    #[inline(always)]
    unsafe fn pixels_cl<const P: usize, const NV: usize>(
        pad: &[f32],
        i: usize,
        x0: usize,
        wt: &[f32],
        kk: usize,
        (bias, affine, relu): (Option<&[f32]>, Option<(&[f32], &[f32])>, bool),
        y: *mut f32,
    ) {
        let k = wt.len() / 9;
        let pw = MAX_WIDTH + 2;
        let zero = _mm512_setzero_ps();
        let mut acc = [[zero; NV]; P];
        for tap in 0..9 {
            let (di, dj) = (tap / 3, tap % 3);
            let wr = wt.as_ptr().add(tap * k + kk);
            let wv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(wr.add(16 * v)));
            let row = pad.as_ptr().add((i + di) * pw + x0 + dj);
            for (p, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*row.add(p));
                for (x, c) in a.iter_mut().zip(wv) {
                    *x = _mm512_fmadd_ps(xv, c, *x);
                }
            }
        }
        for (p, a) in acc.iter().enumerate() {
            for (v, &x) in a.iter().enumerate() {
                let o = kk + 16 * v;
                let mut r = x;
                if let Some(b) = bias {
                    r = _mm512_add_ps(r, _mm512_loadu_ps(b.as_ptr().add(o)));
                }
                if let Some((a, b)) = affine {
                    let (va, vb) = (
                        _mm512_loadu_ps(a.as_ptr().add(o)),
                        _mm512_loadu_ps(b.as_ptr().add(o)),
                    );
                    r = _mm512_add_ps(_mm512_mul_ps(r, va), vb);
                }
                if relu {
                    r = _mm512_max_ps(r, zero);
                }
                _mm512_storeu_ps(y.add(p * k + o), r);
            }
        }
    }

    /// Per output channel o: out[o·10 + tap] = Σ dy·x over the image for each of the 9 taps, out[o·10 + 9] = Σ dy.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn wgrad_image(
        pad: &[f32],
        h: usize,
        w: usize,
        dy: &[f32],
        k: usize,
        out: &mut [f64],
    ) {
        let (m0, m1) = (mask(w), mask(w.saturating_sub(16)));
        let zero = _mm512_setzero_ps();
        let gp = dy.as_ptr();
        for o in 0..k {
            let mut acc = [zero; 10];
            let mut bsum = _mm512_setzero_pd();
            for i in 0..h {
                let t = taps(pad, i, m0, m1);
                let g = gp.add((o * h + i) * w);
                let g0 = _mm512_maskz_loadu_ps(m0, g);
                let g1 = _mm512_maskz_loadu_ps(m1, g.add(16.min(w)));
                for (tap, v) in t.iter().enumerate() {
                    acc[tap] = _mm512_fmadd_ps(v[0], g0, acc[tap]);
                    acc[tap] = _mm512_fmadd_ps(v[1], g1, acc[tap]);
                }
                // the bias sum in f64 (exact for these f32 values up to f64 rounding)
                let g = _mm512_add_pd(
                    _mm512_add_pd(
                        _mm512_cvtps_pd(_mm512_castps512_ps256(g0)),
                        _mm512_cvtps_pd(hi256(g0)),
                    ),
                    _mm512_add_pd(
                        _mm512_cvtps_pd(_mm512_castps512_ps256(g1)),
                        _mm512_cvtps_pd(hi256(g1)),
                    ),
                );
                bsum = _mm512_add_pd(bsum, g);
            }
            out[o * 10 + 9] += _mm512_reduce_add_pd(bsum);
            for (j, a) in acc.iter().take(9).enumerate() {
                // lanes to f64 before the horizontal sum
                let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(*a));
                let hi = _mm512_cvtps_pd(hi256(*a));
                out[o * 10 + j] += _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
            }
        }
    }
}

#[cfg(not(nv_x86))]
mod x86 {
    // The public entry points assert `available()`, which is false off x86-64.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_image(
        _: &[f32],
        _: usize,
        _: usize,
        _: &[f32],
        _: Option<&[f32]>,
        _: Option<(&[f32], &[f32])>,
        _: bool,
        _: &mut [f32],
    ) {
        unreachable!("needs AVX-512F")
    }
    #[allow(clippy::type_complexity)]
    pub unsafe fn forward_rows_cl(
        _: &[f32],
        _: (usize, usize),
        _: usize,
        _: &[f32],
        _: (Option<&[f32]>, Option<(&[f32], &[f32])>, bool),
        _: *mut f32,
    ) {
        unreachable!("needs AVX-512F")
    }
    pub unsafe fn wgrad_image(_: &[f32], _: usize, _: usize, _: &[f32], _: usize, _: &mut [f64]) {
        unreachable!("needs AVX-512F")
    }
    pub unsafe fn data_image(_: &[f32], _: usize, _: usize, _: &[f32], _: &mut [f32]) {
        unreachable!("needs AVX-512F")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The channel-last forward is the planar forward's values, transposed, bit for bit: every epilogue,
    /// widths with and without a partial group of 4 pixels, 16 to 48 channels, rows split over 1 to 3 threads.
    #[test]
    fn channel_last_is_bitwise_the_planar_forward() {
        if !available() {
            return;
        }
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(4);
        for &(n, k, h, w) in &[
            (1, 32, 28, 28),
            (3, 16, 5, 7),
            (2, 48, 3, 32),
            (1, 16, 2, 1),
        ] {
            let s = OneChannelShape { n, k, h, w };
            let x: Vec<f32> = (0..n * h * w).map(|_| rng.gen::<f32>() - 0.5).collect();
            let wt: Vec<f32> = (0..k * 9).map(|_| rng.gen::<f32>() - 0.5).collect();
            let b: Vec<f32> = (0..k).map(|_| rng.gen::<f32>() - 0.5).collect();
            let a: Vec<f32> = (0..k).map(|_| rng.gen::<f32>() - 0.5).collect();
            for (bias, affine, relu) in [
                (None, None, false),
                (Some(&b[..]), None, true),
                (None, Some((&a[..], &b[..])), true),
                (Some(&b[..]), Some((&a[..], &b[..])), false),
            ] {
                let mut planar = vec![0.0; n * k * h * w];
                forward(s, &x, &wt, bias, affine, relu, &mut planar);
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut cl = vec![f32::NAN; n * k * h * w];
                    pool.install(|| forward_channel_last(s, &x, &wt, bias, affine, relu, &mut cl));
                    for img in 0..n {
                        for o in 0..k {
                            for p in 0..h * w {
                                let want = planar[(img * k + o) * h * w + p];
                                let got = cl[(img * h * w + p) * k + o];
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{s:?} threads {threads}: image {img}, channel {o}, pixel {p}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_an_f64_direct_convolution() {
        if !available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(3);
        for &(n, k, h, w) in &[
            (3, 5, 28, 28),
            (2, 3, 7, 9),
            (1, 4, 1, 1),
            (2, 2, 5, 32),
            (3, 6, 4, 16),
        ] {
            let s = OneChannelShape { n, k, h, w };
            let x: Vec<f32> = (0..n * h * w).map(|_| rng.gen::<f32>() - 0.5).collect();
            let wt: Vec<f32> = (0..k * 9).map(|_| rng.gen::<f32>() - 0.5).collect();
            let b: Vec<f32> = (0..k).map(|_| rng.gen::<f32>() - 0.5).collect();
            let dy: Vec<f32> = (0..n * k * h * w).map(|_| rng.gen::<f32>() - 0.5).collect();
            let at = |img: usize, i: isize, j: isize| {
                if i < 0 || j < 0 || i >= h as isize || j >= w as isize {
                    0.0
                } else {
                    x[img * h * w + i as usize * w + j as usize] as f64
                }
            };
            let mut y_ref = vec![0f64; n * k * h * w];
            let mut dw_ref = vec![0f64; k * 9];
            let mut db_ref = vec![0f64; k];
            let mut dx_ref = vec![0f64; n * h * w];
            for img in 0..n {
                for o in 0..k {
                    for i in 0..h {
                        for j in 0..w {
                            let yi = ((img * k + o) * h + i) * w + j;
                            let mut v = b[o] as f64;
                            for tap in 0..9 {
                                let xv = at(
                                    img,
                                    i as isize + (tap / 3) as isize - 1,
                                    j as isize + (tap % 3) as isize - 1,
                                );
                                v += wt[o * 9 + tap] as f64 * xv;
                                dw_ref[o * 9 + tap] += dy[yi] as f64 * xv;
                                let (ii, jj) = (
                                    i as isize + (tap / 3) as isize - 1,
                                    j as isize + (tap % 3) as isize - 1,
                                );
                                if ii >= 0 && jj >= 0 && ii < h as isize && jj < w as isize {
                                    dx_ref[img * h * w + ii as usize * w + jj as usize] +=
                                        dy[yi] as f64 * wt[o * 9 + tap] as f64;
                                }
                            }
                            y_ref[yi] = v;
                            db_ref[o] += dy[yi] as f64;
                        }
                    }
                }
            }
            for relu in [false, true] {
                let mut y = vec![f32::NAN; y_ref.len()];
                forward(s, &x, &wt, Some(&b), None, relu, &mut y);
                for (g, r) in y.iter().zip(&y_ref) {
                    let r = if relu { r.max(0.0) } else { *r };
                    assert!(
                        (*g as f64 - r).abs() < 1e-5,
                        "{s:?} relu {relu}: {g} vs {r}"
                    );
                }
            }
            let mut dw = vec![0.25f32; k * 9];
            let mut db = vec![0f64; k];
            backward_params(s, &x, &dy, &mut dw, Some(&mut db));
            let scale = dw_ref.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (g, r) in dw.iter().zip(&dw_ref) {
                assert!(
                    (*g as f64 - 0.25 - r).abs() < 1e-5 * scale,
                    "{s:?} dw: {g} vs {r}"
                );
            }
            for (g, r) in db.iter().zip(&db_ref) {
                assert!(
                    (g - r).abs() < 1e-9 * r.abs().max(1.0),
                    "{s:?} db: {g} vs {r}"
                );
            }
            let mut dx = vec![f32::NAN; n * h * w];
            backward_data(s, &dy, &wt, &mut dx);
            for (g, r) in dx.iter().zip(&dx_ref) {
                assert!((*g as f64 - r).abs() < 1e-5, "{s:?} dx: {g} vs {r}");
            }
        }
    }
}
