//! Lane-wise building blocks of the normalization kernels.
//!
//! Every reduction keeps `W` independent accumulators over `chunks_exact(W)` so that LLVM turns it into vector
//! code (a plain `iter().sum()` cannot be vectorised: float addition is not associative). The lanes accumulate in
//! `T` for at most 64 values each and are then flushed into `f64`, so sums over hundreds of thousands of `f32`
//! values keep full `f32` precision (as PyTorch's CPU kernels do with `acc_type<float> = double`) while the
//! hot loop stays in packed `f32`.
//!
//! Statistics use a *shift*: the caller subtracts a value close to the mean (the `f32`-rounded mean of a first
//! pass), which makes `x - shift` exact for data concentrated around its mean (Sterbenz), so that even inputs
//! with mean 1e4 and standard deviation 1e-1 keep their variance. Elementwise passes compute in `T`.
//!
//! Every function takes the instruction set first and runs compiled for it (`isa_leaf!` in `kernels/isa.rs`): the
//! generic loops vectorised at its width, and for `f32` the explicit AVX2/FMA reductions and AVX-512
//! streaming stores of `lanes_x86` where it allows them. Each also has a `_with` form,
//! generic over the two flags, for kernels already compiled for a set.

#[cfg(nv_x86)]
use super::cast::{as_f32, as_f32_mut, val_f32};
use super::isa::isa_leaf;
#[cfg(nv_x86)]
use super::lanes_x86 as simd;
use crate::Real;

const W: usize = 16;
/// Chunks of `W` accumulated in `T` before the lane sums are flushed into `f64` (1024 values per flush).
const FLUSH: usize = 64;

isa_leaf! {
    /// Σx.
    pub fn sum / sum_with<T: Real, const X2: bool, const X512: bool>(xs: &[T]) -> f64 {
        #[cfg(nv_x86)]
        if X2 {
            if let Some(x) = as_f32(xs) {
                return unsafe { simd::sum(x, simd::Strided::contiguous(x.len())) };
            }
        }
        let mut total = 0.0f64;
        for blk in xs.chunks(W * FLUSH) {
            let mut acc = [T::zero(); W];
            let mut chunks = blk.chunks_exact(W);
            for c in &mut chunks {
                let c: &[T; W] = c.try_into().expect("chunks_exact");
                for i in 0..W {
                    acc[i] = acc[i] + c[i];
                }
            }
            total += acc.iter().map(|v| v.as_f64()).sum::<f64>();
            total += chunks.remainder().iter().map(|v| v.as_f64()).sum::<f64>();
        }
        total
    }
}

isa_leaf! {
    /// (Σd, Σd²) with d = x - shift.
    pub fn shifted_moments / shifted_moments_with<T: Real, const X2: bool, const X512: bool>(xs: &[T], shift: T) -> (f64, f64) {
        #[cfg(nv_x86)]
        if X2 {
            if let (Some(x), Some(sh)) = (as_f32(xs), val_f32(shift)) {
                return unsafe { simd::shifted_moments(x, simd::Strided::contiguous(x.len()), sh) };
            }
        }
        let (mut t1, mut t2) = (0.0f64, 0.0f64);
        for blk in xs.chunks(W * FLUSH) {
            let mut a1 = [T::zero(); W];
            let mut a2 = [T::zero(); W];
            let mut chunks = blk.chunks_exact(W);
            for c in &mut chunks {
                let c: &[T; W] = c.try_into().expect("chunks_exact");
                for i in 0..W {
                    let d = c[i] - shift;
                    a1[i] = a1[i] + d;
                    a2[i] = a2[i] + d * d;
                }
            }
            for i in 0..W {
                t1 += a1[i].as_f64();
                t2 += a2[i].as_f64();
            }
            for v in chunks.remainder() {
                let d = (*v - shift).as_f64();
                t1 += d;
                t2 += d * d;
            }
        }
        (t1, t2)
    }
}

