//! What a run checks before its first step: the data fits the model, the run's sample limits, and the batch
//! sizes every rank will see (a batch-statistics layer needs more than one value per channel; a Ghost BN's
//! virtual batch must fit), which may drop each epoch's last partial batch.

use super::TrainConfig;
use crate::data::{Dataset, Shard};
use crate::model::Model;
use crate::{NvError, Result};
use std::sync::Arc;

/// The data must fit the model before the first step: images of the model's input shape, in the training and
/// the test set alike, and (when resuming) exactly the model's number of classes; at most that many otherwise.
pub(super) fn check_data(
    model: &Model,
    train: &Dataset,
    test: &Dataset,
    resuming: bool,
) -> Result<()> {
    let want = model.input_shape();
    for (which, ds) in [("training", train), ("test", test)] {
        if ds.shape != want {
            return Err(NvError::Config(format!(
                "the {which} images are {}x{}x{} (CxHxW), the model takes {}x{}x{}",
                ds.shape[0], ds.shape[1], ds.shape[2], want[0], want[1], want[2]
            )));
        }
        let k = ds.num_classes();
        let bad = if resuming && which == "training" {
            k != model.num_classes()
        } else {
            k > model.num_classes()
        };
        if bad {
            return Err(NvError::Config(format!(
                "the {which} data has {k} classes, the model{} has {}",
                if resuming { " being resumed" } else { "" },
                model.num_classes()
            )));
        }
    }
    Ok(())
}

pub(super) fn limit(ds: Arc<Dataset>, k: usize) -> Result<Arc<Dataset>> {
    if k == 0 || k >= ds.len() {
        Ok(ds)
    } else {
        Ok(Arc::new(ds.slice(0, k)?))
    }
}

/// Checks the batch sizes of a run over `train_len` images (each rank's slice of them with a `shard`) and
/// returns whether each epoch's last batch is dropped, saying why in `notes`.
pub(super) fn batch_checks(
    model: &Model,
    cfg: &TrainConfig,
    train_len: usize,
    shard: Option<&Shard>,
    notes: &mut Vec<String>,
) -> Result<bool> {
    if let Some(sh) = &shard {
        sh.validate(cfg.batch_size)?;
    }
    // the first rank whose slice of a global batch of `n` leaves a batch-statistics layer with one value per
    // channel
    let too_small = |n: usize| -> Result<Option<(String, Vec<usize>)>> {
        match shard {
            None => model.one_value_per_channel(n),
            Some(sh) => {
                for r in 0..sh.ranks {
                    if let Some(v) =
                        model.one_value_per_channel_sharded(sh.range_of(r, n).len(), n)?
                    {
                        return Ok(Some(v));
                    }
                }
                Ok(None)
            }
        }
    };
    for node in model.graph().nodes() {
        if let Some(g) = node.layer_as::<crate::norm::GhostBatchNorm<f32>>() {
            if g.ghost_batch() > cfg.batch_size {
                return Err(NvError::Config(format!(
                    "{}: the virtual batch size {} (--ghost-batch) is larger than the batch size {} (--batch-size)",
                    node.name(),
                    g.ghost_batch(),
                    cfg.batch_size
                )));
            }
        }
    }
    let drop_last = cfg.drop_last
        || {
            if let Some((node, shape)) = too_small(cfg.batch_size)? {
                return Err(NvError::Config(format!(
                "batch size {} leaves {node} with one value per channel (its input would be {shape:?}{}); \
                 train with a batch of at least 2{}",
                cfg.batch_size,
                if shard.is_some() { " on one rank" } else { "" },
                if shard.is_some() { " per rank, or with --sync-bn" } else { "" }
            )));
            }
            let rem = train_len % cfg.batch_size;
            match too_small(rem)? {
                Some((node, _)) if rem > 0 => {
                    notes.push(format!(
                    "each epoch's last batch ({rem} of {} images) is dropped: it would leave {node} with one \
                     value per channel (--drop-last drops every partial last batch)",
                    train_len
                ));
                    true
                }
                _ => false,
            }
        };
    Ok(drop_last)
}
