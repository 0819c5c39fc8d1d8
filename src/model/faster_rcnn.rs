//! Faster R-CNN's networks (Ren et al. 2015), at one feature level (C4-style, stride 8) and CPU scale, under
//! the state-dict names of torchvision's `FasterRCNN` (`backbone.*`, `rpn.head.*`, `roi_heads.box_head.*`,
//! `roi_heads.box_predictor.*`), so that its twin loads the same weights.
//!
//! ```text
//! trunk:    image (N, C, H, W) ─► backbone: ResNet-14 (32-64-128), last stage dilated: stride 8
//!                               ─► features (N, 128, H/8, W/8)                                  [output 0]
//!           features ─► rpn.head.conv.0.0: 3×3 conv + ReLU ─┬► rpn.head.cls_logits: 1×1 → (N, A, h, w)   [1]
//!                                                           └► rpn.head.bbox_pred: 1×1 → (N, 4A, h, w) [2]
//! box head: RoIAlign'd regions (R, 128, 7, 7) ─► box_head ─► box_predictor.cls_score → (R, classes)  [0]
//!                                                          └► box_predictor.bbox_pred → (R, 4·classes) [1]
//! ```
//!
//! The box head is torchvision's `TwoMLPHead` (`--head-norm none`: fc6, fc7 with ReLU) or Detectron's
//! "4conv1fc" with GroupNorm (`--head-norm group`, torchvision's `FastRCNNConvFCHead`: four 3×3 conv + GN +
//! ReLU blocks `box_head.{0..3}.{0,1}`, flatten, `box_head.5` fc + ReLU). The anchors (A per location), the
//! region proposals, RoIAlign and the losses live in [`crate::detect`]; these are the two graphs it runs.
//!
//! Initialization as torchvision: RPN head convolutions N(0, 0.01) with zero bias; the conv head's
//! convolutions Kaiming-normal (fan_out, ReLU) with zero bias; linear layers PyTorch's default.

use super::backbone::{Builder, RESNET14_WIDTHS};
use super::norm_choice::{NormKind, NormParams};
use super::{in_range, Graph};
use crate::nn::{init, Conv2dConfig, Flatten, Init, InitSpec, LinearConfig, ReLU};
use crate::{NvError, Result};
use rand::SeedableRng;

/// The box head's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxHeadKind {
    /// Two fully connected layers, no norm (torchvision's default `TwoMLPHead`).
    TwoFc,
    /// Four 3×3 convolutions with GroupNorm, then one fully connected layer (Detectron's 4conv1fc GN head).
    FourConvGn,
}

/// Everything that defines the detector's networks (saved in detection checkpoints).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FasterRcnnConfig {
    pub in_channels: usize,
    /// Classes, background included (11 for garment scenes).
    pub num_classes: usize,
    pub backbone_norm: NormKind,
    pub box_head: BoxHeadKind,
    /// GroupNorm's groups (backbone and head).
    pub groups: usize,
    pub widths: [usize; 3],
    /// Anchors per feature location (sizes × aspect ratios).
    pub anchors_per_location: usize,
    /// RoIAlign's output side (7).
    pub pool: usize,
    /// The conv head's channels (4conv1fc).
    pub head_channels: usize,
    /// The fully connected representation's size (fc6/fc7, or the conv head's fc).
    pub representation: usize,
    pub seed: u64,
}

impl FasterRcnnConfig {
    pub fn new(
        in_channels: usize,
        num_classes: usize,
        backbone_norm: NormKind,
        box_head: BoxHeadKind,
    ) -> Self {
        FasterRcnnConfig {
            in_channels,
            num_classes,
            backbone_norm,
            box_head,
            groups: 8,
            widths: RESNET14_WIDTHS,
            anchors_per_location: 9,
            pool: 7,
            head_channels: 64,
            representation: 256,
            seed: 0,
        }
    }

    /// Channels of the feature map.
    pub fn feature_channels(&self) -> usize {
        self.widths[2]
    }

    /// Checks every field, so that a configuration read from a file is refused before anything is built.
    pub fn validate(&self) -> Result<()> {
        let range = |name: &str, v: usize, max: usize| in_range("faster-rcnn", name, v, max);
        range("in_channels", self.in_channels, 64)?;
        range("num_classes", self.num_classes, 1024)?;
        range("groups", self.groups, 1024)?;
        range("anchors_per_location", self.anchors_per_location, 64)?;
        range("pool", self.pool, 32)?;
        range("head_channels", self.head_channels, 4096)?;
        range("representation", self.representation, 1 << 16)?;
        for w in self.widths {
            range("a backbone width", w, 4096)?;
        }
        if self.num_classes < 2 {
            return Err(NvError::Config(
                "faster-rcnn: num_classes counts the background, so it must be at least 2".into(),
            ));
        }
        if matches!(
            self.backbone_norm,
            NormKind::Instance | NormKind::Layer | NormKind::Bcn
        ) {
            return Err(NvError::Config(format!(
                "faster-rcnn: --backbone-norm {} is not offered for detection (use frozen, batch, group or none)",
                self.backbone_norm.as_str()
            )));
        }
        Ok(())
    }

