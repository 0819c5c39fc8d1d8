//! Compiling a graph into a plan for one set of input shapes and one kind of pass: one step per node, each
//! convolution's algorithm chosen, the fusion patterns applied ([`super::fusions`]), and the activations planned
//! by liveness (which values the backward keeps, and when each other one is freed).

use super::builder::Builder;
use super::fusions;
use super::step::{BnStep, ConvStep, Step, StepKind};
use super::{PlanKind, PlanOptions};
use crate::model::graph::{in_node, op_output_shape, Node, Op, ValueId};
use crate::nn::{Conv2d, Flatten};
use crate::norm::{BatchNorm, FrozenBatchNorm};
use crate::{Ctx, Real, Result};

/// A compiled plan.
pub(crate) struct Plan {
    pub steps: Vec<Step>,
    /// Every value's shape.
    pub shapes: Vec<Vec<usize>>,
    /// Per step: the values to drop (or recycle) once the step's forward has run.
    pub free_after: Vec<Vec<ValueId>>,
    /// Per value: kept after the forward for the backward.
    pub keep: Vec<bool>,
    /// Per step: the kept values to drop once the step's backward has run (no earlier step's backward reads
    /// them), so the backward's memory falls as it goes.
    pub bwd_free_after: Vec<Vec<ValueId>>,
    /// Per step: an Add may add into its first input's buffer (read by nothing after it, kept for nothing).
    pub in_place: Vec<bool>,
    /// Forward and backward seconds per step, summed while timing is on.
    pub times: Vec<[f64; 2]>,
}

/// Whether each node has trainable parameters (a frozen node has none).
fn params_of<T: Real>(nodes: &mut [Node<T>]) -> Vec<bool> {
    nodes
        .iter_mut()
        .map(|n| match &mut n.op {
            Op::Layer(_) if n.frozen => false,
            Op::Layer(l) => {
                let mut count = 0;
                l.visit_params("", &mut |_, _| count += 1);
                count > 0
            }
            _ => false,
        })
        .collect()
}

/// The base step of a node: the convolutions and norms the patterns know get their own kinds.
fn base_step<T: Real>(
    nodes: &[Node<T>],
    i: usize,
    shapes: &[Vec<usize>],
    ctx: Ctx,
    opts: &PlanOptions,
    has_params: bool,
) -> Result<Step> {
    let node = &nodes[i];
    let kind = match node.op() {
        Op::Add => StepKind::Add { relu: false },
        Op::Concat { axis } => StepKind::Concat { axis: *axis },
        Op::ResizeAs { align_corners } => StepKind::ResizeAs {
            align_corners: *align_corners,
        },
        Op::Layer(_) => {
            if let Some(conv) = node.layer_as::<Conv2d<T>>() {
                let algo = conv
                    .algorithm(
                        &shapes[node.inputs()[0].0],
                        ctx.mode(),
                        opts.conv,
                        ctx.isa(),
                    )
                    .map_err(|e| in_node(node.name(), e))?;
                StepKind::Conv(ConvStep {
                    node: i,
                    algo,
                    affine: None,
                    relu: false,
                    pool: false,
                    moments: false,
                    channel_last: None,
                })
            } else if node.layer_as::<BatchNorm<T>>().is_some() {
                StepKind::BatchNorm(BnStep {
                    node: i,
                    relu: false,
                    pool: false,
                    moments: false,
                    defer_to: None,
                })
            } else if node.layer_as::<FrozenBatchNorm<T>>().is_some() {
                StepKind::Frozen {
                    node: i,
                    relu: false,
                }
            } else if node.layer_as::<Flatten<T>>().is_some() {
                StepKind::Reshape {
                    node: i,
                    moved: false,
                }
            } else {
                StepKind::Layer { node: i }
            }
        }
    };
    Ok(Step {
        kind,
        inputs: node.inputs().to_vec(),
        output: node.output(),
        nodes: vec![i],
        has_params,
    })
}

