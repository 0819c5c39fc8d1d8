//! Batch Renormalization (Ioffe 2017, arXiv:1702.03275): in training,
//!
//! ```text
//! x̂ = (x − μ_B)/σ_B · r + d,   y = γ·x̂ + β,
//! r = clip(σ_B/σ, 1/r_max, r_max),   d = clip((μ_B − μ)/σ, −d_max, d_max),
//! ```
//!
//! with σ_B = sqrt(var_B + eps) and σ = sqrt(running_var + eps) from the running statistics *before* this
//! batch's update; r and d are constants in the backward (the paper's `stop_gradient`), so
//! dx = r·(BatchNorm's dx with γ·r in place of γ), dγ = Σdy·(r·x̂_B + d), dβ = Σdy. In eval mode the layer is a
//! BatchNorm (running statistics). With r_max = 1 and d_max = 0 it is BatchNorm exactly.
//!
//! **The schedule.** The paper starts as BatchNorm (r_max = 1, d_max = 0) for 5 000 steps, then relaxes the limits
//! linearly to r_max = 3 at 40 000 steps and d_max = 5 at 25 000 steps. [`RenormSchedule::paper`] is that.
//! Our runs are far shorter, so [`RenormSchedule::scaled_to`] maps the paper's 40 000-step relaxation onto the
//! first half of a run of T steps: warm-up until T/16 (5k/80k), d_max reaches 5 at 5T/16 (25k/80k), r_max
//! reaches 3 at T/2 (40k/80k); the second half runs at the full limits, as the paper's did. The trainer applies
//! it to every Batch Renorm of a model whose schedule is [`RenormSchedule::Run`] (the default), from the run's
//! total number of steps; outside a trainer, `Run` means the paper's step counts.
//!
//! Running statistics: the paper's rate α = 0.01 (momentum 0.01 in PyTorch's convention: running_var holds the
//! unbiased variance), under BatchNorm's state-dict names, so a Batch Renorm checkpoint loads into a BatchNorm
//! for inference. Kernels: BatchNorm's staged ones (moments → statistics → normalize; backward sums → dx).

use super::batch::planes;
use super::batch::stats::{BackwardSums, BatchStats};
use super::batch::{BatchNorm, BatchNormConfig};
use super::NormLayer;
use crate::kernels::shape::contiguous;
use crate::layer::Layer;
use crate::state::{StateDict, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD};

/// When the limits r_max and d_max relax from BatchNorm's (1, 0) to their final values.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RenormSchedule {
    /// Scaled to the training run that uses the layer ([`RenormSchedule::scaled_to`] of its total steps); the
    /// paper's step counts outside a trainer.
    Run,
    /// Limits 1 and 0 until `warmup`, then linear ramps reaching d_max at `d_full` and r_max at `r_full`.
    Steps {
        warmup: u64,
        d_full: u64,
        r_full: u64,
    },
}

impl RenormSchedule {
    /// The paper's: warm-up 5 000 steps, d_max full at 25 000, r_max full at 40 000.
    pub fn paper() -> RenormSchedule {
        RenormSchedule::Steps {
            warmup: 5_000,
            d_full: 25_000,
            r_full: 40_000,
        }
    }
    /// The paper's schedule mapped onto the first half of a run of `total` steps (see the module docs).
    pub fn scaled_to(total: u64) -> RenormSchedule {
        RenormSchedule::Steps {
            warmup: total / 16,
            d_full: (5 * total / 16).max(total / 16 + 1),
            r_full: (total / 2).max(total / 16 + 1),
        }
    }
    fn steps(self) -> (u64, u64, u64) {
        match self {
            RenormSchedule::Run => match Self::paper() {
                RenormSchedule::Steps {
                    warmup,
                    d_full,
                    r_full,
                } => (warmup, d_full, r_full),
                RenormSchedule::Run => unreachable!(),
            },
            RenormSchedule::Steps {
                warmup,
                d_full,
                r_full,
            } => (warmup, d_full, r_full),
        }
    }
}

/// Batch Renorm's configuration: the paper's limits (r_max 3, d_max 5), rate α = 0.01, eps 1e-5.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchRenormConfig {
    pub num_features: usize,
    pub eps: f64,
    /// The running statistics' rate α (PyTorch's momentum convention).
    pub momentum: f64,
    /// Final limits.
    pub r_max: f64,
    pub d_max: f64,
    pub schedule: RenormSchedule,
    /// Accepted input ranks, as [`BatchNormConfig::ranks`].
    pub ranks: Vec<usize>,
}

