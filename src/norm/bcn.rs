//! Batch-Channel Normalization (Khaled et al. 2023, arXiv:2312.00596):
//! y = γ_c·(l_c·x̂_BN + (1-l_c)·x̂_LN) + β_c, with x̂_BN normalised per channel over (N, *spatial) and x̂_LN per
//! sample over (C, *spatial); l_c is learnable per channel, initialised to 1 (pure BN).
//!
//! | | |
//! |---|---|
//! | defaults | eps 1e-5, momentum 0.1 (PyTorch convention for the BN part) |
//! | train | BN part uses batch statistics and updates running_mean / running_var (unbiased) / num_batches_tracked |
//! | eval | BN part uses running statistics; the LN part always uses the sample's statistics |
//! | parameters | `weight` (γ), `bias` (β), `l` |
//! | one value per channel when training | error |
//!
//! Kernels: the BN moments come from [`local_moments`](super::batch::planes::local_moments), the LN
//! moments per sample; the output is one affine pass per (sample, channel) slice. Backward: one reduction pass per
//! (sample, channel) giving Σdy and Σdy·(x-shift), from which both parts' terms follow, then one dx pass.

use super::batch::planes;
use super::batch::stats::{BatchStats, Ncs};
use super::group_kernels::block_stats;
use super::NormLayer;
use super::{check_eps, check_momentum};
use crate::kernels::lanes;
use crate::kernels::shape::{check_channels, check_dx_len, check_same_shape, contiguous};
use crate::layer::Layer;
use crate::param::ParamRole;
use crate::state::{join, StateDict, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

/// Configuration with the paper's defaults (eps 1e-5, momentum 0.1 for the BN part's running statistics).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchChannelNormConfig {
    pub num_features: usize,
    pub eps: f64,
    pub momentum: Option<f64>,
}

impl BatchChannelNormConfig {
    pub fn new(num_features: usize) -> Self {
        BatchChannelNormConfig {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
        }
    }
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    /// `None`: cumulative average of the batch statistics (factor 1/num_batches_tracked), as BatchNorm.
    pub fn momentum(mut self, m: Option<f64>) -> Self {
        self.momentum = m;
        self
    }
    pub fn build<T: Real>(self) -> Result<BatchChannelNorm<T>> {
        BatchChannelNorm::new(self)
    }
}

/// Statistics of the BN part for one pass: per channel shift, mean and invstd (batch or running).
#[derive(Debug, Clone)]
struct Part {
    shift: Vec<f64>,
    mean: Vec<f64>,
    invstd: Vec<f64>,
}

#[derive(Debug, Clone)]
struct Saved<T> {
    bn: Part,
    bn_shift: Vec<T>,
    batch: bool,
    ln_mean: Vec<f64>,
    ln_invstd: Vec<f64>,
    shape: Vec<usize>,
}

/// Batch-Channel Normalization.
#[derive(Debug, Clone)]
pub struct BatchChannelNorm<T: Real = f32> {
    cfg: BatchChannelNormConfig,
    weight: Param<T>,
    bias: Param<T>,
    /// The per-channel mix between the BN and LN parts.
    l: Param<T>,
    running_mean: ArrayD<T>,
    running_var: ArrayD<T>,
    num_batches_tracked: i64,
    saved: Option<Saved<T>>,
}

impl<T: Real> BatchChannelNorm<T> {
    pub const NAME: &'static str = "BatchChannelNorm";

    pub fn new(cfg: BatchChannelNormConfig) -> Result<Self> {
        check_eps(cfg.eps)?;
        check_momentum(cfg.momentum)?;
        if cfg.num_features == 0 {
            return Err(NvError::Config("num_features must be > 0".into()));
        }
        let c = cfg.num_features;
        Ok(BatchChannelNorm {
            weight: Param::filled(&[c], T::one()).with_role(ParamRole::NormWeight),
            bias: Param::filled(&[c], T::zero()).with_role(ParamRole::NormBias),
            l: Param::filled(&[c], T::one()).with_role(ParamRole::NormWeight),
            running_mean: ArrayD::zeros(IxDyn(&[c])),
            running_var: ArrayD::from_elem(IxDyn(&[c]), T::one()),
            num_batches_tracked: 0,
            cfg,
            saved: None,
        })
    }

