//! Models are graphs: a DAG of named nodes over named values, with branches, additions, concatenations and
//! several outputs. Each node keeps the PyTorch state-dict name of its module, so a graph's state dict has
//! PyTorch's keys.
//!
//! A graph is built in order (a node can only read values that exist), so the node list is a topological order.
//! Running it is the plan's business ([`plan`]): a graph compiles, once per input shape and mode, into
//! a plan whose steps are the nodes with their fusions applied; the backward runs the steps in reverse and
//! accumulates gradients where a value feeds several nodes.
//!
//! ```
//! use normvision::model::Graph;
//! use normvision::nn::{Conv2dConfig, ReLU};
//! use normvision::norm::BatchNormConfig;
//! use normvision::ndarray::{ArrayD, IxDyn};
//! use normvision::state::Stateful;
//! use normvision::Ctx;
//! let mut rng = rand::thread_rng();
//! let mut g = Graph::new();
//! let x = g.input("x");
//! let a = g.layer("conv", Conv2dConfig::new(3, 8, 3).padding(1).build::<f32>(&mut rng).unwrap(), x).unwrap();
//! let a = g.layer("bn", BatchNormConfig::d2(8).build::<f32>().unwrap(), a).unwrap();
//! let a = g.layer("relu", ReLU::new(), a).unwrap();
//! let b = g.layer("proj", Conv2dConfig::new(3, 8, 1).build::<f32>(&mut rng).unwrap(), x).unwrap();
//! let y = g.add("add", &[a, b]).unwrap();
//! g.set_outputs(&[y]).unwrap();
//! let input = ArrayD::ones(IxDyn(&[2, 3, 6, 6]));
//! let out = g.forward(&[&input], Ctx::train()).unwrap();
//! assert_eq!(out[0].shape(), &[2, 8, 6, 6]);
//! let grads = g.backward(&[&input], &[&ArrayD::ones(IxDyn(&[2, 8, 6, 6]))], Ctx::train(), true).unwrap();
//! assert_eq!(grads[0].as_ref().unwrap().shape(), &[2, 3, 6, 6]);
//! assert!(g.state_dict().get("bn.running_mean").is_some());
//! ```

mod edit;
pub mod plan;

use crate::kernels::elementwise::SyncPtr;
use crate::layer::Layer;
use crate::state::{join, StateDict, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::ArrayD;
use plan::{Engine, PlanOptions, StepTime};
use rayon::prelude::*;

/// A value of a graph: a graph input or a node's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub(crate) usize);

impl ValueId {
    /// The value's index in its graph.
    pub fn index(self) -> usize {
        self.0
    }
}

/// What a node computes.
pub enum Op<T: Real = f32> {
    /// A layer of one input.
    Layer(Box<dyn Layer<T>>),
    /// The elementwise sum of its inputs (all of one shape).
    Add,
    /// Its inputs concatenated along `axis` (1: channels).
    Concat { axis: usize },
    /// Its first input, (N, C, H, W), resampled bilinearly to the spatial size of its second (whose last two
    /// dims give (H', W')): PyTorch's `F.interpolate(x, size=like.shape[-2:], mode="bilinear",
    /// align_corners=...)`. A segmentation network's final up-sampling to its input and its image-level
    /// pooling broadcast back to the feature map, for any image size. The second input gets no gradient.
    ResizeAs { align_corners: bool },
}

impl<T: Real> Op<T> {
    /// The layer, when the node is one.
    pub fn as_layer(&self) -> Option<&dyn Layer<T>> {
        match self {
            Op::Layer(l) => Some(l.as_ref()),
            _ => None,
        }
    }
    /// The layer as its concrete type `L`, when it is one.
    pub fn downcast<L: 'static>(&self) -> Option<&L> {
        let any: &dyn std::any::Any = self.as_layer()?;
        any.downcast_ref::<L>()
    }
    /// A short description for tables and errors.
    pub fn describe(&self) -> String {
        match self {
            Op::Layer(l) => l.name(),
            Op::Add => "Add".into(),
            Op::Concat { axis } => format!("Concat(dim={axis})"),
            Op::ResizeAs { align_corners } => resize_as_name(*align_corners),
        }
    }
}

