//! Batch normalization over (N, C, *) inputs: BatchNorm1d on (N, C) and (N, C, L), BatchNorm2d on (N, C, H, W),
//! BatchNorm3d on (N, C, D, H, W).
//!
//! | | PyTorch convention (default) | Keras convention ([`BatchNormConfig::keras`]) |
//! |---|---|---|
//! | defaults | eps 1e-5, momentum 0.1 | epsilon 1e-3, momentum 0.99 |
//! | running update | `r = (1-m)·r + m·batch` | `r = r·m + batch·(1-m)` |
//! | variance normalising the batch | biased | biased |
//! | variance entering `running_var` | unbiased (·m/(m-1)) | biased |
//! | momentum `None` | cumulative average, factor 1/num_batches_tracked | same |
//! | one value per channel when training | error | error |
//!
//! In eval mode with `track_running_stats` the layer is the affine map y = x·a + b with
//! a = weight/sqrt(running_var+eps), b = bias - running_mean·a; without tracking it uses batch statistics.
//! `num_batches_tracked` counts training forwards (an `i64`, as in PyTorch).

use super::batch_kernels::{self as k, BatchStats, Ncs};
use super::buffers::{load_affine, load_running, save_affine, save_running, visit_affine};
use super::{check_channels, check_eps, check_momentum, check_same_shape, contiguous, pslice};
use crate::state::{StateDict, Stateful};
use crate::{Mode, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// Which running-statistics rule the layer follows (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Convention {
    PyTorch,
    Keras,
}

/// Configuration with PyTorch's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormConfig {
    pub num_features: usize,
    pub eps: f64,
    /// `None`: cumulative moving average (factor 1/num_batches_tracked).
    pub momentum: Option<f64>,
    pub affine: bool,
    pub track_running_stats: bool,
    pub convention: Convention,
    /// Apply ReLU inside the same kernels (forward and backward). A normvision extension; state is unchanged.
    pub fuse_relu: bool,
    /// Accepted input ranks; empty = any rank >= 2 (BatchNorm1d is [2, 3], BatchNorm2d [4], BatchNorm3d [5]).
    pub ranks: Vec<usize>,
}

impl BatchNormConfig {
    /// PyTorch defaults: eps 1e-5, momentum 0.1, affine, track_running_stats; any (N, C, *) input.
    pub fn new(num_features: usize) -> Self {
        BatchNormConfig {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
            convention: Convention::PyTorch,
            fuse_relu: false,
            ranks: vec![],
        }
    }
    /// `nn.BatchNorm1d`: (N, C) or (N, C, L).
    pub fn d1(num_features: usize) -> Self {
        BatchNormConfig {
            ranks: vec![2, 3],
            ..Self::new(num_features)
        }
    }
    /// `nn.BatchNorm2d`: (N, C, H, W).
    pub fn d2(num_features: usize) -> Self {
        BatchNormConfig {
            ranks: vec![4],
            ..Self::new(num_features)
        }
    }
    /// `nn.BatchNorm3d`: (N, C, D, H, W).
    pub fn d3(num_features: usize) -> Self {
        BatchNormConfig {
            ranks: vec![5],
            ..Self::new(num_features)
        }
    }
    /// Keras' `BatchNormalization` defaults: momentum 0.99 in the Keras sense, epsilon 1e-3, biased moving variance.
    pub fn keras(num_features: usize) -> Self {
        BatchNormConfig {
            eps: 1e-3,
            momentum: Some(0.99),
            convention: Convention::Keras,
            ..Self::new(num_features)
        }
    }
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    pub fn momentum(mut self, m: Option<f64>) -> Self {
        self.momentum = m;
        self
    }
    pub fn affine(mut self, a: bool) -> Self {
        self.affine = a;
        self
    }
    pub fn track_running_stats(mut self, t: bool) -> Self {
        self.track_running_stats = t;
        self
    }
    pub fn fuse_relu(mut self, r: bool) -> Self {
        self.fuse_relu = r;
        self
    }
    pub fn build<T: Real>(self) -> Result<BatchNorm<T>> {
        BatchNorm::new(self)
    }
}

