//! Instance normalization: statistics per sample and channel over the spatial axes (GroupNorm with G = C).
//!
//! | | PyTorch behaviour matched here |
//! |---|---|
//! | defaults | eps 1e-5, momentum 0.1, affine **false**, track_running_stats **false** |
//! | train, or eval without tracking | per-instance statistics (biased variance) |
//! | eval with tracking | running statistics, like BatchNorm eval |
//! | running update | `r = (1-m)·r + m·mean over N` of the instance means and of the *unbiased* instance variances |
//! | momentum `None` | running statistics never change (PyTorch passes momentum 0.0) |
//! | `num_batches_tracked` | a buffer when tracking, never incremented (PyTorch leaves it at 0) |
//! | one spatial value when training | error ("Expected more than 1 spatial element when training") |
//! | unbatched (C, *spatial) input | accepted, treated as N = 1 |

use super::batch::planes as bk;
use super::batch::stats::Ncs;
use super::buffers::{load_affine, load_running, save_affine, save_running, visit_affine};
use super::group::accumulate_affine_grads;
use super::group_kernels::{self as k, GroupStats};
use super::NormLayer;
use super::{check_eps, check_momentum, pslice, EvalAffine};
use crate::kernels::shape::{check_dx_len, check_same_shape, contiguous};
use crate::layer::Layer;
use crate::state::{StateDict, Stateful};
use crate::{Ctx, Mode, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD};

/// Configuration with PyTorch's defaults (eps 1e-5, momentum 0.1, no affine, no running statistics).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InstanceNormConfig {
    pub num_features: usize,
    /// 1 for InstanceNorm1d, 2 for InstanceNorm2d, 3 for InstanceNorm3d.
    pub spatial_dims: usize,
    pub eps: f64,
    /// `None`: the running statistics never change, as in PyTorch.
    pub momentum: Option<f64>,
    pub affine: bool,
    pub track_running_stats: bool,
}

impl InstanceNormConfig {
    pub fn new(num_features: usize, spatial_dims: usize) -> Self {
        InstanceNormConfig {
            num_features,
            spatial_dims,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: false,
            track_running_stats: false,
        }
    }
    pub fn d1(c: usize) -> Self {
        Self::new(c, 1)
    }
    pub fn d2(c: usize) -> Self {
        Self::new(c, 2)
    }
    pub fn d3(c: usize) -> Self {
        Self::new(c, 3)
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
    pub fn build<T: Real>(self) -> Result<InstanceNorm<T>> {
        InstanceNorm::new(self)
    }
}

#[derive(Debug, Clone)]
enum Saved<T> {
    Instance(GroupStats<T>, Vec<usize>),
    Running {
        m: Vec<T>,
        a: Vec<T>,
        b: Vec<T>,
        invstd: Vec<f64>,
        shape: Vec<usize>,
    },
}

/// Instance normalization.
#[derive(Debug, Clone)]
pub struct InstanceNorm<T: Real = f32> {
    cfg: InstanceNormConfig,
    weight: Option<Param<T>>,
    bias: Option<Param<T>>,
    running_mean: Option<ArrayD<T>>,
    running_var: Option<ArrayD<T>>,
    num_batches_tracked: i64,
    saved: Option<Saved<T>>,
}

impl<T: Real> InstanceNorm<T> {
    pub const NAME: &'static str = "InstanceNorm";

    pub fn new(cfg: InstanceNormConfig) -> Result<Self> {
        check_eps(cfg.eps)?;
        check_momentum(cfg.momentum)?;
        if cfg.num_features == 0 || !(1..=3).contains(&cfg.spatial_dims) {
            return Err(NvError::Config(
                "InstanceNorm needs num_features > 0 and 1-3 spatial dims".into(),
            ));
        }
        let c = cfg.num_features;
        let (weight, bias) = super::buffers::new_affine(c, cfg.affine);
        let (running_mean, running_var) = super::buffers::new_running(c, cfg.track_running_stats);
        Ok(InstanceNorm {
            cfg,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked: 0,
            saved: None,
        })
    }

