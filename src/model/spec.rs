//! A graph's architecture as data: what checkpoints store beside the weights, so that `eval` and `predict` can
//! rebuild any model the CLI or the API made ([`Graph::spec`], [`Graph::from_spec`]).

use super::graph::{Graph, Op, ValueId};
use crate::layer::Layer;
use crate::nn::{
    AvgPool2d, AvgPool2dConfig, Clamp, Conv2d, Conv2dConfig, Dropout, Flatten, GlobalAvgPool,
    Linear, LinearConfig, MaxPool2d, MaxPool2dConfig, ReLU, Reshape, ScaleShift, Sigmoid, Softmax,
    UpsampleBilinear, UpsampleSize,
};
use crate::norm::frozen::FrozenBatchNormConfig;
use crate::norm::{
    BatchChannelNorm, BatchChannelNormConfig, BatchNorm, BatchNormConfig, BatchRenorm,
    BatchRenormConfig, FrozenBatchNorm, GhostBatchNorm, GhostBatchNormConfig, GroupNorm,
    GroupNormConfig, InstanceNorm, InstanceNormConfig, LayerNorm, LayerNormConfig,
};
use crate::{NvError, Real, Result};
use serde::{Deserialize, Serialize};

/// A layer's type and configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerSpec {
    Conv2d(Conv2dConfig),
    Linear(LinearConfig),
    BatchNorm(BatchNormConfig),
    FrozenBatchNorm(FrozenBatchNormConfig),
    GroupNorm(GroupNormConfig),
    LayerNorm(LayerNormConfig),
    InstanceNorm(InstanceNormConfig),
    BatchChannelNorm(BatchChannelNormConfig),
    BatchRenorm(BatchRenormConfig),
    GhostBatchNorm(GhostBatchNormConfig),
    Relu,
    Sigmoid,
    Flatten,
    MaxPool2d(MaxPool2dConfig),
    AvgPool2d(AvgPool2dConfig),
    GlobalAvgPool,
    Dropout {
        p: f64,
        seed: u64,
    },
    /// `nn.Hardtanh(lo, hi)` (ONNX `Clip`); infinite bounds are written as `null`.
    Clamp {
        lo: Option<f64>,
        hi: Option<f64>,
    },
    Softmax,
    Reshape {
        shape: Vec<usize>,
    },
    /// `nn.Upsample(size or scale_factor, mode="bilinear", align_corners)`.
    UpsampleBilinear {
        size: UpsampleSize,
        align_corners: bool,
    },
    /// The shapes of the constant `scale` and `shift` buffers (loaded from the state dict).
    ScaleShift {
        scale: Option<Vec<usize>>,
        shift: Option<Vec<usize>>,
    },
}

impl LayerSpec {
    /// The spec of a layer of a known type (`None` for a user's own layer type).
    pub fn of<T: Real>(layer: &dyn Layer<T>) -> Option<LayerSpec> {
        let any: &dyn std::any::Any = layer;
        macro_rules! try_cfg {
            ($($t:ident => $v:ident),*) => {$(
                if let Some(l) = any.downcast_ref::<$t<T>>() {
                    return Some(LayerSpec::$v(l.config().clone()));
                }
            )*};
        }
        try_cfg!(Conv2d => Conv2d, Linear => Linear, BatchNorm => BatchNorm, FrozenBatchNorm => FrozenBatchNorm,
            GroupNorm => GroupNorm, LayerNorm => LayerNorm, InstanceNorm => InstanceNorm,
            BatchChannelNorm => BatchChannelNorm, BatchRenorm => BatchRenorm,
            GhostBatchNorm => GhostBatchNorm, MaxPool2d => MaxPool2d, AvgPool2d => AvgPool2d);
        if any.is::<ReLU<T>>() {
            return Some(LayerSpec::Relu);
        }
        if any.is::<Sigmoid<T>>() {
            return Some(LayerSpec::Sigmoid);
        }
        if any.is::<Flatten<T>>() {
            return Some(LayerSpec::Flatten);
        }
        if any.is::<GlobalAvgPool<T>>() {
            return Some(LayerSpec::GlobalAvgPool);
        }
        if let Some(c) = any.downcast_ref::<Clamp<T>>() {
            let fin = |v: f64| v.is_finite().then_some(v);
            return Some(LayerSpec::Clamp {
                lo: fin(c.lo()),
                hi: fin(c.hi()),
            });
        }
        if any.is::<Softmax<T>>() {
            return Some(LayerSpec::Softmax);
        }
        if let Some(u) = any.downcast_ref::<UpsampleBilinear<T>>() {
            return Some(LayerSpec::UpsampleBilinear {
                size: u.size(),
                align_corners: u.align_corners(),
            });
        }
        if let Some(r) = any.downcast_ref::<Reshape<T>>() {
            return Some(LayerSpec::Reshape {
                shape: r.shape().to_vec(),
            });
        }
        if let Some(s) = any.downcast_ref::<ScaleShift<T>>() {
            return Some(LayerSpec::ScaleShift {
                scale: s.scale().map(|a| a.shape().to_vec()),
                shift: s.shift().map(|a| a.shape().to_vec()),
            });
        }
        if let Some(d) = any.downcast_ref::<Dropout<T>>() {
            return Some(LayerSpec::Dropout {
                p: d.p(),
                seed: d.seed(),
            });
        }
        None
    }

