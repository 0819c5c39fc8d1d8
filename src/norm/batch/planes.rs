//! BatchNorm's passes over (N, C, S) tensors with planes of S > 1 values (S = 1 goes to [`super::rows`]).
//!
//! `train_forward` and `train_backward` are the fused single-process forms: one parallel task per channel
//! computes the statistics (two passes: Σx, then shifted Σd and Σd²) and normalises while the channel's slice is
//! still hot in cache. Passes that no longer need a channel's values together (normalizing with known statistics,
//! the backward's sums and dx) visit the planes in memory order instead.

use super::stats::{all_dx_coefficients, BackwardSums, BatchStats, Moments, Ncs};
use crate::kernels::elementwise::SyncPtr;
use crate::kernels::isa::isa_fn;
use crate::kernels::lanes;
use crate::kernels::moments::moments_from_shifted;
use crate::{Isa, KernelOptions, Real};
use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn normalize_channel<T: Real, const X2: bool, const X512: bool>(
    x: &[T],
    y: SyncPtr<T>,
    d: Ncs,
    c: usize,
    s: T,
    b: T,
    shift: T,
    relu: bool,
    ko: KernelOptions,
) {
    let stream = streams::<T>(d, 2, ko);
    let ahead = !stream && d.s * std::mem::size_of::<T>() <= PREFETCH_PLANE_BYTES;
    for n in 0..d.n {
        let off = (n * d.c + c) * d.s;
        if ahead && n + PREFETCH_PLANES < d.n {
            prefetch_for_write(y.0, (n + PREFETCH_PLANES) * d.c * d.s + c * d.s, d.s);
        }
        // SAFETY: (n, c) chunks are disjoint and each is written by exactly one task.
        let out = unsafe { y.slice(off, d.s) };
        lanes::affine_shifted_to_with::<T, X2, X512>(
            &x[off..off + d.s],
            out,
            shift,
            s,
            b,
            relu,
            stream,
        );
    }
    if stream {
        lanes::stream_fence();
    }
}

/// Two-pass statistics of one channel: returns (shift, Σ(x-shift), Σ(x-shift)²).
#[inline(always)]
pub(super) fn channel_moments<T: Real, const X2: bool, const X512: bool>(
    x: &[T],
    d: Ncs,
    c: usize,
) -> (T, f64, f64) {
    let m = d.m() as f64;
    let total = lanes::sum_channel_with::<T, X2, X512>(x, c * d.s, d.n, d.s, d.c * d.s);
    let shift = T::of_f64(total / m);
    let (s1, s2) =
        lanes::shifted_moments_channel_with::<T, X2, X512>(x, c * d.s, d.n, d.s, d.c * d.s, shift);
    (shift, s1, s2)
}

isa_fn! {
    isa = ko.isa;
    /// Stage 1 of the forward: this process's per-channel moments.
    pub fn local_moments<T: Real, const X2: bool, const X512: bool>(x: &[T], d: Ncs, ko: KernelOptions) -> Moments {
        assert_eq!(x.len(), d.numel());
        let mut out = Moments::empty(d.c);
        out.count = d.m() as u64;
        if d.m() == 0 {
            return out;
        }
        if d.s == 1 {
            return super::rows::moments(x, d, ko).1;
        }
        let m = d.m() as f64;
        let per: Vec<(f64, f64)> = (0..d.c)
            .into_par_iter()
            .map(|c| {
                let (sh, s1, s2) = channel_moments::<T, X2, X512>(x, d, c);
                moments_from_shifted(sh.as_f64(), s1, s2, m)
            })
            .collect();
        for (c, (mean, m2)) in per.into_iter().enumerate() {
            out.mean[c] = mean;
            out.m2[c] = m2;
        }

        out
    }
}

/// Planes of at most this many bytes have their output lines requested ahead by the channel-by-channel
/// normalising pass of the training forward ([`normalize_channel`]): a channel's planes lie C·S values apart, and
/// pieces that short and that far apart are not followed by the hardware prefetcher, so without it every
/// plane's stores waited for their lines. A read prefetch of x in the statistics pass added nothing
/// measurable and is not used (see docs/PERFORMANCE.md, "Tuning constants").
const PREFETCH_PLANE_BYTES: usize = 1024;
/// How many planes ahead.
const PREFETCH_PLANES: usize = 8;