/// A node: its state-dict name, what it computes, the values it reads and the value it writes.
pub struct Node<T: Real = f32> {
    pub(crate) name: String,
    pub(crate) op: Op<T>,
    pub(crate) inputs: Vec<ValueId>,
    pub(crate) output: ValueId,
    /// Frozen (`requires_grad = False` on all its parameters): the optimizer does not see its parameters and
    /// the plan computes no gradient for them ([`Graph::set_frozen`]).
    pub(crate) frozen: bool,
}

impl<T: Real> Node<T> {
    /// Whether the node's parameters are frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn op(&self) -> &Op<T> {
        &self.op
    }
    pub fn inputs(&self) -> &[ValueId] {
        &self.inputs
    }
    pub fn output(&self) -> ValueId {
        self.output
    }
    /// The layer as its concrete type `L`, when it is one.
    pub fn layer_as<L: 'static>(&self) -> Option<&L> {
        self.op.downcast::<L>()
    }
    /// The layer as its concrete type `L`, mutably.
    pub fn layer_as_mut<L: 'static>(&mut self) -> Option<&mut L> {
        match &mut self.op {
            Op::Layer(l) => {
                let any: &mut dyn std::any::Any = l.as_mut();
                any.downcast_mut::<L>()
            }
            _ => None,
        }
    }
}

/// A value's name and the node that writes it (`None`: a graph input).
#[derive(Debug, Clone)]
pub(crate) struct ValueInfo {
    pub(crate) name: String,
    pub(crate) producer: Option<usize>,
}

/// A model as a graph of layers of element type `T` (f32; f64 for gradient checks of the same graphs). See the
/// module docs.
pub struct Graph<T: Real = f32> {
    pub(crate) nodes: Vec<Node<T>>,
    pub(crate) values: Vec<ValueInfo>,
    pub(crate) inputs: Vec<ValueId>,
    pub(crate) outputs: Vec<ValueId>,
    pub(crate) engine: Engine<T>,
}

/// The nodes, one per line: `name = op(inputs)`.
impl<T: Real> std::fmt::Debug for Graph<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |vs: &[ValueId]| {
            vs.iter()
                .map(|v| self.value_name(*v))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            f,
            "Graph({}) -> ({})",
            names(&self.inputs),
            names(&self.outputs)
        )?;
        for n in &self.nodes {
            writeln!(
                f,
                "  {} = {}({})",
                n.name,
                n.op.describe(),
                names(&n.inputs)
            )?;
        }
        Ok(())
    }
}

impl<T: Real> Default for Graph<T> {
    fn default() -> Self {
        Graph {
            nodes: vec![],
            values: vec![],
            inputs: vec![],
            outputs: vec![],
            engine: Engine::default(),
        }
    }
}

impl<T: Real> Graph<T> {
    pub fn new() -> Self {
        Self::default()
    }