    /// About how many values this layer's state dict holds (parameters and buffers; an upper bound), in
    /// `u128` so that no claim read from a file overflows. Checked against a checkpoint's tensors before the
    /// layer is built, so an architecture that claims huge layers is refused without allocating them.
    pub fn state_elements(&self) -> u128 {
        let u = |v: usize| v as u128;
        match self {
            LayerSpec::Conv2d(c) => {
                u(c.out_channels)
                    * (u(c.in_channels) / u(c.groups.max(1)))
                    * u(c.kernel_size.0)
                    * u(c.kernel_size.1)
                    + u(c.out_channels)
            }
            LayerSpec::Linear(c) => u(c.in_features) * u(c.out_features) + u(c.out_features),
            LayerSpec::BatchNorm(c) => 4 * u(c.num_features) + 1,
            LayerSpec::FrozenBatchNorm(c) => 4 * u(c.num_features),
            LayerSpec::GroupNorm(c) => 2 * u(c.num_channels),
            LayerSpec::LayerNorm(c) => {
                2 * c.normalized_shape.iter().map(|&d| u(d)).product::<u128>()
            }
            LayerSpec::InstanceNorm(c) => 4 * u(c.num_features) + 1,
            LayerSpec::BatchChannelNorm(c) => 8 * u(c.num_features) + 1,
            LayerSpec::BatchRenorm(c) => 4 * u(c.num_features) + 1,
            LayerSpec::GhostBatchNorm(c) => 4 * u(c.bn.num_features) + 1,
            LayerSpec::ScaleShift { scale, shift } => [scale, shift]
                .iter()
                .filter_map(|s| s.as_ref())
                .map(|s| s.iter().map(|&d| u(d)).product::<u128>())
                .sum(),
            _ => 0,
        }
    }

