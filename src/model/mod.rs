//! Models as graphs ([`Graph`]), the planning pass that runs them ([`plan`]), the model zoo ([`zoo`]: cnn, mlp,
//! resnet with any `--norm`), architecture descriptions for checkpoints ([`spec`]), and the [`Model`] the
//! trainer drives: a graph with one image input and one logits output.
//!
//! ```text
//! images (N, C, H, W) ──► Model::forward(ctx) ──► logits (N, K) ──► loss ──► Model::backward ──► optimizer
//! ```

mod backbone;
pub mod deeplab;
pub mod faster_rcnn;
pub mod graph;
mod norm_choice;
mod sequential;
pub mod spec;
pub mod zoo;

pub use graph::plan;
pub use graph::plan::{PlanOptions, StepTime};
pub use graph::{Graph, Node, Op, ValueId};
pub use norm_choice::{build_norm, NormKind, NormParams};
pub use sequential::Sequential;
pub use spec::{GraphSpec, LayerSpec};
pub use zoo::{ModelConfig, ModelKind};

use crate::state::{StateDict, Stateful};
use crate::{Ctx, NvError, Param, Result};
use ndarray::ArrayD;

/// `Ok` when `v` is in `1..=max`, else a configuration error "`what`: `name` must be in 1..=max".
pub(crate) fn in_range(what: &str, name: &str, v: usize, max: usize) -> Result<()> {
    if (1..=max).contains(&v) {
        Ok(())
    } else {
        Err(NvError::Config(format!(
            "{what}: {name} must be in 1..={max}, got {v}"
        )))
    }
}

/// A classifier: a graph of one input, images (N, C, H, W), and one output, logits (N, classes), with the input
/// shape and class count it was built for, and the zoo recipe when it came from the zoo.
///
/// ```
/// use normvision::model::{Model, ModelConfig, ModelKind, NormKind};
/// use normvision::ndarray::{ArrayD, IxDyn};
/// use normvision::Ctx;
/// let mut model = Model::new(ModelConfig::fashion(ModelKind::Cnn, NormKind::Batch)).unwrap();
/// let x = ArrayD::zeros(IxDyn(&[4, 1, 28, 28]));
/// let logits = model.forward(&x, Ctx::train()).unwrap();
/// assert_eq!(logits.shape(), &[4, 10]);
/// model.backward_params(&x, &ArrayD::ones(IxDyn(&[4, 10])), Ctx::train()).unwrap();
/// ```
pub struct Model {
    graph: Graph,
    input: [usize; 3],
    classes: usize,
    recipe: Option<ModelConfig>,
}

impl Model {
    /// The zoo model `cfg` describes, with weights drawn from its seed.
    pub fn new(cfg: ModelConfig) -> Result<Self> {
        let graph = cfg.build_graph()?;
        let mut m = Model::from_graph(graph, [cfg.in_channels, cfg.height, cfg.width])?;
        m.recipe = Some(cfg);
        Ok(m)
    }

    /// A model from any graph of one input and one output, for images of `input` = (C, H, W): the output must
    /// be (N, classes).
    pub fn from_graph(graph: Graph, input: [usize; 3]) -> Result<Self> {
        graph.validate()?;
        if graph.inputs().len() != 1 || graph.outputs().len() != 1 {
            return Err(NvError::Config(format!(
                "a classifier has one input and one output, this graph has {} and {}",
                graph.inputs().len(),
                graph.outputs().len()
            )));
        }
        let shape = [2, input[0], input[1], input[2]];
        let shapes = graph.value_shapes(&[&shape])?;
        let out = &shapes[graph.outputs()[0].index()];
        if out.len() != 2 || out[0] != 2 || out[1] == 0 {
            return Err(NvError::Config(format!(
                "a classifier's output is (N, classes); this graph gives {out:?} for input {shape:?}"
            )));
        }
        Ok(Model {
            classes: out[1],
            graph,
            input,
            recipe: None,
        })
    }

