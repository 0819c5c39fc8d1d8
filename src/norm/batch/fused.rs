//! BatchNorm's fused entry points, which a model's plan calls for its fusion patterns: the forward with a
//! following ReLU, 2×2 max pool or the input's plane moments ([`BnFusion`]), the backward of a pooled forward,
//! and the backward that hands dx over plane by plane to the convolution before it.

use super::maxpool::{self, Pool2x2};
use super::planes::{self, DxPlanes};
use super::stats::{self, BatchStats, Ncs};
use super::{add_sums_grads, BatchNorm, Saved};
use crate::kernels::arena;
use crate::kernels::shape::{check_same_shape, contiguous};
use crate::norm::pslice;
use crate::{Ctx, Mode, NvError, Real, Result};
use ndarray::ArrayD;

/// What a model's plan fuses into a BatchNorm's forward. Each is bitwise what the separate layers compute
/// (finite values: a NaN becomes 0 in a fused ReLU, as `max(·, 0)` makes it).
#[derive(Debug, Clone, Copy, Default)]
pub struct BnFusion<'a> {
    /// A following ReLU.
    pub relu: bool,
    /// A following 2×2, stride-2 max pool (see [`BatchNorm::can_pool2x2`]); the output is the pooled one.
    pub pool2x2: bool,
    /// The (mean, M2) of each of the input's N·C planes (n-major), computed by the layer that wrote them (see
    /// [`BatchNorm::takes_plane_moments`]): the statistics are their exact merge, so the only pass over the input
    /// is the normalizing one.
    pub plane_moments: Option<&'a [(f64, f64)]>,
}

impl<T: Real> BatchNorm<T> {
    /// Whether [`BnFusion::pool2x2`] applies to inputs of `shape` under `ctx`: batch statistics, 4-D input at
    /// least 2×2, f32 with AVX-512F allowed.
    pub fn can_pool2x2(&self, shape: &[usize], ctx: Ctx) -> bool {
        self.uses_batch_stats(ctx.mode())
            && ctx.isa().avx512()
            && Pool2x2::available::<T>()
            && shape.len() == 4
            && shape[2] >= 2
            && shape[3] >= 2
    }

    /// Whether [`BnFusion::plane_moments`] applies to inputs of `shape` in `mode`: batch statistics on planes of
    /// more than one value.
    pub fn takes_plane_moments(&self, shape: &[usize], mode: Mode) -> bool {
        self.uses_batch_stats(mode) && shape.len() >= 3 && shape[2..].iter().product::<usize>() >= 2
    }

    /// The forward with the fusions `f` (see [`BnFusion`]). A requested pool that does not apply
    /// ([`BatchNorm::can_pool2x2`]) or plane moments that do not ([`BatchNorm::takes_plane_moments`], or of the
    /// wrong length) are an error. The backward ([`Layer::backward`](crate::Layer::backward)) then takes the gradient of the pooled
    /// output when the forward pooled.
    pub fn forward_fused(&mut self, x: &ArrayD<T>, ctx: Ctx, f: BnFusion<'_>) -> Result<ArrayD<T>> {
        let shape = x.shape().to_vec();
        let d = self.dims(&shape)?;
        let mode = ctx.mode();
        if f.pool2x2 && !self.can_pool2x2(&shape, ctx) {
            return Err(NvError::Config(format!(
                "{}: no fused 2x2 max pool for input {shape:?} in {mode:?} mode",
                Self::NAME
            )));
        }
        if let Some(pm) = f.plane_moments {
            if !self.takes_plane_moments(&shape, mode) || pm.len() != d.n * d.c {
                return Err(NvError::Config(format!(
                    "{}: {} plane moments do not apply to input {shape:?} in {mode:?} mode",
                    Self::NAME,
                    pm.len()
                )));
            }
            return self.forward_from_plane_moments(x, pm, d, ctx, f.relu, f.pool2x2);
        }
        if f.pool2x2 {
            return self.forward_maxpool(x, d, ctx, f.relu);
        }
        // SAFETY: the forward writes every element of y.
        let mut y = unsafe { arena::output_uninit(x.shape()) };
        self.forward_plain(
            x.view(),
            y.as_slice_mut().expect("fresh array"),
            ctx,
            f.relu,
        )?;
        Ok(y)
    }