isa_leaf! {
    /// (Σdy, Σdy·(x - shift)).
    pub fn dy_moments / dy_moments_with<T: Real, const X2: bool, const X512: bool>(dy: &[T], x: &[T], shift: T) -> (f64, f64) {
        #[cfg(nv_x86)]
        if X2 {
            if let (Some(g), Some(v), Some(sh)) = (as_f32(dy), as_f32(x), val_f32(shift)) {
                return unsafe { simd::dy_moments(g, v, simd::Strided::contiguous(v.len()), sh, None) };
            }
        }
        debug_assert_eq!(dy.len(), x.len());
        let (mut t1, mut t2) = (0.0f64, 0.0f64);
        for (bd, bx) in dy.chunks(W * FLUSH).zip(x.chunks(W * FLUSH)) {
            let mut a1 = [T::zero(); W];
            let mut a2 = [T::zero(); W];
            let mut cd = bd.chunks_exact(W);
            let mut cx = bx.chunks_exact(W);
            for (g, v) in (&mut cd).zip(&mut cx) {
                let g: &[T; W] = g.try_into().expect("chunks_exact");
                let v: &[T; W] = v.try_into().expect("chunks_exact");
                for i in 0..W {
                    a1[i] = a1[i] + g[i];
                    a2[i] = a2[i] + g[i] * (v[i] - shift);
                }
            }
            for i in 0..W {
                t1 += a1[i].as_f64();
                t2 += a2[i].as_f64();
            }
            for (g, v) in cd.remainder().iter().zip(cx.remainder()) {
                t1 += g.as_f64();
                t2 += (*g * (*v - shift)).as_f64();
            }
        }
        (t1, t2)
    }
}

isa_leaf! {
    /// As [`dy_moments`], with dy masked by the ReLU that followed: dy is kept where `(x-shift)*s + b > 0`.
    pub fn dy_moments_relu / dy_moments_relu_with<T: Real, const X2: bool, const X512: bool>(dy: &[T], x: &[T], shift: T, s: T, b: T) -> (f64, f64) {
        #[cfg(nv_x86)]
        if X2 {
            if let (Some(g), Some(v), Some(sh), Some(s32), Some(b32)) = (
                as_f32(dy),
                as_f32(x),
                val_f32(shift),
                val_f32(s),
                val_f32(b),
            ) {
                return unsafe { simd::dy_moments(
                    g,
                    v,
                    simd::Strided::contiguous(v.len()),
                    sh,
                    Some((s32, b32)),
                ) };
            }
        }
        let z = T::zero();
        let (mut t1, mut t2) = (0.0f64, 0.0f64);
        for (bd, bx) in dy.chunks(W * FLUSH).zip(x.chunks(W * FLUSH)) {
            let mut a1 = [T::zero(); W];
            let mut a2 = [T::zero(); W];
            let mut cd = bd.chunks_exact(W);
            let mut cx = bx.chunks_exact(W);
            for (g, v) in (&mut cd).zip(&mut cx) {
                let g: &[T; W] = g.try_into().expect("chunks_exact");
                let v: &[T; W] = v.try_into().expect("chunks_exact");
                for i in 0..W {
                    let d = v[i] - shift;
                    let gi = if d * s + b > z { g[i] } else { z };
                    a1[i] = a1[i] + gi;
                    a2[i] = a2[i] + gi * d;
                }
            }
            for i in 0..W {
                t1 += a1[i].as_f64();
                t2 += a2[i].as_f64();
            }
            for (g, v) in cd.remainder().iter().zip(cx.remainder()) {
                let d = *v - shift;
                let gi = if d * s + b > z { *g } else { z };
                t1 += gi.as_f64();
                t2 += (gi * d).as_f64();
            }
        }
        (t1, t2)
    }
}

isa_leaf! {
    /// y = (x - shift)·s + b.
    pub fn affine_shifted / affine_shifted_with<T: Real, const X2: bool, const X512: bool>(x: &[T], y: &mut [T], shift: T, s: T, b: T) {
        for (o, v) in y.iter_mut().zip(x) {
            *o = (*v - shift) * s + b;
        }
    }
}

