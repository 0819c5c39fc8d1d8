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
//! a = weight/sqrt(running_var+eps), b = bias - running_mean·a ([`BatchNorm::eval_affine`]); without tracking it
//! uses batch statistics. `num_batches_tracked` counts training forwards (an `i64`, as in PyTorch).
//!
//! A model's plan fuses the layers around a BatchNorm into its kernels ([`BnFusion`]): the ReLU after it, a 2×2
//! max pool after that, and statistics computed by the convolution before it. Each fused form is bitwise the
//! layers run one by one.
//!
//! | file | what it holds |
//! |---|---|
//! | [`stats`] | (N, C, S) dimensions, moments and their exact merge, the forward's saved statistics, the backward's sums |
//! | [`planes`] | the passes over planes of S > 1 values (train/eval forward, backward, dx handed over plane by plane) |
//! | [`rows`] | the same for S = 1 (BatchNorm1d on (N, C)), over tiles of rows × channels |
//! | [`maxpool`] | the training forward and backward fused with a following 2×2 max pool |
//! | `sync` | the staged training forward and backward over the batches of several ranks (SyncBN) |

mod config;
mod fused;
#[doc(hidden)]
pub mod maxpool;
#[doc(hidden)]
pub mod planes;
#[doc(hidden)]
pub mod rows;
#[doc(hidden)]
pub mod stats;
mod sync;

pub use config::{BatchNormConfig, Convention};
pub use planes::DxPlanes;

use super::buffers::{load_affine, load_running, save_affine, save_running, visit_affine};
use super::NormLayer;
use super::{check_eps, check_momentum, pslice, EvalAffine};
use crate::kernels::shape::{check_channels, check_same_shape, contiguous};
use crate::layer::Layer;
use crate::state::{StateDict, Stateful};
use crate::{Ctx, Mode, NvError, Param, Real, Result};
pub use fused::BnFusion;
use maxpool::Pool2x2;
use ndarray::{ArrayD, ArrayViewD};
use stats::{BackwardSums, BatchStats, Ncs};

/// What the last forward left for the backward.
#[derive(Debug, Clone)]
enum Saved<T> {
    /// Batch statistics (training, or eval without running stats).
    Batch {
        stats: BatchStats<T>,
        shape: Vec<usize>,
        relu: bool,
    },
    /// Fixed affine y = x·a + b from running statistics; `invstd` and `mean` for dweight.
    Running {
        m: Vec<T>,
        a: Vec<T>,
        b: Vec<T>,
        invstd: Vec<f64>,
        shape: Vec<usize>,
        relu: bool,
    },
}

/// A batch-norm layer. Parameters and buffers are under PyTorch's names (`weight`, `bias`, `running_mean`,
/// `running_var`, `num_batches_tracked`).
///
/// ```
/// use normvision::ndarray::{ArrayD, IxDyn};
/// use normvision::norm::BatchNormConfig;
/// use normvision::{Ctx, Layer};
/// let mut bn = BatchNormConfig::d2(3).build::<f32>().unwrap();
/// let x = ArrayD::from_shape_fn(IxDyn(&[4, 3, 5, 5]), |i| (i[0] * 7 + i[3]) as f32);
/// let y = bn.forward(&x, Ctx::train()).unwrap();
/// let mean: f32 = y.iter().sum::<f32>() / y.len() as f32;
/// assert!(mean.abs() < 1e-5);
/// assert_eq!(bn.num_batches_tracked(), 1);
/// let dx = bn.backward(&x, &ArrayD::ones(x.raw_dim()), Ctx::train()).unwrap();
/// assert!(dx.iter().all(|v| v.abs() < 1e-5)); // a constant dy has no gradient through the batch mean
/// ```
#[derive(Debug, Clone)]
pub struct BatchNorm<T: Real = f32> {
    cfg: BatchNormConfig,
    weight: Option<Param<T>>,
    bias: Option<Param<T>>,
    running_mean: Option<ArrayD<T>>,
    running_var: Option<ArrayD<T>>,
    num_batches_tracked: i64,
    saved: Option<Saved<T>>,
    /// The argmax indices of the max pool fused into the last forward; kept across steps so that consecutive
    /// pooled forwards reuse the allocation.
    pooled: Option<(Pool2x2, Vec<u32>)>,
    /// The group whose batches the training statistics span (SyncBN; [`BatchNorm::set_sync`]).
    sync: Option<std::sync::Arc<dyn crate::comm::Communicator>>,
}

impl<T: Real> BatchNorm<T> {
    pub const NAME: &'static str = "BatchNorm";

    pub fn new(cfg: BatchNormConfig) -> Result<Self> {
        check_eps(cfg.eps)?;
        check_momentum(cfg.momentum)?;
        if cfg.num_features == 0 {
            return Err(NvError::Config("num_features must be > 0".into()));
        }
        let c = cfg.num_features;
        let (weight, bias) = super::buffers::new_affine(c, cfg.affine);
        let (running_mean, running_var) = super::buffers::new_running(c, cfg.track_running_stats);
        Ok(BatchNorm {
            cfg,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked: 0,
            saved: None,
            pooled: None,
            sync: None,
        })
    }