    /// The batch-statistics forward followed by a 2×2, stride-2 max pool, as one kernel that never writes the
    /// unpooled output ([`maxpool::train_forward_maxpool`]): the pooled (N, C, H/2, W/2) output, bitwise that of
    /// the forward then [`crate::nn::MaxPool2d`], with the running statistics updated the same way.
    fn forward_maxpool(
        &mut self,
        x: &ArrayD<T>,
        d: Ncs,
        ctx: Ctx,
        relu: bool,
    ) -> Result<ArrayD<T>> {
        let shape = x.shape().to_vec();
        let mode = ctx.mode();
        if self.synced(mode) {
            let local = super::planes::local_moments(&contiguous(x), d, ctx.kernels());
            return self.forward_synced_maxpool(x, &local, d, ctx, relu);
        }
        self.check_train_values(d, &shape, mode)?;
        let p = Pool2x2 {
            h: shape[2],
            w: shape[3],
        };
        let (mut y, mut ix) = Self::pooled_buffers(&mut self.pooled, d, p);
        let xs = contiguous(x);
        let stats = maxpool::train_forward_maxpool(
            &xs,
            y.as_slice_mut().expect("fresh array"),
            &mut ix,
            d,
            p,
            pslice(&self.weight),
            pslice(&self.bias),
            self.cfg.eps,
            relu,
            ctx.kernels(),
        );
        if mode.is_train() && self.cfg.track_running_stats {
            self.update_running(&stats.mean, &stats.var, d.m());
        }
        self.saved = Some(Saved::Batch { stats, shape, relu });
        self.pooled = Some((p, ix));
        Ok(y)
    }

    /// The pooled output (N, C, H/2, W/2) and its argmax buffer (the last forward's, reused).
    fn pooled_buffers(
        last: &mut Option<(Pool2x2, Vec<u32>)>,
        d: Ncs,
        p: Pool2x2,
    ) -> (ArrayD<T>, Vec<u32>) {
        // SAFETY: the pooled kernels write every output element.
        let y = unsafe { arena::output_uninit(&[d.n, d.c, p.oh(), p.ow()]) };
        let mut ix = last.take().map(|(_, v)| v).unwrap_or_default();
        ix.resize(y.len(), 0);
        (y, ix)
    }

    /// The batch-statistics forward when the layer that produced `x` (N, C, *) has already reduced each of its
    /// N·C planes to (mean, M2) while writing it: the statistics are their exact merge
    /// ([`stats::moments_from_planes`]), so the only pass over `x` is the normalizing one (with the pool applied
    /// in it when `pool`). Running statistics, the saved state and the errors are those of the plain forward;
    /// the statistics agree with it to rounding.
    fn forward_from_plane_moments(
        &mut self,
        x: &ArrayD<T>,
        pm: &[(f64, f64)],
        d: Ncs,
        ctx: Ctx,
        relu: bool,
        pool: bool,
    ) -> Result<ArrayD<T>> {
        let shape = x.shape().to_vec();
        let mode = ctx.mode();
        let local = stats::moments_from_planes(pm, d);
        if self.synced(mode) && pool {
            return self.forward_synced_maxpool(x, &local, d, ctx, relu);
        }
        let xs = contiguous(x);
        if self.synced(mode) {
            // SAFETY: the synced forward writes every element.
            let mut y = unsafe { arena::output_uninit(&shape) };
            let ys = y.as_slice_mut().expect("fresh array");
            self.forward_synced(&xs, ys, d, shape, &local, relu, ctx)?;
            self.pooled = None;
            return Ok(y);
        }
        self.check_train_values(d, &shape, mode)?;
        let stats = BatchStats::<T>::from_moments(&local, self.cfg.eps);
        let (w, b) = (pslice(&self.weight), pslice(&self.bias));
        let (y, pooled) = if pool {
            let p = Pool2x2 {
                h: shape[2],
                w: shape[3],
            };
            let (mut y, mut ix) = Self::pooled_buffers(&mut self.pooled, d, p);
            let ys = y.as_slice_mut().expect("fresh array");
            maxpool::normalize_maxpool(&xs, ys, &mut ix, d, p, &stats, w, b, relu, ctx.kernels());
            (y, Some((p, ix)))
        } else {
            // SAFETY: normalize writes every element.
            let mut y = unsafe { arena::output_uninit(&shape) };
            let ys = y.as_slice_mut().expect("fresh array");
            planes::normalize(&xs, ys, d, &stats, w, b, relu, ctx.kernels());
            (y, None)
        };
        if mode.is_train() && self.cfg.track_running_stats {
            self.update_running(&stats.mean, &stats.var, d.m());
        }
        self.saved = Some(Saved::Batch { stats, shape, relu });
        self.pooled = pooled;
        Ok(y)
    }