isa_leaf! {
    /// y = max((x - shift)·s + b, 0).
    pub fn affine_shifted_relu / affine_shifted_relu_with<T: Real, const X2: bool, const X512: bool>(x: &[T], y: &mut [T], shift: T, s: T, b: T) {
        let z = T::zero();
        for (o, v) in y.iter_mut().zip(x) {
            let t = (*v - shift) * s + b;
            *o = if t > z { t } else { z };
        }
    }
}

isa_leaf! {
    /// y = x·a + b (the eval-mode batch norm pass, PyTorch's formula).
    pub fn affine / affine_with<T: Real, const X2: bool, const X512: bool>(x: &[T], y: &mut [T], a: T, b: T) {
        for (o, v) in y.iter_mut().zip(x) {
            *o = *v * a + b;
        }
    }
}

isa_leaf! {
    /// y = max(x·a + b, 0).
    pub fn affine_relu / affine_relu_with<T: Real, const X2: bool, const X512: bool>(x: &[T], y: &mut [T], a: T, b: T) {
        let z = T::zero();
        for (o, v) in y.iter_mut().zip(x) {
            let t = *v * a + b;
            *o = if t > z { t } else { z };
        }
    }
}

isa_leaf! {
    /// dx = dy·k1 + (x - shift)·k2 + k3: the batch-statistics backward once its reductions are known.
    pub fn bwd_dx / bwd_dx_with<T: Real, const X2: bool, const X512: bool>(dy: &[T], x: &[T], dx: &mut [T], shift: T, k1: T, k2: T, k3: T) {
        for ((o, g), v) in dx.iter_mut().zip(dy).zip(x) {
            *o = *g * k1 + (*v - shift) * k2 + k3;
        }
    }
}

isa_leaf! {
    /// [`bwd_dx`] with dy masked by the following ReLU (mask recomputed from x exactly as in the forward).
    #[allow(clippy::too_many_arguments)]
    pub fn bwd_dx_relu / bwd_dx_relu_with<T: Real, const X2: bool, const X512: bool>(
        dy: &[T],
        x: &[T],
        dx: &mut [T],
        shift: T,
        s: T,
        b: T,
        k1: T,
        k2: T,
        k3: T,
    ) {
        let z = T::zero();
        for ((o, g), v) in dx.iter_mut().zip(dy).zip(x) {
            let d = *v - shift;
            let gi = if d * s + b > z { *g } else { z };
            *o = gi * k1 + d * k2 + k3;
        }
    }
}

isa_leaf! {
    /// [`affine_shifted`] / [`affine_shifted_relu`] with streaming stores when `stream` and the build has
    /// AVX-512 (bitwise the same result); call [`stream_fence`] before the output is read by another thread.
    pub fn affine_shifted_to / affine_shifted_to_with<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        y: &mut [T],
        shift: T,
        s: T,
        b: T,
        relu: bool,
        stream: bool,
    ) {
        #[cfg(nv_x86)]
        if X512 && stream {
            if let (Some(xf), Some(yf), Some(sh), Some(sf), Some(bf)) = (
                as_f32(x),
                as_f32_mut(y),
                val_f32(shift),
                val_f32(s),
                val_f32(b),
            ) {
                return unsafe { simd::stream::affine_shifted(xf, yf, sh, sf, bf, relu) };
            }
        }
        let _ = stream;
        if relu {
            affine_shifted_relu_with::<T, X2, X512>(x, y, shift, s, b)
        } else {
            affine_shifted_with::<T, X2, X512>(x, y, shift, s, b)
        }
    }
}