    /// The layer its eval pass is: a BatchNorm for Batch Renorm and Ghost BN (which differ from it in training
    /// only), the spec itself otherwise.
    pub fn eval_equivalent(&self) -> std::borrow::Cow<'_, LayerSpec> {
        use std::borrow::Cow;
        match self {
            LayerSpec::BatchRenorm(c) => Cow::Owned(LayerSpec::BatchNorm(c.batch_norm_config())),
            LayerSpec::GhostBatchNorm(c) => Cow::Owned(LayerSpec::BatchNorm(c.bn.clone())),
            s => Cow::Borrowed(s),
        }
    }

    /// A layer of this spec, with zero (or identity) parameters, to be loaded from a state dict.
    pub fn build<T: Real>(&self) -> Result<Box<dyn Layer<T>>> {
        Ok(match self {
            LayerSpec::Conv2d(c) => Box::new(Conv2d::<T>::new(c.clone())?),
            LayerSpec::Linear(c) => Box::new(Linear::<T>::new(c.clone())?),
            LayerSpec::BatchNorm(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::FrozenBatchNorm(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::GroupNorm(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::LayerNorm(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::InstanceNorm(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::BatchChannelNorm(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::BatchRenorm(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::GhostBatchNorm(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::Relu => Box::new(ReLU::<T>::new()),
            LayerSpec::Sigmoid => Box::new(Sigmoid::<T>::new()),
            LayerSpec::Flatten => Box::new(Flatten::<T>::new()),
            LayerSpec::MaxPool2d(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::AvgPool2d(c) => Box::new(c.clone().build::<T>()?),
            LayerSpec::GlobalAvgPool => Box::new(GlobalAvgPool::<T>::new()),
            LayerSpec::Dropout { p, seed } => Box::new(Dropout::<T>::new(*p, *seed)?),
            LayerSpec::Clamp { lo, hi } => Box::new(Clamp::<T>::new(
                lo.unwrap_or(f64::NEG_INFINITY),
                hi.unwrap_or(f64::INFINITY),
            )?),
            LayerSpec::Softmax => Box::new(Softmax::<T>::new()),
            LayerSpec::UpsampleBilinear {
                size,
                align_corners,
            } => Box::new(UpsampleBilinear::<T>::new(*size, *align_corners)?),
            LayerSpec::Reshape { shape } => Box::new(Reshape::<T>::new(shape.clone())),
            LayerSpec::ScaleShift { scale, shift } => {
                let zeros = |s: &Option<Vec<usize>>| {
                    s.as_ref()
                        .map(|s| ndarray::ArrayD::<T>::zeros(ndarray::IxDyn(s)))
                };
                Box::new(ScaleShift::<T>::new(zeros(scale), zeros(shift)))
            }
        })
    }
}

/// What a node computes, as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpSpec {
    Layer(LayerSpec),
    Add,
    Concat {
        axis: usize,
    },
    /// [`Op::ResizeAs`]: the first input resampled to the second's spatial size.
    ResizeAs {
        align_corners: bool,
    },
}

/// A node: its name, what it computes, the names of the values it reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub op: OpSpec,
    pub inputs: Vec<String>,
    /// The node's parameters are frozen ([`Graph::set_frozen`]); written only when set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frozen: bool,
}

/// A graph's architecture: its inputs, nodes in order and outputs, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphSpec {
    pub inputs: Vec<String>,
    pub nodes: Vec<NodeSpec>,
    pub outputs: Vec<String>,
}

impl GraphSpec {
    /// About how many values the state dict of a graph of this architecture holds ([`LayerSpec::state_elements`]).
    pub fn state_elements(&self) -> u128 {
        self.nodes
            .iter()
            .map(|n| match &n.op {
                OpSpec::Layer(l) => l.state_elements(),
                _ => 0,
            })
            .sum()
    }
}

impl<T: Real> Graph<T> {
    /// The graph's architecture, or an error naming a node whose layer type has no spec.
    pub fn spec(&self) -> Result<GraphSpec> {
        let name = |v: &ValueId| self.value_name(*v).to_string();
        let nodes = self
            .nodes
            .iter()
            .map(|n| {
                let op = match n.op() {
                    Op::Layer(l) => OpSpec::Layer(LayerSpec::of(l.as_ref()).ok_or_else(|| {
                        NvError::Config(format!(
                            "node {}: layer {} has no architecture description",
                            n.name(),
                            l.name()
                        ))
                    })?),
                    Op::Add => OpSpec::Add,
                    Op::Concat { axis } => OpSpec::Concat { axis: *axis },
                    Op::ResizeAs { align_corners } => OpSpec::ResizeAs {
                        align_corners: *align_corners,
                    },
                };
                Ok(NodeSpec {
                    name: n.name().to_string(),
                    op,
                    inputs: n.inputs().iter().map(name).collect(),
                    frozen: n.is_frozen(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GraphSpec {
            inputs: self.inputs().iter().map(name).collect(),
            nodes,
            outputs: self.outputs().iter().map(name).collect(),
        })
    }

    /// A graph of this architecture with zero (or identity) parameters, to be loaded from a state dict. Every
    /// name must be unique and every value read must exist before it is read.
    pub fn from_spec(spec: &GraphSpec) -> Result<Self> {
        let mut g = Graph::new();
        let mut by_name: std::collections::HashMap<String, ValueId> = Default::default();
        let lookup = |by_name: &std::collections::HashMap<String, ValueId>, n: &str, node: &str| {
            by_name.get(n).copied().ok_or_else(|| {
                NvError::Config(format!(
                    "architecture: node {node:?} reads {n:?}, which no earlier node or input writes"
                ))
            })
        };
        for i in &spec.inputs {
            by_name.insert(i.clone(), g.input(i.clone()));
        }
        for n in &spec.nodes {
            let ins = n
                .inputs
                .iter()
                .map(|i| lookup(&by_name, i, &n.name))
                .collect::<Result<Vec<_>>>()?;
            let out = match &n.op {
                OpSpec::Layer(l) => {
                    if ins.len() != 1 {
                        return Err(NvError::Config(format!(
                            "architecture: layer node {:?} reads {} values, not one",
                            n.name,
                            ins.len()
                        )));
                    }
                    g.layer_boxed(n.name.clone(), l.build()?, ins[0])?
                }
                OpSpec::Add => g.add(n.name.clone(), &ins)?,
                OpSpec::Concat { axis } => g.concat(n.name.clone(), &ins, *axis)?,
                OpSpec::ResizeAs { align_corners } => {
                    if ins.len() != 2 {
                        return Err(NvError::Config(format!(
                            "architecture: node {:?} (ResizeAs) reads {} values, not two",
                            n.name,
                            ins.len()
                        )));
                    }
                    g.resize_as(n.name.clone(), ins[0], ins[1], *align_corners)?
                }
            };
            if n.frozen {
                g.set_frozen(&n.name, true)?;
            }
            by_name.insert(n.name.clone(), out);
        }
        let outs = spec
            .outputs
            .iter()
            .map(|o| lookup(&by_name, o, "output"))
            .collect::<Result<Vec<_>>>()?;
        g.set_outputs(&outs)?;
        Ok(g)
    }
}
