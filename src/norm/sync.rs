//! Synchronized BatchNorm (Peng et al. 2018, MegDet; PyTorch's `nn.SyncBatchNorm`): in training, the batch
//! statistics are those of the **global** batch, the union of every rank's samples, so each rank normalizes as
//! one BatchNorm over the whole batch would.
//!
//! It is a [`BatchNorm`] whose statistics span a [`Communicator`]'s ranks ([`BatchNorm::set_sync`]): BatchNorm's
//! staged kernels with a collective between the stages, one small exchange per layer and direction, never a
//! second pass over the data:
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
//!
//! In a model, `--sync-bn` ([`crate::model::Graph::set_batch_norm_sync`]) sets the group on every BatchNorm node
//! instead of changing its type, so the plan still fuses the ReLU and the 2×2 max pool after it and the
//! convolution's plane moments into it (only the dx handed plane by plane to a first convolution is off: its
//! kernel needs the global sums before the first plane).

use super::batch::{BatchNorm, BatchNormConfig, BnFusion};
use super::NormLayer;
use crate::comm::{Communicator, SingleProcess};
use crate::layer::Layer;
use crate::state::{StateDict, Stateful};
use crate::{Ctx, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD};
use std::sync::Arc;

/// BatchNorm whose training statistics are those of the batch of every rank of a [`Communicator`].
#[derive(Debug, Clone)]
pub struct SyncBatchNorm<T: Real = f32> {
    bn: BatchNorm<T>,
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
    pub fn from_batch_norm(mut bn: BatchNorm<T>, comm: Arc<dyn Communicator>) -> Self {
        bn.set_sync(Some(comm));
        SyncBatchNorm { bn }
    }
    /// The BatchNorm it is outside training (and holds its parameters and running statistics).
    pub fn batch_norm(&self) -> &BatchNorm<T> {
        &self.bn
    }
    pub fn batch_norm_mut(&mut self) -> &mut BatchNorm<T> {
        &mut self.bn
    }
    /// Back to a plain BatchNorm with the same parameters and running statistics.
    pub fn into_batch_norm(mut self) -> BatchNorm<T> {
        self.bn.set_sync(None);
        self.bn
    }
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        self.bn.sync_group().expect("a SyncBatchNorm has a group")
    }
    pub fn set_communicator(&mut self, comm: Arc<dyn Communicator>) {
        self.bn.set_sync(Some(comm));
    }
}

impl<T: Real> NormLayer<T> for SyncBatchNorm<T> {
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        self.bn.forward_into(x, y, ctx)
    }
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        ctx: Ctx,
    ) -> Result<()> {
        self.bn.backward_into(x, dy, dx, ctx)
    }
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)> {
        self.bn.running_stats()
    }
}

impl<T: Real> Layer<T> for SyncBatchNorm<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        self.bn.forward_fused(x, ctx, BnFusion::default())
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        Layer::backward(&mut self.bn, x, dy, ctx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.bn.output_shape(input)
    }
    fn name(&self) -> String {
        let c = self.bn.config();
        format!(
            "SyncBatchNorm({}, eps={}, momentum={:?}, ranks={})",
            c.num_features,
            c.eps,
            c.momentum,
            self.communicator().size()
        )
    }
}

impl<T: Real> Stateful<T> for SyncBatchNorm<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.bn.save_state(prefix, sd)
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        self.bn.load_state(prefix, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        self.bn.visit_params(prefix, f)
    }
}
