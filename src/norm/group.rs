//! Group normalization (Wu & He 2018): statistics per sample over each group of C/G channels and all spatial
//! positions; biased variance; identical computation in train and eval; per-channel affine.
//!
//! | | |
//! |---|---|
//! | defaults | eps 1e-5, affine (weight 1, bias 0) |
//! | running statistics | none |
//! | C % G != 0 | configuration error |
//! | one value per group | allowed (output = bias), as in PyTorch |

use super::batch::stats::Ncs;
use super::buffers::{load_affine, save_affine, visit_affine};
use super::group_kernels::{self as k, GroupStats};
use super::NormLayer;
use super::{check_eps, pslice};
use crate::kernels::shape::{check_channels, check_dx_len, check_same_shape, contiguous};
use crate::layer::Layer;
use crate::state::{StateDict, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD};

/// Configuration with PyTorch's defaults (eps 1e-5, affine).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupNormConfig {
    pub num_groups: usize,
    pub num_channels: usize,
    pub eps: f64,
    pub affine: bool,
}

impl GroupNormConfig {
    pub fn new(num_groups: usize, num_channels: usize) -> Self {
        GroupNormConfig {
            num_groups,
            num_channels,
            eps: 1e-5,
            affine: true,
        }
    }
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    pub fn affine(mut self, a: bool) -> Self {
        self.affine = a;
        self
    }
    pub fn build<T: Real>(self) -> Result<GroupNorm<T>> {
        GroupNorm::new(self)
    }
}

/// Group normalization.
#[derive(Debug, Clone)]
pub struct GroupNorm<T: Real = f32> {
    cfg: GroupNormConfig,
    weight: Option<Param<T>>,
    bias: Option<Param<T>>,
    saved: Option<(GroupStats<T>, Vec<usize>)>,
}

impl<T: Real> GroupNorm<T> {
    pub const NAME: &'static str = "GroupNorm";

    pub fn new(cfg: GroupNormConfig) -> Result<Self> {
        check_eps(cfg.eps)?;
        if cfg.num_groups == 0
            || cfg.num_channels == 0
            || !cfg.num_channels.is_multiple_of(cfg.num_groups)
        {
            return Err(NvError::Config(format!(
                "num_channels ({}) must be divisible by num_groups ({}), both > 0",
                cfg.num_channels, cfg.num_groups
            )));
        }
        let c = cfg.num_channels;
        let (weight, bias) = super::buffers::new_affine(c, cfg.affine);
        Ok(GroupNorm {
            cfg,
            weight,
            bias,
            saved: None,
        })
    }

    pub fn config(&self) -> &GroupNormConfig {
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
    /// GroupNorm keeps no running statistics (it normalizes every sample by its own groups in both modes).
    pub fn running_mean(&self) -> Option<&ArrayD<T>> {
        None
    }
    /// See [`GroupNorm::running_mean`].
    pub fn running_var(&self) -> Option<&ArrayD<T>> {
        None
    }

    fn dims(&self, shape: &[usize]) -> Result<Ncs> {
        if shape.len() < 2 {
            return Err(NvError::Rank {
                layer: Self::NAME,
                expected: "(N, C, *)".into(),
                got: shape.to_vec(),
            });
        }
        check_channels(Self::NAME, shape, self.cfg.num_channels)?;
        Ok(Ncs {
            n: shape[0],
            c: shape[1],
            s: shape[2..].iter().product(),
        })
    }
}

/// Adds per-(n, c) (Σdy, Σdy·x̂) into per-channel dweight, dbias.
pub(crate) fn accumulate_affine_grads<T: Real>(
    w: &mut Option<Param<T>>,
    b: &mut Option<Param<T>>,
    sums: &[(f64, f64)],
    d: Ncs,
) {
    if let (Some(w), Some(b)) = (w.as_mut(), b.as_mut()) {
        let mut gw = vec![0.0f64; d.c];
        let mut gb = vec![0.0f64; d.c];
        for (i, (a, gx)) in sums.iter().enumerate() {
            gb[i % d.c] += a;
            gw[i % d.c] += gx;
        }
        for (g, v) in w.grads_mut().iter_mut().zip(gw) {
            *g = *g + T::of_f64(v);
        }
        for (g, v) in b.grads_mut().iter_mut().zip(gb) {
            *g = *g + T::of_f64(v);
        }
    }
}

impl<T: Real> NormLayer<T> for GroupNorm<T> {
    /// Forward into a caller-owned buffer. GroupNorm computes the same thing in both modes.
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        let d = self.dims(x.shape())?;
        if y.len() != d.numel() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: "output buffer size".into(),
            });
        }
        let xs = contiguous(&x);
        let st = k::forward(
            &xs,
            y,
            d,
            self.cfg.num_groups,
            pslice(&self.weight),
            pslice(&self.bias),
            self.cfg.eps,
            ctx.kernels(),
        );
        self.saved = Some((st, x.shape().to_vec()));
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
        let Some((st, shape)) = &self.saved else {
            return Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode,
            });
        };
        if shape != x.shape() {
            return Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode,
            });
        }
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        let sums = k::backward(&xs, &gs, dx, d, st, pslice(&self.weight), ctx.kernels());
        accumulate_affine_grads(&mut self.weight, &mut self.bias, &sums, d);
        Ok(())
    }
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)> {
        None
    }
}

impl<T: Real> Layer<T> for GroupNorm<T> {
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
            "GroupNorm({}, {}, eps={}, affine={})",
            c.num_groups,
            c.num_channels,
            c.eps,
            super::batch::py_bool(c.affine)
        )
    }
}

impl<T: Real> Stateful<T> for GroupNorm<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        save_affine(prefix, &self.weight, &self.bias, sd);
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        load_affine(prefix, &mut self.weight, &mut self.bias, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        visit_affine(prefix, &mut self.weight, &mut self.bias, f);
    }
}