isa_leaf! {
    /// [`bwd_dx`] / [`bwd_dx_relu`] (mask from `relu = Some((s, b))`) with streaming stores when `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn bwd_dx_to / bwd_dx_to_with<T: Real, const X2: bool, const X512: bool>(
        dy: &[T],
        x: &[T],
        dx: &mut [T],
        shift: T,
        relu: Option<(T, T)>,
        k: (T, T, T),
        stream: bool,
    ) {
        #[cfg(nv_x86)]
        if X512 && stream {
            let f = |v: T| val_f32(v);
            if let (Some(gf), Some(xf), Some(of), Some(sh), Some(k1), Some(k2), Some(k3)) = (
                as_f32(dy),
                as_f32(x),
                as_f32_mut(dx),
                f(shift),
                f(k.0),
                f(k.1),
                f(k.2),
            ) {
                let r = relu.map(|(s, b)| (f(s).expect("f32"), f(b).expect("f32")));
                return unsafe { simd::stream::bwd_dx(gf, xf, of, sh, r, k1, k2, k3) };
            }
        }
        let _ = stream;
        match relu {
            Some((s, b)) => bwd_dx_relu_with::<T, X2, X512>(dy, x, dx, shift, s, b, k.0, k.1, k.2),
            None => bwd_dx_with::<T, X2, X512>(dy, x, dx, shift, k.0, k.1, k.2),
        }
    }
}

isa_leaf! {
    /// Writes `dst` from `src` with streaming stores (a plain copy for other element types or builds without
    /// AVX-512, where `KernelOptions::streams` never asks for it). Elementwise passes with no dedicated streaming kernel
    /// compute into an L1-sized scratch chunk and store it with this, which keeps their arithmetic unchanged.
    pub fn store_to / store_to_with<T: Real, const X2: bool, const X512: bool>(src: &[T], dst: &mut [T]) {
        #[cfg(nv_x86)]
        if X512 {
            if let (Some(s), Some(d)) = (as_f32(src), as_f32_mut(dst)) {
                return unsafe { simd::stream::copy(s, d) };
            }
        }
        dst.copy_from_slice(src);
    }
}

/// Orders earlier streaming stores (no-op without AVX-512).
#[inline]
pub fn stream_fence() {
    #[cfg(nv_x86)]
    simd::stream::fence();
}

isa_leaf! {
    /// dx = dy·a (eval-mode / frozen backward).
    pub fn scale / scale_with<T: Real, const X2: bool, const X512: bool>(dy: &[T], dx: &mut [T], a: T) {
        for (o, g) in dx.iter_mut().zip(dy) {
            *o = *g * a;
        }
    }
}

isa_leaf! {
    /// dx = dy·a where (x - shift)·a + b > 0, else 0 (eval-mode BN+ReLU backward; the mask is the forward's).
    pub fn scale_relu / scale_relu_with<T: Real, const X2: bool, const X512: bool>(dy: &[T], x: &[T], dx: &mut [T], shift: T, a: T, b: T) {
        let z = T::zero();
        for ((o, g), v) in dx.iter_mut().zip(dy).zip(x) {
            *o = if (*v - shift) * a + b > z { *g * a } else { z };
        }
    }
}

isa_leaf! {
    /// (Σdy, Σdy·(x - shift)) in the eval-mode backward, for dweight and dbias, with the running mean as the
    /// shift (no cancellation when |mean| ≫ std); masked where (x - shift)·a + b ≤ 0 when `relu` is
    /// `Some((a, b))`.
    pub fn dy_x_sums / dy_x_sums_with<T: Real, const X2: bool, const X512: bool>(dy: &[T], x: &[T], shift: T, relu: Option<(T, T)>) -> (f64, f64) {
        match relu {
            None => dy_moments_with::<T, X2, X512>(dy, x, shift),
            Some((a, b)) => dy_moments_relu_with::<T, X2, X512>(dy, x, shift, a, b),
        }
    }
}

isa_leaf! {
    /// Σx over one channel of an (N, C, S) tensor (chunks `start + k·stride`, `len` values each, k < n).
    pub fn sum_channel / sum_channel_with<T: Real, const X2: bool, const X512: bool>(x: &[T], start: usize, n: usize, len: usize, stride: usize) -> f64 {
        #[cfg(nv_x86)]
        if X2 {
            if let Some(xf) = as_f32(x) {
                return unsafe { simd::sum(
                    xf,
                    simd::Strided {
                        start,
                        n,
                        len,
                        stride,
                    },
                ) };
            }
        }
        (0..n)
            .map(|k| sum_with::<T, X2, X512>(&x[start + k * stride..start + k * stride + len]))
            .sum()
    }
}