    /// The training backward without its dx pass, for a consumer that takes dx plane by plane (see
    /// [`DxPlanes`]): accumulates dweight and dbias as the backward does and returns dx as a function of the
    /// plane. Needs a last forward that was unpooled, with batch statistics, on planes of more than one value,
    /// and contiguous x and dy.
    pub fn backward_deferred<'a>(
        &mut self,
        x: &'a ArrayD<T>,
        dy: &'a ArrayD<T>,
        ctx: Ctx,
    ) -> Result<DxPlanes<'a, T>> {
        check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        let d = self.dims(x.shape())?;
        let no_state = NvError::NoSavedState {
            layer: Self::NAME,
            mode: ctx.mode(),
        };
        let (Some(xs), Some(gs)) = (x.as_slice(), dy.as_slice()) else {
            return Err(NvError::Config(format!(
                "{}: a deferred dx needs contiguous x and dy",
                Self::NAME
            )));
        };
        let Some(Saved::Batch { stats, shape, relu }) = &self.saved else {
            return Err(no_state);
        };
        if self.pooled.is_some()
            || self.synced(ctx.mode())
            || !self.uses_batch_stats(ctx.mode())
            || shape.as_slice() != x.shape()
            || d.s < 2
        {
            return Err(no_state);
        }
        let (sums, planes) = planes::train_backward_deferred(
            xs,
            gs,
            d,
            stats,
            pslice(&self.weight),
            pslice(&self.bias),
            *relu,
            ctx.kernels(),
        );
        add_sums_grads(&mut self.weight, &mut self.bias, &sums, stats);
        Ok(planes)
    }

    /// Backward of a pooled forward: `dy` is the gradient of the pooled output; returns dx (of x's shape) and
    /// accumulates dweight and dbias, bitwise as the max pool's backward followed by the BatchNorm's would.
    pub(super) fn backward_maxpool(
        &mut self,
        x: &ArrayD<T>,
        dy: &ArrayD<T>,
        ctx: Ctx,
    ) -> Result<ArrayD<T>> {
        let d = self.dims(x.shape())?;
        let mode = ctx.mode();
        let no_state = || NvError::NoSavedState {
            layer: Self::NAME,
            mode,
        };
        let (Some(Saved::Batch { stats, shape, relu }), Some((p, ix)), true) =
            (&self.saved, &self.pooled, self.uses_batch_stats(mode))
        else {
            return Err(no_state());
        };
        if shape.as_slice() != x.shape() {
            return Err(no_state());
        }
        let want = [d.n, d.c, p.oh(), p.ow()];
        if dy.shape() != want {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "dy has shape {:?}, the pooled output has shape {want:?}",
                    dy.shape()
                ),
            });
        }
        // SAFETY: the pooled backward writes every element of dx.
        let mut dx = unsafe { arena::output_uninit(x.shape()) };
        let (xs, gs) = (contiguous(x), contiguous(dy));
        let group = self.sync_for(mode);
        let sums = maxpool::train_backward_maxpool(
            &xs,
            &gs,
            ix,
            dx.as_slice_mut().expect("fresh array"),
            d,
            *p,
            stats,
            pslice(&self.weight),
            pslice(&self.bias),
            *relu,
            ctx.kernels(),
            &mut |s| super::sync::sum_over_ranks(group.as_deref(), s),
        )?;
        add_sums_grads(&mut self.weight, &mut self.bias, &sums, stats);
        Ok(dx)
    }

    /// The synchronized (SyncBN) training forward fused with a 2×2 max pool, from this rank's moments `local`.
    fn forward_synced_maxpool(
        &mut self,
        x: &ArrayD<T>,
        local: &stats::Moments,
        d: Ncs,
        ctx: Ctx,
        relu: bool,
    ) -> Result<ArrayD<T>> {
        let shape = x.shape().to_vec();
        let (stats, count) = self.synced_stats(local, &shape)?;
        let p = Pool2x2 {
            h: shape[2],
            w: shape[3],
        };
        let (mut y, mut ix) = Self::pooled_buffers(&mut self.pooled, d, p);
        let xs = contiguous(x);
        let ys = y.as_slice_mut().expect("fresh array");
        let (w, b) = (pslice(&self.weight), pslice(&self.bias));
        maxpool::normalize_maxpool(&xs, ys, &mut ix, d, p, &stats, w, b, relu, ctx.kernels());
        if self.cfg.track_running_stats {
            self.update_running(&stats.mean, &stats.var, count);
        }
        self.saved = Some(Saved::Batch { stats, shape, relu });
        self.pooled = Some((p, ix));
        Ok(y)
    }
}