/// Compiles the graph's `nodes` for these input shapes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compile<T: Real>(
    nodes: &mut [Node<T>],
    num_values: usize,
    inputs: &[ValueId],
    outputs: &[ValueId],
    input_shapes: &[Vec<usize>],
    kind: PlanKind,
    ctx: Ctx,
    opts: &PlanOptions,
) -> Result<Plan> {
    let mut shapes = vec![vec![]; num_values];
    for (v, s) in inputs.iter().zip(input_shapes) {
        shapes[v.0] = s.clone();
    }
    for node in nodes.iter() {
        let ins: Vec<&[usize]> = node
            .inputs()
            .iter()
            .map(|v| shapes[v.0].as_slice())
            .collect();
        shapes[node.output().0] =
            op_output_shape(node.op(), &ins).map_err(|e| in_node(node.name(), e))?;
    }
    let params = params_of(nodes);
    let nodes: &[Node<T>] = nodes;
    let steps = (0..nodes.len())
        .map(|i| base_step(nodes, i, &shapes, ctx, opts, params[i]).map(Some))
        .collect::<Result<Vec<_>>>()?;
    let mut b = Builder {
        nodes,
        steps,
        shapes,
        kind,
        ctx,
        inputs,
        outputs,
    };
    if opts.fuse {
        fusions::apply_all(&mut b);
    }
    let steps: Vec<Step> = b.steps.into_iter().flatten().collect();
    let shapes = b.shapes;
    let (keep, free_after, in_place) = liveness(&steps, num_values, inputs, outputs, kind);
    let bwd_free_after = backward_liveness(&steps, &keep, inputs);
    let n = steps.len();
    Ok(Plan {
        steps,
        shapes,
        free_after,
        keep,
        bwd_free_after,
        in_place,
        times: vec![[0.0; 2]; n],
    })
}

/// Which values the backward keeps, when every other value is freed, and which additions may write into
/// their first input.
fn liveness(
    steps: &[Step],
    num_values: usize,
    inputs: &[ValueId],
    outputs: &[ValueId],
    kind: PlanKind,
) -> (Vec<bool>, Vec<Vec<ValueId>>, Vec<bool>) {
    let mut keep = vec![false; num_values];
    if kind != PlanKind::Inference {
        for s in steps {
            if s.backward_reads_inputs() {
                for v in &s.inputs {
                    keep[v.0] = true;
                }
            }
            if s.backward_reads_output() {
                keep[s.output.0] = true;
            }
        }
    }
    // the last step reading each value (its producer when nothing reads it)
    let mut last: Vec<Option<usize>> = vec![None; num_values];
    for (i, s) in steps.iter().enumerate() {
        last[s.output.0].get_or_insert(i);
        for v in &s.inputs {
            last[v.0] = Some(i);
        }
    }
    let mut free_after = vec![vec![]; steps.len()];
    for (v, l) in last.iter().enumerate() {
        let id = ValueId(v);
        if let Some(i) = *l {
            if !keep[v] && !outputs.contains(&id) && !inputs.contains(&id) {
                free_after[i].push(id);
            }
        }
    }
    let in_place = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            matches!(s.kind, StepKind::Add { .. }) && {
                let v = s.inputs[0];
                free_after[i].contains(&v) && s.inputs.iter().filter(|&&u| u == v).count() == 1
            }
        })
        .collect();
    (keep, free_after, in_place)
}

/// For each step, the kept values whose last reader in the backward (which runs the steps in reverse) it is.
fn backward_liveness(steps: &[Step], keep: &[bool], inputs: &[ValueId]) -> Vec<Vec<ValueId>> {
    let mut first: Vec<Option<usize>> = vec![None; keep.len()];
    let mut read = |v: ValueId, i: usize| {
        let f = &mut first[v.0];
        *f = Some(f.map_or(i, |f| f.min(i)));
    };
    for (i, s) in steps.iter().enumerate() {
        if s.backward_reads_inputs() {
            s.inputs.iter().for_each(|&v| read(v, i));
        }
        if s.backward_reads_output() {
            read(s.output, i);
        }
    }
    let mut out = vec![vec![]; steps.len()];
    for (v, f) in first.iter().enumerate() {
        if let Some(i) = *f {
            if keep[v] && !inputs.contains(&ValueId(v)) {
                out[i].push(ValueId(v));
            }
        }
    }
    out
}
