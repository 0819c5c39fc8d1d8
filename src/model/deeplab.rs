//! DeepLabV3 for semantic segmentation (Chen et al. 2017), at CPU scale, under the state-dict names of
//! torchvision's `deeplabv3_resnet50` (`backbone.*`, `classifier.0.convs.*`, `classifier.0.project.*`,
//! `classifier.1`-`classifier.4`), so that its PyTorch twin (`tools/seg_twin.py`) loads the same weights.
//!
//! ```text
//! input (N, C, H, W)
//!  └► backbone: ResNet-14 (32-64-128), last stage dilated: output stride 8 ─► f (N, 128, H/8, W/8)
//!  └► ASPP over f, each branch conv + norm + ReLU with `aspp_channels` outputs:
//!       convs.0: 1×1 · convs.1-3: 3×3 with dilation rates[0..3] · convs.4: image pooling (global average,
//!       1×1 conv, norm, ReLU, resized back to f's size)
//!     concatenated ─► project: 1×1 conv + norm + ReLU (+ dropout) ─► classifier.1-3: 3×3 conv + norm + ReLU
//!  └► classifier.4: 1×1 conv to the classes ─► bilinear resize to the input's size (align_corners=False)
//! ```
//!
//! The backbone's and the head's norms are chosen separately (`--backbone-norm`, `--head-norm`). The rates
//! scale torchvision's (12, 24, 36) for 513-pixel crops (a 65×65 map at output stride 8) to the 8×8 map of a
//! 64×64 scene: 8/65 · (12, 24, 36) ≈ (1.5, 3, 4.4), rounded to (2, 3, 4). torchvision's projection ends in
//! Dropout(0.5); here it is `dropout` (0 leaves it out).
//!
//! Cost of the default on a 64×64 scene: about 70 M multiply-adds per image in the forward (backbone 52 M, head 19 M).

use super::backbone::{Builder, RESNET14_WIDTHS};
use super::norm_choice::{NormKind, NormParams};
use super::{in_range, Graph, ValueId};
use crate::nn::{Conv2dConfig, Dropout, GlobalAvgPool, Init, InitSpec, Reshape};
use crate::{NvError, Result};
use rand::SeedableRng;

/// Everything that defines a DeepLabV3 (saved in segmentation checkpoints).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeepLabConfig {
    pub in_channels: usize,
    /// Classes, background included (11 for garment scenes).
    pub num_classes: usize,
    pub backbone_norm: NormKind,
    pub head_norm: NormKind,
    /// GroupNorm's groups, Ghost BN's virtual batch, Batch Renorm's schedule.
    pub groups: usize,
    pub ghost_batch: usize,
    /// The backbone's stage widths.
    pub widths: [usize; 3],
    /// Output channels of every ASPP branch, the projection and the 3×3 head convolution.
    pub aspp_channels: usize,
    /// Dilation rates of ASPP's three 3×3 branches.
    pub rates: [usize; 3],
    /// Dropout after the projection (torchvision: 0.5).
    pub dropout: f64,
    pub init: InitSpec,
    pub seed: u64,
}

impl DeepLabConfig {
    /// The default network for `classes` classes on `in_channels`-channel images, one norm everywhere.
    pub fn new(in_channels: usize, num_classes: usize, norm: NormKind) -> Self {
        DeepLabConfig {
            in_channels,
            num_classes,
            backbone_norm: norm,
            head_norm: norm,
            groups: 8,
            ghost_batch: 16,
            widths: RESNET14_WIDTHS,
            aspp_channels: 64,
            rates: [2, 3, 4],
            dropout: 0.0,
            init: InitSpec {
                init: Init::KaimingNormal,
                scale: 1.0,
            },
            seed: 0,
        }
    }

