//! Running a plan: the forward step by step (each step reads its input values and writes its output value;
//! values the backward does not need are freed after their last reader), and the backward in reverse,
//! accumulating gradients where a value feeds several steps.

use super::compile::Plan;
use super::step::{BnStep, ConvStep, Step, StepKind};
use super::PlanKind;
use crate::kernels::arena;
use crate::kernels::moments::PlaneMoments;
use crate::model::graph::{in_node, resize_as_layer, Node, Op, ValueId};
use crate::nn::{Conv2d, Epilogue};
use crate::norm::{BatchNorm, BnFusion, FrozenBatchNorm};
use crate::{Ctx, NvError, Real, Result};
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use std::sync::Arc;

/// The activations of one forward: the values it computed (graph inputs stay the caller's).
pub(crate) struct Values<'x, T: Real> {
    pub vals: Vec<Option<ArrayD<T>>>,
    pub inputs: &'x [&'x ArrayD<T>],
    pub input_ids: &'x [ValueId],
    moments: Vec<Option<PlaneMoments>>,
}

impl<'x, T: Real> Values<'x, T> {
    pub fn new(
        vals: Vec<Option<ArrayD<T>>>,
        inputs: &'x [&'x ArrayD<T>],
        input_ids: &'x [ValueId],
    ) -> Self {
        let n = vals.len();
        Values {
            vals,
            inputs,
            input_ids,
            moments: vec![None; n],
        }
    }

    /// Drops computed values (their buffers go back to the allocator).
    pub fn drop_values(&mut self, vs: &[ValueId]) {
        for v in vs {
            self.vals[v.0] = None;
            self.moments[v.0] = None;
        }
    }

    /// Value `v`: a graph input or a computed value still alive.
    pub fn get(&self, v: ValueId) -> Result<&ArrayD<T>> {
        if let Some(k) = self.input_ids.iter().position(|&i| i == v) {
            return Ok(self.inputs[k]);
        }
        self.vals[v.0]
            .as_ref()
            .ok_or_else(|| NvError::Config(format!("plan: value #{} is not alive", v.0)))
    }
}

/// The node's layer as an `L` (the plan made the step for that type).
fn layer<T: Real, L: 'static>(nodes: &mut [Node<T>], n: usize) -> &mut L {
    nodes[n]
        .layer_as_mut::<L>()
        .expect("the plan's step kind matches its node's layer")
}

fn dyn_layer<T: Real>(nodes: &mut [Node<T>], n: usize) -> &mut dyn crate::Layer<T> {
    match &mut nodes[n].op {
        Op::Layer(l) => l.as_mut(),
        _ => unreachable!("a layer step's node is a layer"),
    }
}

/// Runs step `i`'s forward, writing its output value.
pub(crate) fn forward_step<T: Real>(
    plan: &Plan,
    i: usize,
    nodes: &mut [Node<T>],
    v: &mut Values<T>,
    ctx: Ctx,
) -> Result<()> {
    let step = &plan.steps[i];
    let y = forward_kind(plan, i, step, nodes, v, ctx)
        .map_err(|e| in_node(nodes[step.nodes[0]].name(), e))?;
    v.vals[step.output.0] = Some(y);
    Ok(())
}

fn forward_kind<T: Real>(
    plan: &Plan,
    i: usize,
    step: &Step,
    nodes: &mut [Node<T>],
    v: &mut Values<T>,
    ctx: Ctx,
) -> Result<ArrayD<T>> {
    match &step.kind {
        StepKind::Layer { node } => {
            let x = v.get(step.inputs[0])?;
            dyn_layer(nodes, *node).forward(x, ctx)
        }
        StepKind::Conv(c) => conv_forward(c, step, nodes, v),
        StepKind::BatchNorm(b) => {
            let pm = if b.moments {
                v.moments[step.inputs[0].0].take()
            } else {
                None
            };
            let x = v.get(step.inputs[0])?;
            let f = BnFusion {
                relu: b.relu,
                pool2x2: b.pool,
                plane_moments: pm.as_deref(),
            };
            layer::<T, BatchNorm<T>>(nodes, b.node).forward_fused(x, ctx, f)
        }
        StepKind::Frozen { node, relu } => {
            let x = v.get(step.inputs[0])?;
            layer::<T, FrozenBatchNorm<T>>(nodes, *node).forward_fused(x, ctx, *relu)
        }
        StepKind::Add { relu } => add_forward(plan, i, step, v, *relu),
        StepKind::Concat { axis } => {
            let xs = step
                .inputs
                .iter()
                .map(|&u| v.get(u))
                .collect::<Result<Vec<_>>>()?;
            concat(&xs, *axis)
        }
        StepKind::ResizeAs { align_corners } => {
            let up = resize_as_layer::<T>(&plan.shapes[step.inputs[1].0], *align_corners)?;
            let x = v.get(step.inputs[0])?;
            Layer::forward(&mut { up }, x, ctx)
        }
        StepKind::Reshape { node, moved } => {
            let out_shape = plan.shapes[step.output.0].clone();
            if *moved {
                let owned = v.vals[step.inputs[0].0]
                    .take()
                    .expect("a moved input is computed");
                Ok(reshape_owned(owned, &out_shape))
            } else {
                let x = v.get(step.inputs[0])?;
                dyn_layer(nodes, *node).forward(x, ctx)
            }
        }
    }
}

