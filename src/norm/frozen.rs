//! Frozen batch normalization (torchvision's `FrozenBatchNorm2d`, Detectron's "BN*"), for fine-tuning with small
//! batches: weight, bias, running_mean and running_var are fixed buffers and the layer is the affine map
//! y = x·scale + shift with scale = weight/sqrt(running_var+eps), shift = bias - running_mean·scale,
//! in both modes. Gradients flow to the input only (dx = dy·scale), or, with
//! [`FrozenBatchNormConfig::train_affine`], also to weight and bias (BatchNorm in eval mode while the rest
//! trains). Loading a state dict ignores `num_batches_tracked`. Build one from a trained [`BatchNorm`] with [`FrozenBatchNorm::from_batch_norm`].

use super::batch::planes;
use super::batch::stats::Ncs;
use super::{check_eps, BatchNorm, EvalAffine, NormLayer};
use crate::kernels::arena;
use crate::kernels::shape::{check_channels, check_dx_len, check_same_shape, contiguous};
use crate::layer::Layer;
use crate::param::ParamRole;
use crate::state::{join, StateDict, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

/// Configuration with torchvision's defaults (eps 1e-5).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FrozenBatchNormConfig {
    pub num_features: usize,
    pub eps: f64,
    /// Train the affine `weight` and `bias` (BatchNorm in eval mode with gradients flowing: fine-tuning with
    /// `--bn eval-stats`); the statistics stay fixed. Off: torchvision's FrozenBatchNorm2d, all four fixed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub train_affine: bool,
}

impl FrozenBatchNormConfig {
    pub fn new(num_features: usize) -> Self {
        FrozenBatchNormConfig {
            num_features,
            eps: 1e-5,
            train_affine: false,
        }
    }
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    pub fn train_affine(mut self, on: bool) -> Self {
        self.train_affine = on;
        self
    }
    pub fn build<T: Real>(self) -> Result<FrozenBatchNorm<T>> {
        FrozenBatchNorm::new(self)
    }
}

/// A batch norm with fixed statistics and affine.
#[derive(Debug, Clone)]
pub struct FrozenBatchNorm<T: Real = f32> {
    cfg: FrozenBatchNormConfig,
    /// Parameters only with `train_affine` (otherwise buffers the optimizer never sees).
    weight: Param<T>,
    bias: Param<T>,
    running_mean: ArrayD<T>,
    running_var: ArrayD<T>,
    /// Whether the last forward applied a fused ReLU (the backward masks dy the same way).
    relu: bool,
}

impl<T: Real> FrozenBatchNorm<T> {
    pub const NAME: &'static str = "FrozenBatchNorm";

    /// torchvision's initial buffers: weight 1, bias 0, running_mean 0, running_var 1.
    pub fn new(cfg: FrozenBatchNormConfig) -> Result<Self> {
        check_eps(cfg.eps)?;
        if cfg.num_features == 0 {
            return Err(NvError::Config("num_features must be > 0".into()));
        }
        let c = IxDyn(&[cfg.num_features]);
        Ok(FrozenBatchNorm {
            weight: Param::new(ArrayD::from_elem(c.clone(), T::one()))
                .with_role(ParamRole::NormWeight),
            bias: Param::new(ArrayD::zeros(c.clone())).with_role(ParamRole::NormBias),
            running_mean: ArrayD::zeros(c.clone()),
            running_var: ArrayD::from_elem(c, T::one()),
            cfg,
            relu: false,
        })
    }

    /// Freezes a (trained) BatchNorm: its affine and running statistics become fixed buffers.
    pub fn from_batch_norm(bn: &BatchNorm<T>) -> Result<Self> {
        let mut f = FrozenBatchNormConfig::new(bn.config().num_features)
            .eps(bn.config().eps)
            .build()?;
        if let (Some(w), Some(b)) = (bn.weight(), bn.bias()) {
            f.weight.value.assign(&w.value);
            f.bias.value.assign(&b.value);
        }
        match (bn.running_mean(), bn.running_var()) {
            (Some(rm), Some(rv)) => {
                f.running_mean.assign(rm);
                f.running_var.assign(rv);
            }
            _ => {
                return Err(NvError::Config(
                    "cannot freeze a BatchNorm without running statistics".into(),
                ))
            }
        }
        Ok(f)
    }

    /// The same layer with its affine trainable or not ([`FrozenBatchNormConfig::train_affine`]).
    pub fn with_train_affine(mut self, on: bool) -> Self {
        self.cfg.train_affine = on;
        self
    }
    pub fn config(&self) -> &FrozenBatchNormConfig {
        &self.cfg
    }
    pub fn weight(&self) -> &ArrayD<T> {
        &self.weight.value
    }
    pub fn bias(&self) -> &ArrayD<T> {
        &self.bias.value
    }
    pub fn running_mean(&self) -> &ArrayD<T> {
        &self.running_mean
    }
    pub fn running_var(&self) -> &ArrayD<T> {
        &self.running_var
    }

    /// The layer's output as an affine y = x·scale + shift (f64), for folding into a convolution. The layer
    /// itself computes (x − running_mean)·scale + bias, which stays exact when |mean| ≫ std.
    pub fn eval_affine(&self) -> EvalAffine {
        EvalAffine::from_stats(
            self.running_mean.iter().map(|v| v.as_f64()),
            self.running_var.iter().map(|v| v.as_f64()),
            self.weight.value.as_slice(),
            self.bias.value.as_slice(),
            self.cfg.eps,
        )
    }

