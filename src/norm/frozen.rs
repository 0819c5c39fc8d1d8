//! Frozen batch normalization (torchvision's `FrozenBatchNorm2d`, Detectron's "BN*"), for fine-tuning with small
//! batches: weight, bias, running_mean and running_var are fixed buffers and the layer is the affine map
//! y = x·scale + shift with scale = weight/sqrt(running_var+eps), shift = bias - running_mean·scale,
//! in both modes. Gradients flow to the input only (dx = dy·scale). Loading a state dict ignores
//! `num_batches_tracked`. Build one from a trained [`BatchNorm`] with [`FrozenBatchNorm::from_batch_norm`].

use super::batch_kernels::{self as k, Ncs};
use super::{check_channels, check_dx_len, check_eps, check_same_shape, contiguous, BatchNorm};
use crate::state::{join, StateDict, Stateful};
use crate::{Mode, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

#[derive(Debug, Clone)]
pub struct FrozenBatchNorm<T: Real = f32> {
    pub num_features: usize,
    pub eps: f64,
    pub weight: ArrayD<T>,
    pub bias: ArrayD<T>,
    pub running_mean: ArrayD<T>,
    pub running_var: ArrayD<T>,
    /// Apply ReLU in the same pass (normvision extension).
    pub fuse_relu: bool,
}

impl<T: Real> FrozenBatchNorm<T> {
    pub const NAME: &'static str = "FrozenBatchNorm";

    /// torchvision's defaults: weight 1, bias 0, running_mean 0, running_var 1, eps 1e-5.
    pub fn new(num_features: usize, eps: f64) -> Result<Self> {
        check_eps(eps)?;
        if num_features == 0 {
            return Err(NvError::Config("num_features must be > 0".into()));
        }
        let c = IxDyn(&[num_features]);
        Ok(FrozenBatchNorm {
            num_features,
            eps,
            weight: ArrayD::from_elem(c.clone(), T::one()),
            bias: ArrayD::zeros(c.clone()),
            running_mean: ArrayD::zeros(c.clone()),
            running_var: ArrayD::from_elem(c, T::one()),
            fuse_relu: false,
        })
    }

    /// Freezes a (trained) BatchNorm: its affine and running statistics become fixed buffers.
    pub fn from_batch_norm(bn: &BatchNorm<T>) -> Result<Self> {
        let mut f = Self::new(bn.cfg.num_features, bn.cfg.eps)?;
        if let (Some(w), Some(b)) = (&bn.weight, &bn.bias) {
            f.weight.assign(&w.value);
            f.bias.assign(&b.value);
        }
        match (&bn.running_mean, &bn.running_var) {
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
        f.fuse_relu = bn.cfg.fuse_relu;
        Ok(f)
    }

    /// The affine (a, b) in f64 and whether a ReLU is fused (the same in both modes).
    pub fn eval_affine_of(&self) -> Option<(Vec<f64>, Vec<f64>, bool)> {
        let (mut a, mut b) = (vec![], vec![]);
        for c in 0..self.num_features {
            let s = self.weight[c].as_f64() / (self.running_var[c].as_f64() + self.eps).sqrt();
            a.push(s);
            b.push(self.bias[c].as_f64() - self.running_mean[c].as_f64() * s);
        }
        Some((a, b, self.fuse_relu))
    }

    /// Per-channel (scale, shift).
    pub fn scale_shift(&self) -> (Vec<T>, Vec<T>) {
        let mut a = Vec::with_capacity(self.num_features);
        let mut b = Vec::with_capacity(self.num_features);
        for c in 0..self.num_features {
            // w·(1/sqrt(v+eps)), rounded exactly as BatchNorm's eval affine (and torchvision's w·rsqrt(v+eps)),
            // so that from_batch_norm reproduces the BatchNorm's eval output bit for bit.
            let invstd = 1.0 / (self.running_var[c].as_f64() + self.eps).sqrt();
            let s = self.weight[c].as_f64() * invstd;
            a.push(T::of_f64(s));
            b.push(T::of_f64(
                self.bias[c].as_f64() - self.running_mean[c].as_f64() * s,
            ));
        }
        (a, b)
    }

    fn dims(&self, shape: &[usize]) -> Result<Ncs> {
        if shape.len() < 2 {
            return Err(NvError::Rank {
                layer: Self::NAME,
                expected: "(N, C, *)".into(),
                got: shape.to_vec(),
            });
        }
        check_channels(Self::NAME, shape, self.num_features)?;
        Ok(Ncs {
            n: shape[0],
            c: shape[1],
            s: shape[2..].iter().product(),
        })
    }

    pub fn forward(&mut self, x: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>> {
        let mut y = ArrayD::zeros(x.raw_dim());
        self.forward_into(x.view(), y.as_slice_mut().unwrap(), mode)?;
        Ok(y)
    }

    /// Same computation in both modes.
    pub fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], _mode: Mode) -> Result<()> {
        let d = self.dims(x.shape())?;
        if y.len() != d.numel() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: "output buffer size".into(),
            });
        }
        let (a, b) = self.scale_shift();
        k::eval_forward(&contiguous(&x), y, d, &a, &b, self.fuse_relu);
        Ok(())
    }

    pub fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>> {
        let mut dx = ArrayD::zeros(x.raw_dim());
        self.backward_into(x.view(), dy.view(), dx.as_slice_mut().unwrap(), mode)?;
        Ok(dx)
    }

    /// dx = dy·scale (masked by the fused ReLU); nothing else has a gradient.
    pub fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        _mode: Mode,
    ) -> Result<()> {
        check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        check_dx_len(Self::NAME, dx.len(), x.shape())?;
        let d = self.dims(x.shape())?;
        let (a, b) = self.scale_shift();
        k::eval_backward(
            &contiguous(&x),
            &contiguous(&dy),
            dx,
            d,
            &a,
            &b,
            self.fuse_relu,
        );
        Ok(())
    }
}

impl<T: Real> Stateful<T> for FrozenBatchNorm<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        sd.insert_float(join(prefix, "weight"), &self.weight);
        sd.insert_float(join(prefix, "bias"), &self.bias);
        sd.insert_float(join(prefix, "running_mean"), &self.running_mean);
        sd.insert_float(join(prefix, "running_var"), &self.running_var);
    }
    /// Reads weight, bias, running_mean, running_var; ignores num_batches_tracked (as torchvision does).
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        sd.load_float(&join(prefix, "weight"), &mut self.weight)?;
        sd.load_float(&join(prefix, "bias"), &mut self.bias)?;
        sd.load_float(&join(prefix, "running_mean"), &mut self.running_mean)?;
        sd.load_float(&join(prefix, "running_var"), &mut self.running_var)?;
        Ok(())
    }
    fn visit_params(&mut self, _prefix: &str, _f: &mut dyn FnMut(&str, &mut Param<T>)) {}
}