fn conv_forward<T: Real>(
    c: &ConvStep,
    step: &Step,
    nodes: &mut [Node<T>],
    v: &mut Values<T>,
) -> Result<ArrayD<T>> {
    let affine = match c.affine {
        Some(n) => Some(norm_affine(nodes, n)?),
        None => None,
    };
    let x = v.get(step.inputs[0])?;
    let conv = layer::<T, Conv2d<T>>(nodes, c.node);
    if c.moments {
        let (y, pm) = conv.forward_with_moments(x, c.algo)?;
        v.moments[step.output.0] = Some(pm);
        return Ok(y);
    }
    let epi = Epilogue {
        affine: affine.as_ref().map(|(a, b)| (a.as_slice(), b.as_slice())),
        relu: c.relu,
        pool2x2: c.pool,
    };
    match c.channel_last {
        Some(layouts) => conv.forward_channel_last(x, c.algo, epi, layouts),
        None => conv.forward_with(x, c.algo, epi),
    }
}

/// The f32 eval affine of a BatchNorm or FrozenBatchNorm node.
fn norm_affine<T: Real>(nodes: &[Node<T>], n: usize) -> Result<(Vec<T>, Vec<T>)> {
    let node = &nodes[n];
    let aff = match node.layer_as::<BatchNorm<T>>() {
        Some(bn) => bn.eval_affine(),
        None => node
            .layer_as::<FrozenBatchNorm<T>>()
            .map(|f| f.eval_affine()),
    };
    aff.map(|a| a.to_real())
        .ok_or_else(|| NvError::Config(format!("{}: no eval affine to fuse", node.name())))
}

/// relu(a + b + …), into the first input's buffer when the plan allows.
fn add_forward<T: Real>(
    plan: &Plan,
    i: usize,
    step: &Step,
    v: &mut Values<T>,
    relu: bool,
) -> Result<ArrayD<T>> {
    let first = step.inputs[0];
    let mut y = if plan.in_place[i] {
        v.vals[first.0]
            .take()
            .expect("an in-place input is computed")
    } else {
        let x = v.get(first)?;
        // SAFETY: assigned in full right away.
        let mut y = unsafe { arena::output_uninit(x.shape()) };
        y.assign(x);
        y
    };
    let last = step.inputs.len() - 1;
    for (k, &u) in step.inputs.iter().enumerate().skip(1) {
        let b = v.get(u)?;
        if b.shape() != y.shape() {
            return Err(NvError::Shape {
                layer: "Add",
                msg: format!("inputs of shapes {:?} and {:?}", y.shape(), b.shape()),
            });
        }
        let zip = ndarray::Zip::from(&mut y).and(b);
        if relu && k == last {
            // the sum and the ReLU in one pass, as PyTorch's `relu(a + b)` computes each element
            zip.for_each(|a, &b| {
                let t = *a + b;
                *a = if t <= T::zero() { T::zero() } else { t };
            });
        } else {
            zip.for_each(|a, &b| *a = *a + b);
        }
    }
    Ok(y)
}

/// `xs` concatenated along `axis`, in standard layout (a layer after it reads one contiguous buffer): for each
/// index of the dims before `axis`, each input's block is copied whole.
fn concat<T: Real>(xs: &[&ArrayD<T>], axis: usize) -> Result<ArrayD<T>> {
    let first = xs[0].shape();
    let mut shape = first.to_vec();
    shape[axis] = xs.iter().map(|x| x.shape()[axis]).sum();
    let outer: usize = first[..axis].iter().product();
    let inner: usize = first[axis + 1..].iter().product();
    let srcs: Vec<std::borrow::Cow<'_, [T]>> = xs
        .iter()
        .map(|x| crate::kernels::shape::contiguous(x))
        .collect();
    // SAFETY: every element is written below (the blocks tile each outer index's row).
    let mut y = unsafe { arena::output_uninit(&shape) };
    let ys = y.as_slice_mut().expect("fresh array");
    let row = shape[axis] * inner;
    for o in 0..outer {
        let mut at = o * row;
        for (x, src) in xs.iter().zip(&srcs) {
            let block = x.shape()[axis] * inner;
            ys[at..at + block].copy_from_slice(&src[o * block..(o + 1) * block]);
            at += block;
        }
    }
    Ok(y)
}

