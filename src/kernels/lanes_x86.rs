//! Explicit AVX2/FMA versions of the `f32` reductions in [`lanes`](super::lanes).
//!
//! LLVM does not reliably turn the generic lane-array reductions into packed code (it emitted scalar `vmovss`
//! and `vinsertps` for them on this project's machines), so the `f32` reductions are written with intrinsics:
//! 4 independent 8-wide accumulators, flushed into `f64` every 1024 values, the same accumulation scheme as the
//! generic code. Each is a `#[target_feature]` function: [`lanes`](super::lanes) calls them where the instruction
//! set chosen at run time allows (see [`super::isa`]).

#![allow(unsafe_code)]

#[cfg(nv_x86)]
mod imp {
    use std::arch::x86_64::*;

    const FLUSH: usize = 1024;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum_pd(v: __m256d) -> f64 {
        let lo = _mm256_castpd256_pd128(v);
        let hi = _mm256_extractf128_pd(v, 1);
        let s = _mm_add_pd(lo, hi);
        let h = _mm_unpackhi_pd(s, s);
        _mm_cvtsd_f64(_mm_add_sd(s, h))
    }

    /// Sum of 8 f32 lanes in f64.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum_ps_f64(v: __m256) -> f64 {
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        hsum_pd(_mm256_add_pd(lo, hi))
    }

    /// Chunks `x[start + k·stride .. start + k·stride + len]` for k in 0..n: one channel of an (N, C, S) tensor.
    #[derive(Clone, Copy)]
    pub struct Strided {
        pub start: usize,
        pub n: usize,
        pub len: usize,
        pub stride: usize,
    }

    impl Strided {
        pub fn contiguous(len: usize) -> Self {
            Strided {
                start: 0,
                n: 1,
                len,
                stride: len,
            }
        }
        #[inline(always)]
        fn check(&self, total: usize) {
            if self.n > 0 {
                assert!(
                    self.start + (self.n - 1) * self.stride + self.len <= total,
                    "strided view out of bounds"
                );
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum(xs: &[f32], v: Strided) -> f64 {
        v.check(xs.len());
        let mut total = 0.0f64;
        let mut since = 0usize;
        unsafe {
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let n16 = v.len / 16 * 16;
            for k in 0..v.n {
                let p = xs.as_ptr().add(v.start + k * v.stride);
                let mut i = 0;
                while i < n16 {
                    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p.add(i)));
                    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p.add(i + 8)));
                    i += 16;
                    since += 16;
                    if since >= FLUSH {
                        total += hsum_ps_f64(_mm256_add_ps(a0, a1));
                        a0 = _mm256_setzero_ps();
                        a1 = _mm256_setzero_ps();
                        since = 0;
                    }
                }
                while i < v.len {
                    total += *p.add(i) as f64;
                    i += 1;
                }
            }
            total += hsum_ps_f64(_mm256_add_ps(a0, a1));
        }
        total
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn shifted_moments(xs: &[f32], v: Strided, shift: f32) -> (f64, f64) {
        v.check(xs.len());
        let (mut t1, mut t2) = (0.0f64, 0.0f64);
        let mut since = 0usize;
        unsafe {
            let sh = _mm256_set1_ps(shift);
            let (mut s0, mut s1, mut q0, mut q1) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let n16 = v.len / 16 * 16;
            for k in 0..v.n {
                let p = xs.as_ptr().add(v.start + k * v.stride);
                let mut i = 0;
                while i < n16 {
                    let d0 = _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), sh);
                    let d1 = _mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), sh);
                    s0 = _mm256_add_ps(s0, d0);
                    s1 = _mm256_add_ps(s1, d1);
                    q0 = _mm256_fmadd_ps(d0, d0, q0);
                    q1 = _mm256_fmadd_ps(d1, d1, q1);
                    i += 16;
                    since += 16;
                    if since >= FLUSH {
                        t1 += hsum_ps_f64(_mm256_add_ps(s0, s1));
                        t2 += hsum_ps_f64(_mm256_add_ps(q0, q1));
                        (s0, s1, q0, q1) = (
                            _mm256_setzero_ps(),
                            _mm256_setzero_ps(),
                            _mm256_setzero_ps(),
                            _mm256_setzero_ps(),
                        );
                        since = 0;
                    }
                }
                while i < v.len {
                    let d = (*p.add(i) - shift) as f64;
                    t1 += d;
                    t2 += d * d;
                    i += 1;
                }
            }
            t1 += hsum_ps_f64(_mm256_add_ps(s0, s1));
            t2 += hsum_ps_f64(_mm256_add_ps(q0, q1));
        }
        (t1, t2)
    }

    /// (Σg, Σg·(x-shift)) where g = dy, or dy masked by (x-shift)·s + b > 0 when `relu` is `Some((s, b))`.
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dy_moments(
        dy: &[f32],
        x: &[f32],
        v: Strided,
        shift: f32,
        relu: Option<(f32, f32)>,
    ) -> (f64, f64) {
        v.check(dy.len());
        v.check(x.len());
        let (mut t1, mut t2) = (0.0f64, 0.0f64);
        let mut since = 0usize;
        let (rs, rb) = relu.unwrap_or((0.0, 0.0));
        unsafe {
            let sh = _mm256_set1_ps(shift);
            let (vs, vb, zero) = (_mm256_set1_ps(rs), _mm256_set1_ps(rb), _mm256_setzero_ps());
            let (mut s0, mut s1, mut q0, mut q1) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let n16 = v.len / 16 * 16;
            for k in 0..v.n {
                let off = v.start + k * v.stride;
                let (pd, px) = (dy.as_ptr().add(off), x.as_ptr().add(off));
                let mut i = 0;
                while i < n16 {
                    let mut g0 = _mm256_loadu_ps(pd.add(i));
                    let mut g1 = _mm256_loadu_ps(pd.add(i + 8));
                    let d0 = _mm256_sub_ps(_mm256_loadu_ps(px.add(i)), sh);
                    let d1 = _mm256_sub_ps(_mm256_loadu_ps(px.add(i + 8)), sh);
                    if relu.is_some() {
                        // the forward computes (x - shift)·s + b without FMA contraction; do the same here
                        let z0 = _mm256_add_ps(_mm256_mul_ps(d0, vs), vb);
                        let z1 = _mm256_add_ps(_mm256_mul_ps(d1, vs), vb);
                        g0 = _mm256_and_ps(g0, _mm256_cmp_ps(z0, zero, _CMP_GT_OQ));
                        g1 = _mm256_and_ps(g1, _mm256_cmp_ps(z1, zero, _CMP_GT_OQ));
                    }
                    s0 = _mm256_add_ps(s0, g0);
                    s1 = _mm256_add_ps(s1, g1);
                    q0 = _mm256_fmadd_ps(g0, d0, q0);
                    q1 = _mm256_fmadd_ps(g1, d1, q1);
                    i += 16;
                    since += 16;
                    if since >= FLUSH {
                        t1 += hsum_ps_f64(_mm256_add_ps(s0, s1));
                        t2 += hsum_ps_f64(_mm256_add_ps(q0, q1));
                        (s0, s1, q0, q1) = (
                            _mm256_setzero_ps(),
                            _mm256_setzero_ps(),
                            _mm256_setzero_ps(),
                            _mm256_setzero_ps(),
                        );
                        since = 0;
                    }
                }
                while i < v.len {
                    let d = *px.add(i) - shift;
                    let g = *pd.add(i);
                    let g = if relu.is_some() && !(d * rs + rb > 0.0) {
                        0.0
                    } else {
                        g
                    };
                    t1 += g as f64;
                    t2 += (g * d) as f64;
                    i += 1;
                }
            }
            t1 += hsum_ps_f64(_mm256_add_ps(s0, s1));
            t2 += hsum_ps_f64(_mm256_add_ps(q0, q1));
        }
        (t1, t2)
    }
}