/// Requests the lines of `p[off..off + len]` for writing (PREFETCHW); a no-op elsewhere than x86-64.
#[inline(always)]
fn prefetch_for_write<T>(p: *mut T, off: usize, len: usize) {
    #[cfg(nv_x86)]
    {
        let start = p.wrapping_add(off) as usize;
        let end = p.wrapping_add(off + len) as usize;
        let mut a = start & !63;
        while a < end {
            // SAFETY: prefetching never faults.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(
                    a as *const i8,
                )
            };
            a += 64;
        }
    }
    #[cfg(not(nv_x86))]
    let _ = (p, off, len);
}

pub(super) fn streams<T>(d: Ncs, arrays: usize, ko: KernelOptions) -> bool {
    ko.streams(d.numel() * std::mem::size_of::<T>(), arrays)
}

isa_fn! {
    isa = ko.isa;
    /// Stage 3 of the forward: y = weight·(x-mean)·invstd + bias (then ReLU when `relu`), with statistics that may
    /// come from several workers.
    pub fn normalize<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        y: &mut [T],
        d: Ncs,
        st: &BatchStats<T>,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        relu: bool,
        ko: KernelOptions,
    ) {
        assert_eq!(x.len(), d.numel());
        assert_eq!(y.len(), d.numel());
        if d.s == 1 {
            return super::rows::normalize(x, y, d, st, weight, bias, relu, ko);
        }
        // With the statistics known, no channel needs its values together: the planes are normalized in memory
        // order, each thread streaming through a contiguous run of the tensor. (A channel's planes are C·S values
        // apart; visited channel by channel, each 1-3 KB plane was a fresh start for the hardware prefetcher.)
        let aff = st.channel_affines(weight, bias);
        let stream = streams::<T>(d, 2, ko);
        y.par_chunks_mut(d.s)
            .zip(x.par_chunks(d.s))
            .enumerate()
            .with_min_len(PLANES_PER_TASK)
            .for_each(|(k, (yo, xi))| {
                let (s, b, sh) = aff[k % d.c];
                lanes::affine_shifted_to_with::<T, X2, X512>(xi, yo, sh, s, b, relu, stream);
                if stream {
                    lanes::stream_fence();
                }
            });
    }
}

/// Planes a worker takes at a time in the memory-order passes (amortizes rayon's splitting).
pub(super) const PLANES_PER_TASK: usize = 8;

isa_fn! {
    isa = ko.isa;
    /// Fused training forward: per channel, statistics then normalisation while the channel is hot in cache.
    /// Requires more than one value per channel (checked by the layer).
    pub fn train_forward<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        y: &mut [T],
        d: Ncs,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        eps: f64,
        relu: bool,
        ko: KernelOptions,
    ) -> BatchStats<T> {
        assert_eq!(x.len(), d.numel());
        assert_eq!(y.len(), d.numel());
        if d.s == 1 {
            return super::rows::train_forward(x, y, d, weight, bias, eps, relu, ko);
        }
        let yp = SyncPtr(y.as_mut_ptr());
        train_forward_with(x, d, weight, bias, eps, ko, |c, s, b, sh| {
            normalize_channel::<T, X2, X512>(x, yp, d, c, s, b, sh, relu, ko)
        })
    }
}

