//! Editing a built graph for transfer learning: freezing nodes, replacing a layer (a new classifier head),
//! turning BatchNorms into FrozenBatchNorms or synchronized ones, and finding the classifier.

use super::{Graph, Op};
use crate::layer::Layer;
use crate::nn::Linear;
use crate::norm::{BatchNorm, FrozenBatchNorm};
use crate::state::StateDict;
use crate::{NvError, Real, Result};

impl<T: Real> super::Node<T> {
    /// Whether the node holds parameters or buffers (a layer with a state dict).
    pub fn has_state(&self) -> bool {
        self.op.as_layer().is_some_and(|l| {
            let mut sd = StateDict::new();
            l.save_state("", &mut sd);
            !sd.tensors.is_empty()
        })
    }
}

impl<T: Real> Graph<T> {
    /// Freezes (or unfreezes) node `name`'s parameters, as `requires_grad_(False)` on a PyTorch module: the
    /// optimizer no longer sees them ([`crate::state::Stateful::visit_params`] skips the node) and the plan
    /// computes no gradient for them. Its buffers (BatchNorm's running statistics) still update in training
    /// mode, as in PyTorch. Architecture files record it.
    pub fn set_frozen(&mut self, name: &str, frozen: bool) -> Result<()> {
        let n = self
            .node_mut(name)
            .ok_or_else(|| NvError::Config(format!("graph: no node named {name:?} to freeze")))?;
        n.frozen = frozen;
        Ok(())
    }

    /// The names of the frozen nodes, in order.
    pub fn frozen_nodes(&self) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|n| n.frozen)
            .map(|n| n.name())
            .collect()
    }

    /// Replaces node `name`'s layer (its inputs and output stay; the next plan sees the new layer). The
    /// output shape may change: whatever reads it must accept the new shape, which the next plan checks.
    pub fn replace_layer(&mut self, name: &str, layer: Box<dyn Layer<T>>) -> Result<()> {
        let n = self
            .node_mut(name)
            .ok_or_else(|| NvError::Config(format!("graph: no node named {name:?}")))?;
        match &mut n.op {
            Op::Layer(l) => {
                *l = layer;
                Ok(())
            }
            other => Err(NvError::Config(format!(
                "graph: node {name:?} is {}, not a layer",
                other.describe()
            ))),
        }
    }

    /// Replaces every BatchNorm with running statistics by a FrozenBatchNorm holding its affine and statistics
    /// (torchvision's `FrozenBatchNorm2d`; with `train_affine` the affine stays trainable: BatchNorm in eval
    /// mode with gradients flowing). Returns the names of the converted nodes; a BatchNorm without running
    /// statistics is an error naming it.
    pub fn freeze_batch_norms(&mut self, train_affine: bool) -> Result<Vec<String>> {
        let mut done = vec![];
        for i in 0..self.nodes.len() {
            let Some(bn) = self.nodes[i].layer_as::<BatchNorm<T>>() else {
                continue;
            };
            let f = FrozenBatchNorm::from_batch_norm(bn)
                .map_err(|e| NvError::Config(format!("node {}: {e}", self.nodes[i].name)))?
                .with_train_affine(train_affine);
            self.nodes[i].op = Op::Layer(Box::new(f));
            done.push(self.nodes[i].name.clone());
        }
        self.engine.invalidate();
        Ok(done)
    }

    /// Makes every BatchNorm's (and SyncBatchNorm's) training statistics span the ranks of `comm` (`--sync-bn`;
    /// PyTorch's `SyncBatchNorm.convert_sync_batchnorm`), or single-process again with `None`
    /// ([`BatchNorm::set_sync`]). The nodes keep their type, names and state, so checkpoints and the plan's
    /// fusions are BatchNorm's. Returns the names of the nodes set.
    pub fn set_batch_norm_sync(
        &mut self,
        comm: Option<std::sync::Arc<dyn crate::comm::Communicator>>,
    ) -> Vec<String> {
        let mut done = vec![];
        for n in &mut self.nodes {
            let bn = if n.layer_as::<BatchNorm<T>>().is_some() {
                n.layer_as_mut::<BatchNorm<T>>()
            } else {
                n.layer_as_mut::<crate::norm::SyncBatchNorm<T>>()
                    .map(|s| s.batch_norm_mut())
            };
            if let Some(bn) = bn {
                bn.set_sync(comm.clone());
                done.push(n.name.clone());
            }
        }
        self.engine.invalidate();
        done
    }

    /// The classifier: the last Linear layer on the path from the first output back through the layers
    /// without state (flatten, dropout, softmax...). `None` when the output is not computed that way.
    pub fn classifier(&self) -> Option<&str> {
        let mut v = *self.outputs.first()?;
        loop {
            let n = &self.nodes[self.values[v.0].producer?];
            if n.layer_as::<Linear<T>>().is_some() {
                return Some(n.name());
            }
            if !matches!(n.op, Op::Layer(_)) || n.has_state() || n.inputs.len() != 1 {
                return None;
            }
            v = n.inputs[0];
        }
    }
}
