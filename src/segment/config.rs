//! What defines a segmentation run ([`SegTrainConfig`], saved in its checkpoints and log) and the data it runs
//! on ([`SegData`]).

use super::batches::SegAugment;
use super::data::SegSource;
use crate::data::scenes::IGNORE;
use crate::data::Normalization;
use crate::model::deeplab::DeepLabConfig;
use crate::nn::loss::PixelCrossEntropy;
use crate::optim::sgd::SgdConfig;
use crate::optim::{LrSchedule, OptimConfig, Schedule};
use crate::{NvError, Result};

/// Everything that defines a segmentation run (saved in its checkpoints and log).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SegTrainConfig {
    pub model: DeepLabConfig,
    pub optim: OptimConfig,
    /// Base rate; the schedule is poly(0.9) over the run ([`SegTrainConfig::schedule`]).
    pub lr: f64,
    pub epochs: usize,
    /// Stop after this many steps (the schedule still spans `epochs`).
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub eval_batch_size: usize,
    pub augment: SegAugment,
    /// Seed of the data order and augmentation (the model's weights come from `model.seed`).
    pub seed: u64,
    pub loss: PixelCrossEntropy,
    /// The backbone's parameters are frozen (not trained).
    #[serde(default)]
    pub freeze_backbone: bool,
    /// The classification checkpoint the backbone started from, if any.
    #[serde(default)]
    pub backbone_from: Option<String>,
    /// In data-parallel training, every BatchNorm's statistics span the ranks (SyncBN).
    #[serde(default)]
    pub sync_bn: bool,
}

impl SegTrainConfig {
    /// torchvision's recipe at CPU scale for `model`: SGD momentum 0.9, weight decay 1e-4, lr 0.02 (poly 0.9),
    /// batch 8, 15 epochs, crops of 64 scaled 0.75-1.5 with flips.
    pub fn reference(model: DeepLabConfig) -> Self {
        SegTrainConfig {
            model,
            optim: OptimConfig::Sgd(SgdConfig {
                momentum: 0.9,
                weight_decay: 1e-4,
                ..SgdConfig::default()
            }),
            lr: 0.02,
            epochs: 15,
            max_steps: None,
            batch_size: 8,
            eval_batch_size: 32,
            augment: SegAugment {
                crop: 64,
                scale: (0.75, 1.5),
                flip: true,
            },
            seed: 0,
            loss: PixelCrossEntropy::ignoring(IGNORE as usize),
            freeze_backbone: false,
            backbone_from: None,
            sync_bn: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.augment.validate()?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(NvError::Config(format!(
                "segmentation: --lr must be finite and positive, got {}",
                self.lr
            )));
        }
        for (name, v) in [
            ("--batch-size", self.batch_size),
            ("the eval batch size", self.eval_batch_size),
            ("--epochs", self.epochs),
        ] {
            if !(1..=1 << 16).contains(&v) {
                return Err(NvError::Config(format!(
                    "segmentation: {name} must be in 1..=65536, got {v}"
                )));
            }
        }
        Ok(())
    }

    /// Steps per epoch for `n` training samples (the last partial batch is dropped, as torchvision's recipe
    /// does).
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n / self.batch_size
    }

    /// poly(0.9) from `lr` to 0 over the whole run.
    pub fn schedule(&self, n: usize) -> Result<LrSchedule> {
        let total = (self.steps_per_epoch(n) * self.epochs).max(1) as u64;
        LrSchedule::new(Schedule::Poly {
            lr: self.lr,
            total_steps: total + 1,
            power: 0.9,
        })
    }
}

/// Training and test data with the input normalization and the class names (background first).
pub struct SegData {
    pub train: SegSource,
    pub test: SegSource,
    pub norm: Normalization,
    pub classes: Vec<String>,
}

impl SegData {
    /// Garment scenes of `size`² pixels drawn on the fly, as `train --task segment` makes them: `n_train`
    /// scenes of `train`'s garments (generator seed `seed`), `n_test` of `test`'s (seed `seed + 1`),
    /// normalized by the first 512 training scenes.
    pub fn garment_scenes(
        train: std::sync::Arc<crate::data::Dataset>,
        test: std::sync::Arc<crate::data::Dataset>,
        size: usize,
        seed: u64,
        n_train: usize,
        n_test: usize,
    ) -> Result<SegData> {
        use crate::data::scenes::{scene_classes, SceneGenerator};
        let classes = scene_classes(&train.classes);
        let train = SegSource::scenes(SceneGenerator::new(train, size, seed)?, 0, n_train)?;
        let test = SegSource::scenes(
            SceneGenerator::new(test, size, seed.wrapping_add(1))?,
            0,
            n_test,
        )?;
        Ok(SegData {
            norm: super::batches::normalization(&train, 512)?,
            train,
            test,
            classes,
        })
    }
}