/// What the last forward left for the backward.
#[derive(Debug, Clone)]
enum Saved<T> {
    /// Batch statistics (training, or eval without running stats).
    Batch {
        stats: BatchStats<T>,
        shape: Vec<usize>,
    },
    /// Fixed affine y = x·a + b from running statistics; `invstd` and `mean` for dweight.
    Running {
        a: Vec<T>,
        b: Vec<T>,
        invstd: Vec<f64>,
        mean: Vec<f64>,
        shape: Vec<usize>,
    },
}

/// A batch-norm layer. Parameters and buffers are public under PyTorch's names.
#[derive(Debug, Clone)]
pub struct BatchNorm<T: Real = f32> {
    pub cfg: BatchNormConfig,
    pub weight: Option<Param<T>>,
    pub bias: Option<Param<T>>,
    pub running_mean: Option<ArrayD<T>>,
    pub running_var: Option<ArrayD<T>>,
    pub num_batches_tracked: i64,
    saved: Option<Saved<T>>,
    /// The argmax indices of the max pool fused into the last forward ([`BatchNorm::forward_maxpool`]); kept
    /// (emptied) across steps so its allocation is reused.
    pooled: Option<(k::Pool2x2, Vec<u32>)>,
}

impl<T: Real> BatchNorm<T> {
    pub fn new(cfg: BatchNormConfig) -> Result<Self> {
        check_eps(cfg.eps)?;
        check_momentum(cfg.momentum)?;
        if cfg.num_features == 0 {
            return Err(NvError::Config("num_features must be > 0".into()));
        }
        let c = cfg.num_features;
        let (weight, bias) = if cfg.affine {
            (
                Some(Param::filled(&[c], T::one())),
                Some(Param::filled(&[c], T::zero())),
            )
        } else {
            (None, None)
        };
        let (running_mean, running_var) = if cfg.track_running_stats {
            (
                Some(ArrayD::zeros(IxDyn(&[c]))),
                Some(ArrayD::from_elem(IxDyn(&[c]), T::one())),
            )
        } else {
            (None, None)
        };
        Ok(BatchNorm {
            cfg,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked: 0,
            saved: None,
            pooled: None,
        })
    }

    pub const NAME: &'static str = "BatchNorm";

    /// Validates the input shape and returns its (N, C, S) view.
    pub fn dims(&self, shape: &[usize]) -> Result<Ncs> {
        let rank_ok = if self.cfg.ranks.is_empty() {
            shape.len() >= 2
        } else {
            self.cfg.ranks.contains(&shape.len())
        };
        if !rank_ok {
            let expected = if self.cfg.ranks.is_empty() {
                "(N, C, *) (rank >= 2)".to_string()
            } else {
                format!("rank {:?}", self.cfg.ranks)
            };
            return Err(NvError::Rank {
                layer: Self::NAME,
                expected,
                got: shape.to_vec(),
            });
        }
        check_channels(Self::NAME, shape, self.cfg.num_features)?;
        Ok(Ncs {
            n: shape[0],
            c: shape[1],
            s: shape[2..].iter().product(),
        })
    }

    fn uses_batch_stats(&self, mode: Mode) -> bool {
        mode.is_train() || !self.cfg.track_running_stats
    }

    /// The eval-mode affine (a, b) in f64 and whether a ReLU is fused, when eval mode uses the running
    /// statistics (`None` with `track_running_stats = false`, whose eval normalises with batch statistics).
    pub fn eval_affine_of(&self) -> Option<(Vec<f64>, Vec<f64>, bool)> {
        if self.uses_batch_stats(Mode::Eval) {
            return None;
        }
        let (rm, rv) = (self.running_mean.as_ref()?, self.running_var.as_ref()?);
        let (w, b) = (pslice(&self.weight), pslice(&self.bias));
        let (mut a_out, mut b_out) = (vec![], vec![]);
        for i in 0..self.cfg.num_features {
            let a = w.map_or(1.0, |w| w[i].as_f64()) / (rv[i].as_f64() + self.cfg.eps).sqrt();
            a_out.push(a);
            b_out.push(b.map_or(0.0, |b| b[i].as_f64()) - rm[i].as_f64() * a);
        }
        Some((a_out, b_out, self.cfg.fuse_relu))
    }

    /// The `(a, b)` (in `T`) and ReLU flag of [`crate::norm::NormLayer::eval_affine_exact`]: what
    /// `eval_forward` computes with, `None` when eval normalises with batch statistics.
    pub fn eval_affine_exact_of(&self) -> Option<(Vec<T>, Vec<T>, bool)> {
        if self.uses_batch_stats(Mode::Eval) {
            return None;
        }
        let (a, b, _, _) = self.running_affine();
        Some((a, b, self.cfg.fuse_relu))
    }

