//! Training: the loop that drives a batch through the model and back, evaluation, divergence detection,
//! checkpoints and logs.
//!
//! ```text
//! DataLoader (background thread) ─► Model::forward(Train) ─► cross_entropy ─► Model::backward ─► Optimizer::step
//!        every epoch / k steps: evaluate(Eval) ─► JSON log, progress bar, --target-acc, checkpoint (atomic)
//! ```

pub mod adapt;
pub mod checkpoint;
pub mod distributed;
mod evaluate;
pub mod finetune;
pub mod log;
mod preflight;
pub mod trainer;

pub use checkpoint::{Checkpoint, Position};
pub use distributed::Distributed;
pub use evaluate::{evaluate, evaluate_with, LogitsFn};
pub use trainer::{
    train, train_model, train_model_keep, EvalPoint, Progress, RunOptions, TrainReport,
};

use crate::data::Augment;
use crate::model::{ModelConfig, ModelKind, NormKind};
use crate::optim::sgd::SgdConfig;
use crate::optim::{LrSchedule, OptimConfig};

/// Everything that defines a training run (saved in checkpoints and logs).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub optim: OptimConfig,
    pub schedule: LrSchedule,
    pub epochs: usize,
    /// Stop after this many optimizer steps (counted over the whole run).
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    /// Also evaluate every k steps (besides every epoch).
    pub eval_every_steps: Option<u64>,
    /// Stop at the first evaluation reaching this test accuracy (0-1).
    pub target_acc: Option<f64>,
    pub label_smoothing: f64,
    pub augment: Option<Augment>,
    pub seed: u64,
    /// Steps over which a loss stuck at ln(classes) means the run diverged (0 disables the check).
    pub divergence_window: u64,
    /// Use only the first k training / test samples (0 = all).
    pub train_limit: usize,
    pub test_limit: usize,
    /// Drop every epoch's last batch when it is smaller than `batch_size`. Without it, a last batch is still
    /// dropped (and the log says so) when it would leave a batch-statistics norm with one value per channel.
    #[serde(default)]
    pub drop_last: bool,
    /// Data-parallel training: every BatchNorm's statistics span the global batch (SyncBN, `--sync-bn`). No
    /// effect in a single process.
    #[serde(default)]
    pub sync_bn: bool,
    /// Set when the run fine-tunes another model: where it came from and what was changed and frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<finetune::FinetuneRecord>,
}

impl TrainConfig {
    /// The reference recipe of `experiments.md`: SGD momentum 0.9, batch 128, constant lr 0.05, 5 epochs.
    pub fn reference(kind: ModelKind, norm: NormKind) -> Self {
        let lr = 0.05;
        TrainConfig {
            model: ModelConfig::fashion(kind, norm),
            optim: OptimConfig::Sgd(SgdConfig {
                momentum: 0.9,
                ..SgdConfig::default()
            }),
            schedule: LrSchedule::constant(lr),
            epochs: 5,
            max_steps: None,
            batch_size: 128,
            eval_batch_size: 500,
            eval_every_steps: None,
            target_acc: None,
            label_smoothing: 0.0,
            augment: None,
            seed: 0,
            divergence_window: 200,
            train_limit: 0,
            test_limit: 0,
            drop_last: false,
            sync_bn: false,
            finetune: None,
        }
    }

    /// Most images in a batch.
    pub const MAX_BATCH: usize = 1 << 16;

    /// Checks every field (a configuration read from a checkpoint is checked before anything is built).
    pub fn validate(&self) -> crate::Result<()> {
        use crate::NvError;
        self.model.validate()?;
        self.schedule.validate()?;
        for (name, v) in [
            ("batch_size (--batch-size)", self.batch_size),
            ("eval_batch_size", self.eval_batch_size),
        ] {
            if !(1..=Self::MAX_BATCH).contains(&v) {
                return Err(NvError::Config(format!(
                    "{name} must be in 1..={}, got {v}",
                    Self::MAX_BATCH
                )));
            }
        }
        if self.eval_every_steps == Some(0) {
            return Err(NvError::Config(
                "eval_every_steps (--eval-every) must be at least 1 step".into(),
            ));
        }
        if let Some(t) = self.target_acc {
            if !(0.0..=1.0).contains(&t) {
                return Err(NvError::Config(format!(
                    "target_acc (--target-acc) is a fraction in [0, 1], got {t}"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(NvError::Config(format!(
                "label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            )));
        }
        Ok(())
    }
}