impl BatchRenormConfig {
    /// Any (N, C, *) input.
    pub fn new(num_features: usize) -> Self {
        BatchRenormConfig {
            num_features,
            eps: 1e-5,
            momentum: 0.01,
            r_max: 3.0,
            d_max: 5.0,
            schedule: RenormSchedule::Run,
            ranks: vec![],
        }
    }
    /// For (N, C, H, W).
    pub fn d2(num_features: usize) -> Self {
        BatchRenormConfig {
            ranks: vec![4],
            ..Self::new(num_features)
        }
    }
    /// For (N, C) and (N, C, L).
    pub fn d1(num_features: usize) -> Self {
        BatchRenormConfig {
            ranks: vec![2, 3],
            ..Self::new(num_features)
        }
    }
    pub fn limits(mut self, r_max: f64, d_max: f64) -> Self {
        self.r_max = r_max;
        self.d_max = d_max;
        self
    }
    pub fn schedule(mut self, s: RenormSchedule) -> Self {
        self.schedule = s;
        self
    }
    pub fn momentum(mut self, m: f64) -> Self {
        self.momentum = m;
        self
    }
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    pub fn build<T: Real>(self) -> Result<BatchRenorm<T>> {
        BatchRenorm::new(self)
    }
    /// The BatchNorm the layer is in eval mode (and whose parameters and buffers it holds).
    pub fn batch_norm_config(&self) -> BatchNormConfig {
        let mut bc = BatchNormConfig::new(self.num_features)
            .eps(self.eps)
            .momentum(Some(self.momentum));
        bc.ranks = self.ranks.clone();
        bc
    }
}

/// What a training forward left for the backward.
#[derive(Debug, Clone)]
struct Saved<T> {
    stats: BatchStats<T>,
    /// γ·r and β + γ·d per channel: the normalising pass's weight and bias.
    w: Vec<T>,
    b: Vec<T>,
    r: Vec<f64>,
    d: Vec<f64>,
    shape: Vec<usize>,
}

/// A Batch Renormalization layer (see the module docs). Parameters and buffers under BatchNorm's names.
///
/// ```
/// use normvision::ndarray::{ArrayD, IxDyn};
/// use normvision::norm::{BatchRenormConfig, RenormSchedule};
/// use normvision::{Ctx, Layer};
/// let sched = RenormSchedule::Steps { warmup: 0, d_full: 1, r_full: 1 };
/// let mut rn = BatchRenormConfig::d2(2).schedule(sched).build::<f64>().unwrap();
/// let x = ArrayD::from_shape_fn(IxDyn(&[4, 2, 3, 3]), |i| (i[0] * 5 + i[2] * 3 + i[3]) as f64 + 10.0);
/// // running statistics (0, 1) are far from the batch's: r and d hit their limits at step 1
/// let y = rn.forward(&x, Ctx::train().with_step(1)).unwrap();
/// let (r, d) = rn.last_correction().unwrap();
/// assert_eq!((r[0], d[0]), (3.0, 5.0));
/// assert!(y.iter().all(|v| v.is_finite()));
/// ```
#[derive(Debug, Clone)]
pub struct BatchRenorm<T: Real = f32> {
    cfg: BatchRenormConfig,
    /// Parameters, running statistics and the eval pass.
    bn: BatchNorm<T>,
    run_length: Option<u64>,
    saved: Option<Saved<T>>,
}

impl<T: Real> BatchRenorm<T> {
    pub const NAME: &'static str = "BatchRenorm";

    pub fn new(cfg: BatchRenormConfig) -> Result<Self> {
        if !(cfg.r_max >= 1.0 && cfg.r_max.is_finite() && cfg.d_max >= 0.0 && cfg.d_max.is_finite())
        {
            return Err(NvError::Config(format!(
                "Batch Renorm: r_max must be finite and >= 1 and d_max finite and >= 0, got r_max {} and d_max {}",
                cfg.r_max, cfg.d_max
            )));
        }
        if let RenormSchedule::Steps {
            warmup,
            d_full,
            r_full,
        } = cfg.schedule
        {
            if d_full < warmup || r_full < warmup {
                return Err(NvError::Config(format!(
                    "Batch Renorm schedule: the ramps must end after the warm-up ({warmup} steps), got d_max at {d_full} and r_max at {r_full}"
                )));
            }
        }
        Ok(BatchRenorm {
            bn: cfg.batch_norm_config().build()?,
            cfg,
            run_length: None,
            saved: None,
        })
    }
    pub fn config(&self) -> &BatchRenormConfig {
        &self.cfg
    }
    /// The BatchNorm holding the parameters and running statistics (and computing the eval pass).
    pub fn batch_norm(&self) -> &BatchNorm<T> {
        &self.bn
    }
    pub fn batch_norm_mut(&mut self) -> &mut BatchNorm<T> {
        &mut self.bn
    }
    /// Tells a layer with [`RenormSchedule::Run`] how many steps its run has (the trainer does).
    pub fn set_run_length(&mut self, total_steps: u64) {
        self.run_length = Some(total_steps);
    }
    /// The schedule in force: the configured steps, or for `Run` the scaled one (the paper's without a run
    /// length).
    pub fn effective_schedule(&self) -> RenormSchedule {
        match (self.cfg.schedule, self.run_length) {
            (RenormSchedule::Run, Some(t)) => RenormSchedule::scaled_to(t),
            (RenormSchedule::Run, None) => RenormSchedule::paper(),
            (s, _) => s,
        }
    }
    /// (r_max, d_max) at training step `step` (0-based; a forward without a step counts as step 0).
    pub fn limits_at(&self, step: u64) -> (f64, f64) {
        let (w, df, rf) = self.effective_schedule().steps();
        let ramp = |full: u64| -> f64 {
            if step <= w {
                0.0
            } else if step >= full {
                1.0
            } else {
                (step - w) as f64 / (full - w) as f64
            }
        };
        (
            1.0 + (self.cfg.r_max - 1.0) * ramp(rf),
            self.cfg.d_max * ramp(df),
        )
    }
    /// The (r, d) of the last training forward, per channel.
    pub fn last_correction(&self) -> Option<(&[f64], &[f64])> {
        self.saved.as_ref().map(|s| (&s.r[..], &s.d[..]))
    }

