//! The model zoo: the reference CNN, the BN paper's sigmoid MLP and a ResNet-20 for 28×28 inputs, each with any
//! normalization (`--norm`), built as graphs under the state-dict names of their PyTorch twins
//! (`tools/gen_model_fixture.py`).

use super::backbone::{Builder, RESNET14_WIDTHS};
use super::norm_choice::{build_norm, NormKind, NormParams};
use super::Graph;
use crate::layer::Layer;
use crate::model::ValueId;
use crate::nn::{
    Conv2d, Conv2dConfig, Dropout, Flatten, GlobalAvgPool, Init, InitSpec, Linear, LinearConfig,
    MaxPool2dConfig, ReLU, Sigmoid,
};
use crate::{NvError, Result};
use rand::SeedableRng;

/// Which network to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Cnn,
    Mlp,
    Resnet,
    /// The `deeplabv3` backbone as a classifier, to pre-train it (`--backbone-from`).
    Resnet14,
    /// DeepLabV3 ([`crate::model::deeplab`]): a segmentation network (`--task segment`), not a classifier.
    Deeplabv3,
}

impl ModelKind {
    pub const ALL: [ModelKind; 5] = [
        ModelKind::Cnn,
        ModelKind::Mlp,
        ModelKind::Resnet,
        ModelKind::Resnet14,
        ModelKind::Deeplabv3,
    ];
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelKind::Cnn => "cnn",
            ModelKind::Mlp => "mlp",
            ModelKind::Resnet => "resnet",
            ModelKind::Resnet14 => "resnet14",
            ModelKind::Deeplabv3 => "deeplabv3",
        }
    }
    /// What the CLI's `--help` says of it.
    pub fn help(&self) -> &'static str {
        match self {
            ModelKind::Cnn => "the reference CNN: 4 conv3x3 + norm + ReLU (2 max-pools), linear(->128) + norm + ReLU, linear(->classes)",
            ModelKind::Mlp => "784-100-100-100-10 with sigmoid, the BN paper's MNIST network (norm before each sigmoid)",
            ModelKind::Resnet => "ResNet-20 style for 28x28: conv stem (16), 3 stages x 3 basic blocks (16, 32, 64; stride 2 between stages with projection shortcuts), global average pool, linear",
            ModelKind::Resnet14 => "ResNet-14, the deeplabv3 backbone as a classifier (pre-train it for --backbone-from): conv3x3 stride 2 (32), 3 stages x 2 basic blocks (32, 64, 128; stride 2 each), global average pool, linear",
            ModelKind::Deeplabv3 => "DeepLabV3 for --task segment: the resnet14 backbone at output stride 8 (last stage dilated), ASPP (1x1, three dilated 3x3, image pooling; 64 channels), 3x3 head, classifier, bilinear up-sampling to the input",
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = NvError;
    fn from_str(s: &str) -> Result<Self> {
        ModelKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                NvError::Config(format!(
                    "unknown model {s:?} (expected cnn, mlp, resnet, resnet14 or deeplabv3)"
                ))
            })
    }
}