    pub fn config(&self) -> &InstanceNormConfig {
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
    /// The running (unbiased) variance.
    pub fn running_var(&self) -> Option<&ArrayD<T>> {
        self.running_var.as_ref()
    }
    /// Mutable running statistics (mean, var).
    pub fn running_stats_mut(&mut self) -> Option<(&mut ArrayD<T>, &mut ArrayD<T>)> {
        match (self.running_mean.as_mut(), self.running_var.as_mut()) {
            (Some(m), Some(v)) => Some((m, v)),
            _ => None,
        }
    }
    pub fn num_batches_tracked(&self) -> i64 {
        self.num_batches_tracked
    }
    /// The eval-mode affine, when eval mode uses running statistics (see [`EvalAffine`]).
    pub fn eval_affine(&self) -> Option<EvalAffine> {
        if self.uses_instance_stats(Mode::Eval) {
            return None;
        }
        Some(EvalAffine::from_stats(
            self.running_mean.as_ref()?.iter().map(|v| v.as_f64()),
            self.running_var.as_ref()?.iter().map(|v| v.as_f64()),
            pslice(&self.weight),
            pslice(&self.bias),
            self.cfg.eps,
        ))
    }

    /// (N, C, S) of a batched or unbatched input.
    fn dims(&self, shape: &[usize]) -> Result<Ncs> {
        let sd = self.cfg.spatial_dims;
        let (n, rest) = if shape.len() == sd + 2 {
            (shape[0], &shape[1..])
        } else if shape.len() == sd + 1 {
            (1, shape)
        } else {
            return Err(NvError::Rank {
                layer: Self::NAME,
                expected: format!("{}D (unbatched) or {}D (batched)", sd + 1, sd + 2),
                got: shape.to_vec(),
            });
        };
        let c = rest[0];
        // PyTorch only warns on a mismatch without affine/running stats; with them the sizes must agree.
        if c != self.cfg.num_features && (self.cfg.affine || self.cfg.track_running_stats) {
            return Err(NvError::Channels {
                layer: Self::NAME,
                expected: self.cfg.num_features,
                got: c,
                shape: shape.to_vec(),
            });
        }
        Ok(Ncs {
            n,
            c,
            s: rest[1..].iter().product(),
        })
    }

    fn uses_instance_stats(&self, mode: Mode) -> bool {
        mode.is_train() || !self.cfg.track_running_stats
    }
}

impl<T: Real> NormLayer<T> for InstanceNorm<T> {
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        let mode = ctx.mode();
        let shape = x.shape().to_vec();
        let d = self.dims(&shape)?;
        if y.len() != d.numel() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: "output buffer size".into(),
            });
        }
        let xs = contiguous(&x);
        if self.uses_instance_stats(mode) {
            if mode.is_train() && d.s <= 1 {
                return Err(NvError::OneSpatialElement {
                    layer: Self::NAME,
                    shape,
                });
            }
            let st = k::forward(
                &xs,
                y,
                d,
                d.c,
                pslice(&self.weight),
                pslice(&self.bias),
                self.cfg.eps,
                ctx.kernels(),
            );
            if mode.is_train() && self.cfg.track_running_stats {
                let mo = self.cfg.momentum.unwrap_or(0.0);
                let unb = d.s as f64 / (d.s as f64 - 1.0);
                let rm = self.running_mean.as_mut().unwrap().as_slice_mut().unwrap();
                let rv = self.running_var.as_mut().unwrap().as_slice_mut().unwrap();
                for c in 0..d.c {
                    let mean: f64 =
                        (0..d.n).map(|n| st.mean[n * d.c + c]).sum::<f64>() / d.n as f64;
                    let var: f64 =
                        (0..d.n).map(|n| st.var[n * d.c + c] * unb).sum::<f64>() / d.n as f64;
                    rm[c] = T::of_f64((1.0 - mo) * rm[c].as_f64() + mo * mean);
                    rv[c] = T::of_f64((1.0 - mo) * rv[c].as_f64() + mo * var);
                }
            }
            self.saved = Some(Saved::Instance(st, shape));
        } else {
            let rm = self.running_mean.as_ref().unwrap().as_slice().unwrap();
            let rv = self.running_var.as_ref().unwrap().as_slice().unwrap();
            let (m, a, b, invstd) = super::running_affine(
                rm,
                rv,
                pslice(&self.weight),
                pslice(&self.bias),
                self.cfg.eps,
            );
            bk::eval_forward(&xs, y, d, &m, &a, &b, false, ctx.kernels());
            self.saved = Some(Saved::Running {
                m,
                a,
                b,
                invstd,
                shape,
            });
        }
        Ok(())
    }
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        ctx: Ctx,
    ) -> Result<()> {
        let mode = ctx.mode();
        check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        check_dx_len(Self::NAME, dx.len(), x.shape())?;
        let d = self.dims(x.shape())?;
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        match (&self.saved, self.uses_instance_stats(mode)) {
            (Some(Saved::Instance(st, shape)), true) if shape == x.shape() => {
                let sums = k::backward(&xs, &gs, dx, d, st, pslice(&self.weight), ctx.kernels());
                accumulate_affine_grads(&mut self.weight, &mut self.bias, &sums, d);
                Ok(())
            }
            (
                Some(Saved::Running {
                    m,
                    a,
                    b,
                    invstd,
                    shape,
                }),
                false,
            ) if shape == x.shape() => {
                let (sd, sx) = bk::eval_backward(&xs, &gs, dx, d, m, a, b, false, ctx.kernels());
                if let (Some(w), Some(bp)) = (self.weight.as_mut(), self.bias.as_mut()) {
                    for (c, g) in w.grads_mut().iter_mut().enumerate() {
                        *g = *g + T::of_f64(sx[c] * invstd[c]);
                    }
                    for (c, g) in bp.grads_mut().iter_mut().enumerate() {
                        *g = *g + T::of_f64(sd[c]);
                    }
                }
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

impl<T: Real> Layer<T> for InstanceNorm<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        super::forward_new(self, x, ctx)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        super::backward_new(self, x, dy, ctx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.dims(input)?;
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        let c = &self.cfg;
        format!(
            "InstanceNorm{}d({}, eps={}, momentum={}, affine={}, track_running_stats={})",
            c.spatial_dims,
            c.num_features,
            c.eps,
            c.momentum.map_or("None".to_string(), |m| m.to_string()),
            super::batch::py_bool(c.affine),
            super::batch::py_bool(c.track_running_stats)
        )
    }
}

impl<T: Real> Stateful<T> for InstanceNorm<T> {
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
        Ok(())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        visit_affine(prefix, &mut self.weight, &mut self.bias, f);
    }
}
