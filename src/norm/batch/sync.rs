//! BatchNorm over the batches of several ranks (SyncBN): BatchNorm's staged kernels with one small collective
//! between the stages, so the data is read no more often than in a single process.
//!
//! ```text
//! forward : local moments (planes::local_moments, or the convolution's plane moments) ──► gather every rank's
//!           (count, mean, M2) ──► Moments::merge in rank order (exact; Chan et al.) ──► normalize (+ ReLU)
//!           (+ the fused 2×2 max pool: maxpool::normalize_maxpool)
//! backward: planes::backward_sums (Σdy, Σdy·(x−mean)) ──► all-reduce ──► planes::backward_dx (after a pooled
//!           forward, maxpool::train_backward_maxpool does the same with the all-reduce between its passes)
//! ```
//!
//! Only training forwards exchange anything; a group of one rank runs the single-process kernels. The merged
//! statistics are the same bits on every rank, so the running statistics stay identical across ranks; they are
//! updated with the global count's unbiased variance, as PyTorch's `SyncBatchNorm` does. The weight and bias
//! gradients are this rank's share (the data-parallel trainer sums them over ranks with every other gradient);
//! dx is the gradient of the global batch's loss.

use super::planes;
use super::stats::{BackwardSums, BatchStats, Moments, Ncs};
use super::{add_sums_grads, BatchNorm, Saved};
use crate::comm::Communicator;
use crate::norm::pslice;
use crate::{Ctx, Mode, NvError, Real, Result};
use std::sync::Arc;

impl<T: Real> BatchNorm<T> {
    /// Makes the training statistics span the batches of every rank of `comm` (PyTorch's
    /// `convert_sync_batchnorm` without a change of type: the state dict, the plan's fusions that apply and
    /// the eval pass are BatchNorm's); `None` makes it a single-process BatchNorm again. Every rank must run
    /// the same sequence of training forwards and backwards through it.
    pub fn set_sync(&mut self, comm: Option<Arc<dyn Communicator>>) {
        self.sync = comm;
        self.saved = None;
        self.pooled = None;
    }

    /// The group the training statistics span, if set.
    pub fn sync_group(&self) -> Option<&Arc<dyn Communicator>> {
        self.sync.as_ref()
    }

    /// Whether a forward in `mode` exchanges statistics: training, with a group of more than one rank.
    pub(super) fn synced(&self, mode: Mode) -> bool {
        mode.is_train() && self.sync.as_ref().is_some_and(|c| c.size() > 1)
    }

    /// The global batch's moments: every rank's (count, mean, M2), merged in rank order.
    fn global_moments(&self, comm: &dyn Communicator, local: &Moments) -> Result<Moments> {
        let c = local.mean.len();
        let mut buf = Vec::with_capacity(1 + 2 * c);
        buf.push(local.count as f64);
        buf.extend_from_slice(&local.mean);
        buf.extend_from_slice(&local.m2);
        let all = comm.all_gather_f64(&buf)?;
        let mut out = Moments::empty(c);
        for (r, v) in all.iter().enumerate() {
            if v.len() != buf.len() {
                return Err(NvError::Comm(format!(
                    "SyncBatchNorm: rank {r} has {} channels, rank {} has {c}",
                    v.len().saturating_sub(1) / 2,
                    comm.rank()
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

    /// The training forward from this rank's moments `local` of `xs` (N, C, S): merge over the group,
    /// normalize (then ReLU), update the running statistics with the global count, save for the backward.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_synced(
        &mut self,
        xs: &[T],
        y: &mut [T],
        d: Ncs,
        shape: Vec<usize>,
        local: &Moments,
        relu: bool,
        ctx: Ctx,
    ) -> Result<()> {
        let (stats, count) = self.synced_stats(local, &shape)?;
        planes::normalize(
            xs,
            y,
            d,
            &stats,
            pslice(&self.weight),
            pslice(&self.bias),
            relu,
            ctx.kernels(),
        );
        if self.cfg.track_running_stats {
            self.update_running(&stats.mean, &stats.var, count);
        }
        self.saved = Some(Saved::Batch { stats, shape, relu });
        Ok(())
    }

    /// The statistics of the global batch from this rank's moments `local` of an input of `shape`, and the
    /// global count per channel (an error when that is at most 1).
    pub(super) fn synced_stats(
        &self,
        local: &Moments,
        shape: &[usize],
    ) -> Result<(BatchStats<T>, usize)> {
        let comm = self.sync.clone().expect("a synced forward has a group");
        let global = self.global_moments(comm.as_ref(), local)?;
        if global.count <= 1 {
            return Err(NvError::OneValuePerChannel {
                layer: Self::NAME,
                shape: shape.to_vec(),
            });
        }
        Ok((
            BatchStats::<T>::from_moments(&global, self.cfg.eps),
            global.count as usize,
        ))
    }

    /// The group a backward in `mode` sums its statistics over (`None`: this process alone).
    pub(super) fn sync_for(&self, mode: Mode) -> Option<Arc<dyn Communicator>> {
        self.synced(mode).then(|| self.sync.clone()).flatten()
    }
}

/// `local` summed over `comm`'s ranks (Σdy, then Σdy·(x−mean), in one all-reduce); `local` itself without a
/// group.
pub(super) fn sum_over_ranks(
    comm: Option<&dyn Communicator>,
    local: &BackwardSums,
) -> Result<BackwardSums> {
    let Some(comm) = comm else {
        return Ok(local.clone());
    };
    let c = local.sum_dy.len();
    let mut buf = Vec::with_capacity(2 * c);
    buf.extend_from_slice(&local.sum_dy);
    buf.extend_from_slice(&local.dot);
    comm.all_reduce_sum_f64(&mut buf)?;
    Ok(BackwardSums {
        sum_dy: buf[..c].to_vec(),
        dot: buf[c..].to_vec(),
    })
}

impl<T: Real> BatchNorm<T> {
    /// The training backward of a synced forward: the sums all-reduced over the group, dx of the global loss,
    /// this rank's share of the affine gradients.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_synced(
        &mut self,
        xs: &[T],
        gs: &[T],
        dx: &mut [T],
        d: Ncs,
        x_shape: &[usize],
        ctx: Ctx,
    ) -> Result<()> {
        let comm = self.sync.clone().expect("a synced backward has a group");
        let Some(Saved::Batch { stats, shape, relu }) = &self.saved else {
            return Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode: ctx.mode(),
            });
        };
        if shape.as_slice() != x_shape {
            return Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode: ctx.mode(),
            });
        }
        let (w, b) = (pslice(&self.weight), pslice(&self.bias));
        let ko = ctx.kernels();
        let local = planes::backward_sums(xs, gs, d, stats, w, b, *relu, ko);
        let global = sum_over_ranks(Some(comm.as_ref()), &local)?;
        planes::backward_dx(xs, gs, dx, d, stats, &global, stats.count, w, b, *relu, ko);
        add_sums_grads(&mut self.weight, &mut self.bias, &local, stats);
        Ok(())
    }
}