/// Elementwise passes that write with non-temporal (streaming) stores: for outputs much larger than the caches,
/// a normal store first reads the destination line into cache (read-for-ownership) and later evicts it, about
/// twice the memory traffic of the write itself. The arithmetic is the generic code's, operation for operation
/// (separate multiply and add, no FMA), so the results are bitwise the same. Stores are 64-byte aligned: a
/// scalar head runs up to the first aligned element. Callers must [`fence`] before other threads read the output.
#[cfg(nv_x86)]
pub mod stream {
    use std::arch::x86_64::*;

    /// Runs scalar `f(i)` up to the first index whose output address is 64-byte aligned; returns that index.
    #[inline(always)]
    fn head(out: *mut f32, n: usize, mut f: impl FnMut(usize)) -> usize {
        let mis = (out as usize) % 64;
        let skip = if mis == 0 { 0 } else { ((64 - mis) / 4).min(n) };
        for i in 0..skip {
            f(i);
        }
        skip
    }

    /// y = (x - shift)·s + b, then ReLU when `relu`.
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn affine_shifted(x: &[f32], y: &mut [f32], shift: f32, s: f32, b: f32, relu: bool) {
        assert_eq!(x.len(), y.len());
        let n = x.len();
        let one = |x: &[f32], y: &mut [f32], i: usize| {
            let t = (x[i] - shift) * s + b;
            y[i] = if relu && !(t > 0.0) { 0.0 } else { t };
        };
        let yp = y.as_mut_ptr();
        let mut i = head(yp, n, |i| {
            one(x, unsafe { std::slice::from_raw_parts_mut(yp, n) }, i)
        });
        // SAFETY: i + 16 <= n bounds every load and store; stores are 64-byte aligned by `head`.
        unsafe {
            let (vh, vs, vb, z) = (
                _mm512_set1_ps(shift),
                _mm512_set1_ps(s),
                _mm512_set1_ps(b),
                _mm512_setzero_ps(),
            );
            while i + 16 <= n {
                let d = _mm512_sub_ps(_mm512_loadu_ps(x.as_ptr().add(i)), vh);
                let mut t = _mm512_add_ps(_mm512_mul_ps(d, vs), vb);
                if relu {
                    let keep = _mm512_cmp_ps_mask(t, z, _CMP_GT_OQ);
                    t = _mm512_maskz_mov_ps(keep, t);
                }
                _mm512_stream_ps(yp.add(i), t);
                i += 16;
            }
        }
        while i < n {
            one(x, y, i);
            i += 1;
        }
    }