    pub fn config(&self) -> &BatchChannelNormConfig {
        &self.cfg
    }
    pub fn weight(&self) -> &Param<T> {
        &self.weight
    }
    pub fn weight_mut(&mut self) -> &mut Param<T> {
        &mut self.weight
    }
    pub fn bias(&self) -> &Param<T> {
        &self.bias
    }
    pub fn bias_mut(&mut self) -> &mut Param<T> {
        &mut self.bias
    }
    /// The per-channel mixing weight l_c between the BN part (l = 1) and the LN part (l = 0).
    pub fn l(&self) -> &Param<T> {
        &self.l
    }
    pub fn l_mut(&mut self) -> &mut Param<T> {
        &mut self.l
    }
    /// The BN part's running mean.
    pub fn running_mean(&self) -> Option<&ArrayD<T>> {
        Some(&self.running_mean)
    }
    /// The BN part's running (unbiased) variance.
    pub fn running_var(&self) -> Option<&ArrayD<T>> {
        Some(&self.running_var)
    }
    /// Mutable running statistics (mean, var) of the BN part.
    pub fn running_stats_mut(&mut self) -> Option<(&mut ArrayD<T>, &mut ArrayD<T>)> {
        Some((&mut self.running_mean, &mut self.running_var))
    }
    pub fn num_batches_tracked(&self) -> i64 {
        self.num_batches_tracked
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

    fn update_running(&mut self, mean: &[f64], var_b: &[f64], m: usize) {
        self.num_batches_tracked += 1;
        let f = self
            .cfg
            .momentum
            .unwrap_or(1.0 / self.num_batches_tracked as f64);
        let unb = m as f64 / (m as f64 - 1.0);
        for (c, r) in self.running_mean.iter_mut().enumerate() {
            *r = T::of_f64((1.0 - f) * r.as_f64() + f * mean[c]);
        }
        for (c, r) in self.running_var.iter_mut().enumerate() {
            *r = T::of_f64((1.0 - f) * r.as_f64() + f * var_b[c] * unb);
        }
    }
}

impl<T: Real> NormLayer<T> for BatchChannelNorm<T> {
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        let mode = ctx.mode();
        let isa = ctx.kernels().isa;
        let shape = x.shape().to_vec();
        let d = self.dims(&shape)?;
        if y.len() != d.numel() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: "output buffer size".into(),
            });
        }
        let xs = contiguous(&x);
        let eps = self.cfg.eps;
        let (bn, bn_shift) = if mode.is_train() {
            if d.m() <= 1 {
                return Err(NvError::OneValuePerChannel {
                    layer: Self::NAME,
                    shape,
                });
            }
            let st: BatchStats<T> =
                BatchStats::from_moments(&planes::local_moments(&xs, d, ctx.kernels()), eps);
            self.update_running(&st.mean, &st.var, d.m());
            (
                Part {
                    shift: st.shift.iter().map(|v| v.as_f64()).collect(),
                    mean: st.mean,
                    invstd: st.invstd,
                },
                st.shift,
            )
        } else {
            let rm: Vec<f64> = self.running_mean.iter().map(|v| v.as_f64()).collect();
            let inv = self
                .running_var
                .iter()
                .map(|v| 1.0 / (v.as_f64() + eps).sqrt())
                .collect();
            let sh: Vec<T> = rm.iter().map(|&v| T::of_f64(v)).collect();
            (
                Part {
                    shift: sh.iter().map(|v| v.as_f64()).collect(),
                    mean: rm,
                    invstd: inv,
                },
                sh,
            )
        };
        let blk = d.c * d.s;
        let (g, b, l) = (self.weight.values(), self.bias.values(), self.l.values());
        let ln: Vec<(f64, f64)> = if blk == 0 {
            vec![]
        } else {
            y.par_chunks_mut(blk)
                .zip(xs.par_chunks(blk))
                .map(|(yb, xb)| {
                    let (_, mu_l, var_l) = block_stats(isa, xb);
                    let r_l = 1.0 / (var_l + eps).sqrt();
                    for c in 0..d.c {
                        let (gc, lc) = (g[c].as_f64(), l[c].as_f64());
                        let (sh, rb) = (bn.shift[c], bn.invstd[c]);
                        let db = bn.mean[c] - sh;
                        let a = gc * (lc * rb + (1.0 - lc) * r_l);
                        let c0 =
                            gc * (-lc * db * rb + (1.0 - lc) * (sh - mu_l) * r_l) + b[c].as_f64();
                        let r = c * d.s..(c + 1) * d.s;
                        lanes::affine_shifted(
                            isa,
                            &xb[r.clone()],
                            &mut yb[r],
                            bn_shift[c],
                            T::of_f64(a),
                            T::of_f64(c0),
                        );
                    }
                    (mu_l, r_l)
                })
                .collect()
        };
        let (ln_mean, ln_invstd) = ln.into_iter().unzip();
        self.saved = Some(Saved {
            bn,
            bn_shift,
            batch: mode.is_train(),
            ln_mean,
            ln_invstd,
            shape,
        });
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
        let isa = ctx.kernels().isa;
        check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        check_dx_len(Self::NAME, dx.len(), x.shape())?;
        let d = self.dims(x.shape())?;
        let sv = match &self.saved {
            Some(s) if s.shape == x.shape() && s.batch == mode.is_train() => s,
            _ => {
                return Err(NvError::NoSavedState {
                    layer: Self::NAME,
                    mode,
                })
            }
        };
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        let blk = d.c * d.s;
        if blk == 0 || d.n == 0 {
            return Ok(());
        }
        // Pass 1: per (n, c) a = Σdy, p = Σdy·(x - shift_c).
        let ap: Vec<Vec<(f64, f64)>> = xs
            .par_chunks(blk)
            .zip(gs.par_chunks(blk))
            .map(|(xb, gb)| {
                (0..d.c)
                    .map(|c| {
                        let r = c * d.s..(c + 1) * d.s;
                        lanes::dy_moments(isa, &gb[r.clone()], &xb[r], sv.bn_shift[c])
                    })
                    .collect()
            })
            .collect();
        let (g, l) = (self.weight.values().to_vec(), self.l.values().to_vec());
        let mb = d.m() as f64;
        let ml = blk as f64;
        // Channel sums of the BN part.
        let mut sb = vec![0.0; d.c];
        let mut sbx = vec![0.0; d.c];
        let mut gw = vec![0.0; d.c];
        let mut gl = vec![0.0; d.c];
        for (n, row) in ap.iter().enumerate() {
            let (mu_l, r_l) = (sv.ln_mean[n], sv.ln_invstd[n]);
            for c in 0..d.c {
                let (a, p) = row[c];
                let (sh, rb) = (sv.bn.shift[c], sv.bn.invstd[c]);
                let xb_sum = rb * (p - (sv.bn.mean[c] - sh) * a); // Σdy·x̂_BN
                let xl_sum = r_l * (p + (sh - mu_l) * a); // Σdy·x̂_LN
                sb[c] += a;
                sbx[c] += xb_sum;
                let lc = l[c].as_f64();
                gw[c] += lc * xb_sum + (1.0 - lc) * xl_sum;
                gl[c] += g[c].as_f64() * (xb_sum - xl_sum);
            }
        }
        let batch = sv.batch;
        dx.par_chunks_mut(blk)
            .zip(xs.par_chunks(blk).zip(gs.par_chunks(blk)))
            .zip(ap.par_iter())
            .enumerate()
            .for_each(|(n, ((dxb, (xb, gb)), row))| {
                let (mu_l, r_l) = (sv.ln_mean[n], sv.ln_invstd[n]);
                let (mut sv_l, mut svx_l) = (0.0, 0.0);
                for c in 0..d.c {
                    let (a, p) = row[c];
                    let w = g[c].as_f64() * (1.0 - l[c].as_f64());
                    sv_l += w * a;
                    svx_l += w * r_l * (p + (sv.bn.shift[c] - mu_l) * a);
                }
                for c in 0..d.c {
                    let (gc, lc) = (g[c].as_f64(), l[c].as_f64());
                    let (sh, rb) = (sv.bn.shift[c], sv.bn.invstd[c]);
                    let db = sv.bn.mean[c] - sh;
                    let k1 = gc * (lc * rb + (1.0 - lc) * r_l);
                    let mut k2 = -r_l * r_l * svx_l / ml;
                    let mut k3 = -r_l / ml * (sv_l + (sh - mu_l) * r_l * svx_l);
                    if batch {
                        k2 += -gc * lc * rb * rb * sbx[c] / mb;
                        k3 += -gc * lc * rb / mb * (sb[c] - db * rb * sbx[c]);
                    }
                    let r = c * d.s..(c + 1) * d.s;
                    lanes::bwd_dx(
                        isa,
                        &gb[r.clone()],
                        &xb[r.clone()],
                        &mut dxb[r],
                        sv.bn_shift[c],
                        T::of_f64(k1),
                        T::of_f64(k2),
                        T::of_f64(k3),
                    );
                }
            });
        for (p, v) in self.weight.grads_mut().iter_mut().zip(&gw) {
            *p = *p + T::of_f64(*v);
        }
        for (p, v) in self.bias.grads_mut().iter_mut().zip(&sb) {
            *p = *p + T::of_f64(*v);
        }
        for (p, v) in self.l.grads_mut().iter_mut().zip(&gl) {
            *p = *p + T::of_f64(*v);
        }
        Ok(())
    }
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)> {
        Some((&self.running_mean, &self.running_var))
    }
}

