//! Fused batch-norm kernels over an (N, C, S) tensor (S = product of the spatial dims, 1 for BatchNorm1d on (N, C)).
//!
//! The kernels come in stages so that SyncBN, Ghost BN and statistics re-estimation reuse them unchanged:
//!
//! ```text
//! forward : local_moments ──► Moments::merge (exact parallel Welford; across workers) ──► stats_from_moments ──► normalize
//! backward: backward_sums ──► BackwardSums::add (across workers) ──► backward_dx
//! ```
//!
//! `train_forward` and `train_backward` are the fused single-process forms: one parallel task per channel
//! computes the statistics (two passes: Σx, then shifted Σd and Σd²) and normalises while the channel's slice is
//! still hot in cache, and the backward computes its two reductions and dx in the same task.
//! With S = 1 the channels are contiguous in memory, so those kernels work on blocks of channels, row by row.

use crate::kernels::elementwise::SyncPtr;
use crate::kernels::lanes;
use crate::kernels::moments::moments_from_shifted;
use crate::Real;
use rayon::prelude::*;

/// Dimensions of an (N, C, S) view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ncs {
    pub n: usize,
    pub c: usize,
    pub s: usize,
}

impl Ncs {
    /// Values per channel.
    pub fn m(&self) -> usize {
        self.n * self.s
    }
    pub fn numel(&self) -> usize {
        self.n * self.c * self.s
    }
}

/// Per-channel count, mean and M2 = Σ(x-mean)²: the exact, mergeable summary of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub count: u64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl Moments {
    pub fn empty(c: usize) -> Self {
        Moments {
            count: 0,
            mean: vec![0.0; c],
            m2: vec![0.0; c],
        }
    }
    /// Exact parallel-Welford merge (Chan et al.): the result summarises the union of both batches.
    /// Either side may be empty.
    pub fn merge(&self, other: &Moments) -> Moments {
        assert_eq!(
            self.mean.len(),
            other.mean.len(),
            "merging moments of different channel counts"
        );
        if other.count == 0 {
            return self.clone();
        }
        if self.count == 0 {
            return other.clone();
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        let mut out = Moments::empty(self.mean.len());
        out.count = self.count + other.count;
        for c in 0..self.mean.len() {
            let delta = other.mean[c] - self.mean[c];
            out.mean[c] = self.mean[c] + delta * nb / n;
            out.m2[c] = self.m2[c] + other.m2[c] + delta * delta * na * nb / n;
        }
        out
    }
    /// Biased variance Σ(x-mean)²/n.
    pub fn var_biased(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.m2.iter().map(|m| m / n).collect()
    }
    /// Unbiased variance Σ(x-mean)²/(n-1) (NaN-free: n=1 gives +inf as in PyTorch's formula m/(m-1)).
    pub fn var_unbiased(&self) -> Vec<f64> {
        let n = self.count as f64;
        self.m2.iter().map(|m| m / (n - 1.0)).collect()
    }
}

/// What the forward saved for the backward: per channel the shift used inside the kernels (the mean rounded to T),
/// the exact mean, the biased variance, and 1/sqrt(var+eps); `count` values per channel.
#[derive(Debug, Clone)]
pub struct BatchStats<T> {
    pub shift: Vec<T>,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub invstd: Vec<f64>,
    pub count: u64,
}

impl<T: Real> BatchStats<T> {
    pub fn from_moments(m: &Moments, eps: f64) -> Self {
        let var = m.var_biased();
        let invstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        BatchStats {
            shift: m.mean.iter().map(|&v| T::of_f64(v)).collect(),
            mean: m.mean.clone(),
            var,
            invstd,
            count: m.count,
        }
    }
    /// (s, b', shift) of every channel: the normalising pass in memory order looks them up per plane.
    pub fn channel_affines(&self, weight: Option<&[T]>, bias: Option<&[T]>) -> Vec<(T, T, T)> {
        (0..self.shift.len())
            .map(|c| {
                let (s, b) = self.channel_affine(c, weight, bias);
                (s, b, self.shift[c])
            })
            .collect()
    }
    /// The per-channel affine (s, b') of the normalising pass: y = (x - shift)·s + b'.
    /// Backward recomputes it identically, so a fused ReLU's mask matches the forward bit for bit.
    #[inline]
    pub fn channel_affine(&self, c: usize, weight: Option<&[T]>, bias: Option<&[T]>) -> (T, T) {
        let w = weight.map_or(1.0, |w| w[c].as_f64());
        let b = bias.map_or(0.0, |b| b[c].as_f64());
        let s = w * self.invstd[c];
        let delta = self.mean[c] - self.shift[c].as_f64();
        (T::of_f64(s), T::of_f64(b - delta * s))
    }
}