    fn check_name(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(NvError::Config("graph: a node needs a name".into()));
        }
        if self.values.iter().any(|v| v.name == name) {
            return Err(NvError::Config(format!(
                "graph: the name {name:?} is taken"
            )));
        }
        Ok(())
    }

    fn check_value(&self, v: ValueId, node: &str) -> Result<()> {
        if v.0 >= self.values.len() {
            return Err(NvError::Config(format!(
                "graph: node {node:?} reads value #{} of a graph with {} values",
                v.0,
                self.values.len()
            )));
        }
        Ok(())
    }

    fn changed(&mut self) {
        self.engine.invalidate();
    }

    /// Adds an input named `name` (fed in order to [`Graph::forward`]).
    pub fn input(&mut self, name: impl Into<String>) -> ValueId {
        let name = name.into();
        let id = ValueId(self.values.len());
        self.values.push(ValueInfo {
            name,
            producer: None,
        });
        self.inputs.push(id);
        self.changed();
        id
    }

    fn push(&mut self, name: String, op: Op<T>, inputs: Vec<ValueId>) -> Result<ValueId> {
        self.check_name(&name)?;
        for &v in &inputs {
            self.check_value(v, &name)?;
        }
        let output = ValueId(self.values.len());
        self.values.push(ValueInfo {
            name: name.clone(),
            producer: Some(self.nodes.len()),
        });
        self.nodes.push(Node {
            name,
            op,
            inputs,
            output,
            frozen: false,
        });
        self.changed();
        Ok(output)
    }

    /// Adds a layer node named `name` (its state-dict prefix) reading `x`.
    pub fn layer(
        &mut self,
        name: impl Into<String>,
        layer: impl Layer<T>,
        x: ValueId,
    ) -> Result<ValueId> {
        self.layer_boxed(name, Box::new(layer), x)
    }

    /// [`Graph::layer`] for a boxed layer.
    pub fn layer_boxed(
        &mut self,
        name: impl Into<String>,
        layer: Box<dyn Layer<T>>,
        x: ValueId,
    ) -> Result<ValueId> {
        self.push(name.into(), Op::Layer(layer), vec![x])
    }

    /// Adds the elementwise sum of `xs` (at least two, of one shape).
    pub fn add(&mut self, name: impl Into<String>, xs: &[ValueId]) -> Result<ValueId> {
        let name = name.into();
        if xs.len() < 2 {
            return Err(NvError::Config(format!(
                "graph: Add {name:?} needs at least two inputs"
            )));
        }
        self.push(name, Op::Add, xs.to_vec())
    }

    /// Adds the concatenation of `xs` along `axis` (at least one input; 1 concatenates channels).
    pub fn concat(
        &mut self,
        name: impl Into<String>,
        xs: &[ValueId],
        axis: usize,
    ) -> Result<ValueId> {
        let name = name.into();
        if xs.is_empty() {
            return Err(NvError::Config(format!(
                "graph: Concat {name:?} needs an input"
            )));
        }
        self.push(name, Op::Concat { axis }, xs.to_vec())
    }

    /// Adds `x` resampled bilinearly to the spatial size of `like` ([`Op::ResizeAs`]).
    pub fn resize_as(
        &mut self,
        name: impl Into<String>,
        x: ValueId,
        like: ValueId,
        align_corners: bool,
    ) -> Result<ValueId> {
        self.push(name.into(), Op::ResizeAs { align_corners }, vec![x, like])
    }

    /// Sets the graph's outputs, in the order [`Graph::forward`] returns them.
    pub fn set_outputs(&mut self, outputs: &[ValueId]) -> Result<()> {
        for &v in outputs {
            self.check_value(v, "output")?;
        }
        if outputs.is_empty() {
            return Err(NvError::Config("graph: at least one output".into()));
        }
        self.outputs = outputs.to_vec();
        self.changed();
        Ok(())
    }

    /// Appends a chain of layers, each reading the previous one's output, the first reading `x`; the layers are
    /// named `prefix.name` (or `name` with an empty prefix). Returns the last output.
    pub fn chain(
        &mut self,
        prefix: &str,
        seq: super::Sequential<T>,
        x: ValueId,
    ) -> Result<ValueId> {
        let mut cur = x;
        for (name, layer) in seq.into_layers() {
            cur = self.layer_boxed(join(prefix, &name), layer, cur)?;
        }
        Ok(cur)
    }

    pub fn nodes(&self) -> &[Node<T>] {
        &self.nodes
    }
    pub fn inputs(&self) -> &[ValueId] {
        &self.inputs
    }
    pub fn outputs(&self) -> &[ValueId] {
        &self.outputs
    }
    /// The name of value `v` (its producing node's, or the input's).
    pub fn value_name(&self, v: ValueId) -> &str {
        &self.values[v.0].name
    }
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&Node<T>> {
        self.nodes.iter().find(|n| n.name == name)
    }
    /// The node named `name`, mutably (a change of its layer's configuration is seen by the next plan).
    pub fn node_mut(&mut self, name: &str) -> Option<&mut Node<T>> {
        self.engine.invalidate();
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// Errors unless the graph has inputs and outputs and every value is read or is an output.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(NvError::Config(
                "graph: it needs at least one input and one output (set_outputs)".into(),
            ));
        }
        Ok(())
    }

    /// The shapes of every value for these input shapes (the errors a forward would raise).
    pub fn value_shapes(&self, inputs: &[&[usize]]) -> Result<Vec<Vec<usize>>> {
        if inputs.len() != self.inputs.len() {
            return Err(NvError::Config(format!(
                "graph: {} inputs given, the graph has {}",
                inputs.len(),
                self.inputs.len()
            )));
        }
        let mut shapes: Vec<Option<Vec<usize>>> = vec![None; self.values.len()];
        for (v, s) in self.inputs.iter().zip(inputs) {
            shapes[v.0] = Some(s.to_vec());
        }
        for node in &self.nodes {
            let ins: Vec<&[usize]> = node
                .inputs
                .iter()
                .map(|v| shapes[v.0].as_deref().expect("topological order"))
                .collect();
            let out = op_output_shape(&node.op, &ins).map_err(|e| in_node(&node.name, e))?;
            shapes[node.output.0] = Some(out);
        }
        Ok(shapes.into_iter().map(|s| s.unwrap_or_default()).collect())
    }

    /// The graph as the plan reads it, and its engine.
    fn parts(&mut self) -> (GraphView<'_, T>, &mut Engine<T>) {
        let Graph {
            nodes,
            values,
            inputs,
            outputs,
            engine,
        } = self;
        let view = GraphView {
            nodes,
            values,
            inputs,
            outputs,
        };
        (view, engine)
    }

    /// The options every plan of this graph is made with.
    pub fn plan_options(&self) -> &PlanOptions {
        self.engine.options()
    }

    /// Sets the plan options (the cached plans are dropped).
    pub fn set_plan_options(&mut self, opts: PlanOptions) -> Result<()> {
        self.engine.set_options(opts)
    }

    /// Forward pass in `ctx`'s mode, keeping what the backward needs. Returns the outputs in
    /// [`Graph::outputs`] order.
    pub fn forward(&mut self, inputs: &[&ArrayD<T>], ctx: Ctx) -> Result<Vec<ArrayD<T>>> {
        let (view, engine) = self.parts();
        engine.forward(view, inputs, ctx, false)
    }

    /// Inference: an eval-mode forward with the inference fusions (a convolution applies the eval BatchNorm,
    /// ReLU and 2×2 max pool after it in its output pass), bitwise the eval forward's outputs for finite
    /// values. Keeps nothing for a backward.
    ///
    /// With fewer samples than threads (batch-1 serving), the whole call runs on a worker of the current rayon
    /// pool (when called from outside it), with the pool's other workers kept polling for work
    /// ([`crate::runtime::keep_workers_warm`]): each parallel kernel then starts on a running thread instead of
    /// waking a sleeping one from outside the pool, which at batch 1 costs more than a small layer's work. Larger
    /// batches run on the calling thread: their layers are long enough, and their activations, allocated on a
    /// pool worker, made glibc's per-thread heaps grow from epoch to epoch of a training run's evaluations
    /// (tests/resources.rs).
    ///
    /// A serving thread that is itself a worker of the pool (built with rayon's `use_current_thread`, as the
    /// CLI's `predict` and `bench --inference` do) runs the call in place, without that hand-off.
    pub fn infer(&mut self, inputs: &[&ArrayD<T>]) -> Result<Vec<ArrayD<T>>> {
        let small = inputs
            .first()
            .and_then(|x| x.shape().first())
            .is_some_and(|&n| n < rayon::current_num_threads());
        let mut run = || {
            let (view, engine) = self.parts();
            engine.forward(view, inputs, Ctx::eval(), true)
        };
        if !small {
            return run();
        }
        rayon::scope(|_| {
            crate::runtime::keep_workers_warm();
            run()
        })
    }

    /// Backward from dL/d(output) for every output (`dys` in [`Graph::outputs`] order), after a forward on the
    /// same `inputs` in the same mode: accumulates every parameter's gradient, and returns dL/d(input) for
    /// each input when `input_grads` (else `None`s, and the first layers skip their input gradients).
    pub fn backward(
        &mut self,
        inputs: &[&ArrayD<T>],
        dys: &[&ArrayD<T>],
        ctx: Ctx,
        input_grads: bool,
    ) -> Result<Vec<Option<ArrayD<T>>>> {
        let (view, engine) = self.parts();
        engine.backward(view, inputs, dys, ctx, input_grads)
    }

    /// Drops the activations kept for a backward.
    pub fn clear_saved(&mut self) {
        self.engine.clear_saved();
    }

    /// Starts (or restarts) timing every step of every plan.
    pub fn enable_timing(&mut self) {
        self.engine.enable_timing();
    }

    /// The time of every step of the most recently used plan since timing was enabled.
    pub fn step_times(&self) -> Vec<StepTime> {
        self.engine.step_times(&self.nodes)
    }

    /// A description of the plan for these input shapes in `ctx`'s mode (`inference` for [`Graph::infer`]'s):
    /// one line per step, with its nodes, fusions and algorithm.
    pub fn describe_plan(
        &mut self,
        inputs: &[&[usize]],
        ctx: Ctx,
        inference: bool,
    ) -> Result<String> {
        let (view, engine) = self.parts();
        engine.describe(view, inputs, ctx, inference)
    }

    /// The bytes of activations the forward in `ctx`'s mode keeps for a backward (none for `inference`), and
    /// the peak bytes of activations alive at once during it, for these input shapes (as planned; parameters,
    /// gradients and kernel workspaces apart).
    pub fn activation_memory(
        &mut self,
        inputs: &[&[usize]],
        ctx: Ctx,
        inference: bool,
    ) -> Result<(usize, usize)> {
        let (view, engine) = self.parts();
        engine.memory(view, inputs, ctx, inference)
    }

    /// Folds every eval-mode BatchNorm (or FrozenBatchNorm) whose input is the output of a convolution (or
    /// linear layer) read by nothing else into that layer's weights and bias, and removes it: an inference-only
    /// graph that computes the same eval outputs up to f32 rounding with one pass less per pair (see
    /// [`plan::fusions::fold`] for the error bound). The state dict keeps the other nodes' names.
    /// Returns the number of folded pairs.
    pub fn fold_batch_norm(&mut self) -> Result<usize> {
        let n = plan::fusions::fold::fold(self)?;
        self.engine.invalidate();
        Ok(n)
    }

    /// The number of parameters.
    pub fn num_params(&mut self) -> usize {
        let mut n = 0;
        self.visit_params("", &mut |_, p| n += p.len());
        n
    }
}