    /// dx = g·k1 + (x - shift)·k2 + k3, g = dy masked by (x - shift)·s + b > 0 when `relu` is `Some((s, b))`.
    #[allow(clippy::too_many_arguments)]
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn bwd_dx(
        dy: &[f32],
        x: &[f32],
        dx: &mut [f32],
        shift: f32,
        relu: Option<(f32, f32)>,
        k1: f32,
        k2: f32,
        k3: f32,
    ) {
        assert_eq!(x.len(), dx.len());
        assert_eq!(dy.len(), dx.len());
        let n = x.len();
        let one = |dx: &mut [f32], i: usize| {
            let d = x[i] - shift;
            let g = match relu {
                Some((s, b)) if !(d * s + b > 0.0) => 0.0,
                _ => dy[i],
            };
            dx[i] = g * k1 + d * k2 + k3;
        };
        let dp = dx.as_mut_ptr();
        let mut i = head(dp, n, |i| {
            one(unsafe { std::slice::from_raw_parts_mut(dp, n) }, i)
        });
        let (rs, rb) = relu.unwrap_or((0.0, 0.0));
        // SAFETY: as in `affine_shifted`.
        unsafe {
            let (vh, v1, v2, v3) = (
                _mm512_set1_ps(shift),
                _mm512_set1_ps(k1),
                _mm512_set1_ps(k2),
                _mm512_set1_ps(k3),
            );
            let (vs, vb, z) = (_mm512_set1_ps(rs), _mm512_set1_ps(rb), _mm512_setzero_ps());
            while i + 16 <= n {
                let d = _mm512_sub_ps(_mm512_loadu_ps(x.as_ptr().add(i)), vh);
                let mut g = _mm512_loadu_ps(dy.as_ptr().add(i));
                if relu.is_some() {
                    let t = _mm512_add_ps(_mm512_mul_ps(d, vs), vb);
                    g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, z, _CMP_GT_OQ), g);
                }
                let r = _mm512_add_ps(
                    _mm512_add_ps(_mm512_mul_ps(g, v1), _mm512_mul_ps(d, v2)),
                    v3,
                );
                _mm512_stream_ps(dp.add(i), r);
                i += 16;
            }
        }
        while i < n {
            one(dx, i);
            i += 1;
        }
    }

    /// dst = src with streaming stores.
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn copy(src: &[f32], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        let n = src.len();
        let dp = dst.as_mut_ptr();
        let mut i = head(dp, n, |i| unsafe { *dp.add(i) = src[i] });
        // SAFETY: i + 16 <= n bounds every access; stores are 64-byte aligned by `head`.
        unsafe {
            while i + 16 <= n {
                _mm512_stream_ps(dp.add(i), _mm512_loadu_ps(src.as_ptr().add(i)));
                i += 16;
            }
        }
        dst[i..].copy_from_slice(&src[i..]);
    }

    /// Orders the streaming stores before whatever follows (they are weakly ordered, even against locks).
    #[inline]
    pub fn fence() {
        // SAFETY: sfence has no preconditions.
        unsafe { _mm_sfence() }
    }
}

#[cfg(nv_x86)]
pub use imp::*;