isa_leaf! {
    /// (Σd, Σd²), d = x - shift, over one channel of an (N, C, S) tensor.
    pub fn shifted_moments_channel / shifted_moments_channel_with<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        start: usize,
        n: usize,
        len: usize,
        stride: usize,
        shift: T,
    ) -> (f64, f64) {
        #[cfg(nv_x86)]
        if X2 {
            if let (Some(xf), Some(sh)) = (as_f32(x), val_f32(shift)) {
                return unsafe { simd::shifted_moments(
                    xf,
                    simd::Strided {
                        start,
                        n,
                        len,
                        stride,
                    },
                    sh,
                ) };
            }
        }
        let (mut a, mut b) = (0.0, 0.0);
        for k in 0..n {
            let (p, q) = shifted_moments_with::<T, X2, X512>(&x[start + k * stride..start + k * stride + len], shift);
            a += p;
            b += q;
        }
        (a, b)
    }
}

/// Values per chunk of [`block_moments`]: each chunk has its own shift.
pub const BLOCK_CHUNK: usize = 512;

isa_leaf! {
    /// One chunk's shift (the mean of its first 16 values, rounded to `T`) and its shifted sums (Σd, Σd²), d = x - shift.
    /// The head is summed in four interleaved partial sums: a dependency chain of 4 additions instead of 16.
    pub fn chunk_sums / chunk_sums_with<T: Real, const X2: bool, const X512: bool>(blk: &[T]) -> (T, f64, f64) {
        let head = &blk[..blk.len().min(16)];
        let total = if let Ok(h) = <&[T; 16]>::try_from(head) {
            let f = |i: usize| h[i].as_f64();
            let p = |j: usize| ((f(j) + f(j + 4)) + f(j + 8)) + f(j + 12);
            (p(0) + p(1)) + (p(2) + p(3))
        } else {
            // the same order of additions, for a chunk shorter than 16 values
            let mut p = [0.0f64; 4];
            for (i, v) in head.iter().enumerate() {
                p[i % 4] += v.as_f64();
            }
            (p[0] + p[1]) + (p[2] + p[3])
        };
        let k = T::of_f64(total / head.len() as f64);
        let (s1, s2) = shifted_moments_with::<T, X2, X512>(blk, k);
        (k, s1, s2)
    }
}

/// A chunk's (mean, M2) from [`chunk_sums`] over `n` values.
#[inline]
pub fn chunk_moments<T: Real>(k: T, s1: f64, s2: f64, n: f64) -> (f64, f64) {
    let dm = s1 / n;
    (k.as_f64() + dm, (s2 - s1 * dm).max(0.0))
}

/// The (mean, M2) of a block's chunks merged in order (Chan et al.), from each chunk's [`chunk_sums`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkMerge {
    n: f64,
    mean: f64,
    m2: f64,
}

impl ChunkMerge {
    /// Merges the next chunk, of `len` values, with sums `sums` from [`chunk_sums`].
    #[inline]
    pub fn add<T: Real>(&mut self, (k, s1, s2): (T, f64, f64), len: usize) {
        let n = len as f64;
        let (bm, bm2) = chunk_moments(k, s1, s2, n);
        if self.n == 0.0 {
            (self.n, self.mean, self.m2) = (n, bm, bm2);
        } else {
            let tot = self.n + n;
            let delta = bm - self.mean;
            self.mean += delta * n / tot;
            self.m2 += bm2 + delta * delta * self.n * n / tot;
            self.n = tot;
        }
    }

    /// (mean, M2) of the chunks merged so far.
    pub fn moments(&self) -> (f64, f64) {
        (self.mean, self.m2)
    }
}