    /// Per-channel (a, b) of the eval affine y = x·a + b, with the exact invstd.
    fn running_affine(&self) -> (Vec<T>, Vec<T>, Vec<f64>, Vec<f64>) {
        let rm = self
            .running_mean
            .as_ref()
            .expect("tracked")
            .as_slice()
            .unwrap();
        let rv = self
            .running_var
            .as_ref()
            .expect("tracked")
            .as_slice()
            .unwrap();
        let (w, b) = (pslice(&self.weight), pslice(&self.bias));
        let c = self.cfg.num_features;
        let mut a_out = Vec::with_capacity(c);
        let mut b_out = Vec::with_capacity(c);
        let mut inv = Vec::with_capacity(c);
        let mut mean = Vec::with_capacity(c);
        for i in 0..c {
            let invstd = 1.0 / (rv[i].as_f64() + self.cfg.eps).sqrt();
            let a = w.map_or(1.0, |w| w[i].as_f64()) * invstd;
            let bb = b.map_or(0.0, |b| b[i].as_f64()) - rm[i].as_f64() * a;
            a_out.push(T::of_f64(a));
            b_out.push(T::of_f64(bb));
            inv.push(invstd);
            mean.push(rm[i].as_f64());
        }
        (a_out, b_out, inv, mean)
    }