/// Per-channel (Σdy, Σdy·(x-mean)) of the backward.
#[derive(Debug, Clone, PartialEq)]
pub struct BackwardSums {
    pub sum_dy: Vec<f64>,
    pub dot: Vec<f64>,
}

impl BackwardSums {
    /// Element-wise sum (the all-reduce of SyncBN's backward).
    pub fn add(&self, o: &BackwardSums) -> BackwardSums {
        BackwardSums {
            sum_dy: self
                .sum_dy
                .iter()
                .zip(&o.sum_dy)
                .map(|(a, b)| a + b)
                .collect(),
            dot: self.dot.iter().zip(&o.dot).map(|(a, b)| a + b).collect(),
        }
    }
}

/// Per-channel [`Moments`] of an (N, C, S) tensor from the (mean, M2) of each of its N·C planes (n-major, as
/// the tensor), merged exactly (Chan et al.) in image order: the local-statistics stage of the forward, computed
/// by the layer that produced the planes.
pub fn moments_from_planes(pm: &[(f64, f64)], d: Ncs) -> Moments {
    assert_eq!(pm.len(), d.n * d.c, "one (mean, M2) per plane");
    let mut out = Moments::empty(d.c);
    out.count = d.m() as u64;
    let s = d.s as f64;
    for c in 0..d.c {
        let (mut n_acc, mut mean, mut m2) = (0.0f64, 0.0f64, 0.0f64);
        for n in 0..d.n {
            let (pmean, pm2) = pm[n * d.c + c];
            if n_acc == 0.0 {
                (n_acc, mean, m2) = (s, pmean, pm2);
                continue;
            }
            let tot = n_acc + s;
            let delta = pmean - mean;
            mean += delta * s / tot;
            m2 += pm2 + delta * delta * n_acc * s / tot;
            n_acc = tot;
        }
        out.mean[c] = mean;
        out.m2[c] = m2;
    }
    out
}

/// Two-pass statistics of one channel: returns (shift, Σ(x-shift), Σ(x-shift)²).
#[inline]
fn channel_moments<T: Real>(x: &[T], d: Ncs, c: usize) -> (T, f64, f64) {
    let m = d.m() as f64;
    let total = lanes::sum_channel(x, c * d.s, d.n, d.s, d.c * d.s);
    let shift = T::of_f64(total / m);
    let (s1, s2) = lanes::shifted_moments_channel(x, c * d.s, d.n, d.s, d.c * d.s, shift);
    (shift, s1, s2)
}

/// Stage 1 of the forward: this process's per-channel moments.
pub fn local_moments<T: Real>(x: &[T], d: Ncs) -> Moments {
    assert_eq!(x.len(), d.numel());
    let mut out = Moments::empty(d.c);
    out.count = d.m() as u64;
    if d.m() == 0 {
        return out;
    }
    if d.s == 1 {
        return super::rows_kernels::moments(x, d).1;
    }
    let m = d.m() as f64;
    let per: Vec<(f64, f64)> = (0..d.c)
        .into_par_iter()
        .map(|c| {
            let (sh, s1, s2) = channel_moments(x, d, c);
            moments_from_shifted(sh.as_f64(), s1, s2, m)
        })
        .collect();
    for (c, (mean, m2)) in per.into_iter().enumerate() {
        out.mean[c] = mean;
        out.m2[c] = m2;
    }

    out
}