/// The parts of a graph a plan reads and runs (the graph without its engine).
pub(crate) struct GraphView<'a, T: Real> {
    pub(crate) nodes: &'a mut [Node<T>],
    pub(crate) values: &'a [ValueInfo],
    pub(crate) inputs: &'a [ValueId],
    pub(crate) outputs: &'a [ValueId],
}

/// The output shape of `op` on inputs of `ins`.
pub(crate) fn op_output_shape<T: Real>(op: &Op<T>, ins: &[&[usize]]) -> Result<Vec<usize>> {
    match op {
        Op::Layer(l) => l.output_shape(ins[0]),
        Op::Add => {
            for s in &ins[1..] {
                if *s != ins[0] {
                    return Err(NvError::Shape {
                        layer: "Add",
                        msg: format!("inputs of shapes {:?} and {s:?}", ins[0]),
                    });
                }
            }
            Ok(ins[0].to_vec())
        }
        Op::Concat { axis } => {
            let a = *axis;
            let first = ins[0];
            if a >= first.len() {
                return Err(NvError::Shape {
                    layer: "Concat",
                    msg: format!("axis {a} of a rank-{} input", first.len()),
                });
            }
            let mut out = first.to_vec();
            for s in &ins[1..] {
                let same_rest = s.len() == first.len()
                    && s.iter()
                        .zip(first)
                        .enumerate()
                        .all(|(i, (p, q))| i == a || p == q);
                if !same_rest {
                    return Err(NvError::Shape {
                        layer: "Concat",
                        msg: format!("inputs of shapes {first:?} and {s:?} differ outside dim {a}"),
                    });
                }
                out[a] += s[a];
            }
            Ok(out)
        }
        Op::ResizeAs { align_corners } => {
            resize_as_layer::<T>(ins[1], *align_corners)?.output_shape(ins[0])
        }
    }
}