    pub fn config(&self) -> &BatchNormConfig {
        &self.cfg
    }
    pub fn weight(&self) -> Option<&Param<T>> {
        self.weight.as_ref()
    }
    pub fn weight_mut(&mut self) -> Option<&mut Param<T>> {
        self.weight.as_mut()
    }
    pub fn bias(&self) -> Option<&Param<T>> {
        self.bias.as_ref()
    }
    pub fn bias_mut(&mut self) -> Option<&mut Param<T>> {
        self.bias.as_mut()
    }
    /// The running mean (`None` without `track_running_stats`).
    pub fn running_mean(&self) -> Option<&ArrayD<T>> {
        self.running_mean.as_ref()
    }
    /// The running (unbiased, in PyTorch's convention) variance.
    pub fn running_var(&self) -> Option<&ArrayD<T>> {
        self.running_var.as_ref()
    }
    /// Mutable running statistics (mean, var), e.g. to re-estimate them.
    pub fn running_stats_mut(&mut self) -> Option<(&mut ArrayD<T>, &mut ArrayD<T>)> {
        match (self.running_mean.as_mut(), self.running_var.as_mut()) {
            (Some(m), Some(v)) => Some((m, v)),
            _ => None,
        }
    }
    pub fn num_batches_tracked(&self) -> i64 {
        self.num_batches_tracked
    }
    /// Sets the momentum of the running update (`None`: cumulative average), as PyTorch's `bn.momentum = m`.
    pub fn set_momentum(&mut self, m: Option<f64>) -> Result<()> {
        check_momentum(m)?;
        self.cfg.momentum = m;
        Ok(())
    }