#[inline]
#[allow(clippy::too_many_arguments)]
fn normalize_channel<T: Real>(
    x: &[T],
    y: SyncPtr<T>,
    d: Ncs,
    c: usize,
    s: T,
    b: T,
    shift: T,
    relu: bool,
) {
    let stream = streams::<T>(d, 2);
    let ahead = !stream && d.s * std::mem::size_of::<T>() <= PREFETCH_PLANE_BYTES;
    for n in 0..d.n {
        let off = (n * d.c + c) * d.s;
        if ahead && n + PREFETCH_PLANES < d.n {
            prefetch_for_write(y.0, (n + PREFETCH_PLANES) * d.c * d.s + c * d.s, d.s);
        }
        // SAFETY: (n, c) chunks are disjoint and each is written by exactly one task.
        let out = unsafe { y.slice(off, d.s) };
        lanes::affine_shifted_to(&x[off..off + d.s], out, shift, s, b, relu, stream);
    }
    if stream {
        lanes::stream_fence();
    }
}

/// Planes of at most this many bytes have their output lines requested ahead by the channel-by-channel
/// normalising pass of the training forward ([`normalize_channel`]): a channel's planes lie C·S values apart, and
/// pieces that short and that far apart are not followed by the hardware prefetcher, so without it every
/// plane's stores waited for their lines. Measured (`normvision bench-kernels --ops batch_norm --modes
/// train_fwd`, best of 120 calls): (128, 128, 7, 7) 0.562 → 0.354 ms on one thread and 0.274 → 0.203 ms on two;
/// (64, 64, 14, 14) 0.364 → 0.314 ms on one thread, 0.172 → 0.179 ms on two. A read prefetch of x in the
/// statistics pass added nothing measurable and is not used.
const PREFETCH_PLANE_BYTES: usize = 1024;
/// How many planes ahead.
const PREFETCH_PLANES: usize = 8;

/// Requests the lines of `p[off..off + len]` for writing (PREFETCHW); a no-op elsewhere than x86-64.
#[inline(always)]
fn prefetch_for_write<T>(p: *mut T, off: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
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
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, off, len);
}

fn streams<T>(d: Ncs, arrays: usize) -> bool {
    lanes::stream_output(d.numel() * std::mem::size_of::<T>(), arrays)
}

/// Stage 3 of the forward: y = weight·(x-mean)·invstd + bias (then ReLU when `relu`), with statistics that may
/// come from several workers.
pub fn normalize<T: Real>(
    x: &[T],
    y: &mut [T],
    d: Ncs,
    st: &BatchStats<T>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
) {
    assert_eq!(x.len(), d.numel());
    assert_eq!(y.len(), d.numel());
    if d.s == 1 {
        return super::rows_kernels::normalize(x, y, d, st, weight, bias, relu);
    }
    // With the statistics known, no channel needs its values together: the planes are normalized in memory
    // order, each thread streaming through a contiguous run of the tensor. (A channel's planes are C·S values
    // apart; visited channel by channel, each 1-3 KB plane was a fresh start for the hardware prefetcher.)
    let aff = st.channel_affines(weight, bias);
    let stream = streams::<T>(d, 2);
    y.par_chunks_mut(d.s)
        .zip(x.par_chunks(d.s))
        .enumerate()
        .with_min_len(PLANES_PER_TASK)
        .for_each(|(k, (yo, xi))| {
            let (s, b, sh) = aff[k % d.c];
            lanes::affine_shifted_to(xi, yo, sh, s, b, relu, stream);
            if stream {
                lanes::stream_fence();
            }
        });
}

/// Planes a worker takes at a time in the memory-order passes (amortizes rayon's splitting).
const PLANES_PER_TASK: usize = 8;

/// Fused training forward: per channel, statistics then normalisation while the channel is hot in cache.
/// Requires more than one value per channel (checked by the layer).
pub fn train_forward<T: Real>(
    x: &[T],
    y: &mut [T],
    d: Ncs,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
    relu: bool,
) -> BatchStats<T> {
    assert_eq!(x.len(), d.numel());
    assert_eq!(y.len(), d.numel());
    if d.s == 1 {
        return super::rows_kernels::train_forward(x, y, d, weight, bias, eps, relu);
    }
    let yp = SyncPtr(y.as_mut_ptr());
    train_forward_with(x, d, weight, bias, eps, |c, s, b, sh| {
        normalize_channel(x, yp, d, c, s, b, sh, relu)
    })
}

