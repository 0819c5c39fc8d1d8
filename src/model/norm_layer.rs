//! The `--norm` switch: one enum naming every normalization, and the adapter that lets a [`NormLayer`] sit in a
//! [`Sequential`](super::Sequential).

use crate::nn::Layer;
use crate::norm::{
    BatchChannelNormConfig, BatchNormConfig, FrozenBatchNorm, GroupNormConfig, InstanceNormConfig,
    LayerNormConfig, NormLayer,
};
use crate::state::{StateDict, Stateful};
use crate::{Mode, NvError, Param, Result};
use ndarray::ArrayD;

/// Which normalization a model uses everywhere.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// No normalization (layers before it get a bias instead).
    None,
    /// BatchNorm (fused with the following ReLU).
    Batch,
    /// GroupNorm with `groups` groups (8 by default).
    Group,
    /// Layer normalization: GroupNorm(1, C) after convolutions (Wu & He's LN for CNNs), LayerNorm(C) after linear layers.
    Layer,
    /// InstanceNorm2d with affine after convolutions; none after linear layers (one value per instance).
    Instance,
    /// Batch-Channel Normalization.
    Bcn,
    /// FrozenBatchNorm: fixed statistics and affine (load them from a BN checkpoint to fine-tune).
    Frozen,
}

impl NormKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            NormKind::None => "none",
            NormKind::Batch => "batch",
            NormKind::Group => "group",
            NormKind::Layer => "layer",
            NormKind::Instance => "instance",
            NormKind::Bcn => "bcn",
            NormKind::Frozen => "frozen",
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

/// A [`NormLayer`] as a model [`Layer`].
pub struct NormAdapter(pub Box<dyn NormLayer<f32>>);

impl Layer<f32> for NormAdapter {
    fn forward(&mut self, x: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        self.0.forward(x, mode)
    }
    fn backward(&mut self, x: &ArrayD<f32>, dy: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        self.0.backward(x, dy, mode)
    }
    fn name(&self) -> String {
        self.0.name().to_string()
    }
    fn eval_affine(&self) -> Option<(Vec<f64>, Vec<f64>, bool)> {
        self.0.eval_affine()
    }
    fn eval_affine_exact(&self) -> Option<(Vec<f32>, Vec<f32>, bool)> {
        self.0.eval_affine_exact()
    }
    fn forward_maxpool(&mut self, x: &ArrayD<f32>, mode: Mode) -> Result<Option<ArrayD<f32>>> {
        self.0.forward_maxpool(x, mode)
    }
    fn takes_plane_moments(&self, mode: Mode) -> bool {
        self.0.takes_plane_moments(mode)
    }
    fn backward_deferred<'a>(
        &mut self,
        x: &'a ArrayD<f32>,
        dy: &'a ArrayD<f32>,
        mode: Mode,
    ) -> Result<Option<crate::norm::batch_kernels::DxPlanes<'a, f32>>> {
        self.0.backward_deferred(x, dy, mode)
    }
    fn forward_from_plane_moments(
        &mut self,
        x: &ArrayD<f32>,
        pm: &[(f64, f64)],
        mode: Mode,
        pool: bool,
    ) -> Result<Option<(ArrayD<f32>, bool)>> {
        self.0.forward_from_plane_moments(x, pm, mode, pool)
    }
    fn backward_maxpool(
        &mut self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        mode: Mode,
    ) -> Result<ArrayD<f32>> {
        self.0.backward_maxpool(x, dy, mode)
    }
}

impl Stateful<f32> for NormAdapter {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.0.save_state(prefix, sd)
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        self.0.load_state(prefix, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<f32>)) {
        self.0.visit_params(prefix, f)
    }
}

/// A built normalization layer and whether it absorbed the following ReLU.
pub type BuiltNorm = (Box<dyn Layer<f32>>, bool);

/// Builds the normalization for `c` channels. `spatial` is true after a convolution (input (N, C, H, W)), false
/// after a linear layer (input (N, C)). `relu` asks for a fused ReLU; the returned flag says whether it was fused
/// (only BatchNorm and FrozenBatchNorm fuse; the caller adds a separate ReLU otherwise).
/// Returns `None` when the kind has no layer at that position (`none`, or `instance` after a linear layer).
pub fn build_norm(
    kind: NormKind,
    c: usize,
    spatial: bool,
    relu: bool,
    groups: usize,
) -> Result<Option<BuiltNorm>> {
    let wrap = |n: Box<dyn NormLayer<f32>>, fused: bool| {
        Ok(Some((
            Box::new(NormAdapter(n)) as Box<dyn Layer<f32>>,
            fused,
        )))
    };
    match kind {
        NormKind::None => Ok(None),
        NormKind::Batch => {
            let cfg = if spatial {
                BatchNormConfig::d2(c)
            } else {
                BatchNormConfig::d1(c)
            };
            wrap(Box::new(cfg.fuse_relu(relu).build::<f32>()?), relu)
        }
        NormKind::Frozen => {
            let mut f = FrozenBatchNorm::<f32>::new(c, 1e-5)?;
            f.fuse_relu = relu;
            wrap(Box::new(f), relu)
        }
        NormKind::Group => {
            let g = groups.min(c);
            if !c.is_multiple_of(g) {
                return Err(NvError::Config(format!(
                    "--groups {g} does not divide {c} channels"
                )));
            }
            wrap(Box::new(GroupNormConfig::new(g, c).build::<f32>()?), false)
        }
        NormKind::Layer => {
            if spatial {
                wrap(Box::new(GroupNormConfig::new(1, c).build::<f32>()?), false)
            } else {
                wrap(Box::new(LayerNormConfig::new(&[c]).build::<f32>()?), false)
            }
        }
        NormKind::Instance => {
            if spatial {
                wrap(
                    Box::new(InstanceNormConfig::d2(c).affine(true).build::<f32>()?),
                    false,
                )
            } else {
                Ok(None)
            }
        }
        NormKind::Bcn => wrap(
            Box::new(BatchChannelNormConfig::new(c).build::<f32>()?),
            false,
        ),
    }
}

/// Appends the normalization for `c` channels followed by a ReLU, under `norm_name` and `relu_name`: the ReLU
/// is fused into the norm where the norm supports it, and stands alone when there is no norm. Returns whether a
/// norm layer was added (callers that number children, like `nn.Sequential`, keep the ReLU's index either way).
pub fn push_norm_relu(
    seq: &mut super::Sequential,
    norm_name: &str,
    relu_name: &str,
    kind: NormKind,
    c: usize,
    spatial: bool,
    groups: usize,
) -> Result<bool> {
    match build_norm(kind, c, spatial, true, groups)? {
        Some((n, fused)) => {
            seq.push(norm_name, n);
            if !fused {
                seq.push(relu_name, Box::new(crate::nn::activation::ReLU::new()));
            }
            Ok(true)
        }
        None => {
            seq.push(relu_name, Box::new(crate::nn::activation::ReLU::new()));
            Ok(false)
        }
    }
}