impl<T: Real> Layer<T> for BatchChannelNorm<T> {
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
        format!(
            "BatchChannelNorm({}, eps={}, momentum={})",
            self.cfg.num_features,
            self.cfg.eps,
            self.cfg
                .momentum
                .map_or("None".to_string(), |m| m.to_string())
        )
    }
}

impl<T: Real> Stateful<T> for BatchChannelNorm<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        sd.insert_float(join(prefix, "weight"), &self.weight.value);
        sd.insert_float(join(prefix, "bias"), &self.bias.value);
        sd.insert_float(join(prefix, "l"), &self.l.value);
        sd.insert_float(join(prefix, "running_mean"), &self.running_mean);
        sd.insert_float(join(prefix, "running_var"), &self.running_var);
        sd.insert_i64(
            join(prefix, "num_batches_tracked"),
            self.num_batches_tracked,
        );
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        sd.load_float(&join(prefix, "weight"), &mut self.weight.value)?;
        sd.load_float(&join(prefix, "bias"), &mut self.bias.value)?;
        sd.load_float(&join(prefix, "l"), &mut self.l.value)?;
        sd.load_float(&join(prefix, "running_mean"), &mut self.running_mean)?;
        sd.load_float(&join(prefix, "running_var"), &mut self.running_var)?;
        self.num_batches_tracked = sd
            .load_i64(&join(prefix, "num_batches_tracked"))
            .unwrap_or(0);
        self.saved = None;
        Ok(())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        f(&join(prefix, "weight"), &mut self.weight);
        f(&join(prefix, "bias"), &mut self.bias);
        f(&join(prefix, "l"), &mut self.l);
    }
}