/// The per-channel body of the fused training forward: statistics of channel `c` while it is hot in cache, then
/// `normalize(c, s, b, shift)` writes y = (x - shift)·s + b in whatever layout the caller produces.
fn train_forward_with<T: Real>(
    x: &[T],
    d: Ncs,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
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
            let (sh, s1, s2) = channel_moments(x, d, c);
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

/// A 2×2, stride-2 max pool (no padding, floor mode) over (H, W) planes, applied to a BatchNorm's output inside
/// the BatchNorm's own kernels ([`train_forward_maxpool`], [`train_backward_maxpool`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2x2 {
    pub h: usize,
    pub w: usize,
}

impl Pool2x2 {
    pub fn oh(&self) -> usize {
        self.h / 2
    }
    pub fn ow(&self) -> usize {
        self.w / 2
    }
    /// Pooled values per plane.
    pub fn out(&self) -> usize {
        self.oh() * self.ow()
    }
    /// Whether the fused kernels can run here for `T` (f32 with AVX-512F, as the pool's fast path).
    pub fn available<T: 'static>() -> bool {
        std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && crate::kernels::pool2x2::available()
    }
}

std::thread_local! {
    /// One normalized plane (forward) or one channel's unpooled dy (backward), per worker thread, reused.
    static POOL_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn with_pool_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    POOL_SCRATCH.with(|sc| {
        let mut v = sc.borrow_mut();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

/// [`train_forward`] (planes of S = H·W > 1) followed by a 2×2, stride-2 max pool, without writing the
/// unpooled output: each (n, c) plane is normalized into a per-thread buffer that stays in L1 and pooled from
/// there into `y` (N, C, H/2, W/2), with the window's argmax (an index into the H × W plane) in `ix`. The
/// values and indices are bitwise those of `train_forward` then [`crate::nn::MaxPool2d`] (the same kernels).
/// Needs [`Pool2x2::available`].
#[allow(clippy::too_many_arguments)]
pub fn train_forward_maxpool<T: Real>(
    x: &[T],
    y: &mut [T],
    ix: &mut [u32],
    d: Ncs,
    p: Pool2x2,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
    relu: bool,
) -> BatchStats<T> {
    assert!(
        Pool2x2::available::<T>(),
        "fused max pool needs f32 and AVX-512F"
    );
    assert!(p.h * p.w == d.s && d.s > 1, "planes of H·W values");
    assert_eq!(x.len(), d.numel());
    assert!(
        y.len() == d.n * d.c * p.out() && ix.len() == y.len(),
        "pooled sizes"
    );
    let (yp, ip) = (SyncPtr(y.as_mut_ptr()), SyncPtr(ix.as_mut_ptr()));
    train_forward_with(x, d, weight, bias, eps, |c, s, b, sh| {
        normalize_channel_maxpool(x, yp, ip, d, p, c, s, b, sh, relu)
    })
}

/// The normalize stage of [`train_forward_maxpool`] with statistics computed elsewhere (as [`normalize`] is
/// to [`train_forward`]).
#[allow(clippy::too_many_arguments)]
pub fn normalize_maxpool<T: Real>(
    x: &[T],
    y: &mut [T],
    ix: &mut [u32],
    d: Ncs,
    p: Pool2x2,
    st: &BatchStats<T>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
) {
    assert!(
        Pool2x2::available::<T>(),
        "fused max pool needs f32 and AVX-512F"
    );
    assert!(p.h * p.w == d.s && d.s > 1, "planes of H·W values");
    assert_eq!(x.len(), d.numel());
    assert!(
        y.len() == d.n * d.c * p.out() && ix.len() == y.len(),
        "pooled sizes"
    );
    // planes in memory order, as in [`normalize`]
    let aff = st.channel_affines(weight, bias);
    y.par_chunks_mut(p.out())
        .zip(ix.par_chunks_mut(p.out()))
        .zip(x.par_chunks(d.s))
        .enumerate()
        .with_min_len(PLANES_PER_TASK)
        .for_each(|(k, ((yo, io), xi))| {
            let (s, b, sh) = aff[k % d.c];
            normalize_plane_maxpool(xi, yo, io, p, s, b, sh, relu);
        });
}

/// One plane normalized into this thread's L1 buffer and max-pooled from there into `yo` and `io`.
#[allow(clippy::too_many_arguments)]
fn normalize_plane_maxpool<T: Real>(
    xi: &[T],
    yo: &mut [T],
    io: &mut [u32],
    p: Pool2x2,
    s: T,
    b: T,
    sh: T,
    relu: bool,
) {
    with_pool_scratch(xi.len(), |plane| {
        let pt: &mut [T] = crate::kernels::cast::f32_as_mut(plane).expect("f32");
        lanes::affine_shifted_to(xi, pt, sh, s, b, relu, false);
        crate::kernels::pool2x2::plane(
            crate::kernels::cast::as_f32(pt).expect("f32"),
            p.w,
            p.oh(),
            p.ow(),
            crate::kernels::cast::as_f32_mut(yo).expect("f32"),
            io,
        );
    })
}

/// Channel `c` normalized plane by plane into an L1 buffer and max-pooled from there into `y` and `ix`.
#[allow(clippy::too_many_arguments)]
fn normalize_channel_maxpool<T: Real>(
    x: &[T],
    yp: SyncPtr<T>,
    ip: SyncPtr<u32>,
    d: Ncs,
    p: Pool2x2,
    c: usize,
    s: T,
    b: T,
    sh: T,
    relu: bool,
) {
    for n in 0..d.n {
        let off = (n * d.c + c) * d.s;
        let po = (n * d.c + c) * p.out();
        // SAFETY: (n, c) output planes are disjoint and each is written by exactly one task.
        let (yo, io) = unsafe { (yp.slice(po, p.out()), ip.slice(po, p.out())) };
        normalize_plane_maxpool(&x[off..off + d.s], yo, io, p, s, b, sh, relu);
    }
}

/// Eval forward: one per-channel affine pass y = x·a + b (ReLU when `relu`).
pub fn eval_forward<T: Real>(x: &[T], y: &mut [T], d: Ncs, a: &[T], b: &[T], relu: bool) {
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
                        let t = xr[i] * a[i] + b[i];
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
                    lanes::affine_relu(xi, yo, a[c], b[c]);
                } else {
                    lanes::affine(xi, yo, a[c], b[c]);
                }
            });
    }
}