    /// Forward pass, allocating the output.
    pub fn forward(&mut self, x: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>> {
        let mut y = ArrayD::zeros(x.raw_dim());
        self.forward_into(x.view(), y.as_slice_mut().expect("fresh array"), mode)?;
        Ok(y)
    }

    /// Forward pass into a caller-owned buffer of x's size (reused across steps by the training engine).
    pub fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], mode: Mode) -> Result<()> {
        let shape = x.shape().to_vec();
        let d = self.dims(&shape)?;
        if y.len() != d.numel() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "output buffer has {} elements, input {}",
                    y.len(),
                    d.numel()
                ),
            });
        }
        let xs = contiguous(&x);
        self.pooled = None;
        if self.uses_batch_stats(mode) {
            if mode.is_train() && d.m() <= 1 {
                return Err(NvError::OneValuePerChannel {
                    layer: Self::NAME,
                    shape,
                });
            }
            let stats = k::train_forward(
                &xs,
                y,
                d,
                pslice(&self.weight),
                pslice(&self.bias),
                self.cfg.eps,
                self.cfg.fuse_relu,
            );
            if mode.is_train() && self.cfg.track_running_stats {
                self.update_running(&stats.mean, &stats.var, d.m());
            }
            self.saved = Some(Saved::Batch { stats, shape });
        } else {
            let (a, b, invstd, mean) = self.running_affine();
            k::eval_forward(&xs, y, d, &a, &b, self.cfg.fuse_relu);
            self.saved = Some(Saved::Running {
                a,
                b,
                invstd,
                mean,
                shape,
            });
        }
        Ok(())
    }

    /// The forward with batch statistics (training, or eval without running statistics) followed by a 2×2,
    /// stride-2 max pool (no padding, floor mode), as one kernel that never writes the unpooled output
    /// ([`k::train_forward_maxpool`]): returns the pooled (N, C, H/2, W/2) output, bitwise that of
    /// [`BatchNorm::forward`] then [`crate::nn::MaxPool2d`], and updates the running statistics the same way.
    /// `Ok(None)` (nothing done) where the fused kernel does not apply: another element type or no AVX-512F,
    /// input not 4-D or smaller than 2×2, or eval with running statistics. The backward is then
    /// [`BatchNorm::backward_maxpool`].
    pub fn forward_maxpool(&mut self, x: &ArrayD<T>, mode: Mode) -> Result<Option<ArrayD<T>>> {
        let shape = x.shape().to_vec();
        let d = self.dims(&shape)?;
        if !self.can_pool(&shape) || !self.uses_batch_stats(mode) {
            return Ok(None);
        }
        if mode.is_train() && d.m() <= 1 {
            return Err(NvError::OneValuePerChannel {
                layer: Self::NAME,
                shape,
            });
        }
        let p = k::Pool2x2 {
            h: shape[2],
            w: shape[3],
        };
        let (mut y, mut ix) = Self::pooled_buffers(&mut self.pooled, d, p);
        let xv = x.view();
        let xs = contiguous(&xv);
        let stats = k::train_forward_maxpool(
            &xs,
            y.as_slice_mut().expect("fresh array"),
            &mut ix,
            d,
            p,
            pslice(&self.weight),
            pslice(&self.bias),
            self.cfg.eps,
            self.cfg.fuse_relu,
        );
        if mode.is_train() && self.cfg.track_running_stats {
            self.update_running(&stats.mean, &stats.var, d.m());
        }
        self.saved = Some(Saved::Batch { stats, shape });
        self.pooled = Some((p, ix));
        Ok(Some(y))
    }

    /// The pooled output (N, C, H/2, W/2) and its argmax buffer (the last forward's, reused).
    fn pooled_buffers(
        last: &mut Option<(k::Pool2x2, Vec<u32>)>,
        d: Ncs,
        p: k::Pool2x2,
    ) -> (ArrayD<T>, Vec<u32>) {
        let y = crate::kernels::arena::output(&[d.n, d.c, p.oh(), p.ow()]);
        let mut ix = last.take().map(|(_, v)| v).unwrap_or_default();
        ix.resize(y.len(), 0);
        (y, ix)
    }

    /// Whether the fused max-pool kernels apply to inputs of this shape.
    fn can_pool(&self, shape: &[usize]) -> bool {
        k::Pool2x2::available::<T>() && shape.len() == 4 && shape[2] >= 2 && shape[3] >= 2
    }

    /// Whether [`BatchNorm::forward_from_plane_moments`] applies in `mode` (the forward normalizes with batch
    /// statistics), so that the layer before it should compute them.
    pub fn takes_plane_moments(&self, mode: Mode) -> bool {
        self.uses_batch_stats(mode)
    }

    /// The batch-statistics forward when the layer that produced `x` (N, C, *) has already reduced each of its
    /// N·C planes to (mean, M2) while writing it (`pm`, n-major; [`k::plane_moments`]): the statistics are
    /// their exact merge ([`k::moments_from_planes`]), so the only pass over `x` is the normalizing one. With
    /// `pool`, a following 2×2 max pool is applied in that pass as in [`BatchNorm::forward_maxpool`]. Returns
    /// the output and whether it is pooled, or `Ok(None)` (nothing done) where this does not apply (eval with
    /// running statistics, planes of one value, `pm` of another length). Running statistics, the saved state
    /// and the errors are those of [`BatchNorm::forward`]; the statistics agree with it to rounding.
    pub fn forward_from_plane_moments(
        &mut self,
        x: &ArrayD<T>,
        pm: &[(f64, f64)],
        mode: Mode,
        pool: bool,
    ) -> Result<Option<(ArrayD<T>, bool)>> {
        let shape = x.shape().to_vec();
        let d = self.dims(&shape)?;
        if !self.uses_batch_stats(mode) || shape.len() < 3 || d.s < 2 || pm.len() != d.n * d.c {
            return Ok(None);
        }
        if mode.is_train() && d.m() <= 1 {
            return Err(NvError::OneValuePerChannel {
                layer: Self::NAME,
                shape,
            });
        }
        let pool = pool && self.can_pool(&shape);
        let stats = BatchStats::<T>::from_moments(&k::moments_from_planes(pm, d), self.cfg.eps);
        let xv = x.view();
        let xs = contiguous(&xv);
        let (w, b, relu) = (pslice(&self.weight), pslice(&self.bias), self.cfg.fuse_relu);
        let (y, pooled) = if pool {
            let p = k::Pool2x2 {
                h: shape[2],
                w: shape[3],
            };
            let (mut y, mut ix) = Self::pooled_buffers(&mut self.pooled, d, p);
            let ys = y.as_slice_mut().expect("fresh array");
            k::normalize_maxpool(&xs, ys, &mut ix, d, p, &stats, w, b, relu);
            (y, Some((p, ix)))
        } else {
            let mut y = crate::kernels::arena::output(&shape);
            k::normalize(
                &xs,
                y.as_slice_mut().expect("fresh array"),
                d,
                &stats,
                w,
                b,
                relu,
            );
            (y, None)
        };
        if mode.is_train() && self.cfg.track_running_stats {
            self.update_running(&stats.mean, &stats.var, d.m());
        }
        self.saved = Some(Saved::Batch { stats, shape });
        let is_pooled = pooled.is_some();
        self.pooled = pooled;
        Ok(Some((y, is_pooled)))
    }

    /// The training backward without its dx pass, for a consumer that takes dx plane by plane (see
    /// [`k::DxPlanes`]): accumulates dweight and dbias as [`BatchNorm::backward`] does and returns dx as a
    /// function of the plane. `Ok(None)` (nothing done) unless the last forward was an unpooled one with batch
    /// statistics on planes of more than one value, and x and dy are contiguous.
    pub fn backward_deferred<'a>(
        &mut self,
        x: &'a ArrayD<T>,
        dy: &'a ArrayD<T>,
        mode: Mode,
    ) -> Result<Option<k::DxPlanes<'a, T>>> {
        check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        let d = self.dims(x.shape())?;
        let (Some(xs), Some(gs)) = (x.as_slice(), dy.as_slice()) else {
            return Ok(None);
        };
        let Some(Saved::Batch { stats, shape }) = &self.saved else {
            return Ok(None);
        };
        if self.pooled.is_some()
            || !self.uses_batch_stats(mode)
            || shape.as_slice() != x.shape()
            || d.s < 2
        {
            return Ok(None);
        }
        let (sums, planes) = k::train_backward_deferred(
            xs,
            gs,
            d,
            stats,
            pslice(&self.weight),
            pslice(&self.bias),
            self.cfg.fuse_relu,
        );
        add_sums_grads(&mut self.weight, &mut self.bias, &sums, stats);
        Ok(Some(planes))
    }

    /// Backward of [`BatchNorm::forward_maxpool`]: `dy` is the gradient of the pooled output; returns dx (of
    /// x's shape) and accumulates dweight and dbias, bitwise as the max pool's backward followed by
    /// [`BatchNorm::backward`] would.
    pub fn backward_maxpool(
        &mut self,
        x: &ArrayD<T>,
        dy: &ArrayD<T>,
        mode: Mode,
    ) -> Result<ArrayD<T>> {
        let d = self.dims(x.shape())?;
        let (Some(Saved::Batch { stats, shape }), Some((p, ix)), true) =
            (&self.saved, &self.pooled, self.uses_batch_stats(mode))
        else {
            return Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode,
            });
        };
        if shape.as_slice() != x.shape() {
            return Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode,
            });
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
        let mut dx = crate::kernels::arena::output(x.shape());
        let (xv, gv) = (x.view(), dy.view());
        let (xs, gs) = (contiguous(&xv), contiguous(&gv));
        let sums = k::train_backward_maxpool(
            &xs,
            &gs,
            ix,
            dx.as_slice_mut().expect("fresh array"),
            d,
            *p,
            stats,
            pslice(&self.weight),
            pslice(&self.bias),
            self.cfg.fuse_relu,
        );
        add_sums_grads(&mut self.weight, &mut self.bias, &sums, stats);
        Ok(dx)
    }

    /// Folds one batch's statistics into the running statistics (the layer's convention); `m` values per channel.
    pub fn update_running(&mut self, mean: &[f64], var_biased: &[f64], m: usize) {
        self.num_batches_tracked += 1;
        let factor = match self.cfg.momentum {
            Some(mo) => match self.cfg.convention {
                Convention::PyTorch => mo,
                Convention::Keras => 1.0 - mo,
            },
            None => 1.0 / self.num_batches_tracked as f64,
        };
        let unbias = match self.cfg.convention {
            Convention::PyTorch => m as f64 / (m as f64 - 1.0),
            Convention::Keras => 1.0,
        };
        let rm = self
            .running_mean
            .as_mut()
            .expect("tracked")
            .as_slice_mut()
            .unwrap();
        for (r, &v) in rm.iter_mut().zip(mean) {
            *r = T::of_f64((1.0 - factor) * r.as_f64() + factor * v);
        }
        let rv = self
            .running_var
            .as_mut()
            .expect("tracked")
            .as_slice_mut()
            .unwrap();
        for (r, &v) in rv.iter_mut().zip(var_biased) {
            *r = T::of_f64((1.0 - factor) * r.as_f64() + factor * v * unbias);
        }
    }

    /// Backward pass: returns dx and accumulates dweight, dbias. `mode` must match the last forward.
    pub fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>> {
        let mut dx = ArrayD::zeros(x.raw_dim());
        self.backward_into(
            x.view(),
            dy.view(),
            dx.as_slice_mut().expect("fresh array"),
            mode,
        )?;
        Ok(dx)
    }

    /// Backward into a caller-owned buffer.
    pub fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        mode: Mode,
    ) -> Result<()> {
        check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        let d = self.dims(x.shape())?;
        if dx.len() != d.numel() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!("dx buffer has {} elements, input {}", dx.len(), d.numel()),
            });
        }
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        let relu = self.cfg.fuse_relu;
        let batch = self.uses_batch_stats(mode);
        match (&self.saved, batch) {
            (Some(Saved::Batch { stats, shape }), true) if shape == x.shape() => {
                let sums = k::train_backward(
                    &xs,
                    &gs,
                    dx,
                    d,
                    stats,
                    pslice(&self.weight),
                    pslice(&self.bias),
                    relu,
                );
                add_sums_grads(&mut self.weight, &mut self.bias, &sums, stats);
                Ok(())
            }
            (
                Some(Saved::Running {
                    a,
                    b,
                    invstd,
                    mean,
                    shape,
                }),
                false,
            ) if shape == x.shape() => {
                let (sd, sx) = k::eval_backward(&xs, &gs, dx, d, a, b, relu);
                add_affine_grads(
                    &mut self.weight,
                    &mut self.bias,
                    |c| (sx[c] - mean[c] * sd[c]) * invstd[c],
                    |c| sd[c],
                );
                Ok(())
            }
            _ => Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode,
            }),
        }
    }

    /// Resets running statistics to their initial values (mean 0, var 1, count 0), as `reset_running_stats()`.
    pub fn reset_running_stats(&mut self) {
        if let Some(rm) = self.running_mean.as_mut() {
            rm.fill(T::zero());
        }
        if let Some(rv) = self.running_var.as_mut() {
            rv.fill(T::one());
        }
        self.num_batches_tracked = 0;
    }

    /// The eval-mode per-channel scale and shift (a, b) with y = x·a + b, for folding into a preceding conv/linear.
    pub fn eval_affine(&self) -> Result<(Vec<T>, Vec<T>)> {
        if !self.cfg.track_running_stats {
            return Err(NvError::Config(
                "folding needs running statistics (track_running_stats=true)".into(),
            ));
        }
        let (a, b, _, _) = self.running_affine();
        Ok((a, b))
    }
}

