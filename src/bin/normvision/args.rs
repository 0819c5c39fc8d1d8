//! Command-line arguments shared by the training commands, and their translation into a [`TrainConfig`].

use crate::choice;
use clap::{Args, ValueEnum};
use normvision::data::image_folder::scan;
use normvision::data::{
    fashion_mnist, load_image_folder, stream_image_folder, Augment, Corruption, Dataset,
};
use normvision::model::{ModelKind, NormKind};
use normvision::nn::init::{Init, InitSpec};
use normvision::optim::adamw::AdamWConfig;
use normvision::optim::schedule::Schedule;
use normvision::optim::sgd::SgdConfig;
use normvision::optim::{DecayPolicy, LrSchedule, OptimConfig};
use normvision::train::TrainConfig;
use normvision::{NvError, Result};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    Sgd,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    Constant,
    Step,
    Cosine,
    OneCycle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitArg {
    /// PyTorch's default (kaiming-uniform, a = sqrt(5)).
    Default,
    KaimingUniform,
    KaimingNormal,
    XavierUniform,
    XavierNormal,
}

impl From<InitArg> for Init {
    fn from(a: InitArg) -> Init {
        match a {
            InitArg::Default => Init::Default,
            InitArg::KaimingUniform => Init::KaimingUniform,
            InitArg::KaimingNormal => Init::KaimingNormal,
            InitArg::XavierUniform => Init::XavierUniform,
            InitArg::XavierNormal => Init::XavierNormal,
        }
    }
}

/// Where the images come from.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Fashion-MNIST (or any MNIST-format IDX) directory [default: /usr/share/datasets/fashion-mnist].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Train on an image folder instead (one sub-folder per class, PNG/JPEG); needs --test-folder.
    #[arg(long, value_name = "DIR", requires = "test_folder")]
    pub image_folder: Option<PathBuf>,
    /// The evaluation image folder (same class sub-folders).
    #[arg(long, value_name = "DIR")]
    pub test_folder: Option<PathBuf>,
    /// Image size (H = W) and channels for image folders.
    #[arg(long, default_value_t = 28)]
    pub image_size: usize,
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Decode image-folder images from disk as batches are made (in the loader's threads) instead of holding
    /// the decoded folder in memory. Default: stream when the decoded folder would take more than half of the
    /// available memory.
    #[arg(long)]
    pub stream: bool,
}

impl DataArgs {
    /// (train, test) datasets.
    pub fn load(&self) -> Result<(Arc<Dataset>, Arc<Dataset>)> {
        let max = normvision::model::ModelConfig::MAX_SIDE;
        if !(1..=max).contains(&self.image_size) {
            return Err(NvError::Config(format!(
                "--image-size must be in 1..={max}, got {}",
                self.image_size
            )));
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(NvError::Config(format!(
                "--channels must be 1 (grayscale) or 3 (RGB), got {}",
                self.channels
            )));
        }
        match (&self.image_folder, &self.test_folder) {
            (Some(tr), Some(te)) => {
                let s = self.image_size;
                let load = |dir: &std::path::Path| -> Result<Dataset> {
                    let files: usize = scan(dir)?.iter().map(|(_, f)| f.len()).sum();
                    let bytes = files as u64 * (self.channels * s * s) as u64;
                    if self.stream || available_memory().is_some_and(|m| bytes > m / 2) {
                        if !self.stream {
                            eprintln!(
                                "note: {}: streaming its {files} images from disk (decoded, they would take {} MiB, \
                                 more than half of the available memory)",
                                dir.display(),
                                bytes >> 20
                            );
                        }
                        stream_image_folder(dir, self.channels, s, s)
                    } else {
                        load_image_folder(dir, self.channels, s, s)
                    }
                };
                let train = load(tr)?;
                let test = load(te)?;
                if train.classes != test.classes {
                    return Err(NvError::Config(format!(
                        "train classes {:?} differ from test classes {:?}",
                        train.classes, test.classes
                    )));
                }
                Ok((Arc::new(train), Arc::new(test)))
            }
            _ => Ok((
                Arc::new(fashion_mnist::load(
                    self.data.as_deref(),
                    fashion_mnist::Split::Train,
                )?),
                Arc::new(fashion_mnist::load(
                    self.data.as_deref(),
                    fashion_mnist::Split::Test,
                )?),
            )),
        }
    }
}

