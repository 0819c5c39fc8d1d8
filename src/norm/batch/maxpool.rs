//! BatchNorm followed by a 2×2, stride-2 max pool in one kernel: each plane is normalized into a per-thread
//! buffer that stays in L1 and pooled from there, so the unpooled output is never written; the backward rebuilds
//! each plane's unpooled dy in L1 from the pooled dy and the argmax.

use super::planes::{
    combine_plane_sums, plane_dy_sums, relu_masks, streams, train_forward_with, PLANES_PER_TASK,
};
use super::stats::{all_dx_coefficients, BackwardSums, BatchStats, Ncs};
use crate::kernels::elementwise::SyncPtr;
use crate::kernels::isa::isa_fn;
use crate::kernels::lanes;
use crate::{KernelOptions, Real};
use rayon::prelude::*;

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

isa_fn! {
    isa = ko.isa;
    /// [`train_forward`](super::planes::train_forward) (planes of S = H·W > 1) followed by a 2×2, stride-2 max pool, without writing the
    /// unpooled output: each (n, c) plane is normalized into a per-thread buffer that stays in L1 and pooled from
    /// there into `y` (N, C, H/2, W/2), with the window's argmax (an index into the H × W plane) in `ix`. The
    /// values and indices are bitwise those of `train_forward` then [`crate::nn::MaxPool2d`] (the same kernels).
    /// Needs [`Pool2x2::available`].
    pub fn train_forward_maxpool<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        y: &mut [T],
        ix: &mut [u32],
        d: Ncs,
        p: Pool2x2,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        eps: f64,
        relu: bool,
        ko: KernelOptions,
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
        train_forward_with(x, d, weight, bias, eps, ko, |c, s, b, sh| {
            normalize_channel_maxpool::<T, X2, X512>(x, yp, ip, d, p, c, s, b, sh, relu)
        })
    }
}

isa_fn! {
    isa = ko.isa;
    /// The normalize stage of [`train_forward_maxpool`] with statistics computed elsewhere (as [`normalize`](super::planes::normalize) is
    /// to [`train_forward`](super::planes::train_forward)).
    pub fn normalize_maxpool<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        y: &mut [T],
        ix: &mut [u32],
        d: Ncs,
        p: Pool2x2,
        st: &BatchStats<T>,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        relu: bool,
        ko: KernelOptions,
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
                normalize_plane_maxpool::<T, X2, X512>(xi, yo, io, p, s, b, sh, relu);
            });
    }
}

/// One plane normalized into this thread's L1 buffer and max-pooled from there into `yo` and `io`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn normalize_plane_maxpool<T: Real, const X2: bool, const X512: bool>(
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
        lanes::affine_shifted_to_with::<T, X2, X512>(xi, pt, sh, s, b, relu, false);
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
#[inline(always)]
fn normalize_channel_maxpool<T: Real, const X2: bool, const X512: bool>(
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
        normalize_plane_maxpool::<T, X2, X512>(&x[off..off + d.s], yo, io, p, s, b, sh, relu);
    }
}

isa_fn! {
    isa = ko.isa;
    /// [`train_backward`](super::planes::train_backward) for a BatchNorm whose output went through a 2×2 max pool ([`train_forward_maxpool`]):
    /// `dy` is the pooled gradient (N, C, H/2, W/2) and `ix` the pool's argmax indices. In both passes each plane's
    /// unpooled dy is rebuilt into a per-thread L1 buffer by the pool's own backward kernel and used from there,
    /// so the full-size dy is never written to memory. Bitwise the result of [`crate::nn::MaxPool2d`]'s backward
    /// followed by `train_backward` (the same kernels on the same values, in the same order). `global` maps this
    /// process's sums to those dx is computed from: the identity, or SyncBN's all-reduce over the ranks (between
    /// the two passes, so a synchronized BatchNorm keeps the fusion). Returns this process's sums.
    pub fn train_backward_maxpool<T: Real, const X2: bool, const X512: bool>(
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
        ko: KernelOptions,
        global: &mut dyn FnMut(&BackwardSums) -> crate::Result<BackwardSums>,
    ) -> crate::Result<BackwardSums> {
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
                    out = plane_dy_sums::<T, X2, X512>(g, xs, st.shift[k % d.c], masks[k % d.c])
                });
                out
            })
            .collect();
        let sums = combine_plane_sums(&per, d, st);
        // the sums dx is made of: this process's, or (SyncBN) every rank's
        let total = global(&sums)?;
        let ks = all_dx_coefficients(st, &total, d, st.count as f64, weight);
        let stream = streams::<T>(d, 3, ko);
        dx.par_chunks_mut(d.s)
            .zip(x.par_chunks(d.s))
            .enumerate()
            .with_min_len(PLANES_PER_TASK)
            .for_each(|(k, (out, xs))| {
                let c = k % d.c;
                unpooled(k, &mut |g| {
                    lanes::bwd_dx_to_with::<T, X2, X512>(g, xs, out, st.shift[c], masks[c], ks[c], stream)
                });
                if stream {
                    lanes::stream_fence();
                }
            });
        Ok(sums)
    }
}
