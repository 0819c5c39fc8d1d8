//! Lane-wise building blocks of the normalization kernels.
//!
//! Every reduction keeps `W` independent `f64` accumulators over `chunks_exact(W)` so that LLVM turns it into
//! vector code (a plain `iter().sum()` cannot be vectorised: float addition is not associative). Inputs are
//! converted to `f64` before they are accumulated, so sums over hundreds of thousands of `f32` values keep full
//! `f32` precision, the same choice PyTorch's CPU kernels make (`acc_type<float>` is `double`).
//!
//! Statistics use a *shift*: the caller subtracts a value close to the mean (the `f32`-rounded mean of a first
//! pass), which makes `x - shift` exact for data concentrated around its mean (Sterbenz), so that even inputs
//! with mean 1e4 and standard deviation 1e-1 keep their variance. Elementwise passes compute in `T`.

use crate::Real;

const W: usize = 16;

/// Σx.
#[inline]
pub fn sum<T: Real>(xs: &[T]) -> f64 {
    let mut acc = [0.0f64; W];
    let mut chunks = xs.chunks_exact(W);
    for c in &mut chunks {
        for i in 0..W {
            acc[i] += c[i].as_f64();
        }
    }
    let mut s: f64 = chunks.remainder().iter().map(|v| v.as_f64()).sum();
    s += acc.iter().sum::<f64>();
    s
}

/// (Σd, Σd²) with d = x - shift.
#[inline]
pub fn shifted_moments<T: Real>(xs: &[T], shift: T) -> (f64, f64) {
    let sh = shift.as_f64();
    let mut a1 = [0.0f64; W];
    let mut a2 = [0.0f64; W];
    let mut chunks = xs.chunks_exact(W);
    for c in &mut chunks {
        for i in 0..W {
            let d = (c[i] - shift).as_f64();
            a1[i] += d;
            a2[i] += d * d;
        }
    }
    let (mut s1, mut s2) = (0.0, 0.0);
    for v in chunks.remainder() {
        let d = v.as_f64() - sh;
        s1 += d;
        s2 += d * d;
    }
    (s1 + a1.iter().sum::<f64>(), s2 + a2.iter().sum::<f64>())
}

/// (Σdy, Σdy·(x - shift)).
#[inline]
pub fn dy_moments<T: Real>(dy: &[T], x: &[T], shift: T) -> (f64, f64) {
    debug_assert_eq!(dy.len(), x.len());
    let mut a1 = [0.0f64; W];
    let mut a2 = [0.0f64; W];
    let mut cd = dy.chunks_exact(W);
    let mut cx = x.chunks_exact(W);
    for (g, v) in (&mut cd).zip(&mut cx) {
        for i in 0..W {
            let gi = g[i].as_f64();
            a1[i] += gi;
            a2[i] += gi * (v[i] - shift).as_f64();
        }
    }
    let (mut s1, mut s2) = (0.0, 0.0);
    for (g, v) in cd.remainder().iter().zip(cx.remainder()) {
        s1 += g.as_f64();
        s2 += g.as_f64() * (*v - shift).as_f64();
    }
    (s1 + a1.iter().sum::<f64>(), s2 + a2.iter().sum::<f64>())
}

/// As [`dy_moments`], with dy masked by the ReLU that followed: dy is kept where `(x-shift)*s + b > 0`.
#[inline]
pub fn dy_moments_relu<T: Real>(dy: &[T], x: &[T], shift: T, s: T, b: T) -> (f64, f64) {
    let z = T::zero();
    let mut a1 = [0.0f64; W];
    let mut a2 = [0.0f64; W];
    let mut cd = dy.chunks_exact(W);
    let mut cx = x.chunks_exact(W);
    for (g, v) in (&mut cd).zip(&mut cx) {
        for i in 0..W {
            let d = v[i] - shift;
            let gi = if d * s + b > z { g[i] } else { z }.as_f64();
            a1[i] += gi;
            a2[i] += gi * d.as_f64();
        }
    }
    let (mut s1, mut s2) = (0.0, 0.0);
    for (g, v) in cd.remainder().iter().zip(cx.remainder()) {
        let d = *v - shift;
        let gi = if d * s + b > z { *g } else { z }.as_f64();
        s1 += gi;
        s2 += gi * d.as_f64();
    }
    (s1 + a1.iter().sum::<f64>(), s2 + a2.iter().sum::<f64>())
}

/// y = (x - shift)·s + b.
#[inline]
pub fn affine_shifted<T: Real>(x: &[T], y: &mut [T], shift: T, s: T, b: T) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = (*v - shift) * s + b;
    }
}

/// y = max((x - shift)·s + b, 0).
#[inline]
pub fn affine_shifted_relu<T: Real>(x: &[T], y: &mut [T], shift: T, s: T, b: T) {
    let z = T::zero();
    for (o, v) in y.iter_mut().zip(x) {
        let t = (*v - shift) * s + b;
        *o = if t > z { t } else { z };
    }
}

/// y = x·a + b (the eval-mode batch norm pass, PyTorch's formula).
#[inline]
pub fn affine<T: Real>(x: &[T], y: &mut [T], a: T, b: T) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = *v * a + b;
    }
}

/// y = max(x·a + b, 0).
#[inline]
pub fn affine_relu<T: Real>(x: &[T], y: &mut [T], a: T, b: T) {
    let z = T::zero();
    for (o, v) in y.iter_mut().zip(x) {
        let t = *v * a + b;
        *o = if t > z { t } else { z };
    }
}

/// dx = dy·k1 + (x - shift)·k2 + k3: the batch-statistics backward once its reductions are known.
#[inline]
pub fn bwd_dx<T: Real>(dy: &[T], x: &[T], dx: &mut [T], shift: T, k1: T, k2: T, k3: T) {
    for ((o, g), v) in dx.iter_mut().zip(dy).zip(x) {
        *o = *g * k1 + (*v - shift) * k2 + k3;
    }
}

/// [`bwd_dx`] with dy masked by the following ReLU (mask recomputed from x exactly as in the forward).
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn bwd_dx_relu<T: Real>(
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

/// dx = dy·a (eval-mode / frozen backward).
#[inline]
pub fn scale<T: Real>(dy: &[T], dx: &mut [T], a: T) {
    for (o, g) in dx.iter_mut().zip(dy) {
        *o = *g * a;
    }
}

/// dx = dy·a where x·a + b > 0, else 0 (eval-mode BN+ReLU backward).
#[inline]
pub fn scale_relu<T: Real>(dy: &[T], x: &[T], dx: &mut [T], a: T, b: T) {
    let z = T::zero();
    for ((o, g), v) in dx.iter_mut().zip(dy).zip(x) {
        *o = if *v * a + b > z { *g * a } else { z };
    }
}

/// (Σdy, Σdy·x) in the eval-mode backward, for dweight and dbias; masked variant when `relu` is `Some((a, b))`.
#[inline]
pub fn dy_x_sums<T: Real>(dy: &[T], x: &[T], relu: Option<(T, T)>) -> (f64, f64) {
    match relu {
        None => dy_moments(dy, x, T::zero()),
        Some((a, b)) => dy_moments_relu(dy, x, T::zero(), a, b),
    }
}
