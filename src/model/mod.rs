//! Models: the reference CNN, the BN paper's sigmoid MLP and a ResNet-20 for 28x28 inputs, each built with any
//! normalization (`--norm`), and the [`Model`] wrapper the trainer drives:
//!
//! ```text
//! images (N, C, H, W) ──► Model::forward(Mode) ──► logits (N, K) ──► loss ──► Model::backward ──► optimizer
//! ```

pub mod norm_layer;
pub mod residual;
pub mod sequential;

pub use norm_layer::{build_norm, push_norm_relu, NormAdapter, NormKind};
pub use residual::BasicBlock;
pub use sequential::Sequential;

use crate::nn::activation::{Flatten, Sigmoid};
use crate::nn::conv::Conv2dConfig;
use crate::nn::dropout::Dropout;
use crate::nn::init::{Init, InitSpec};
use crate::nn::linear::LinearConfig;
use crate::nn::pool::{GlobalAvgPool, MaxPool2dConfig};
use crate::nn::Layer;
use crate::state::{StateDict, Stateful};
use crate::{Mode, NvError, Param, Result};
use ndarray::ArrayD;
use rand::SeedableRng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Which network to build.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// The reference CNN: 4 conv3x3 + norm + ReLU (2 max-pools), linear(→128) + norm + ReLU, linear(→classes).
    Cnn,
    /// 784-100-100-100-10 with sigmoid, the BN paper's MNIST network (norm before each sigmoid).
    Mlp,
    /// ResNet-20 style for 28x28: conv stem (16), 3 stages x 3 basic blocks (16, 32, 64; stride 2 between
    /// stages with projection shortcuts), global average pool, linear.
    Resnet,
}

impl ModelKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelKind::Cnn => "cnn",
            ModelKind::Mlp => "mlp",
            ModelKind::Resnet => "resnet",
        }
    }
}

/// Everything needed to rebuild a model (saved in checkpoints).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub kind: ModelKind,
    pub norm: NormKind,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub num_classes: usize,
    /// Groups for `--norm group`.
    pub groups: usize,
    pub init: InitSpec,
    /// Dropout before the classifier (0 = none).
    pub dropout: f64,
    pub seed: u64,
}

impl ModelConfig {
    /// The reference CNN on Fashion-MNIST with BatchNorm and Kaiming-normal init (experiments.md).
    pub fn fashion(kind: ModelKind, norm: NormKind) -> Self {
        ModelConfig {
            kind,
            norm,
            in_channels: 1,
            height: 28,
            width: 28,
            num_classes: 10,
            groups: 8,
            init: InitSpec {
                init: Init::KaimingNormal,
                scale: 1.0,
            },
            dropout: 0.0,
            seed: 0,
        }
    }
}

/// Builds a convolution and initialises it with `init` (drawn after PyTorch's default, as before, so a seed
/// gives the same weights).
pub(crate) fn init_conv(
    cfg: Conv2dConfig,
    init: InitSpec,
    rng: &mut impl rand::Rng,
) -> Result<crate::nn::conv::Conv2d<f32>> {
    let mut c = cfg.build::<f32>(rng)?;
    c.reset_parameters(init.init, init.scale, rng)?;
    Ok(c)
}

/// A network with its configuration.
pub struct Model {
    pub cfg: ModelConfig,
    pub net: Sequential,
    /// The training step set by [`Model::begin_step`], shared with the model's dropout layers.
    step: Arc<AtomicU64>,
}

/// `step` value meaning "no step announced": dropout then draws from its RNG sequentially.
const NO_STEP: u64 = u64::MAX;

/// Dropout whose mask RNG is a pure function of `(seed, training step)` once the trainer announces steps with
/// [`Model::begin_step`], so a run resumed from a checkpoint (which saves the position, not RNG states) draws
/// exactly the masks the uninterrupted run drew. Without announced steps it behaves like plain [`Dropout`].
struct StepDropout {
    inner: Dropout<f32>,
    seed: u64,
    step: Arc<AtomicU64>,
    seeded_for: u64,
}

impl StepDropout {
    fn new(p: f64, seed: u64, step: Arc<AtomicU64>) -> Result<Self> {
        Ok(StepDropout {
            inner: Dropout::new(p, seed)?,
            seed,
            step,
            seeded_for: NO_STEP,
        })
    }
}

impl Layer<f32> for StepDropout {
    fn forward(&mut self, x: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        let step = self.step.load(Ordering::Relaxed);
        if mode.is_train() && step != NO_STEP && step != self.seeded_for {
            // stream u64::MAX: unrelated to the data loader's streams (0 = shuffle, 1 + i = augmentation)
            self.inner
                .set_rng_state(crate::data::loader::derive_rng(self.seed, step, u64::MAX));
            self.seeded_for = step;
        }
        self.inner.forward(x, mode)
    }
    fn backward(&mut self, x: &ArrayD<f32>, dy: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        self.inner.backward(x, dy, mode)
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}

impl Stateful<f32> for StepDropout {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.inner.save_state(prefix, sd)
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        self.inner.load_state(prefix, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<f32>)) {
        self.inner.visit_params(prefix, f)
    }
}