isa_fn! {
    isa = ko.isa;
    /// The per-channel body of the fused training forward: statistics of channel `c` while it is hot in cache, then
    /// `normalize(c, s, b, shift)` writes y = (x - shift)·s + b in whatever layout the caller produces.
    pub(super) fn train_forward_with<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        d: Ncs,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        eps: f64,
        ko: KernelOptions,
        normalize: impl Fn(usize, T, T, T) + Sync,
    ) -> BatchStats<T> {
        let m = d.m() as f64;
        let mut st = BatchStats {
            shift: vec![T::zero(); d.c],
            mean: vec![0.0; d.c],
            var: vec![0.0; d.c],
            invstd: vec![0.0; d.c],
            count: d.m() as u64,
        };
        let per: Vec<(T, f64, f64, f64)> = (0..d.c)
            .into_par_iter()
            .map(|c| {
                let (sh, s1, s2) = channel_moments::<T, X2, X512>(x, d, c);
                let (mean, m2) = moments_from_shifted(sh.as_f64(), s1, s2, m);
                let var = m2 / m;
                let invstd = 1.0 / (var + eps).sqrt();
                let w = weight.map_or(1.0, |w| w[c].as_f64());
                let bb = bias.map_or(0.0, |b| b[c].as_f64());
                let s = w * invstd;
                let delta = mean - sh.as_f64();
                normalize(c, T::of_f64(s), T::of_f64(bb - delta * s), sh);
                (sh, mean, var, invstd)
            })
            .collect();
        for (c, (sh, mean, var, invstd)) in per.into_iter().enumerate() {
            st.shift[c] = sh;
            st.mean[c] = mean;
            st.var[c] = var;
            st.invstd[c] = invstd;
        }

        st
    }
}

isa_fn! {
    isa = ko.isa;
    /// Eval forward: one per-channel affine pass y = (x - m)·a + b (ReLU when `relu`), with m the running
    /// mean and b the bias: exact to f32 rounding even when |mean| ≫ std, where x·a + (b - m·a) would lose the
    /// low bits of x·a. The subtraction is free in a memory-bound pass.
    pub fn eval_forward<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        y: &mut [T],
        d: Ncs,
        m: &[T],
        a: &[T],
        b: &[T],
        relu: bool,
        ko: KernelOptions,
    ) {
        assert_eq!(x.len(), d.numel());
        assert_eq!(y.len(), d.numel());
        if d.s == 1 {
            let z = T::zero();
            let rows_per = (d.n / (rayon::current_num_threads() * 4)).max(1);
            y.par_chunks_mut(d.c * rows_per)
                .zip(x.par_chunks(d.c * rows_per))
                .for_each(|(yo, xi)| {
                    for (yr, xr) in yo.chunks_mut(d.c).zip(xi.chunks(d.c)) {
                        for i in 0..d.c {
                            let t = (xr[i] - m[i]) * a[i] + b[i];
                            yr[i] = if relu && !(t > z) { z } else { t };
                        }
                    }
                });
        } else {
            y.par_chunks_mut(d.s)
                .zip(x.par_chunks(d.s))
                .enumerate()
                .for_each(|(k, (yo, xi))| {
                    let c = k % d.c;
                    if relu {
                        lanes::affine_shifted_relu_with::<T, X2, X512>(xi, yo, m[c], a[c], b[c]);
                    } else {
                        lanes::affine_shifted_with::<T, X2, X512>(xi, yo, m[c], a[c], b[c]);
                    }
                });
        }
    }
}

isa_fn! {
    isa = ko.isa;
    /// Stage 1 of the backward: per-channel Σdy and Σdy·(x-mean) (dy masked by the fused ReLU when `relu`).
    ///
    /// The planes are visited in memory order, each thread streaming through a contiguous run of x and dy (a
    /// channel's planes are C·S values apart: gathered channel by channel, each 1-3 KB plane was a fresh start
    /// for the hardware prefetcher). Each plane's two sums are f64; a channel's planes are added in image order,
    /// so the result does not depend on the number of threads.
    pub fn backward_sums<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        dy: &[T],
        d: Ncs,
        st: &BatchStats<T>,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        relu: bool,
        ko: KernelOptions,
    ) -> BackwardSums {
        if d.s == 1 {
            return super::rows::backward_sums(x, dy, d, st, weight, bias, relu, ko);
        }
        assert!(
            x.len() == d.numel() && dy.len() == d.numel(),
            "x and dy sizes"
        );
        let masks = relu_masks(st, d, weight, bias, relu);
        let per: Vec<(f64, f64)> = dy
            .par_chunks(d.s)
            .zip(x.par_chunks(d.s))
            .enumerate()
            .with_min_len(PLANES_PER_TASK)
            .map(|(k, (g, xs))| plane_dy_sums::<T, X2, X512>(g, xs, st.shift[k % d.c], masks[k % d.c]))
            .collect();
        combine_plane_sums(&per, d, st)
    }
}

