//! Instance normalization: statistics per sample and channel over the spatial axes (GroupNorm with G = C).
//!
//! | | PyTorch behaviour matched here |
//! |---|---|
//! | defaults | eps 1e-5, momentum 0.1, affine **false**, track_running_stats **false** |
//! | train, or eval without tracking | per-instance statistics (biased variance) |
//! | eval with tracking | running statistics, like BatchNorm eval |
//! | running update | `r = (1-m)·r + m·mean over N` of the instance means and of the *unbiased* instance variances |
//! | `num_batches_tracked` | a buffer when tracking, never incremented (PyTorch leaves it at 0) |
//! | one spatial value when training | error ("Expected more than 1 spatial element when training") |
//! | unbatched (C, *spatial) input | accepted, treated as N = 1 |

use super::batch_kernels::{self as bk, Ncs};
use super::buffers::{load_affine, load_running, save_affine, save_running, visit_affine};
use super::group::accumulate_affine_grads;
use super::group_kernels::{self as k, GroupStats};
use super::{check_dx_len, check_eps, check_momentum, check_same_shape, contiguous, pslice};
use crate::state::{StateDict, Stateful};
use crate::{Mode, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceNormConfig {
    pub num_features: usize,
    /// 1 for InstanceNorm1d, 2 for InstanceNorm2d, 3 for InstanceNorm3d.
    pub spatial_dims: usize,
    pub eps: f64,
    pub momentum: f64,
    pub affine: bool,
    pub track_running_stats: bool,
}

impl InstanceNormConfig {
    pub fn new(num_features: usize, spatial_dims: usize) -> Self {
        InstanceNormConfig {
            num_features,
            spatial_dims,
            eps: 1e-5,
            momentum: 0.1,
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
    pub fn momentum(mut self, m: f64) -> Self {
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
        a: Vec<T>,
        b: Vec<T>,
        invstd: Vec<f64>,
        mean: Vec<f64>,
        shape: Vec<usize>,
    },
}

#[derive(Debug, Clone)]
pub struct InstanceNorm<T: Real = f32> {
    pub cfg: InstanceNormConfig,
    pub weight: Option<Param<T>>,
    pub bias: Option<Param<T>>,
    pub running_mean: Option<ArrayD<T>>,
    pub running_var: Option<ArrayD<T>>,
    pub num_batches_tracked: i64,
    saved: Option<Saved<T>>,
}

impl<T: Real> InstanceNorm<T> {
    pub const NAME: &'static str = "InstanceNorm";

    pub fn new(cfg: InstanceNormConfig) -> Result<Self> {
        check_eps(cfg.eps)?;
        check_momentum(Some(cfg.momentum))?;
        if cfg.num_features == 0 || !(1..=3).contains(&cfg.spatial_dims) {
            return Err(NvError::Config(
                "InstanceNorm needs num_features > 0 and 1-3 spatial dims".into(),
            ));
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

    pub fn forward(&mut self, x: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>> {
        let mut y = ArrayD::zeros(x.raw_dim());
        self.forward_into(x.view(), y.as_slice_mut().unwrap(), mode)?;
        Ok(y)
    }

    pub fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], mode: Mode) -> Result<()> {
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
            );
            if mode.is_train() && self.cfg.track_running_stats {
                let mo = self.cfg.momentum;
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
            let (w, b) = (pslice(&self.weight), pslice(&self.bias));
            let mut a_v = vec![];
            let mut b_v = vec![];
            let mut inv_v = vec![];
            let mut mean_v = vec![];
            for c in 0..d.c {
                let inv = 1.0 / (rv[c].as_f64() + self.cfg.eps).sqrt();
                let a = w.map_or(1.0, |w| w[c].as_f64()) * inv;
                a_v.push(T::of_f64(a));
                b_v.push(T::of_f64(
                    b.map_or(0.0, |b| b[c].as_f64()) - rm[c].as_f64() * a,
                ));
                inv_v.push(inv);
                mean_v.push(rm[c].as_f64());
            }
            bk::eval_forward(&xs, y, d, &a_v, &b_v, false);
            self.saved = Some(Saved::Running {
                a: a_v,
                b: b_v,
                invstd: inv_v,
                mean: mean_v,
                shape,
            });
        }
        Ok(())
    }

    pub fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>> {
        let mut dx = ArrayD::zeros(x.raw_dim());
        self.backward_into(x.view(), dy.view(), dx.as_slice_mut().unwrap(), mode)?;
        Ok(dx)
    }

    pub fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        mode: Mode,
    ) -> Result<()> {
        check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        check_dx_len(Self::NAME, dx.len(), x.shape())?;
        let d = self.dims(x.shape())?;
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        match (&self.saved, self.uses_instance_stats(mode)) {
            (Some(Saved::Instance(st, shape)), true) if shape == x.shape() => {
                let sums = k::backward(&xs, &gs, dx, d, st, pslice(&self.weight));
                accumulate_affine_grads(&mut self.weight, &mut self.bias, &sums, d);
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
                let (sd, sx) = bk::eval_backward(&xs, &gs, dx, d, a, b, false);
                if let (Some(w), Some(bp)) = (self.weight.as_mut(), self.bias.as_mut()) {
                    for (c, g) in w.grads_mut().iter_mut().enumerate() {
                        *g = *g + T::of_f64((sx[c] - mean[c] * sd[c]) * invstd[c]);
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