    /// (m, a, b) of the pass y = (x - m)·a + b ([`crate::norm::running_affine`]): exact when |mean| ≫ std.
    fn shifted_affine(&self) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (m, a, b, _) = super::running_affine(
            self.running_mean.as_slice().expect("contiguous"),
            self.running_var.as_slice().expect("contiguous"),
            self.weight.value.as_slice(),
            self.bias.value.as_slice(),
            self.cfg.eps,
        );
        (m, a, b)
    }

    fn dims(&self, shape: &[usize]) -> Result<Ncs> {
        if shape.len() < 2 {
            return Err(NvError::Rank {
                layer: Self::NAME,
                expected: "(N, C, *)".into(),
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

    /// The forward into a caller-owned buffer (the same in both modes), followed by a ReLU when `relu` (a
    /// model's plan fuses a following ReLU this way).
    pub fn forward_fused_into(
        &mut self,
        x: ArrayViewD<T>,
        y: &mut [T],
        ctx: Ctx,
        relu: bool,
    ) -> Result<()> {
        let d = self.dims(x.shape())?;
        if y.len() != d.numel() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: "output buffer size".into(),
            });
        }
        let (m, a, b) = self.shifted_affine();
        planes::eval_forward(&contiguous(&x), y, d, &m, &a, &b, relu, ctx.kernels());
        self.relu = relu;
        Ok(())
    }

    /// The forward (with a fused ReLU when `relu`), allocating the output.
    pub fn forward_fused(&mut self, x: &ArrayD<T>, ctx: Ctx, relu: bool) -> Result<ArrayD<T>> {
        // SAFETY: the eval pass writes every element.
        let mut y = unsafe { arena::output_uninit(x.shape()) };
        self.forward_fused_into(x.view(), y.as_slice_mut().expect("fresh array"), ctx, relu)?;
        Ok(y)
    }
}

impl<T: Real> FrozenBatchNorm<T> {
    /// dweight += Σ dy·x̂ and dbias += Σ dy per channel, x̂ = (x − running_mean)/sqrt(running_var + eps), in
    /// f64, with dy masked where a fused ReLU cut the output.
    fn accumulate_affine_grads(
        &mut self,
        x: &[T],
        dy: &[T],
        d: Ncs,
        (m, a, b): (&[T], &[T], &[T]),
    ) {
        for c in 0..d.c {
            let rm = self.running_mean[c].as_f64();
            let inv = 1.0 / (self.running_var[c].as_f64() + self.cfg.eps).sqrt();
            let (mut sw, mut sb) = (0.0f64, 0.0f64);
            for i in 0..d.n {
                let o = (i * d.c + c) * d.s;
                for k in o..o + d.s {
                    let g = dy[k].as_f64();
                    if self.relu && (x[k] - m[c]) * a[c] + b[c] <= T::zero() {
                        continue;
                    }
                    sw += g * (x[k].as_f64() - rm) * inv;
                    sb += g;
                }
            }
            self.weight.grad[c] = T::of_f64(self.weight.grad[c].as_f64() + sw);
            self.bias.grad[c] = T::of_f64(self.bias.grad[c].as_f64() + sb);
        }
    }
}

impl<T: Real> NormLayer<T> for FrozenBatchNorm<T> {
    /// The same computation in both modes.
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        self.forward_fused_into(x, y, ctx, false)
    }
    /// dx = dy·scale (masked by the last forward's fused ReLU), and the affine's gradients when it trains.
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        ctx: Ctx,
    ) -> Result<()> {
        check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        check_dx_len(Self::NAME, dx.len(), x.shape())?;
        let d = self.dims(x.shape())?;
        let (m, a, b) = self.shifted_affine();
        let (x, dy) = (contiguous(&x), contiguous(&dy));
        planes::eval_backward(&x, &dy, dx, d, &m, &a, &b, self.relu, ctx.kernels());
        if self.cfg.train_affine {
            self.accumulate_affine_grads(&x, &dy, d, (&m, &a, &b));
        }
        Ok(())
    }
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)> {
        Some((&self.running_mean, &self.running_var))
    }
}

impl<T: Real> Layer<T> for FrozenBatchNorm<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        self.forward_fused(x, ctx, false)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        super::backward_new(self, x, dy, ctx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.dims(input)?;
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        format!(
            "FrozenBatchNorm2d({}, eps={}{})",
            self.cfg.num_features,
            self.cfg.eps,
            if self.cfg.train_affine {
                ", affine trained"
            } else {
                ""
            }
        )
    }
}

impl<T: Real> Stateful<T> for FrozenBatchNorm<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        sd.insert_float(join(prefix, "weight"), &self.weight.value);
        sd.insert_float(join(prefix, "bias"), &self.bias.value);
        sd.insert_float(join(prefix, "running_mean"), &self.running_mean);
        sd.insert_float(join(prefix, "running_var"), &self.running_var);
    }
    /// Reads weight, bias, running_mean, running_var; ignores num_batches_tracked (as torchvision does).
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        sd.load_float(&join(prefix, "weight"), &mut self.weight.value)?;
        sd.load_float(&join(prefix, "bias"), &mut self.bias.value)?;
        sd.load_float(&join(prefix, "running_mean"), &mut self.running_mean)?;
        sd.load_float(&join(prefix, "running_var"), &mut self.running_var)?;
        Ok(())
    }
    /// Nothing, unless the affine is trained ([`FrozenBatchNormConfig::train_affine`]).
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        if self.cfg.train_affine {
            f(&join(prefix, "weight"), &mut self.weight);
            f(&join(prefix, "bias"), &mut self.bias);
        }
    }
}