/// The (s, b) of each channel's fused-ReLU mask `(x - shift)·s + b > 0`, when `relu`.
pub(super) fn relu_masks<T: Real>(
    st: &BatchStats<T>,
    d: Ncs,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
) -> Vec<Option<(T, T)>> {
    (0..d.c)
        .map(|c| relu.then(|| st.channel_affine(c, weight, bias)))
        .collect()
}

/// (Σg, Σg·(x - shift)) of one plane, g = dy masked by the fused ReLU when `mask` is given.
#[inline(always)]
pub(super) fn plane_dy_sums<T: Real, const X2: bool, const X512: bool>(
    g: &[T],
    x: &[T],
    shift: T,
    mask: Option<(T, T)>,
) -> (f64, f64) {
    match mask {
        None => lanes::dy_moments_with::<T, X2, X512>(g, x, shift),
        Some((s, b)) => lanes::dy_moments_relu_with::<T, X2, X512>(g, x, shift, s, b),
    }
}

/// Per-channel sums from per-plane ones (n-major), added in image order; Σdy·(x - mean) from Σdy·(x - shift).
pub(super) fn combine_plane_sums<T: Real>(
    per: &[(f64, f64)],
    d: Ncs,
    st: &BatchStats<T>,
) -> BackwardSums {
    let mut sum_dy = vec![0.0; d.c];
    let mut dot = vec![0.0; d.c];
    for (k, &(sd, dt)) in per.iter().enumerate() {
        sum_dy[k % d.c] += sd;
        dot[k % d.c] += dt;
    }
    for c in 0..d.c {
        dot[c] -= (st.mean[c] - st.shift[c].as_f64()) * sum_dy[c];
    }
    BackwardSums { sum_dy, dot }
}

isa_fn! {
    isa = ko.isa;
    /// Stage 3 of the backward: dx from (possibly all-reduced) sums; `count` is the global number of values per
    /// channel. Planes in memory order, as in [`backward_sums`].
    pub fn backward_dx<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        d: Ncs,
        st: &BatchStats<T>,
        sums: &BackwardSums,
        count: u64,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        relu: bool,
        ko: KernelOptions,
    ) {
        assert_eq!(dx.len(), d.numel(), "dx buffer size");
        if d.s == 1 {
            return super::rows::backward_dx(x, dy, dx, d, st, sums, count, weight, bias, relu, ko);
        }
        assert!(
            x.len() == d.numel() && dy.len() == d.numel(),
            "x and dy sizes"
        );
        let masks = relu_masks(st, d, weight, bias, relu);
        let ks = all_dx_coefficients(st, sums, d, count as f64, weight);
        let stream = streams::<T>(d, 3, ko);
        dx.par_chunks_mut(d.s)
            .zip(dy.par_chunks(d.s).zip(x.par_chunks(d.s)))
            .enumerate()
            .with_min_len(PLANES_PER_TASK)
            .for_each(|(k, (out, (g, xs)))| {
                let c = k % d.c;
                lanes::bwd_dx_to_with::<T, X2, X512>(g, xs, out, st.shift[c], masks[c], ks[c], stream);
                if stream {
                    lanes::stream_fence();
                }
            });
    }
}

/// The dx of a training BatchNorm as a function of the plane, for a consumer that takes dx plane by plane
/// (a first convolution, which needs dx only for its weight gradient): each plane is computed into the
/// consumer's buffer, which stays in cache, instead of a full dx tensor being written and read back. The
/// values are bitwise those [`backward_dx`] writes.
pub struct DxPlanes<'a, T> {
    x: &'a [T],
    dy: &'a [T],
    d: Ncs,
    shift: Vec<T>,
    masks: Vec<Option<(T, T)>>,
    ks: Vec<(T, T, T)>,
    isa: Isa,
}