    /// Validates the input shape and returns its (N, C, S) view.
    pub(crate) fn dims(&self, shape: &[usize]) -> Result<Ncs> {
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

    /// The (N, C, S) of a forward's input for layer `layer` (a layer built on this BatchNorm: Batch Renorm, Ghost
    /// BN), checking the output buffer's length.
    pub(crate) fn check_forward(
        &self,
        layer: &'static str,
        shape: &[usize],
        out_len: usize,
    ) -> Result<Ncs> {
        let d = self.dims(shape)?;
        if out_len != d.numel() {
            return Err(NvError::Shape {
                layer,
                msg: format!("output buffer has {out_len} elements, input {}", d.numel()),
            });
        }
        Ok(d)
    }

    /// The (N, C, S) of a backward's input for layer `layer`, checking dy's shape and dx's length.
    pub(crate) fn check_backward(
        &self,
        layer: &'static str,
        x: &[usize],
        dy: &[usize],
        dx_len: usize,
    ) -> Result<Ncs> {
        check_same_shape(layer, x, dy)?;
        let d = self.dims(x)?;
        if dx_len != d.numel() {
            return Err(NvError::Shape {
                layer,
                msg: format!("dx buffer has {dx_len} elements, input {}", d.numel()),
            });
        }
        Ok(d)
    }

    /// Whether the forward in `mode` normalizes with batch statistics (training, or eval without running
    /// statistics) rather than the running ones.
    pub fn uses_batch_stats(&self, mode: Mode) -> bool {
        mode.is_train() || !self.cfg.track_running_stats
    }

    /// The eval-mode affine y = x·scale + shift, when eval mode uses running statistics (`None` with
    /// `track_running_stats = false`): scale = weight/sqrt(running_var + eps), shift = bias − running_mean·scale,
    /// in f64. The eval forward computes with these values rounded to `T`.
    pub fn eval_affine(&self) -> Option<EvalAffine> {
        if self.uses_batch_stats(Mode::Eval) {
            return None;
        }
        let (rm, rv) = (self.running_mean.as_ref()?, self.running_var.as_ref()?);
        Some(EvalAffine::from_stats(
            rm.iter().map(|v| v.as_f64()),
            rv.iter().map(|v| v.as_f64()),
            pslice(&self.weight),
            pslice(&self.bias),
            self.cfg.eps,
        ))
    }

    /// The eval pass's per-channel (m, a, b) in `T` for y = (x - m)·a + b: m the running mean, a =
    /// weight/sqrt(running_var + eps) rounded once, b the bias; with the exact invstd in f64 (for dweight).
    fn running_affine(&self) -> (Vec<T>, Vec<T>, Vec<T>, Vec<f64>) {
        let rv = self.running_var.as_ref().expect("tracked");
        let rm = self.running_mean.as_ref().expect("tracked");
        crate::norm::running_affine(
            rm.as_slice().expect("contiguous"),
            rv.as_slice().expect("contiguous"),
            pslice(&self.weight),
            pslice(&self.bias),
            self.cfg.eps,
        )
    }

    fn check_train_values(&self, d: Ncs, shape: &[usize], mode: Mode) -> Result<()> {
        if mode.is_train() && d.m() <= 1 {
            return Err(NvError::OneValuePerChannel {
                layer: Self::NAME,
                shape: shape.to_vec(),
            });
        }
        Ok(())
    }

    fn forward_plain(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx, relu: bool) -> Result<()> {
        let shape = x.shape().to_vec();
        let d = self.check_forward(Self::NAME, &shape, y.len())?;
        let xs = contiguous(&x);
        self.pooled = None;
        let mode = ctx.mode();
        if self.synced(mode) {
            let local = planes::local_moments(&xs, d, ctx.kernels());
            self.forward_synced(&xs, y, d, shape, &local, relu, ctx)?;
        } else if self.uses_batch_stats(mode) {
            self.check_train_values(d, &shape, mode)?;
            let stats = planes::train_forward(
                &xs,
                y,
                d,
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
        } else {
            let (m, a, b, invstd) = self.running_affine();
            planes::eval_forward(&xs, y, d, &m, &a, &b, relu, ctx.kernels());
            self.saved = Some(Saved::Running {
                m,
                a,
                b,
                invstd,
                shape,
                relu,
            });
        }
        Ok(())
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

    /// Adds a backward's affine gradients: `dweight(c)` to the weight's and `dbias[c]` to the bias's (for the
    /// layers built on this BatchNorm: Batch Renorm, Ghost BN, SyncBN). Nothing without an affine.
    pub(crate) fn add_affine_grads(&mut self, dweight: impl Fn(usize) -> f64, dbias: &[f64]) {
        if let Some(wp) = self.weight_mut() {
            for (c, g) in wp.grads_mut().iter_mut().enumerate() {
                *g = *g + T::of_f64(dweight(c));
            }
        }
        if let Some(bp) = self.bias_mut() {
            for (g, &v) in bp.grads_mut().iter_mut().zip(dbias) {
                *g = *g + T::of_f64(v);
            }
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
}

impl<T: Real> NormLayer<T> for BatchNorm<T> {
    /// Forward pass into a caller-owned buffer of x's size, without fusions.
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        self.forward_plain(x, y, ctx, false)
    }
    /// Backward into a caller-owned buffer (after an unpooled forward). `ctx`'s mode must be the forward's.
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        ctx: Ctx,
    ) -> Result<()> {
        let d = self.check_backward(Self::NAME, x.shape(), dy.shape(), dx.len())?;
        let mode = ctx.mode();
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        let batch = self.uses_batch_stats(mode);
        match (&self.saved, batch) {
            (Some(Saved::Batch { .. }), true) if self.synced(mode) => {
                self.backward_synced(&xs, &gs, dx, d, x.shape(), ctx)
            }
            (Some(Saved::Batch { stats, shape, relu }), true)
                if shape == x.shape() && self.pooled.is_none() =>
            {
                let sums = planes::train_backward(
                    &xs,
                    &gs,
                    dx,
                    d,
                    stats,
                    pslice(&self.weight),
                    pslice(&self.bias),
                    *relu,
                    ctx.kernels(),
                );
                add_sums_grads(&mut self.weight, &mut self.bias, &sums, stats);
                Ok(())
            }
            (
                Some(Saved::Running {
                    m,
                    a,
                    b,
                    invstd,
                    shape,
                    relu,
                }),
                false,
            ) if shape == x.shape() => {
                let (sd, sx) =
                    planes::eval_backward(&xs, &gs, dx, d, m, a, b, *relu, ctx.kernels());
                add_affine_grads(
                    &mut self.weight,
                    &mut self.bias,
                    |c| sx[c] * invstd[c],
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
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)> {
        Some((self.running_mean.as_ref()?, self.running_var.as_ref()?))
    }
}

impl<T: Real> Layer<T> for BatchNorm<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        self.forward_fused(x, ctx, BnFusion::default())
    }
    /// The backward of the last forward, fused or not: after a pooled forward, `dy` is the gradient of the
    /// pooled output.
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        if self.saved.is_none() {
            return Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode: ctx.mode(),
            });
        }
        if self.pooled.is_some() {
            return self.backward_maxpool(x, dy, ctx);
        }
        super::backward_new(self, x, dy, ctx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.dims(input)?;
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        let c = &self.cfg;
        let kind = match c.ranks.as_slice() {
            [2, 3] => "BatchNorm1d",
            [4] => "BatchNorm2d",
            [5] => "BatchNorm3d",
            _ => "BatchNorm",
        };
        let synced = match &self.sync {
            Some(g) if g.size() > 1 => format!(" [synchronized over {} ranks]", g.size()),
            _ => String::new(),
        };
        format!(
            "{kind}({}, eps={}, momentum={}, affine={}, track_running_stats={}){synced}",
            c.num_features,
            c.eps,
            c.momentum.map_or("None".to_string(), |m| m.to_string()),
            py_bool(c.affine),
            py_bool(c.track_running_stats)
        )
    }
}

/// `True` / `False`, as PyTorch prints booleans.
pub(crate) fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
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
    sums: &BackwardSums,
    stats: &BatchStats<T>,
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
