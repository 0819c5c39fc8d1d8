//! The steps of a plan: one per graph node, or one for several nodes when a fusion pattern merged them. A fused
//! step is an ordinary step whose flags say what it does in its kernels.

use crate::model::graph::{Node, ValueId};
use crate::nn::conv::winograd::channel_last::Layouts;
use crate::nn::ConvAlgo;

/// A convolution with its algorithm and what the plan fused into it.
#[derive(Debug, Clone)]
pub(crate) struct ConvStep {
    pub node: usize,
    pub algo: ConvAlgo,
    /// Inference: the eval-mode norm node whose affine the output pass applies.
    pub affine: Option<usize>,
    /// A ReLU applied in the output pass.
    pub relu: bool,
    /// A 2×2 max pool applied in the output pass (after affine and ReLU).
    pub pool: bool,
    /// The forward also reduces each output plane to (mean, M2) for the BatchNorm that reads it.
    pub moments: bool,
    /// Inference: Winograd F(2×2) on channel-last tiles, with these layouts of its input and output.
    pub channel_last: Option<Layouts>,
}

/// A BatchNorm with what the plan fused into it.
#[derive(Debug, Clone)]
pub(crate) struct BnStep {
    pub node: usize,
    pub relu: bool,
    pub pool: bool,
    /// Its statistics come from the plane moments of the convolution that wrote its input.
    pub moments: bool,
    /// The convolution step before it (whose input needs no gradient) that takes its dx plane by plane, when
    /// the backward needs no gradient for that input.
    pub defer_to: Option<usize>,
}

#[derive(Debug, Clone)]
pub(crate) enum StepKind {
    /// Any layer, through the [`crate::Layer`] interface.
    Layer {
        node: usize,
    },
    Conv(ConvStep),
    BatchNorm(BnStep),
    /// A FrozenBatchNorm, with a fused ReLU.
    Frozen {
        node: usize,
        relu: bool,
    },
    /// An elementwise sum (then a ReLU).
    Add {
        relu: bool,
    },
    Concat {
        axis: usize,
    },
    /// Bilinear resampling of the first input to the second's spatial size (the backward reads only shapes).
    ResizeAs {
        align_corners: bool,
    },
    /// A flatten; `moved`: its input's buffer becomes its output (no copy), which needs an input read by
    /// nothing else and kept for no backward.
    Reshape {
        node: usize,
        moved: bool,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub kind: StepKind,
    pub inputs: Vec<ValueId>,
    pub output: ValueId,
    /// The graph nodes this step runs, the anchor first.
    pub nodes: Vec<usize>,
    /// Whether any of its nodes has parameters.
    pub has_params: bool,
}

impl Step {
    /// Whether the step's backward reads its inputs.
    pub fn backward_reads_inputs(&self) -> bool {
        match &self.kind {
            StepKind::Add { .. } | StepKind::Concat { .. } | StepKind::ResizeAs { .. } => false,
            StepKind::Reshape { moved, .. } => !moved,
            _ => true,
        }
    }
    /// Whether the step's backward reads its output (a ReLU fused after an addition masks by it).
    pub fn backward_reads_output(&self) -> bool {
        matches!(self.kind, StepKind::Add { relu: true })
    }

    /// `name1+name2 [what]`: the nodes and what the step does, for plan descriptions and profiles.
    pub fn describe<T: crate::Real>(&self, nodes: &[Node<T>]) -> (String, String) {
        let names: Vec<&str> = self.nodes.iter().map(|&n| nodes[n].name()).collect();
        let what = match &self.kind {
            StepKind::Layer { node } => nodes[*node].op().describe(),
            StepKind::Conv(c) => {
                let mut f = vec![c.algo.name().to_string()];
                if let Some(l) = c.channel_last {
                    let side = |cl: bool| if cl { "NHWC" } else { "NCHW" };
                    f.push(format!("{} in, {} out", side(l.input), side(l.output)));
                }
                if c.moments {
                    f.push("plane moments".into());
                }
                if c.affine.is_some() {
                    f.push("+ eval affine".into());
                }
                if c.relu {
                    f.push("+ ReLU".into());
                }
                if c.pool {
                    f.push("+ 2x2 max pool".into());
                }
                format!("{} [{}]", nodes[c.node].op().describe(), f.join(", "))
            }
            StepKind::BatchNorm(b) => {
                let mut f = vec![];
                if b.moments {
                    f.push("stats from plane moments".to_string());
                }
                if b.relu {
                    f.push("+ ReLU".into());
                }
                if b.pool {
                    f.push("+ 2x2 max pool".into());
                }
                if b.defer_to.is_some() {
                    f.push("dx by planes".into());
                }
                let desc = nodes[b.node].op().describe();
                if f.is_empty() {
                    desc
                } else {
                    format!("{desc} [{}]", f.join(", "))
                }
            }
            StepKind::Frozen { node, relu } => {
                let desc = nodes[*node].op().describe();
                if *relu {
                    format!("{desc} [+ ReLU]")
                } else {
                    desc
                }
            }
            StepKind::Add { relu } => {
                if *relu {
                    "Add [+ ReLU]".into()
                } else {
                    "Add".into()
                }
            }
            StepKind::Concat { axis } => format!("Concat(dim={axis})"),
            StepKind::ResizeAs { align_corners } => {
                crate::model::graph::resize_as_name(*align_corners)
            }
            StepKind::Reshape { node, moved } => {
                let desc = nodes[*node].op().describe();
                if *moved {
                    format!("{desc} [buffer moved]")
                } else {
                    desc
                }
            }
        };
        (names.join("+"), what)
    }
}
