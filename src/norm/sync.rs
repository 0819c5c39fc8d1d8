//! Synchronized BatchNorm (Peng et al. 2018, MegDet; PyTorch's `nn.SyncBatchNorm`): in training, the batch
//! statistics are those of the **global** batch, the union of every rank's samples, so each rank normalizes as
//! one BatchNorm over the whole batch would.
//!
//! It is BatchNorm's staged kernels with a collective between the stages, one small exchange per layer and
//! direction, never a second pass over the data:
//!
//! ```text
//! forward : planes::local_moments ──► gather (count, mean, M2) of every rank ──► Moments::merge in rank order
//!           (exact parallel Welford, Chan et al.) ──► BatchStats ──► planes::normalize
//! backward: planes::backward_sums (Σdy, Σdy·(x−mean), global mean) ──► all-reduce ──► planes::backward_dx
//! ```
//!
//! - Ranks may hold different numbers of samples, including none: a rank with an empty batch contributes a
//!   count of 0 and still takes part in both collectives.
//! - The merged statistics are the same bits on every rank (the merge runs in rank order on each), so the
//!   running statistics stay identical on all ranks. They are updated with the global count's unbiased
//!   variance, as PyTorch does.
//! - The weight and bias gradients are this rank's share (its Σdy·x̂ and Σdy), as in PyTorch: the data-parallel
//!   trainer sums them over ranks with the other gradients. dx is the gradient of the global loss.
//! - In eval mode (running statistics) nothing is exchanged: the layer is its BatchNorm.
//! - State-dict names are BatchNorm's, so a checkpoint moves between SyncBN and BN freely.

use super::batch::planes;
use super::batch::stats::{BackwardSums, BatchStats, Moments};
use super::batch::{BatchNorm, BatchNormConfig};
use super::NormLayer;
use crate::comm::{Communicator, SingleProcess};
use crate::kernels::shape::contiguous;
use crate::layer::Layer;
use crate::state::{StateDict, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD};
use std::sync::Arc;

#[derive(Debug, Clone)]
struct Saved<T> {
    stats: BatchStats<T>,
    shape: Vec<usize>,
}

/// BatchNorm whose training statistics are those of the batch of every rank of a [`Communicator`].
#[derive(Debug, Clone)]
pub struct SyncBatchNorm<T: Real = f32> {
    bn: BatchNorm<T>,
    comm: Arc<dyn Communicator>,
    saved: Option<Saved<T>>,
}

impl<T: Real> SyncBatchNorm<T> {
    pub const NAME: &'static str = "SyncBatchNorm";

    /// A new layer over the ranks of `comm`.
    pub fn new(cfg: BatchNormConfig, comm: Arc<dyn Communicator>) -> Result<Self> {
        Ok(Self::from_batch_norm(cfg.build()?, comm))
    }
    /// A single-process SyncBatchNorm (exactly a BatchNorm until it is given a group with
    /// [`SyncBatchNorm::set_communicator`]).
    pub fn single(cfg: BatchNormConfig) -> Result<Self> {
        Self::new(cfg, Arc::new(SingleProcess))
    }
    /// Converts a BatchNorm, keeping its parameters, running statistics and configuration (PyTorch's
    /// `convert_sync_batchnorm`).
    pub fn from_batch_norm(bn: BatchNorm<T>, comm: Arc<dyn Communicator>) -> Self {
        SyncBatchNorm {
            bn,
            comm,
            saved: None,
        }
    }
    /// The BatchNorm it is outside training (and holds its parameters and running statistics).
    pub fn batch_norm(&self) -> &BatchNorm<T> {
        &self.bn
    }
    pub fn batch_norm_mut(&mut self) -> &mut BatchNorm<T> {
        &mut self.bn
    }
    /// Back to a plain BatchNorm with the same parameters and running statistics.
    pub fn into_batch_norm(self) -> BatchNorm<T> {
        self.bn
    }
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }
    pub fn set_communicator(&mut self, comm: Arc<dyn Communicator>) {
        self.comm = comm;
        self.saved = None;
    }

    /// The global batch's moments: every rank's (count, mean, M2), merged in rank order.
    fn global_moments(&self, local: &Moments) -> Result<Moments> {
        let c = local.mean.len();
        let mut buf = Vec::with_capacity(1 + 2 * c);
        buf.push(local.count as f64);
        buf.extend_from_slice(&local.mean);
        buf.extend_from_slice(&local.m2);
        let all = self.comm.all_gather_f64(&buf)?;
        let mut out = Moments::empty(c);
        for (r, v) in all.iter().enumerate() {
            if v.len() != buf.len() {
                return Err(NvError::Comm(format!(
                    "{}: rank {r} has {} channels, rank {} has {c}",
                    Self::NAME,
                    v.len().saturating_sub(1) / 2,
                    self.comm.rank()
                )));
            }
            let m = Moments {
                count: v[0] as u64,
                mean: v[1..1 + c].to_vec(),
                m2: v[1 + c..].to_vec(),
            };
            out = out.merge(&m);
        }
        Ok(out)
    }

    fn train_forward(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        let shape = x.shape().to_vec();
        let d = self.bn.check_forward(Self::NAME, &shape, y.len())?;
        let xs = contiguous(&x);
        let ko = ctx.kernels();
        let local = planes::local_moments(&xs, d, ko);
        let global = self.global_moments(&local)?;
        if global.count <= 1 {
            return Err(NvError::OneValuePerChannel {
                layer: Self::NAME,
                shape,
            });
        }
        let stats = BatchStats::<T>::from_moments(&global, self.bn.config().eps);
        let (w, b) = (
            self.bn.weight().map(|p| p.values()),
            self.bn.bias().map(|p| p.values()),
        );
        planes::normalize(&xs, y, d, &stats, w, b, false, ko);
        if self.bn.config().track_running_stats {
            self.bn
                .update_running(&stats.mean, &stats.var, global.count as usize);
        }
        self.saved = Some(Saved { stats, shape });
        Ok(())
    }
}

impl<T: Real> NormLayer<T> for SyncBatchNorm<T> {
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
        let (w, b) = (
            self.bn.weight().map(|p| p.values()),
            self.bn.bias().map(|p| p.values()),
        );
        let local: BackwardSums = planes::backward_sums(&xs, &gs, d, &s.stats, w, b, false, ko);
        let c = d.c;
        let mut buf = Vec::with_capacity(2 * c);
        buf.extend_from_slice(&local.sum_dy);
        buf.extend_from_slice(&local.dot);
        self.comm.all_reduce_sum_f64(&mut buf)?;
        let global = BackwardSums {
            sum_dy: buf[..c].to_vec(),
            dot: buf[c..].to_vec(),
        };
        planes::backward_dx(
            &xs,
            &gs,
            dx,
            d,
            &s.stats,
            &global,
            s.stats.count,
            w,
            b,
            false,
            ko,
        );
        // this rank's share of the affine gradients (the trainer sums them over ranks)
        self.bn
            .add_affine_grads(|c| local.dot[c] * s.stats.invstd[c], &local.sum_dy);
        Ok(())
    }
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)> {
        self.bn.running_stats()
    }
}

impl<T: Real> Layer<T> for SyncBatchNorm<T> {
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
        let c = self.bn.config();
        format!(
            "SyncBatchNorm({}, eps={}, momentum={:?}, ranks={})",
            c.num_features,
            c.eps,
            c.momentum,
            self.comm.size()
        )
    }
}

impl<T: Real> Stateful<T> for SyncBatchNorm<T> {
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