/// `a` with `shape` (the same number of elements, row-major): its buffer moved when `a` is in standard layout,
/// copied in logical order otherwise.
pub(crate) fn reshape_owned<T: Real>(a: ArrayD<T>, shape: &[usize]) -> ArrayD<T> {
    if a.is_standard_layout() {
        if let Ok(y) = a.into_shape_with_order(IxDyn(shape)) {
            return y;
        }
        unreachable!("a standard-layout array reshapes to any shape of the same size");
    }
    ArrayD::from_shape_vec(IxDyn(shape), a.iter().copied().collect())
        .expect("the same number of elements")
}

/// A gradient held by the backward: shared when one dy feeds several inputs (an addition).
pub(crate) type Grad<T> = Arc<ArrayD<T>>;

/// Adds `g` into the gradient slot of a value (the first contribution is stored as is).
pub(crate) fn accumulate<T: Real>(slot: &mut Option<Grad<T>>, g: Grad<T>) {
    match slot {
        None => *slot = Some(g),
        Some(have) => {
            let a = Arc::make_mut(have);
            ndarray::Zip::from(a).and(&*g).for_each(|a, &b| *a = *a + b);
        }
    }
}

/// What a step's backward hands back: a gradient per input (`None` where the input needs none).
pub(crate) type InputGrads<T> = Vec<Option<Grad<T>>>;

/// Runs step `i`'s backward from `dy`: accumulates its parameters' gradients and returns its inputs' gradients
/// where `needs[k]` (input k requires a gradient).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_step<T: Real>(
    plan: &Plan,
    i: usize,
    nodes: &mut [Node<T>],
    v: &Values<T>,
    dy: Grad<T>,
    needs: &[bool],
    deferred: bool,
    ctx: Ctx,
) -> Result<InputGrads<T>> {
    let step = &plan.steps[i];
    backward_kind(plan, i, step, nodes, v, dy, needs, deferred, ctx)
        .map_err(|e| in_node(nodes[step.nodes[0]].name(), e))
}

