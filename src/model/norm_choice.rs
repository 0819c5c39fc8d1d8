//! The `--norm` switch: one enum naming every normalization, and the layer it puts after a convolution or a
//! linear layer.

use crate::layer::Layer;
use crate::norm::{
    BatchChannelNormConfig, BatchNormConfig, BatchRenormConfig, FrozenBatchNormConfig,
    GhostBatchNormConfig, GroupNormConfig, InstanceNormConfig, LayerNormConfig, RenormSchedule,
};
use crate::{NvError, Result};

/// Which normalization a model uses everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    None,
    Batch,
    Group,
    Layer,
    Instance,
    Bcn,
    Frozen,
    Renorm,
    Ghost,
}

impl NormKind {
    /// Every choice, in the order the CLI lists them.
    pub const ALL: [NormKind; 9] = [
        NormKind::None,
        NormKind::Batch,
        NormKind::Group,
        NormKind::Layer,
        NormKind::Instance,
        NormKind::Bcn,
        NormKind::Frozen,
        NormKind::Renorm,
        NormKind::Ghost,
    ];
    pub fn as_str(&self) -> &'static str {
        match self {
            NormKind::None => "none",
            NormKind::Batch => "batch",
            NormKind::Group => "group",
            NormKind::Layer => "layer",
            NormKind::Instance => "instance",
            NormKind::Bcn => "bcn",
            NormKind::Frozen => "frozen",
            NormKind::Renorm => "renorm",
            NormKind::Ghost => "ghost",
        }
    }
    /// What the CLI's `--help` says of it.
    pub fn help(&self) -> &'static str {
        match self {
            NormKind::None => "no normalization (layers before it get a bias instead)",
            NormKind::Batch => "BatchNorm (its ReLU fused into its kernels)",
            NormKind::Group => "GroupNorm with --groups groups (8 by default)",
            NormKind::Layer => "layer normalization: GroupNorm(1, C) after convolutions (Wu & He's LN for CNNs), LayerNorm(C) after linear layers",
            NormKind::Instance => "InstanceNorm2d with affine after convolutions; none after linear layers (one value per instance)",
            NormKind::Bcn => "Batch-Channel Normalization",
            NormKind::Frozen => "FrozenBatchNorm: fixed statistics and affine (load them from a BN checkpoint to fine-tune)",
            NormKind::Renorm => "Batch Renormalization (r_max 1->3, d_max 0->5, ramped over the first half of the run)",
            NormKind::Ghost => "Ghost BatchNorm: virtual batches of --ghost-batch samples (16 by default)",
        }
    }
    /// Whether the layer before it should carry a bias (it is redundant before a norm with a shift).
    pub fn wants_bias_before(&self) -> bool {
        matches!(self, NormKind::None)
    }
}

impl std::fmt::Display for NormKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NormKind {
    type Err = NvError;
    fn from_str(s: &str) -> Result<Self> {
        NormKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                NvError::Config(format!(
                    "unknown normalization {s:?} (expected one of none, batch, group, layer, instance, bcn, frozen, renorm, ghost)"
                ))
            })
    }
}

/// The settings of the norms that have them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormParams {
    /// GroupNorm's groups (`--groups`).
    pub groups: usize,
    /// Ghost BN's virtual batch size (`--ghost-batch`).
    pub ghost_batch: usize,
    /// Batch Renorm's schedule of r_max and d_max.
    pub renorm: RenormSchedule,
}

impl Default for NormParams {
    /// 8 groups, virtual batches of 16, Batch Renorm scaled to the run.
    fn default() -> Self {
        NormParams {
            groups: 8,
            ghost_batch: 16,
            renorm: RenormSchedule::Run,
        }
    }
}

/// The normalization layer of `kind` for `c` channels: after a convolution (`spatial`, input (N, C, H, W)) or
/// after a linear layer (input (N, C)). `None` when the kind has no layer there (`none`, or `instance` after a
/// linear layer). GroupNorm takes `groups.min(c)` groups.
pub fn build_norm(
    kind: NormKind,
    c: usize,
    spatial: bool,
    p: &NormParams,
) -> Result<Option<Box<dyn Layer<f32>>>> {
    let groups = p.groups;
    let boxed = |l: Box<dyn Layer<f32>>| Ok(Some(l));
    match kind {
        NormKind::None => Ok(None),
        NormKind::Batch => {
            let cfg = if spatial {
                BatchNormConfig::d2(c)
            } else {
                BatchNormConfig::d1(c)
            };
            boxed(Box::new(cfg.build::<f32>()?))
        }
        NormKind::Frozen => boxed(Box::new(FrozenBatchNormConfig::new(c).build::<f32>()?)),
        NormKind::Group => {
            let g = groups.min(c);
            if g == 0 || !c.is_multiple_of(g) {
                return Err(NvError::Config(format!(
                    "--groups {g} does not divide {c} channels"
                )));
            }
            boxed(Box::new(GroupNormConfig::new(g, c).build::<f32>()?))
        }
        NormKind::Layer => {
            if spatial {
                boxed(Box::new(GroupNormConfig::new(1, c).build::<f32>()?))
            } else {
                boxed(Box::new(LayerNormConfig::new(&[c]).build::<f32>()?))
            }
        }
        NormKind::Instance => {
            if spatial {
                boxed(Box::new(
                    InstanceNormConfig::d2(c).affine(true).build::<f32>()?,
                ))
            } else {
                Ok(None)
            }
        }
        NormKind::Bcn => boxed(Box::new(BatchChannelNormConfig::new(c).build::<f32>()?)),
        NormKind::Renorm => {
            let cfg = if spatial {
                BatchRenormConfig::d2(c)
            } else {
                BatchRenormConfig::d1(c)
            };
            boxed(Box::new(cfg.schedule(p.renorm).build::<f32>()?))
        }
        NormKind::Ghost => {
            let cfg = if spatial {
                GhostBatchNormConfig::d2(c, p.ghost_batch)
            } else {
                GhostBatchNormConfig::d1(c, p.ghost_batch)
            };
            boxed(Box::new(cfg.build::<f32>()?))
        }
    }
}