    /// The same model, recorded as built from the zoo recipe `cfg`.
    pub fn with_recipe(mut self, cfg: ModelConfig) -> Self {
        self.recipe = Some(cfg);
        self
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    /// The graph, giving up the model (to edit it and build another with [`Model::from_graph`]).
    pub fn into_graph(self) -> Graph {
        self.graph
    }
    pub fn graph_mut(&mut self) -> &mut Graph {
        &mut self.graph
    }
    /// The zoo recipe, when the model came from the zoo.
    pub fn config(&self) -> Option<&ModelConfig> {
        self.recipe.as_ref()
    }
    /// (C, H, W) of an input image.
    pub fn input_shape(&self) -> [usize; 3] {
        self.input
    }
    pub fn num_classes(&self) -> usize {
        self.classes
    }

    /// Sets the plan options (conv algorithm, instruction set, fusions).
    pub fn set_plan_options(&mut self, opts: PlanOptions) -> Result<()> {
        self.graph.set_plan_options(opts)
    }

    /// Folds each eval BatchNorm after a convolution or linear layer into it ([`Graph::fold_batch_norm`]);
    /// inference only.
    pub fn fold_batch_norm(&mut self) -> Result<usize> {
        self.graph.fold_batch_norm()
    }

    /// The first node that a training batch of `n` images would leave with one value per channel (a
    /// BatchNorm, Batch Renorm, or Batch-Channel Norm's batch part, on (n, C) or (n, C, 1, 1); a Ghost BN
    /// whose virtual batches would), or that cannot take it at all (a Ghost BN whose virtual batch is larger
    /// than `n`), with its input shape; `None` when a batch of `n` trains.
    pub fn one_value_per_channel(&self, n: usize) -> Result<Option<(String, Vec<usize>)>> {
        self.one_value_per_channel_sharded(n, n)
    }

    /// [`Model::one_value_per_channel`] for one rank of data-parallel training that holds `local` of a global
    /// batch of `global` images: a BatchNorm synchronized over several ranks sees the global batch, every other
    /// layer the rank's.
    pub fn one_value_per_channel_sharded(
        &self,
        local: usize,
        global: usize,
    ) -> Result<Option<(String, Vec<usize>)>> {
        let [c, h, w] = self.input;
        let local_shapes = self.graph.value_shapes(&[&[local, c, h, w]])?;
        let global_shapes = if global == local {
            local_shapes.clone()
        } else {
            self.graph.value_shapes(&[&[global, c, h, w]])?
        };
        for node in self.graph.nodes() {
            let synced = node
                .layer_as::<crate::norm::BatchNorm<f32>>()
                .is_some_and(|b| b.sync_group().is_some_and(|g| g.size() > 1));
            let shapes = if synced {
                &global_shapes
            } else {
                &local_shapes
            };
            let shape = &shapes[node.inputs().first().map_or(0, |v| v.index())];
            if let Some(g) = node.layer_as::<crate::norm::GhostBatchNorm<f32>>() {
                if g.virtual_batches(shape).is_err() {
                    return Ok(Some((node.name().to_string(), shape.clone())));
                }
                continue;
            }
            let uses_batch_stats = node.layer_as::<crate::norm::BatchNorm<f32>>().is_some()
                || node.layer_as::<crate::norm::BatchRenorm<f32>>().is_some()
                || node
                    .layer_as::<crate::norm::BatchChannelNorm<f32>>()
                    .is_some();
            if !uses_batch_stats {
                continue;
            }
            let per_channel: usize = shape
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != 1)
                .map(|(_, d)| d)
                .product();
            if per_channel <= 1 {
                return Ok(Some((node.name().to_string(), shape.clone())));
            }
        }
        Ok(None)
    }

    /// Tells every Batch Renorm scheduled over its run ([`crate::norm::RenormSchedule::Run`]) how many steps the
    /// run has (the trainer calls it at the start of every run and resume).
    pub fn set_run_length(&mut self, total_steps: u64) {
        let names: Vec<String> = self
            .graph
            .nodes()
            .iter()
            .filter(|n| n.layer_as::<crate::norm::BatchRenorm<f32>>().is_some())
            .map(|n| n.name().to_string())
            .collect();
        for name in names {
            if let Some(r) = self
                .graph
                .node_mut(&name)
                .and_then(|n| n.layer_as_mut::<crate::norm::BatchRenorm<f32>>())
            {
                r.set_run_length(total_steps);
            }
        }
    }

    /// Checks an input batch's shape against the model's input.
    pub fn check_input(&self, x: &ArrayD<f32>) -> Result<()> {
        let want = self.input;
        if x.ndim() != 4 || x.shape()[1..] != want {
            return Err(NvError::Shape {
                layer: "Model",
                msg: format!(
                    "expected input (N, {}, {}, {}), got {:?}",
                    want[0],
                    want[1],
                    want[2],
                    x.shape()
                ),
            });
        }
        Ok(())
    }

    /// Logits (N, classes), keeping what the backward needs.
    pub fn forward(&mut self, x: &ArrayD<f32>, ctx: Ctx) -> Result<ArrayD<f32>> {
        self.check_input(x)?;
        Ok(self.graph.forward(&[x], ctx)?.remove(0))
    }

    /// Eval-mode logits for inference (evaluation, prediction), through the inference plan's fusions: bitwise
    /// those of `forward(x, Ctx::eval())` for finite values. Keeps nothing for a backward.
    pub fn forward_inference(&mut self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        self.check_input(x)?;
        Ok(self.graph.infer(&[x])?.remove(0))
    }

    /// Backpropagates dL/dlogits, accumulating parameter gradients; returns dL/dx.
    pub fn backward(
        &mut self,
        x: &ArrayD<f32>,
        dlogits: &ArrayD<f32>,
        ctx: Ctx,
    ) -> Result<ArrayD<f32>> {
        let mut g = self.graph.backward(&[x], &[dlogits], ctx, true)?;
        Ok(g.remove(0).expect("input gradient requested"))
    }

    /// [`Model::backward`] without the gradient with respect to the input images, which training does not use:
    /// the first layers skip their input gradients.
    pub fn backward_params(
        &mut self,
        x: &ArrayD<f32>,
        dlogits: &ArrayD<f32>,
        ctx: Ctx,
    ) -> Result<()> {
        self.graph
            .backward(&[x], &[dlogits], ctx, false)
            .map(|_| ())
    }

    pub fn num_params(&mut self) -> usize {
        self.graph.num_params()
    }
}

impl Stateful<f32> for Model {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.graph.save_state(prefix, sd)
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        self.graph.load_state(prefix, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<f32>)) {
        self.graph.visit_params(prefix, f)
    }
}