fn push_norm_relu_indexed(
    seq: &mut Sequential,
    idx: &mut usize,
    norm: NormKind,
    c: usize,
    spatial: bool,
    groups: usize,
) -> Result<()> {
    let (n, r) = (idx.to_string(), (*idx + 1).to_string());
    // With a norm, the ReLU keeps its own index even when fused, so names match nn.Sequential(conv, bn, relu).
    *idx += if push_norm_relu(seq, &n, &r, norm, c, spatial, groups)? {
        2
    } else {
        1
    };
    Ok(())
}

impl Model {
    /// Inference-only: folds each BatchNorm that follows a convolution into it ([`Sequential::fold_batch_norm`]).
    /// The folded model has no backward through those convolutions. Returns the number of folded pairs.
    pub fn fold_batch_norm(&mut self) -> Result<usize> {
        self.net.fold_batch_norm()
    }

    pub fn new(cfg: ModelConfig) -> Result<Self> {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(cfg.seed);
        let step = Arc::new(AtomicU64::new(NO_STEP));
        let net = match cfg.kind {
            ModelKind::Cnn => Self::cnn(&cfg, &mut rng, &step)?,
            ModelKind::Mlp => Self::mlp(&cfg, &mut rng)?,
            ModelKind::Resnet => Self::resnet(&cfg, &mut rng, &step)?,
        };
        Ok(Model { cfg, net, step })
    }

    /// Announces that the next training forward belongs to optimizer step `step` (0-based). Layers with their
    /// own randomness (dropout) then draw from an RNG derived from `(seed, step)`, so every random draw of a run
    /// is fixed by the seed and the position, and a resumed run repeats the uninterrupted one exactly.
    pub fn begin_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    fn conv(
        cin: usize,
        cout: usize,
        bias: bool,
        init: InitSpec,
        rng: &mut impl rand::Rng,
    ) -> Result<Box<dyn Layer<f32>>> {
        Ok(Box::new(init_conv(
            Conv2dConfig::new(cin, cout, 3).padding(1).bias(bias),
            init,
            rng,
        )?))
    }

    fn linear(
        i: usize,
        o: usize,
        bias: bool,
        init: InitSpec,
        rng: &mut impl rand::Rng,
    ) -> Result<Box<dyn Layer<f32>>> {
        let mut l = LinearConfig::new(i, o).bias(bias).build::<f32>(rng)?;
        l.reset_parameters(init.init, init.scale, rng)?;
        Ok(Box::new(l))
    }

    fn cnn(
        cfg: &ModelConfig,
        rng: &mut impl rand::Rng,
        step: &Arc<AtomicU64>,
    ) -> Result<Sequential> {
        if !cfg.height.is_multiple_of(4) || !cfg.width.is_multiple_of(4) {
            return Err(NvError::Config(format!(
                "cnn needs H and W divisible by 4, got {}x{}",
                cfg.height, cfg.width
            )));
        }
        let bias = cfg.norm.wants_bias_before();
        let mut s = Sequential::new();
        let mut i = 0usize;
        let chans = [(cfg.in_channels, 32), (32, 32), (32, 64), (64, 64)];
        for (k, &(cin, cout)) in chans.iter().enumerate() {
            s.push(i.to_string(), Self::conv(cin, cout, bias, cfg.init, rng)?);
            i += 1;
            push_norm_relu_indexed(&mut s, &mut i, cfg.norm, cout, true, cfg.groups)?;
            if k % 2 == 1 {
                s.push(
                    i.to_string(),
                    Box::new(MaxPool2dConfig::new(2).build::<f32>()?),
                );
                i += 1;
            }
        }
        s.push(i.to_string(), Box::new(Flatten::new()));
        i += 1;
        let feat = 64 * (cfg.height / 4) * (cfg.width / 4);
        s.push(
            i.to_string(),
            Self::linear(
                feat,
                128,
                bias || cfg.norm == NormKind::Instance,
                cfg.init,
                rng,
            )?,
        );
        i += 1;
        push_norm_relu_indexed(&mut s, &mut i, cfg.norm, 128, false, cfg.groups)?;
        if cfg.dropout > 0.0 {
            s.push(
                i.to_string(),
                Box::new(StepDropout::new(
                    cfg.dropout,
                    cfg.seed ^ 0xD50,
                    Arc::clone(step),
                )?),
            );
            i += 1;
        }
        s.push(
            i.to_string(),
            Self::linear(128, cfg.num_classes, true, cfg.init, rng)?,
        );
        Ok(s)
    }