#[allow(clippy::too_many_arguments)]
fn backward_kind<T: Real>(
    plan: &Plan,
    _i: usize,
    step: &Step,
    nodes: &mut [Node<T>],
    v: &Values<T>,
    dy: Grad<T>,
    needs: &[bool],
    deferred: bool,
    ctx: Ctx,
) -> Result<InputGrads<T>> {
    let need = needs.first().copied().unwrap_or(false);
    match &step.kind {
        StepKind::Layer { node } => {
            let x = v.get(step.inputs[0])?;
            let l = dyn_layer(nodes, *node);
            if need {
                Ok(vec![Some(Arc::new(l.backward(x, &dy, ctx)?))])
            } else {
                l.backward_params(x, &dy, ctx)?;
                Ok(vec![None])
            }
        }
        StepKind::Conv(c) => {
            let x = v.get(step.inputs[0])?;
            let conv = layer::<T, Conv2d<T>>(nodes, c.node);
            if need {
                // SAFETY: every convolution backward writes each element of dx.
                let mut dx = unsafe { arena::output_uninit(x.shape()) };
                conv.backward_with(
                    x,
                    &dy,
                    Some(dx.as_slice_mut().expect("fresh array")),
                    c.algo,
                )?;
                Ok(vec![Some(Arc::new(dx))])
            } else {
                conv.backward_with(x, &dy, None, c.algo)?;
                Ok(vec![None])
            }
        }
        StepKind::BatchNorm(b) => {
            let x = v.get(step.inputs[0])?;
            if deferred {
                deferred_backward(plan, b, nodes, v, x, &dy, ctx)?;
                return Ok(vec![None]);
            }
            let dx = Layer::backward(layer::<T, BatchNorm<T>>(nodes, b.node), x, &dy, ctx)?;
            Ok(vec![need.then(|| Arc::new(dx))])
        }
        StepKind::Frozen { node, .. } => {
            let f = layer::<T, FrozenBatchNorm<T>>(nodes, *node);
            let trains_affine = f.config().train_affine && step.has_params;
            if !(need || trains_affine) {
                return Ok(vec![None]);
            }
            let x = v.get(step.inputs[0])?;
            let dx = Layer::backward(f, x, &dy, ctx)?;
            Ok(vec![need.then(|| Arc::new(dx))])
        }
        StepKind::Add { relu } => {
            let g = if *relu {
                let out = v.get(step.output)?;
                let mut g = Arc::unwrap_or_clone(dy);
                // a select, not a branch: the loop vectorises (a conditional store does not); a NaN output
                // lets dy through, as PyTorch's threshold_backward does
                let mask = |g: &mut T, o: &T| *g = if *o <= T::zero() { T::zero() } else { *g };
                match (g.as_slice_mut(), out.as_slice()) {
                    (Some(gs), Some(os)) => gs.iter_mut().zip(os).for_each(|(g, o)| mask(g, o)),
                    _ => ndarray::Zip::from(&mut g).and(out).for_each(mask),
                }
                Arc::new(g)
            } else {
                dy
            };
            Ok(needs.iter().map(|&n| n.then(|| Arc::clone(&g))).collect())
        }
        StepKind::Concat { axis } => {
            let mut start = 0;
            let mut out = vec![];
            for (k, &u) in step.inputs.iter().enumerate() {
                let len = plan.shapes[u.0][*axis];
                if needs[k] {
                    let part = dy.slice_axis(Axis(*axis), Slice::from(start..start + len));
                    // SAFETY: assigned in full right away.
                    let mut g = unsafe { arena::output_uninit(part.shape()) };
                    g.assign(&part);
                    out.push(Some(Arc::new(g)));
                } else {
                    out.push(None);
                }
                start += len;
            }
            Ok(out)
        }
        StepKind::ResizeAs { align_corners } => {
            if !need {
                return Ok(vec![None, None]);
            }
            let up = resize_as_layer::<T>(&plan.shapes[step.inputs[1].0], *align_corners)?;
            let dx = up.backward_for_shape(&plan.shapes[step.inputs[0].0], &dy)?;
            Ok(vec![Some(Arc::new(dx)), None])
        }
        StepKind::Reshape { node, moved } => {
            if !need {
                return Ok(vec![None]);
            }
            let in_shape = &plan.shapes[step.inputs[0].0];
            if *moved {
                let d = Arc::unwrap_or_clone(dy);
                Ok(vec![Some(Arc::new(reshape_owned(d, in_shape)))])
            } else {
                let x = v.get(step.inputs[0])?;
                Ok(vec![Some(Arc::new(
                    dyn_layer(nodes, *node).backward(x, &dy, ctx)?,
                ))])
            }
        }
    }
}

/// The BatchNorm's backward without its dx pass, its dx handed plane by plane to the weight gradient of the
/// convolution before it ([`super::fusions::dx_planes`]).
fn deferred_backward<T: Real>(
    plan: &Plan,
    b: &BnStep,
    nodes: &mut [Node<T>],
    v: &Values<T>,
    x: &ArrayD<T>,
    dy: &ArrayD<T>,
    ctx: Ctx,
) -> Result<()> {
    let conv_step = &plan.steps[b.defer_to.expect("deferred")];
    let StepKind::Conv(c) = &conv_step.kind else {
        unreachable!("dx_planes defers to a convolution step")
    };
    let x0 = v.get(conv_step.inputs[0])?;
    let [bn_node, conv_node] = nodes
        .get_disjoint_mut([b.node, c.node])
        .expect("two distinct nodes");
    let bn = bn_node
        .layer_as_mut::<BatchNorm<T>>()
        .expect("a BatchNorm step");
    let conv = conv_node
        .layer_as_mut::<Conv2d<T>>()
        .expect("a convolution step");
    let planes = bn.backward_deferred(x, dy, ctx)?;
    let d = planes.dims();
    let fill = |k: usize, out: &mut [T]| planes.fill(k, out);
    if !conv.backward_params_from_planes(x0, (d.n, d.c, d.s), &fill, c.algo)? {
        let dx = ArrayD::from_shape_vec(x.raw_dim(), planes.to_vec())
            .expect("dx of the norm's input shape");
        conv.backward_with(x0, &dx, None, c.algo)?;
    }
    Ok(())
}

use crate::Layer;

/// Whether a plan of this kind keeps activations for a backward.
pub(crate) fn keeps_activations(kind: PlanKind) -> bool {
    kind != PlanKind::Inference
}