/// Everything needed to build a zoo model (saved in checkpoints next to the graph it built).
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
    /// Virtual batch size for `--norm ghost`.
    #[serde(default = "default_ghost_batch")]
    pub ghost_batch: usize,
    /// The r_max/d_max schedule for `--norm renorm`.
    #[serde(default = "default_renorm")]
    pub renorm: crate::norm::RenormSchedule,
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
            ghost_batch: 16,
            renorm: crate::norm::RenormSchedule::Run,
            init: InitSpec {
                init: Init::KaimingNormal,
                scale: 1.0,
            },
            dropout: 0.0,
            seed: 0,
        }
    }

    /// Largest image side a zoo model accepts: far above any vision input it is meant for, and small enough
    /// that no configuration within the bounds asks for more memory than a machine has.
    pub const MAX_SIDE: usize = 512;
    /// Most input channels.
    pub const MAX_CHANNELS: usize = 64;
    /// Most classes.
    pub const MAX_CLASSES: usize = 100_000;

    /// Checks every field against the bounds above, so that a configuration read from a file (a checkpoint
    /// that claims huge dimensions) is refused before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        let range = |name: &str, v: usize, max: usize| super::in_range("model", name, v, max);
        range("in_channels", self.in_channels, Self::MAX_CHANNELS)?;
        range("height", self.height, Self::MAX_SIDE)?;
        range("width", self.width, Self::MAX_SIDE)?;
        range("num_classes", self.num_classes, Self::MAX_CLASSES)?;
        range("groups", self.groups, 1024)?;
        range("ghost_batch", self.ghost_batch, 1 << 16)?;
        if !(self.init.scale.is_finite() && self.init.scale > 0.0) {
            return Err(NvError::Config(format!(
                "model: the init scale must be finite and > 0, got {}",
                self.init.scale
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(NvError::Config(format!(
                "model: dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// The settings of its norm.
    pub fn norm_params(&self) -> NormParams {
        NormParams {
            groups: self.groups,
            ghost_batch: self.ghost_batch,
            renorm: self.renorm,
        }
    }

    /// The graph this configuration describes, with weights drawn from its seed.
    pub fn build_graph(&self) -> Result<Graph> {
        self.validate()?;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(self.seed);
        let mut z = Zoo {
            g: Graph::new(),
            cfg: self,
            rng: &mut rng,
        };
        let x = z.g.input("input");
        let y = match self.kind {
            ModelKind::Cnn => z.cnn(x)?,
            ModelKind::Mlp => z.mlp(x)?,
            ModelKind::Resnet => z.resnet(x)?,
            ModelKind::Resnet14 => z.resnet14(x)?,
            ModelKind::Deeplabv3 => {
                return Err(NvError::Config(
                    "--model deeplabv3 segments images: train it with --task segment".into(),
                ))
            }
        };
        z.g.set_outputs(&[y])?;
        Ok(z.g)
    }
}

/// Builds a zoo graph, drawing the weights in the order of the layers (PyTorch's default initialisation first,
/// then `cfg.init`, as before, so a seed gives the same weights).
struct Zoo<'a, R: rand::Rng> {
    g: Graph,
    cfg: &'a ModelConfig,
    rng: &'a mut R,
}

impl<R: rand::Rng> Zoo<'_, R> {
    fn conv(&mut self, cfg: Conv2dConfig) -> Result<Conv2d<f32>> {
        let init = self.cfg.init;
        let mut c = cfg.build::<f32>(self.rng)?;
        c.reset_parameters(init.init, init.scale, self.rng)?;
        Ok(c)
    }

    fn linear(&mut self, i: usize, o: usize, bias: bool) -> Result<Linear<f32>> {
        let init = self.cfg.init;
        let mut l = LinearConfig::new(i, o).bias(bias).build::<f32>(self.rng)?;
        l.reset_parameters(init.init, init.scale, self.rng)?;
        Ok(l)
    }

    fn node(&mut self, name: impl Into<String>, l: impl Layer<f32>, x: ValueId) -> Result<ValueId> {
        self.g.layer(name, l, x)
    }

    /// The norm (when the kind has one there) then a ReLU, named like `nn.Sequential(norm, relu)` children.
    fn norm_relu(
        &mut self,
        norm_name: &str,
        relu_name: &str,
        c: usize,
        spatial: bool,
        x: ValueId,
    ) -> Result<(ValueId, bool)> {
        let mut cur = x;
        let has_norm = match build_norm(self.cfg.norm, c, spatial, &self.cfg.norm_params())? {
            Some(n) => {
                cur = self.g.layer_boxed(norm_name, n, cur)?;
                true
            }
            None => false,
        };
        Ok((self.node(relu_name, ReLU::new(), cur)?, has_norm))
    }

    /// `nn.Sequential` numbering: a norm and its ReLU take two indices, a lone ReLU one.
    fn indexed_norm_relu(
        &mut self,
        idx: &mut usize,
        c: usize,
        spatial: bool,
        x: ValueId,
    ) -> Result<ValueId> {
        let (n, r) = (idx.to_string(), (*idx + 1).to_string());
        let has_norm = build_norm(self.cfg.norm, c, spatial, &self.cfg.norm_params())?.is_some();
        let relu_name = if has_norm { r } else { n.clone() };
        let (y, _) = self.norm_relu(&n, &relu_name, c, spatial, x)?;
        *idx += if has_norm { 2 } else { 1 };
        Ok(y)
    }

    fn dropout(&self) -> Result<Option<Dropout<f32>>> {
        if self.cfg.dropout > 0.0 {
            Ok(Some(Dropout::new(self.cfg.dropout, self.cfg.seed ^ 0xD50)?))
        } else {
            Ok(None)
        }
    }

    fn cnn(&mut self, x: ValueId) -> Result<ValueId> {
        let cfg = self.cfg;
        if !cfg.height.is_multiple_of(4) || !cfg.width.is_multiple_of(4) {
            return Err(NvError::Config(format!(
                "cnn needs H and W divisible by 4, got {}x{}",
                cfg.height, cfg.width
            )));
        }
        let bias = cfg.norm.wants_bias_before();
        let mut i = 0usize;
        let mut cur = x;
        let chans = [(cfg.in_channels, 32), (32, 32), (32, 64), (64, 64)];
        for (k, &(cin, cout)) in chans.iter().enumerate() {
            let conv = self.conv(Conv2dConfig::new(cin, cout, 3).padding(1).bias(bias))?;
            cur = self.node(i.to_string(), conv, cur)?;
            i += 1;
            cur = self.indexed_norm_relu(&mut i, cout, true, cur)?;
            if k % 2 == 1 {
                cur = self.node(i.to_string(), MaxPool2dConfig::new(2).build::<f32>()?, cur)?;
                i += 1;
            }
        }
        cur = self.node(i.to_string(), Flatten::new(), cur)?;
        i += 1;
        let feat = 64 * (cfg.height / 4) * (cfg.width / 4);
        let fc = self.linear(feat, 128, bias || cfg.norm == NormKind::Instance)?;
        cur = self.node(i.to_string(), fc, cur)?;
        i += 1;
        cur = self.indexed_norm_relu(&mut i, 128, false, cur)?;
        if let Some(d) = self.dropout()? {
            cur = self.node(i.to_string(), d, cur)?;
            i += 1;
        }
        let head = self.linear(128, cfg.num_classes, true)?;
        self.node(i.to_string(), head, cur)
    }

    fn mlp(&mut self, x: ValueId) -> Result<ValueId> {
        let cfg = self.cfg;
        if cfg.norm == NormKind::Instance {
            return Err(NvError::Config("the mlp has no spatial dims: instance norm does not apply (use batch, layer, group or bcn)".into()));
        }
        let bias = cfg.norm.wants_bias_before();
        let mut i = 0usize;
        let mut cur = self.node(i.to_string(), Flatten::new(), x)?;
        i += 1;
        let mut fin = cfg.in_channels * cfg.height * cfg.width;
        for _ in 0..3 {
            let l = self.linear(fin, 100, bias)?;
            cur = self.node(i.to_string(), l, cur)?;
            i += 1;
            if let Some(n) = build_norm(
                cfg.norm,
                100,
                false,
                &NormParams {
                    groups: cfg.groups.min(4),
                    ..cfg.norm_params()
                },
            )? {
                cur = self.g.layer_boxed(i.to_string(), n, cur)?;
                i += 1;
            }
            cur = self.node(i.to_string(), Sigmoid::new(), cur)?;
            i += 1;
            fin = 100;
        }
        let head = self.linear(100, cfg.num_classes, true)?;
        self.node(i.to_string(), head, cur)
    }

    fn resnet(&mut self, x: ValueId) -> Result<ValueId> {
        let cfg = self.cfg;
        let bias = cfg.norm.wants_bias_before();
        let stem = self.conv(
            Conv2dConfig::new(cfg.in_channels, 16, 3)
                .padding(1)
                .bias(bias),
        )?;
        let mut cur = self.node("conv1", stem, x)?;
        cur = self.norm_relu("bn1", "relu", 16, true, cur)?.0;
        let mut cin = 16;
        for (stage, &cout) in [16usize, 32, 64].iter().enumerate() {
            for b in 0..3 {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                cur =
                    self.basic_block(&format!("layer{}.{b}", stage + 1), cin, cout, stride, cur)?;
                cin = cout;
            }
        }
        cur = self.node("avgpool", GlobalAvgPool::new(), cur)?;
        if let Some(d) = self.dropout()? {
            cur = self.node("dropout", d, cur)?;
        }
        let fc = self.linear(64, cfg.num_classes, true)?;
        self.node("fc", fc, cur)
    }

    fn builder(&mut self) -> Builder<'_, R> {
        Builder {
            g: &mut self.g,
            rng: self.rng,
            init: self.cfg.init,
            params: self.cfg.norm_params(),
        }
    }

    /// The basic block of [`Builder::basic_block`] without dilation.
    fn basic_block(
        &mut self,
        p: &str,
        cin: usize,
        cout: usize,
        stride: usize,
        x: ValueId,
    ) -> Result<ValueId> {
        let norm = self.cfg.norm;
        self.builder().basic_block(norm, p, cin, cout, stride, 1, x)
    }

    /// [`Builder::resnet14`] (output stride 16), global average pool, linear.
    fn resnet14(&mut self, x: ValueId) -> Result<ValueId> {
        let (norm, c) = (self.cfg.norm, self.cfg.in_channels);
        let widths = RESNET14_WIDTHS;
        let mut cur = self.builder().resnet14(norm, "", c, widths, false, x)?;
        cur = self.node("avgpool", GlobalAvgPool::new(), cur)?;
        if let Some(d) = self.dropout()? {
            cur = self.node("dropout", d, cur)?;
        }
        let fc = self.linear(widths[2], self.cfg.num_classes, true)?;
        self.node("fc", fc, cur)
    }
}

fn default_ghost_batch() -> usize {
    16
}

fn default_renorm() -> crate::norm::RenormSchedule {
    crate::norm::RenormSchedule::Run
}