impl<T: Real> Stateful<T> for BatchNorm<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        save_affine(prefix, &self.weight, &self.bias, sd);
        save_running(
            prefix,
            &self.running_mean,
            &self.running_var,
            self.num_batches_tracked,
            sd,
        );
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        load_affine(prefix, &mut self.weight, &mut self.bias, sd)?;
        load_running(
            prefix,
            &mut self.running_mean,
            &mut self.running_var,
            &mut self.num_batches_tracked,
            sd,
        )?;
        self.saved = None;
        self.pooled = None;
        Ok(())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        visit_affine(prefix, &mut self.weight, &mut self.bias, f);
    }
}

/// [`add_affine_grads`] from a batch-statistics backward's sums: dweight = Σdy·x̂ = dot·invstd, dbias = Σdy.
fn add_sums_grads<T: Real>(
    weight: &mut Option<Param<T>>,
    bias: &mut Option<Param<T>>,
    sums: &k::BackwardSums,
    stats: &k::BatchStats<T>,
) {
    add_affine_grads(
        weight,
        bias,
        |c| sums.dot[c] * stats.invstd[c],
        |c| sums.sum_dy[c],
    );
}

/// Adds `dweight(c)` and `dbias(c)` to the affine parameters' gradients (when the layer has them).
fn add_affine_grads<T: Real>(
    weight: &mut Option<Param<T>>,
    bias: &mut Option<Param<T>>,
    dweight: impl Fn(usize) -> f64,
    dbias: impl Fn(usize) -> f64,
) {
    if let (Some(w), Some(b)) = (weight.as_mut(), bias.as_mut()) {
        for (c, g) in w.grads_mut().iter_mut().enumerate() {
            *g = *g + T::of_f64(dweight(c));
        }
        for (c, g) in b.grads_mut().iter_mut().enumerate() {
            *g = *g + T::of_f64(dbias(c));
        }
    }
}