isa_leaf! {
    /// One-pass (mean, M2) of a contiguous slice, for per-sample statistics (GroupNorm, LayerNorm, InstanceNorm):
    /// [`BLOCK_CHUNK`]-value sub-blocks are each reduced around their own shift (the mean of their first 16 values)
    /// and merged exactly ([`ChunkMerge`]). One read of the data instead of the two of [`sum`] +
    /// [`shifted_moments`], with the same protection against cancellation as long as a sub-block's first values
    /// are not far outliers.
    pub fn block_moments / block_moments_with<T: Real, const X2: bool, const X512: bool>(xs: &[T]) -> (f64, f64) {
        // f32 reaches the packed reductions through `shifted_moments`
        let mut acc = ChunkMerge::default();
        for blk in xs.chunks(BLOCK_CHUNK) {
            acc.add(chunk_sums_with::<T, X2, X512>(blk), blk.len());
        }
        acc.moments()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::Isa;
    use rand::{Rng, SeedableRng};

    /// The passes (generic, and AVX-512 streaming stores) must give bitwise what the scalar formulas give, for every length and alignment of the output (head, packed body, tail), with and without the ReLU
    /// mask; the scalar references below are the generic code's expressions.
    #[test]
    fn packed_passes_are_bitwise_the_scalar_formulas() {
        let mut g = rand_pcg::Pcg64Mcg::seed_from_u64(3);
        let total = 700;
        let x: Vec<f32> = (0..total).map(|_| g.gen::<f32>() * 4.0 - 2.0).collect();
        let dy: Vec<f32> = (0..total).map(|_| g.gen::<f32>() * 2.0 - 1.0).collect();
        let (shift, s, b) = (0.1f32, 1.7f32, -0.3f32);
        let k = (0.9f32, -0.05f32, 0.01f32);
        let same = |p: &[f32], q: &[f32]| p.iter().zip(q).all(|(u, v)| u.to_bits() == v.to_bits());
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
            for start in 0..17 {
                for len in [0usize, 1, 5, 15, 16, 17, 31, 49, 64, 100, 333, 600] {
                    let xs = &x[start..start + len];
                    let gs = &dy[start..start + len];
                    for relu in [false, true] {
                        let clamp = |t: f32| if relu && !(t > 0.0) { 0.0 } else { t };
                        let want: Vec<f32> =
                            xs.iter().map(|&v| clamp((v - shift) * s + b)).collect();
                        for stream in [false, true] {
                            let mut o = vec![7f32; total];
                            affine_shifted_to(
                                isa,
                                xs,
                                &mut o[start..start + len],
                                shift,
                                s,
                                b,
                                relu,
                                stream,
                            );
                            stream_fence();
                            assert!(
                                same(&o[start..start + len], &want),
                                "affine_shifted {start} {len} {relu} {stream}"
                            );
                            assert!(o[..start]
                                .iter()
                                .chain(&o[start + len..])
                                .all(|&v| v == 7.0));
                        }
                        let want: Vec<f32> = xs.iter().map(|&v| clamp(v * s + b)).collect();
                        let mut o = vec![7f32; len];
                        if relu {
                            affine_relu(isa, xs, &mut o, s, b);
                        } else {
                            affine(isa, xs, &mut o, s, b);
                        }
                        assert!(same(&o, &want), "affine {start} {len} {relu}");
                        let mask = relu.then_some((s, b));
                        let want: Vec<f32> = xs
                            .iter()
                            .zip(gs)
                            .map(|(&v, &gv)| {
                                let d = v - shift;
                                let gi = if relu && !(d * s + b > 0.0) { 0.0 } else { gv };
                                gi * k.0 + d * k.1 + k.2
                            })
                            .collect();
                        for stream in [false, true] {
                            let mut o = vec![7f32; total];
                            bwd_dx_to(
                                isa,
                                gs,
                                xs,
                                &mut o[start..start + len],
                                shift,
                                mask,
                                k,
                                stream,
                            );
                            stream_fence();
                            assert!(
                                same(&o[start..start + len], &want),
                                "dx {start} {len} {relu} {stream}"
                            );
                            assert!(o[..start]
                                .iter()
                                .chain(&o[start + len..])
                                .all(|&v| v == 7.0));
                        }
                    }
                    let mut o = vec![0f32; len];
                    store_to(isa, xs, &mut o);
                    stream_fence();
                    assert!(same(&o, xs), "store {start} {len}");
                }
            }
        }
    }
}