/// A corruption of the evaluated images (`eval`, `adapt`): the covariate shift to measure or adapt to.
#[derive(Debug, Clone, Args)]
pub struct CorruptionArgs {
    /// Corrupt the images first: NAME:SEVERITY with severity 1-5. Names: brightness, contrast, gaussian-noise,
    /// gaussian-blur, inversion, jpeg, pixelate, occlusion (`normvision corrupt --list` prints the parameters).
    #[arg(long, value_name = "NAME:SEVERITY")]
    pub corruption: Option<String>,
    /// Seed of the corruption's random draws (noise, occluder positions); the same seed gives the same images.
    #[arg(long, default_value_t = 0, value_name = "SEED")]
    pub corruption_seed: u64,
}

impl CorruptionArgs {
    /// The parsed corruption, if any.
    pub fn parsed(&self) -> Result<Option<Corruption>> {
        self.corruption.as_deref().map(str::parse).transpose()
    }
    /// `ds` (a training split when `train`), corrupted when --corruption is given.
    pub fn apply(&self, ds: Arc<Dataset>, train: bool) -> Result<Arc<Dataset>> {
        Ok(match self.parsed()? {
            Some(c) => Arc::new(c.apply_to(
                &ds,
                normvision::data::corrupt::split_seed(self.corruption_seed, train),
            )?),
            None => ds,
        })
    }
}

/// A PyTorch state dict's model: the zoo architecture it belongs to, and the input normalization it was trained
/// with (`--weights`, `import --torch`).
#[derive(Debug, Clone, Args)]
pub struct TorchModelArgs {
    /// The zoo model the state dict belongs to (its PyTorch twin: tools/gen_zoo_twins.py).
    #[arg(long, value_parser = choice::model(), default_value = "cnn")]
    pub model: ModelKind,
    /// Its normalization.
    #[arg(long, value_parser = choice::norm(), default_value = "batch")]
    pub norm: NormKind,
    /// Groups for --norm group.
    #[arg(long, default_value_t = 8)]
    pub groups: usize,
    /// Samples per virtual batch for --norm ghost (at most the batch size).
    #[arg(long, default_value_t = 16)]
    pub ghost_batch: usize,
    /// Input shape CxHxW.
    #[arg(long, default_value = "1x28x28")]
    pub input: String,
    #[arg(long, default_value_t = 10)]
    pub num_classes: usize,
    /// Per-channel mean and std of the inputs the model was trained on (in [0, 1] units, as torchvision's
    /// Normalize) [default: Fashion-MNIST's training statistics].
    #[arg(long, value_delimiter = ',', default_values_t = [0.2860f32])]
    pub mean: Vec<f32>,
    #[arg(long, value_delimiter = ',', default_values_t = [0.3530f32])]
    pub std: Vec<f32>,
    /// Load what matches and list the rest, as PyTorch's load_state_dict(strict=False) [default: strict].
    #[arg(long)]
    pub non_strict: bool,
}