    fn mlp(cfg: &ModelConfig, rng: &mut impl rand::Rng) -> Result<Sequential> {
        if cfg.norm == NormKind::Instance {
            return Err(NvError::Config("the mlp has no spatial dims: instance norm does not apply (use batch, layer, group or bcn)".into()));
        }
        let bias = cfg.norm.wants_bias_before();
        let mut s = Sequential::new();
        let mut i = 0usize;
        s.push(i.to_string(), Box::new(Flatten::new()));
        i += 1;
        let mut fin = cfg.in_channels * cfg.height * cfg.width;
        for _ in 0..3 {
            s.push(i.to_string(), Self::linear(fin, 100, bias, cfg.init, rng)?);
            i += 1;
            if let Some((n, _)) = build_norm(cfg.norm, 100, false, false, cfg.groups.min(4))? {
                s.push(i.to_string(), n);
                i += 1;
            }
            s.push(i.to_string(), Box::new(Sigmoid::new()));
            i += 1;
            fin = 100;
        }
        s.push(
            i.to_string(),
            Self::linear(100, cfg.num_classes, true, cfg.init, rng)?,
        );
        Ok(s)
    }

    fn resnet(
        cfg: &ModelConfig,
        rng: &mut impl rand::Rng,
        step: &Arc<AtomicU64>,
    ) -> Result<Sequential> {
        let bias = cfg.norm.wants_bias_before();
        let mut s = Sequential::new();
        s.push(
            "conv1",
            Self::conv(cfg.in_channels, 16, bias, cfg.init, rng)?,
        );
        push_norm_relu(&mut s, "bn1", "relu", cfg.norm, 16, true, cfg.groups)?;
        let mut cin = 16;
        for (stage, &cout) in [16usize, 32, 64].iter().enumerate() {
            for b in 0..3 {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let blk = BasicBlock::new(cin, cout, stride, cfg.norm, cfg.groups, cfg.init, rng)?;
                s.push(format!("layer{}.{b}", stage + 1), Box::new(blk));
                cin = cout;
            }
        }
        s.push("avgpool", Box::new(GlobalAvgPool::new()));
        if cfg.dropout > 0.0 {
            s.push(
                "dropout",
                Box::new(StepDropout::new(
                    cfg.dropout,
                    cfg.seed ^ 0xD50,
                    Arc::clone(step),
                )?),
            );
        }
        s.push(
            "fc",
            Self::linear(64, cfg.num_classes, true, cfg.init, rng)?,
        );
        Ok(s)
    }

    /// Checks an input batch's shape against the configuration.
    pub fn check_input(&self, x: &ArrayD<f32>) -> Result<()> {
        let want = [self.cfg.in_channels, self.cfg.height, self.cfg.width];
        if x.ndim() != 4 || x.shape()[1..] != want {
            return Err(NvError::Shape {
                layer: "Model",
                msg: format!(
                    "expected input (N, {}, {}, {}), got {:?}",
                    want[0],
                    want[1],
                    want[2],
                    x.shape()
                ),
            });
        }
        Ok(())
    }

    /// Logits (N, classes).
    pub fn forward(&mut self, x: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        self.check_input(x)?;
        self.net.forward(x, mode)
    }

    /// Eval-mode logits for inference (evaluation, prediction): bitwise those of `forward(x, Mode::Eval)`, with
    /// each convolution + BatchNorm(+ReLU) pair run as one pass ([`Sequential::forward_inference`]). The model
    /// keeps no activations for a backward.
    pub fn forward_inference(&mut self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.check_input(x)?;
        self.net.forward_inference(x)
    }

    /// Backpropagates dL/dlogits through the network, accumulating parameter gradients.
    pub fn backward(
        &mut self,
        x: &ArrayD<f32>,
        dlogits: &ArrayD<f32>,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        self.net.backward(x, dlogits, mode)
    }

    /// [`Model::backward`] without the gradient with respect to the input images, which training does not use:
    /// the first layer accumulates its parameter gradients only (a first convolution skips its dx).
    pub fn backward_params(
        &mut self,
        x: &ArrayD<f32>,
        dlogits: &ArrayD<f32>,
        mode: Mode,
    ) -> Result<()> {
        self.net.backward_params(x, dlogits, mode)
    }

    pub fn num_params(&mut self) -> usize {
        let mut n = 0;
        self.net.visit_params("", &mut |_, p| n += p.len());
        n
    }
}

impl Stateful<f32> for Model {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.net.save_state(prefix, sd)
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        self.net.load_state(prefix, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<f32>)) {
        self.net.visit_params(prefix, f)
    }
}