    fn train_forward(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        let shape = x.shape().to_vec();
        let d = self.bn.check_forward(Self::NAME, &shape, y.len())?;
        if d.m() <= 1 {
            return Err(NvError::OneValuePerChannel {
                layer: Self::NAME,
                shape,
            });
        }
        let xs = contiguous(&x);
        let ko = ctx.kernels();
        let moments = planes::local_moments(&xs, d, ko);
        let stats = BatchStats::<T>::from_moments(&moments, self.cfg.eps);
        let (r_max, d_max) = self.limits_at(ctx.step().unwrap_or(0));
        let (rm, rv) = self
            .bn
            .running_stats()
            .expect("Batch Renorm tracks running statistics");
        let (mut r, mut dd) = (vec![0.0; d.c], vec![0.0; d.c]);
        for c in 0..d.c {
            let sigma = (rv[c].as_f64() + self.cfg.eps).sqrt();
            let sigma_b = 1.0 / stats.invstd[c];
            r[c] = (sigma_b / sigma).clamp(1.0 / r_max, r_max);
            dd[c] = ((stats.mean[c] - rm[c].as_f64()) / sigma).clamp(-d_max, d_max);
        }
        let gamma = |c: usize| self.bn.weight().map_or(1.0, |w| w.values()[c].as_f64());
        let beta = |c: usize| self.bn.bias().map_or(0.0, |b| b.values()[c].as_f64());
        let w: Vec<T> = (0..d.c).map(|c| T::of_f64(gamma(c) * r[c])).collect();
        let b: Vec<T> = (0..d.c)
            .map(|c| T::of_f64(beta(c) + gamma(c) * dd[c]))
            .collect();
        planes::normalize(&xs, y, d, &stats, Some(&w), Some(&b), false, ko);
        self.bn.update_running(&stats.mean, &stats.var, d.m());
        self.saved = Some(Saved {
            stats,
            w,
            b,
            r,
            d: dd,
            shape,
        });
        Ok(())
    }
}

impl<T: Real> NormLayer<T> for BatchRenorm<T> {
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        if ctx.mode().is_train() {
            self.train_forward(x, y, ctx)
        } else {
            self.saved = None;
            self.bn.forward_into(x, y, ctx)
        }
    }
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        ctx: Ctx,
    ) -> Result<()> {
        if !ctx.mode().is_train() {
            return self.bn.backward_into(x, dy, dx, ctx);
        }
        let d = self
            .bn
            .check_backward(Self::NAME, x.shape(), dy.shape(), dx.len())?;
        let Some(s) = self.saved.as_ref().filter(|s| s.shape == x.shape()) else {
            return Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode: ctx.mode(),
            });
        };
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        let ko = ctx.kernels();
        // BatchNorm's backward with weight γ·r: dx = γ·r/σ_B·(dy − mean(dy) − x̂_B·mean(dy·x̂_B)), r and d fixed.
        let sums: BackwardSums =
            planes::backward_sums(&xs, &gs, d, &s.stats, Some(&s.w), Some(&s.b), false, ko);
        planes::backward_dx(
            &xs,
            &gs,
            dx,
            d,
            &s.stats,
            &sums,
            s.stats.count,
            Some(&s.w),
            Some(&s.b),
            false,
            ko,
        );
        self.bn.add_affine_grads(
            |c| s.r[c] * sums.dot[c] * s.stats.invstd[c] + s.d[c] * sums.sum_dy[c],
            &sums.sum_dy,
        );
        Ok(())
    }
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)> {
        self.bn.running_stats()
    }
}

impl<T: Real> Layer<T> for BatchRenorm<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        super::forward_new(self, x, ctx)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        super::backward_new(self, x, dy, ctx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.bn.dims(input)?;
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        let c = &self.cfg;
        format!(
            "BatchRenorm({}, eps={}, momentum={}, r_max={}, d_max={})",
            c.num_features, c.eps, c.momentum, c.r_max, c.d_max
        )
    }
}

impl<T: Real> Stateful<T> for BatchRenorm<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.bn.save_state(prefix, sd)
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        self.saved = None;
        self.bn.load_state(prefix, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        self.bn.visit_params(prefix, f)
    }
}