impl<T: Real> DxPlanes<'_, T> {
    /// (N, C, S) of dx.
    pub fn dims(&self) -> Ncs {
        self.d
    }
    /// Writes plane `k` (= n·C + c) of dx into `out` (S values).
    pub fn fill(&self, k: usize, out: &mut [T]) {
        let (s, c) = (self.d.s, k % self.d.c);
        let (g, xs) = (&self.dy[k * s..(k + 1) * s], &self.x[k * s..(k + 1) * s]);
        lanes::bwd_dx_to(
            self.isa,
            g,
            xs,
            out,
            self.shift[c],
            self.masks[c],
            self.ks[c],
            false,
        );
    }
    /// The whole dx (for a consumer that cannot take planes).
    pub fn to_vec(&self) -> Vec<T> {
        let mut out = vec![T::zero(); self.d.numel()];
        out.par_chunks_mut(self.d.s.max(1))
            .enumerate()
            .for_each(|(k, o)| self.fill(k, o));
        out
    }
}

/// [`train_backward`] without its dx pass: the sums (for dweight and dbias) and dx as [`DxPlanes`]. Planes of
/// S > 1 values only.
#[allow(clippy::too_many_arguments)]
pub fn train_backward_deferred<'a, T: Real>(
    x: &'a [T],
    dy: &'a [T],
    d: Ncs,
    st: &BatchStats<T>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
    ko: KernelOptions,
) -> (BackwardSums, DxPlanes<'a, T>) {
    assert!(d.s > 1, "planes of more than one value");
    let sums = backward_sums(x, dy, d, st, weight, bias, relu, ko);
    let planes = DxPlanes {
        x,
        dy,
        d,
        shift: st.shift.clone(),
        masks: relu_masks(st, d, weight, bias, relu),
        ks: all_dx_coefficients(st, &sums, d, st.count as f64, weight),
        isa: ko.isa,
    };
    (sums, planes)
}

/// Training backward: the two reductions ([`backward_sums`]), then dx ([`backward_dx`]).
/// Returns the sums (dweight = dot·invstd, dbias = sum_dy).
#[allow(clippy::too_many_arguments)]
pub fn train_backward<T: Real>(
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    d: Ncs,
    st: &BatchStats<T>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
    ko: KernelOptions,
) -> BackwardSums {
    assert_eq!(dx.len(), d.numel(), "dx buffer size");
    if d.s == 1 {
        return super::rows::train_backward(x, dy, dx, d, st, weight, bias, relu, ko);
    }
    let sums = backward_sums(x, dy, d, st, weight, bias, relu, ko);
    backward_dx(x, dy, dx, d, st, &sums, st.count, weight, bias, relu, ko);
    sums
}

isa_fn! {
    isa = ko.isa;
    /// Eval-mode backward of the fixed per-channel affine y = (x - m)·a + b: dx = dy·a (masked by the fused
    /// ReLU). Returns per channel (Σdy, Σdy·(x - m)) with the same mask, from which the layer derives dbias and
    /// dweight (shifted by the running mean, so that nothing cancels when |mean| ≫ std).
    pub fn eval_backward<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        d: Ncs,
        m: &[T],
        a: &[T],
        b: &[T],
        relu: bool,
        ko: KernelOptions,
    ) -> (Vec<f64>, Vec<f64>) {
        assert_eq!(dx.len(), d.numel(), "dx buffer size");
        if d.s == 1 {
            return super::rows::eval_backward(x, dy, dx, d, m, a, b, relu, ko);
        }
        let dxp = SyncPtr(dx.as_mut_ptr());
        let per: Vec<(f64, f64)> = (0..d.c)
            .into_par_iter()
            .map(|c| {
                let (mut s1, mut s2) = (0.0, 0.0);
                for n in 0..d.n {
                    let off = (n * d.c + c) * d.s;
                    let (xs, gs) = (&x[off..off + d.s], &dy[off..off + d.s]);
                    let (a1, a2) = lanes::dy_x_sums_with::<T, X2, X512>(gs, xs, m[c], relu.then_some((a[c], b[c])));
                    s1 += a1;
                    s2 += a2;
                    // SAFETY: one task per channel; chunks disjoint.
                    let out = unsafe { dxp.slice(off, d.s) };
                    if relu {
                        lanes::scale_relu_with::<T, X2, X512>(gs, xs, out, m[c], a[c], b[c]);
                    } else {
                        lanes::scale_with::<T, X2, X512>(gs, out, a[c]);
                    }
                }
                (s1, s2)
            })
            .collect();
        per.into_iter().unzip()
    }
}