    fn params(&self) -> NormParams {
        NormParams {
            groups: self.groups,
            ..NormParams::default()
        }
    }

    /// The trunk: input `images`, outputs `features`, `objectness` (N, A, h, w) and `deltas` (N, 4A, h, w).
    /// Weights drawn from `seed` (the box head draws from `seed + 1`).
    pub fn build_trunk(&self) -> Result<Graph> {
        self.validate()?;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(self.seed);
        let mut g = Graph::new();
        let x = g.input("images");
        let mut b = Builder {
            g: &mut g,
            rng: &mut rng,
            init: InitSpec {
                init: Init::KaimingNormal,
                scale: 1.0,
            },
            params: self.params(),
        };
        let f = b.resnet14(
            self.backbone_norm,
            "backbone",
            self.in_channels,
            self.widths,
            true,
            x,
        )?;
        let c = self.feature_channels();
        let a = self.anchors_per_location;
        let rpn_conv = |cin: usize, cout: usize, k: usize, rng: &mut rand_pcg::Pcg64Mcg| {
            let mut conv = Conv2dConfig::new(cin, cout, k)
                .padding(k / 2)
                .build::<f32>(rng)?;
            init::normal(&mut conv.weight_mut().value, 0.0, 0.01, rng);
            if let Some(bias) = conv.bias_mut() {
                bias.value.fill(0.0);
            }
            Ok::<_, NvError>(conv)
        };
        let conv = rpn_conv(c, c, 3, &mut rng)?;
        let cls = rpn_conv(c, a, 1, &mut rng)?;
        let reg = rpn_conv(c, 4 * a, 1, &mut rng)?;
        let t = g.layer("rpn.head.conv.0.0", conv, f)?;
        let t = g.layer("rpn.head.conv.0.1", ReLU::new(), t)?;
        let obj = g.layer("rpn.head.cls_logits", cls, t)?;
        let del = g.layer("rpn.head.bbox_pred", reg, t)?;
        g.set_outputs(&[f, obj, del])?;
        Ok(g)
    }

    /// The box head: input `regions` (R, feature channels, pool, pool), outputs `class_logits` (R, classes)
    /// and `box_regression` (R, 4·classes).
    pub fn build_box_head(&self) -> Result<Graph> {
        self.validate()?;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(self.seed.wrapping_add(1));
        let mut g = Graph::new();
        let x = g.input("regions");
        let (c, p, rep) = (self.feature_channels(), self.pool, self.representation);
        let mut cur;
        match self.box_head {
            BoxHeadKind::TwoFc => {
                cur = g.layer("roi_heads.box_head.flatten", Flatten::new(), x)?;
                let fc6 = LinearConfig::new(c * p * p, rep).build::<f32>(&mut rng)?;
                cur = g.layer("roi_heads.box_head.fc6", fc6, cur)?;
                cur = g.layer("roi_heads.box_head.relu6", ReLU::new(), cur)?;
                let fc7 = LinearConfig::new(rep, rep).build::<f32>(&mut rng)?;
                cur = g.layer("roi_heads.box_head.fc7", fc7, cur)?;
                cur = g.layer("roi_heads.box_head.relu7", ReLU::new(), cur)?;
            }
            BoxHeadKind::FourConvGn => {
                let hc = self.head_channels;
                let mut b = Builder {
                    g: &mut g,
                    rng: &mut rng,
                    init: InitSpec::default(),
                    params: self.params(),
                };
                cur = x;
                let mut cin = c;
                for i in 0..4 {
                    let mut conv = Conv2dConfig::new(cin, hc, 3)
                        .padding(1)
                        .bias(false)
                        .build::<f32>(b.rng)?;
                    // kaiming_normal_(mode="fan_out", nonlinearity="relu")
                    init::normal(
                        &mut conv.weight_mut().value,
                        0.0,
                        (2.0 / (hc * 9) as f64).sqrt(),
                        b.rng,
                    );
                    cur = b.g.layer(format!("roi_heads.box_head.{i}.0"), conv, cur)?;
                    cur = b.norm(
                        NormKind::Group,
                        &format!("roi_heads.box_head.{i}.1"),
                        hc,
                        cur,
                    )?;
                    cur =
                        b.g.layer(format!("roi_heads.box_head.{i}.2"), ReLU::new(), cur)?;
                    cin = hc;
                }
                cur = g.layer("roi_heads.box_head.4", Flatten::new(), cur)?;
                let fc = LinearConfig::new(cin * p * p, rep).build::<f32>(&mut rng)?;
                cur = g.layer("roi_heads.box_head.5", fc, cur)?;
                cur = g.layer("roi_heads.box_head.6", ReLU::new(), cur)?;
            }
        }
        let k = self.num_classes;
        let cls = LinearConfig::new(rep, k).build::<f32>(&mut rng)?;
        let reg = LinearConfig::new(rep, 4 * k).build::<f32>(&mut rng)?;
        let logits = g.layer("roi_heads.box_predictor.cls_score", cls, cur)?;
        let boxes = g.layer("roi_heads.box_predictor.bbox_pred", reg, cur)?;
        g.set_outputs(&[logits, boxes])?;
        Ok(g)
    }
}