impl TorchModelArgs {
    /// The zoo configuration these flags describe.
    pub fn config(&self) -> Result<normvision::model::ModelConfig> {
        let dims: Vec<usize> = self
            .input
            .split('x')
            .map(|d| d.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                NvError::Config(format!(
                    "--input must be CxHxW, e.g. 1x28x28, got {:?}",
                    self.input
                ))
            })?;
        let [c, h, w] = dims[..] else {
            return Err(NvError::Config(format!(
                "--input must be CxHxW, e.g. 1x28x28, got {:?}",
                self.input
            )));
        };
        let mut cfg = normvision::model::ModelConfig::fashion(self.model, self.norm);
        cfg.in_channels = c;
        cfg.height = h;
        cfg.width = w;
        cfg.num_classes = self.num_classes;
        cfg.groups = self.groups;
        cfg.ghost_batch = self.ghost_batch;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The model with the state dict at `path` loaded, and the input normalization. Notes what loading filled
    /// in or skipped on stderr.
    pub fn load(
        &self,
        path: &std::path::Path,
    ) -> Result<(normvision::model::Model, normvision::data::Normalization)> {
        let cfg = self.config()?;
        let norm = normvision::data::Normalization::new(self.mean.clone(), self.std.clone())
            .map_err(|e| NvError::Config(format!("--mean/--std: {e}")))?;
        if norm.channels() != cfg.in_channels {
            return Err(NvError::Config(format!(
                "--mean/--std give {} channels, --input {} has {}",
                norm.channels(),
                self.input,
                cfg.in_channels
            )));
        }
        let mut model = normvision::model::Model::new(cfg)?;
        let r = normvision::io::torch::load_into(&mut model, path, !self.non_strict)?;
        if !r.filled.is_empty() {
            eprintln!(
                "note: {}: no num_batches_tracked for {} BatchNorm(s); set to 0, as PyTorch does",
                path.display(),
                r.filled.len()
            );
        }
        if !r.skipped.missing.is_empty() || !r.skipped.unexpected.is_empty() {
            eprintln!(
                "note: {}: loaded non-strictly; missing keys (left at their initial values) {:?}, unexpected keys (ignored) {:?}",
                path.display(),
                r.skipped.missing,
                r.skipped.unexpected
            );
        }
        Ok((model, norm))
    }
}

/// Model, optimizer and run arguments of `train` (and of each run of `compare`).
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Network.
    #[arg(long, value_parser = choice::model(), default_value = "cnn")]
    pub model: ModelKind,
    /// Normalization used everywhere in the model.
    #[arg(long, value_parser = choice::norm(), default_value = "batch")]
    pub norm: NormKind,
    /// Groups for --norm group.
    #[arg(long, default_value_t = 8)]
    pub groups: usize,
    /// Samples per virtual batch for --norm ghost (at most the batch size).
    #[arg(long, default_value_t = 16)]
    pub ghost_batch: usize,
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    #[arg(long, value_enum, default_value_t = OptimizerArg::Sgd)]
    pub optimizer: OptimizerArg,
    /// SGD momentum (AdamW: beta1 stays 0.9).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long)]
    pub nesterov: bool,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Exclude biases and normalization parameters from weight decay.
    #[arg(long)]
    pub no_decay_norm_bias: bool,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Constant)]
    pub schedule: ScheduleArg,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Step schedule: decay every this many steps, by --gamma.
    #[arg(long, default_value_t = 1000)]
    pub step_size: u64,
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Augment training images: random crop (pad 2) and horizontal flip.
    #[arg(long)]
    pub augment: bool,
    #[arg(long, value_enum, default_value_t = InitArg::KaimingNormal)]
    pub init: InitArg,
    /// Multiply initial weights by this factor (init-robustness experiments).
    #[arg(long, default_value_t = 1.0)]
    pub init_scale: f64,
    /// Dropout before the classifier.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also evaluate every K steps.
    #[arg(long, value_name = "K")]
    pub eval_every: Option<u64>,
    /// Stop at the first evaluation with at least this test accuracy (e.g. 0.9) and report the step.
    #[arg(long)]
    pub target_acc: Option<f64>,
    /// Use only the first N training samples.
    #[arg(long, default_value_t = 0)]
    pub train_limit: usize,
    /// Use only the first N test samples.
    #[arg(long, default_value_t = 0)]
    pub test_limit: usize,
    /// Steps of loss at ln(classes) after which a run counts as diverged (0 disables).
    #[arg(long, default_value_t = 200)]
    pub divergence_window: u64,
    /// Drop every epoch's last batch when it is smaller than --batch-size. Without it, only a last batch that
    /// would leave a BatchNorm with one value per channel is dropped (and the log says so).
    #[arg(long)]
    pub drop_last: bool,
    /// With --distributed: synchronize every BatchNorm's batch statistics over the ranks (SyncBN), so that
    /// BN sees the global batch, not each rank's slice.
    #[arg(long)]
    pub sync_bn: bool,
}