    /// Checks every field, so that a configuration read from a file is refused before anything is built.
    pub fn validate(&self) -> Result<()> {
        let range = |name: &str, v: usize, max: usize| in_range("deeplabv3", name, v, max);
        range("in_channels", self.in_channels, 64)?;
        range("num_classes", self.num_classes, 1024)?;
        range("groups", self.groups, 1024)?;
        range("ghost_batch", self.ghost_batch, 1 << 16)?;
        range("aspp_channels", self.aspp_channels, 4096)?;
        for w in self.widths {
            range("a backbone width", w, 4096)?;
        }
        for r in self.rates {
            range("an ASPP rate", r, 64)?;
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(NvError::Config(format!(
                "deeplabv3: dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if !(self.init.scale.is_finite() && self.init.scale > 0.0) {
            return Err(NvError::Config(format!(
                "deeplabv3: the init scale must be finite and > 0, got {}",
                self.init.scale
            )));
        }
        if self.head_norm == NormKind::Instance {
            return Err(NvError::Config(
                "deeplabv3: --head-norm instance would normalize image pooling's 1x1 map over one value \
                 (use group, layer, batch, frozen or none)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn norm_params(&self) -> NormParams {
        NormParams {
            groups: self.groups,
            ghost_batch: self.ghost_batch,
            ..NormParams::default()
        }
    }

    /// The graph, with weights drawn from `seed`: one input `input` (N, C, H, W), one output `out`
    /// (N, classes, H, W) of logits, for any H, W (a multiple of 8 keeps the map aligned).
    pub fn build_graph(&self) -> Result<Graph> {
        self.validate()?;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(self.seed);
        let mut g = Graph::new();
        let x = g.input("input");
        let mut b = Builder {
            g: &mut g,
            rng: &mut rng,
            init: self.init,
            params: self.norm_params(),
        };
        let f = b.resnet14(
            self.backbone_norm,
            "backbone",
            self.in_channels,
            self.widths,
            true,
            x,
        )?;
        let y = self.head(&mut b, f)?;
        let out = g.resize_as("out", y, x, false)?;
        g.set_outputs(&[out])?;
        Ok(g)
    }

    /// DeepLabHead: ASPP, the 3×3 convolution and the classifier, on the backbone's features `f`.
    fn head<R: rand::Rng>(&self, b: &mut Builder<'_, R>, f: ValueId) -> Result<ValueId> {
        let (norm, cin, c) = (self.head_norm, self.widths[2], self.aspp_channels);
        let mut branches = vec![];
        let mut i = 0;
        branches.push(b.conv_norm_relu(
            norm,
            "classifier.0.convs.0",
            &mut i,
            Conv2dConfig::new(cin, c, 1),
            f,
        )?);
        for (k, &r) in self.rates.iter().enumerate() {
            let mut i = 0;
            branches.push(b.conv_norm_relu(
                norm,
                &format!("classifier.0.convs.{}", k + 1),
                &mut i,
                Conv2dConfig::new(cin, c, 3).padding(r).dilation(r),
                f,
            )?);
        }
        // image pooling: AdaptiveAvgPool2d(1) at index 0, then conv, norm, ReLU, resized back to f's size
        let p = "classifier.0.convs.4";
        let pooled = b.g.layer(format!("{p}.0"), GlobalAvgPool::new(), f)?;
        let pooled = b.g.layer(
            format!("{p}.0.keepdim"),
            Reshape::new(vec![cin, 1, 1]),
            pooled,
        )?;
        let mut i = 1;
        let pooled = b.conv_norm_relu(norm, p, &mut i, Conv2dConfig::new(cin, c, 1), pooled)?;
        branches.push(b.g.resize_as(format!("{p}.resize"), pooled, f, false)?);
        let cat = b.g.concat("classifier.0.cat", &branches, 1)?;
        let mut i = 0;
        let mut cur = b.conv_norm_relu(
            norm,
            "classifier.0.project",
            &mut i,
            Conv2dConfig::new(5 * c, c, 1),
            cat,
        )?;
        if self.dropout > 0.0 {
            let d = Dropout::new(self.dropout, self.seed ^ 0xD5E6)?;
            cur = b.g.layer(format!("classifier.0.project.{i}"), d, cur)?;
        }
        let mut i = 1;
        cur = b.conv_norm_relu(
            norm,
            "classifier",
            &mut i,
            Conv2dConfig::new(c, c, 3).padding(1),
            cur,
        )?;
        let cls = b.conv(Conv2dConfig::new(c, self.num_classes, 1).bias(true))?;
        b.g.layer(format!("classifier.{i}"), cls, cur)
    }
}