/// Stage 1 of the backward: per-channel Σdy and Σdy·(x-mean) (dy masked by the fused ReLU when `relu`).
///
/// The planes are visited in memory order, each thread streaming through a contiguous run of x and dy (a
/// channel's planes are C·S values apart: gathered channel by channel, each 1-3 KB plane was a fresh start
/// for the hardware prefetcher). Each plane's two sums are f64; a channel's planes are added in image order,
/// so the result does not depend on the number of threads.
pub fn backward_sums<T: Real>(
    x: &[T],
    dy: &[T],
    d: Ncs,
    st: &BatchStats<T>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
) -> BackwardSums {
    if d.s == 1 {
        return super::rows_kernels::backward_sums(x, dy, d, st, weight, bias, relu);
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
        .map(|(k, (g, xs))| plane_dy_sums(g, xs, st.shift[k % d.c], masks[k % d.c]))
        .collect();
    combine_plane_sums(&per, d, st)
}

/// The (s, b) of each channel's fused-ReLU mask `(x - shift)·s + b > 0`, when `relu`.
fn relu_masks<T: Real>(
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
#[inline]
fn plane_dy_sums<T: Real>(g: &[T], x: &[T], shift: T, mask: Option<(T, T)>) -> (f64, f64) {
    match mask {
        None => lanes::dy_moments(g, x, shift),
        Some((s, b)) => lanes::dy_moments_relu(g, x, shift, s, b),
    }
}

/// Per-channel sums from per-plane ones (n-major), added in image order; Σdy·(x - mean) from Σdy·(x - shift).
fn combine_plane_sums<T: Real>(per: &[(f64, f64)], d: Ncs, st: &BatchStats<T>) -> BackwardSums {
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

/// The per-channel constants (k1, k2, k3) of dx = dy·k1 + (x-shift)·k2 + k3, from channel `c`'s Σdy and
/// Σdy·(x-mean) over `count` values.
#[inline]
pub(crate) fn dx_coefficients<T: Real>(
    st: &BatchStats<T>,
    c: usize,
    sum_dy: f64,
    dot: f64,
    count: f64,
    weight: Option<&[T]>,
) -> (T, T, T) {
    let w = weight.map_or(1.0, |w| w[c].as_f64());
    let inv = st.invstd[c];
    let k1 = inv * w;
    let k2 = -dot * inv * inv / count * k1;
    let delta = st.mean[c] - st.shift[c].as_f64();
    let k3 = -sum_dy / count * k1 - delta * k2;
    (T::of_f64(k1), T::of_f64(k2), T::of_f64(k3))
}

/// The per-channel (k1, k2, k3) of the dx pass.
fn all_dx_coefficients<T: Real>(
    st: &BatchStats<T>,
    sums: &BackwardSums,
    d: Ncs,
    count: f64,
    weight: Option<&[T]>,
) -> Vec<(T, T, T)> {
    (0..d.c)
        .map(|c| dx_coefficients(st, c, sums.sum_dy[c], sums.dot[c], count, weight))
        .collect()
}

/// Stage 3 of the backward: dx from (possibly all-reduced) sums; `count` is the global number of values per
/// channel. Planes in memory order, as in [`backward_sums`].
#[allow(clippy::too_many_arguments)]
pub fn backward_dx<T: Real>(
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
) {
    assert_eq!(dx.len(), d.numel(), "dx buffer size");
    if d.s == 1 {
        return super::rows_kernels::backward_dx(x, dy, dx, d, st, sums, count, weight, bias, relu);
    }
    assert!(
        x.len() == d.numel() && dy.len() == d.numel(),
        "x and dy sizes"
    );
    let masks = relu_masks(st, d, weight, bias, relu);
    let ks = all_dx_coefficients(st, sums, d, count as f64, weight);
    let stream = streams::<T>(d, 3);
    dx.par_chunks_mut(d.s)
        .zip(dy.par_chunks(d.s).zip(x.par_chunks(d.s)))
        .enumerate()
        .with_min_len(PLANES_PER_TASK)
        .for_each(|(k, (out, (g, xs)))| {
            let c = k % d.c;
            lanes::bwd_dx_to(g, xs, out, st.shift[c], masks[c], ks[c], stream);
            if stream {
                lanes::stream_fence();
            }
        });
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
        lanes::bwd_dx_to(g, xs, out, self.shift[c], self.masks[c], self.ks[c], false);
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
) -> (BackwardSums, DxPlanes<'a, T>) {
    assert!(d.s > 1, "planes of more than one value");
    let sums = backward_sums(x, dy, d, st, weight, bias, relu);
    let planes = DxPlanes {
        x,
        dy,
        d,
        shift: st.shift.clone(),
        masks: relu_masks(st, d, weight, bias, relu),
        ks: all_dx_coefficients(st, &sums, d, st.count as f64, weight),
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
) -> BackwardSums {
    assert_eq!(dx.len(), d.numel(), "dx buffer size");
    if d.s == 1 {
        return super::rows_kernels::train_backward(x, dy, dx, d, st, weight, bias, relu);
    }
    let sums = backward_sums(x, dy, d, st, weight, bias, relu);
    backward_dx(x, dy, dx, d, st, &sums, st.count, weight, bias, relu);
    sums
}

/// [`train_backward`] for a BatchNorm whose output went through a 2×2 max pool ([`train_forward_maxpool`]):
/// `dy` is the pooled gradient (N, C, H/2, W/2) and `ix` the pool's argmax indices. In both passes each plane's
/// unpooled dy is rebuilt into a per-thread L1 buffer by the pool's own backward kernel and used from there,
/// so the full-size dy is never written to memory. Bitwise the result of [`crate::nn::MaxPool2d`]'s backward
/// followed by `train_backward` (the same kernels on the same values, in the same order).
#[allow(clippy::too_many_arguments)]
pub fn train_backward_maxpool<T: Real>(
    x: &[T],
    dy: &[T],
    ix: &[u32],
    dx: &mut [T],
    d: Ncs,
    p: Pool2x2,
    st: &BatchStats<T>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
) -> BackwardSums {
    assert!(
        Pool2x2::available::<T>(),
        "fused max pool needs f32 and AVX-512F"
    );
    assert!(p.h * p.w == d.s && d.s > 1, "planes of H·W values");
    assert_eq!(x.len(), d.numel());
    assert_eq!(dx.len(), d.numel(), "dx buffer size");
    assert!(
        dy.len() == d.n * d.c * p.out() && ix.len() == dy.len(),
        "pooled sizes"
    );
    let dyf = crate::kernels::cast::as_f32(dy).expect("f32");
    // the unpooled dy of pooled plane k, in this thread's buffer
    let unpooled = |k: usize, f: &mut dyn FnMut(&[T])| {
        let po = k * p.out();
        with_pool_scratch(d.s, |g| {
            crate::kernels::pool2x2::plane_backward(
                &dyf[po..po + p.out()],
                &ix[po..po + p.out()],
                p.w,
                p.h,
                p.oh(),
                p.ow(),
                g,
            );
            f(crate::kernels::cast::f32_as_mut(g).expect("f32"))
        })
    };
    let masks = relu_masks(st, d, weight, bias, relu);
    let per: Vec<(f64, f64)> = x
        .par_chunks(d.s)
        .enumerate()
        .with_min_len(PLANES_PER_TASK)
        .map(|(k, xs)| {
            let mut out = (0.0, 0.0);
            unpooled(k, &mut |g| {
                out = plane_dy_sums(g, xs, st.shift[k % d.c], masks[k % d.c])
            });
            out
        })
        .collect();
    let sums = combine_plane_sums(&per, d, st);
    let ks = all_dx_coefficients(st, &sums, d, st.count as f64, weight);
    let stream = streams::<T>(d, 3);
    dx.par_chunks_mut(d.s)
        .zip(x.par_chunks(d.s))
        .enumerate()
        .with_min_len(PLANES_PER_TASK)
        .for_each(|(k, (out, xs))| {
            let c = k % d.c;
            unpooled(k, &mut |g| {
                lanes::bwd_dx_to(g, xs, out, st.shift[c], masks[c], ks[c], stream)
            });
            if stream {
                lanes::stream_fence();
            }
        });
    sums
}

/// Eval-mode backward with fixed per-channel affine y = x·a + b: dx = dy·a (masked by the fused ReLU).
/// Returns per channel (Σdy, Σdy·x) with the same mask, from which the layer derives dweight and dbias.
pub fn eval_backward<T: Real>(
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    d: Ncs,
    a: &[T],
    b: &[T],
    relu: bool,
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(dx.len(), d.numel(), "dx buffer size");
    if d.s == 1 {
        return super::rows_kernels::eval_backward(x, dy, dx, d, a, b, relu);
    }
    let dxp = SyncPtr(dx.as_mut_ptr());
    let per: Vec<(f64, f64)> = (0..d.c)
        .into_par_iter()
        .map(|c| {
            let (mut s1, mut s2) = (0.0, 0.0);
            for n in 0..d.n {
                let off = (n * d.c + c) * d.s;
                let (xs, gs) = (&x[off..off + d.s], &dy[off..off + d.s]);
                let (a1, a2) = lanes::dy_x_sums(gs, xs, relu.then_some((a[c], b[c])));
                s1 += a1;
                s2 += a2;
                // SAFETY: one task per channel; chunks disjoint.
                let out = unsafe { dxp.slice(off, d.s) };
                if relu {
                    lanes::scale_relu(gs, xs, out, a[c], b[c]);
                } else {
                    lanes::scale(gs, out, a[c]);
                }
            }
            (s1, s2)
        })
        .collect();
    per.into_iter().unzip()
}