impl TrainArgs {
    pub fn to_config(&self, dataset: &Dataset) -> Result<TrainConfig> {
        let [c, h, w] = dataset.shape;
        let mut cfg = TrainConfig::reference(self.model, self.norm);
        cfg.model.in_channels = c;
        cfg.model.height = h;
        cfg.model.width = w;
        cfg.model.num_classes = dataset.classes.len();
        cfg.model.groups = self.groups;
        cfg.model.ghost_batch = self.ghost_batch;
        cfg.model.init = InitSpec {
            init: self.init.into(),
            scale: self.init_scale,
        };
        cfg.model.dropout = self.dropout;
        cfg.model.seed = self.seed;
        let decay = if self.no_decay_norm_bias {
            DecayPolicy::ExcludeNormAndBias
        } else {
            DecayPolicy::All
        };
        cfg.optim = match self.optimizer {
            OptimizerArg::Sgd => OptimConfig::Sgd(SgdConfig {
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: self.weight_decay,
                decay,
                ..SgdConfig::default()
            }),
            OptimizerArg::Adamw => OptimConfig::Adamw(AdamWConfig {
                weight_decay: self.weight_decay,
                decay,
                ..AdamWConfig::default()
            }),
        };
        let per_epoch = dataset
            .len()
            .min(if self.train_limit > 0 {
                self.train_limit
            } else {
                usize::MAX
            })
            .div_ceil(self.batch_size.max(1)) as u64;
        let total = self
            .max_steps
            .unwrap_or(per_epoch * self.epochs as u64)
            .max(1);
        let sched = match self.schedule {
            ScheduleArg::Constant => Schedule::Constant { lr: self.lr },
            ScheduleArg::Step => Schedule::Step {
                lr: self.lr,
                step_size: self.step_size,
                gamma: self.gamma,
            },
            ScheduleArg::Cosine => Schedule::Cosine {
                lr: self.lr,
                min_lr: 0.0,
                total_steps: total,
            },
            ScheduleArg::OneCycle => Schedule::one_cycle(self.lr, total),
        };
        cfg.schedule = LrSchedule::with_warmup(
            sched,
            self.warmup_steps,
            if self.warmup_steps > 0 { 0.0 } else { 1.0 },
        )?;
        cfg.epochs = self.epochs;
        cfg.max_steps = self.max_steps;
        cfg.batch_size = self.batch_size;
        cfg.sync_bn = self.sync_bn;
        cfg.eval_every_steps = self.eval_every;
        cfg.target_acc = self.target_acc;
        cfg.label_smoothing = self.label_smoothing;
        cfg.augment = self.augment.then(|| Augment::crop_flip(2));
        cfg.seed = self.seed;
        cfg.divergence_window = self.divergence_window;
        cfg.train_limit = self.train_limit;
        cfg.test_limit = self.test_limit;
        cfg.drop_last = self.drop_last;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// MemAvailable from /proc/meminfo, in bytes (Linux; `None` elsewhere).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Sets the global rayon pool's size (call once, before any parallel work).
///
/// With `serving` (commands that run inference on the main thread and nothing else: `bench --inference`,
/// `bench --onnx`, `predict`), the main thread becomes the pool's first worker (`use_current_thread`), so a
/// call enters the pool without a hand-off: each batch-1 call used to put the main thread to sleep and wake it
/// again, and the per-layer kernels woke the other worker (5 context switches per call, 512 for 5000 calls
/// after; docs/PERFORMANCE.md §7). Not for the other commands: a main thread that waits outside the pool for
/// threads that use it (the data loader, an experiment's rank threads) would leave them one worker fewer, or,
/// with `--threads 1`, none.
pub fn set_threads(threads: Option<usize>, serving: bool) -> Result<()> {
    if threads.is_none() && !serving {
        return Ok(());
    }
    let t = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let mut b = rayon::ThreadPoolBuilder::new().num_threads(t.max(1));
    if serving {
        b = b.use_current_thread();
    }
    b.build_global()
        .map_err(|e| NvError::Config(format!("--threads: {e}")))
}