/// How plans and errors name an [`Op::ResizeAs`].
pub(crate) fn resize_as_name(align_corners: bool) -> String {
    format!(
        "Interpolate(size=like, mode='bilinear', align_corners={})",
        if align_corners { "True" } else { "False" }
    )
}

/// The bilinear resampling an [`Op::ResizeAs`] applies to an input for a `like` value of shape `like`.
pub(crate) fn resize_as_layer<T: Real>(
    like: &[usize],
    align_corners: bool,
) -> Result<crate::nn::UpsampleBilinear<T>> {
    if like.len() < 3 {
        return Err(NvError::Shape {
            layer: "ResizeAs",
            msg: format!("the size comes from the last two dims of a value of shape {like:?}"),
        });
    }
    let (h, w) = (like[like.len() - 2], like[like.len() - 1]);
    crate::nn::UpsampleBilinear::new(crate::nn::UpsampleSize::Size(h, w), align_corners)
}

/// An error annotated with the node it came from.
pub(crate) fn in_node(name: &str, e: NvError) -> NvError {
    match e {
        NvError::Shape { layer, msg } => NvError::Shape {
            layer,
            msg: format!("{msg} (in node {name})"),
        },
        other => other,
    }
}

impl<T: Real> Stateful<T> for Graph<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        for n in &self.nodes {
            if let Op::Layer(l) = &n.op {
                l.save_state(&join(prefix, &n.name), sd);
            }
        }
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        for n in self.nodes.iter_mut() {
            if let Op::Layer(l) = &mut n.op {
                l.load_state(&join(prefix, &n.name), sd)?;
            }
        }
        self.engine.clear_saved();
        Ok(())
    }
    /// Zeroes every trainable gradient, in pieces over the threads: one thread filling DeepLab's 4 MB of
    /// gradients took 0.6-0.7 ms of a 30 ms step.
    fn zero_grad(&mut self) {
        let mut pieces = Vec::new();
        self.visit_params("", &mut |_, p| {
            let g = p.grads_mut();
            for (off, len) in crate::kernels::elementwise::pieces(g.len()) {
                pieces.push((SyncPtr(g.as_mut_ptr()), off, len));
            }
        });
        pieces.into_par_iter().for_each(|(ptr, off, len)| {
            // SAFETY: the pieces are disjoint ranges of distinct parameters' gradients, which `&mut self`
            // borrows for the whole call.
            unsafe { ptr.slice(off, len) }.fill(T::zero());
        });
    }
    /// The trainable parameters: those of frozen nodes are left out (as PyTorch optimizers skip
    /// `requires_grad = False` tensors).
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        for n in self.nodes.iter_mut().filter(|n| !n.frozen) {
            if let Op::Layer(l) = &mut n.op {
                l.visit_params(&join(prefix, &n.name), f);
            }
        }
    }
}
