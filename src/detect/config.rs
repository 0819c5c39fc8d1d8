//! A detection run's settings: the detector and torchvision's detection reference recipe.

use super::detector::DetectorConfig;
use crate::{NvError, Result};

/// A detection run's settings (saved in its checkpoint).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DetTrainConfig {
    pub detector: DetectorConfig,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Linear warm-up from `lr · warmup_factor` over this many steps (torchvision: 1000 at factor 1e-3).
    pub warmup_steps: u64,
    pub warmup_factor: f64,
    /// Fractions of the run at which the learning rate is multiplied by `gamma`.
    pub lr_steps: Vec<f64>,
    pub gamma: f64,
    pub flip: bool,
    /// Shuffling, flips and the samplers' draws.
    pub seed: u64,
    /// Do not train the backbone (`backbone.*`).
    pub freeze_backbone: bool,
    /// In data-parallel training, the backbone's BatchNorms take their statistics over every rank's images
    /// (SyncBN, `--backbone-norm sync`). Written only when set, so that configurations (and the experiments'
    /// cache keys) from before it read and compare as they were.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync_bn: bool,
}

impl DetTrainConfig {
    pub fn new(detector: DetectorConfig) -> DetTrainConfig {
        DetTrainConfig {
            detector,
            epochs: 12,
            batch_size: 2,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 1e-4,
            warmup_steps: 200,
            warmup_factor: 1e-3,
            lr_steps: vec![2.0 / 3.0, 8.0 / 9.0],
            gamma: 0.1,
            flip: true,
            seed: 0,
            freeze_backbone: false,
            sync_bn: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.detector.validate()?;
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(NvError::Config(
                "detection: --epochs and --batch-size must be at least 1".into(),
            ));
        }
        if self.sync_bn && self.detector.net.backbone_norm != crate::model::NormKind::Batch {
            return Err(NvError::Config(format!(
                "detection: SyncBN synchronizes a BatchNorm backbone, not a {} one",
                self.detector.net.backbone_norm.as_str()
            )));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(NvError::Config(format!(
                "detection: --lr must be positive, got {}",
                self.lr
            )));
        }
        Ok(())
    }

    /// The learning rate at `step` of `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let mut lr = self.lr;
        for &f in &self.lr_steps {
            if step as f64 >= f * total as f64 {
                lr *= self.gamma;
            }
        }
        if step < self.warmup_steps {
            let alpha = step as f64 / self.warmup_steps as f64;
            lr *= self.warmup_factor * (1.0 - alpha) + alpha;
        }
        lr
    }
}
