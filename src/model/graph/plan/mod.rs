//! The planning pass: a graph compiles, once per (input shapes, kind of pass), into a plan of steps. The plan
//! picks each convolution's algorithm, applies the fusion patterns ([`fusions`], one per file), and plans the
//! activations by liveness. Plans are cached (a few, least recently used dropped first: a segmentation model
//! sees images of many sizes).
//!
//! ```text
//! Graph ──compile(shapes, kind, PlanOptions)──► Plan: steps (node | fused nodes) + algorithms + liveness
//!                                                  │
//!   forward: steps in order, values freed after their last reader unless the backward keeps them
//!   backward: steps in reverse, gradients accumulated where a value feeds several steps
//! ```
//!
//! The kinds of pass: training (batch statistics, activations kept), eval (running statistics, activations kept
//! so a backward can follow) and inference (eval, with the inference fusions, nothing kept, every activation
//! handed back to the buffer pool as soon as its last reader has run).

mod builder;
pub(crate) mod compile;
pub(crate) mod exec;
pub mod fusions;
pub(crate) mod step;

use crate::kernels::arena;
use crate::model::graph::{GraphView, Node, ValueId};
use crate::nn::ConvChoice;
use crate::{Ctx, KernelOptions, Mode, NvError, Real, Result};
use compile::Plan;
use exec::{accumulate, Grad, Values};
use ndarray::ArrayD;
use std::sync::Arc;
use std::time::Instant;

/// The options of every plan of a model: what used to be global switches.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// The 3×3 convolution algorithm (the CLI's `--conv`).
    pub conv: ConvChoice,
    /// Instruction set and streaming-store threshold (the CLI's `--isa`).
    pub kernels: KernelOptions,
    /// Apply the fusion patterns. `false` runs every node as its own step (what the fusions buy, and a
    /// reference for tests).
    pub fuse: bool,
    /// Plans kept in the cache.
    pub cache: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            conv: ConvChoice::default(),
            kernels: KernelOptions::default(),
            fuse: true,
            cache: 8,
        }
    }
}

impl PlanOptions {
    pub fn conv(mut self, c: ConvChoice) -> Self {
        self.conv = c;
        self
    }
    pub fn isa(mut self, isa: crate::Isa) -> Self {
        self.kernels.isa = isa;
        self
    }
    pub fn stream_bytes(mut self, bytes: usize) -> Self {
        self.kernels.stream_bytes = bytes;
        self
    }
    pub fn fuse(mut self, f: bool) -> Self {
        self.fuse = f;
        self
    }
    /// Errors on an instruction set this CPU lacks or an empty cache.
    pub fn validate(&self) -> Result<()> {
        self.kernels.isa.checked()?;
        if self.cache == 0 {
            return Err(NvError::Config("plan cache size must be > 0".into()));
        }
        Ok(())
    }
}

/// The kind of pass a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlanKind {
    Train,
    Eval,
    Inference,
}

impl PlanKind {
    fn of(mode: Mode, inference: bool) -> PlanKind {
        match (mode, inference) {
            (_, true) => PlanKind::Inference,
            (Mode::Train, false) => PlanKind::Train,
            (Mode::Eval, false) => PlanKind::Eval,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PlanKey {
    shapes: Vec<Vec<usize>>,
    kind: PlanKind,
}

/// The activations a forward kept for the backward.
struct Saved<T> {
    key: PlanKey,
    vals: Vec<Option<ArrayD<T>>>,
}

/// One step's time: the nodes it runs, what it does, forward and backward seconds.
#[derive(Debug, Clone)]
pub struct StepTime {
    pub nodes: String,
    pub what: String,
    pub forward_s: f64,
    pub backward_s: f64,
}

/// A graph's plans and the state between a forward and its backward.
pub(crate) struct Engine<T> {
    opts: PlanOptions,
    plans: Vec<(PlanKey, Plan)>,
    saved: Option<Saved<T>>,
    timing: bool,
    last: Option<PlanKey>,
}

impl<T> Default for Engine<T> {
    fn default() -> Self {
        Engine {
            opts: PlanOptions::default(),
            plans: vec![],
            saved: None,
            timing: false,
            last: None,
        }
    }
}

impl<T: Real> Engine<T> {
    pub fn options(&self) -> &PlanOptions {
        &self.opts
    }

    pub fn set_options(&mut self, opts: PlanOptions) -> Result<()> {
        opts.validate()?;
        self.opts = opts;
        self.invalidate();
        Ok(())
    }

    /// Drops every plan and the saved activations (the graph or the options changed).
    pub fn invalidate(&mut self) {
        self.plans.clear();
        self.saved = None;
        self.last = None;
    }

    pub fn clear_saved(&mut self) {
        self.saved = None;
    }

    pub fn enable_timing(&mut self) {
        self.timing = true;
        for (_, p) in &mut self.plans {
            p.times.iter_mut().for_each(|t| *t = [0.0; 2]);
        }
    }

    /// The plan for `key`, compiled (and cached) if needed; its index in the cache.
    fn plan(&mut self, g: &mut GraphView<T>, key: &PlanKey, ctx: Ctx) -> Result<usize> {
        if let Some(i) = self.plans.iter().position(|(k, _)| k == key) {
            // most recently used last
            let entry = self.plans.remove(i);
            self.plans.push(entry);
            return Ok(self.plans.len() - 1);
        }
        let plan = compile::compile(
            g.nodes,
            g.values.len(),
            g.inputs,
            g.outputs,
            &key.shapes,
            key.kind,
            ctx,
            &self.opts,
        )?;
        if self.plans.len() >= self.opts.cache {
            self.plans.remove(0);
        }
        self.plans.push((key.clone(), plan));
        Ok(self.plans.len() - 1)
    }

    fn key(g: &GraphView<T>, inputs: &[&[usize]], kind: PlanKind) -> Result<PlanKey> {
        if g.inputs.is_empty() || g.outputs.is_empty() {
            return Err(NvError::Config(
                "graph: it needs at least one input and one output (set_outputs)".into(),
            ));
        }
        if inputs.len() != g.inputs.len() {
            return Err(NvError::Config(format!(
                "graph: {} inputs given, the graph has {}",
                inputs.len(),
                g.inputs.len()
            )));
        }
        Ok(PlanKey {
            shapes: inputs.iter().map(|s| s.to_vec()).collect(),
            kind,
        })
    }

    /// The context the layers run under: the caller's mode and step, the plan's kernel options.
    fn layer_ctx(&self, ctx: Ctx) -> Ctx {
        ctx.with_kernels(self.opts.kernels)
    }

    pub fn forward(
        &mut self,
        mut g: GraphView<T>,
        inputs: &[&ArrayD<T>],
        ctx: Ctx,
        inference: bool,
    ) -> Result<Vec<ArrayD<T>>> {
        let kind = PlanKind::of(ctx.mode(), inference);
        let shapes: Vec<&[usize]> = inputs.iter().map(|x| x.shape()).collect();
        let key = Self::key(&g, &shapes, kind)?;
        let ctx = self.layer_ctx(ctx);
        // The last forward's activations: in eval they go back to the buffer pool for this batch's layers to
        // reuse. Training does not recycle: buffers kept across a training step took write-protect faults
        // (see docs/PERFORMANCE.md, "Tuning constants").
        if let Some(old) = self.saved.take() {
            if old.key.kind != PlanKind::Train {
                old.vals.into_iter().flatten().for_each(arena::recycle);
            }
        }
        let p = self.plan(&mut g, &key, ctx)?;
        let timing = self.timing;
        let plan = &mut self.plans[p].1;
        let recycle = kind != PlanKind::Train;
        let mut v = Values::new(vec![None; g.values.len()], inputs, g.inputs);
        for i in 0..plan.steps.len() {
            let start = timing.then(Instant::now);
            exec::forward_step(plan, i, g.nodes, &mut v, ctx)?;
            for &dead in &plan.free_after[i] {
                if let Some(a) = v.vals[dead.0].take() {
                    if recycle {
                        arena::recycle(a);
                    }
                }
            }
            if let Some(s) = start {
                plan.times[i][0] += s.elapsed().as_secs_f64();
            }
        }
        // The outputs: moved out unless the backward keeps them (or one value is returned twice).
        let mut outs = Vec::with_capacity(g.outputs.len());
        for (k, &o) in g.outputs.iter().enumerate() {
            let again = g.outputs[k + 1..].contains(&o);
            let y = if plan.keep[o.0] || again || g.inputs.contains(&o) {
                v.get(o)?.clone()
            } else {
                v.vals[o.0].take().expect("an output is computed")
            };
            outs.push(y);
        }
        self.last = Some(key.clone());
        if exec::keeps_activations(kind) {
            self.saved = Some(Saved { key, vals: v.vals });
        } else {
            v.vals.into_iter().flatten().for_each(arena::recycle);
        }
        Ok(outs)
    }

    pub fn backward(
        &mut self,
        g: GraphView<T>,
        inputs: &[&ArrayD<T>],
        dys: &[&ArrayD<T>],
        ctx: Ctx,
        input_grads: bool,
    ) -> Result<Vec<Option<ArrayD<T>>>> {
        let kind = PlanKind::of(ctx.mode(), false);
        let shapes: Vec<&[usize]> = inputs.iter().map(|x| x.shape()).collect();
        let key = Self::key(&g, &shapes, kind)?;
        let no_state = || NvError::NoSavedState {
            layer: "Graph",
            mode: ctx.mode(),
        };
        let saved = match self.saved.take() {
            Some(s) if s.key == key => s,
            other => {
                self.saved = other;
                return Err(no_state());
            }
        };
        let ctx = self.layer_ctx(ctx);
        let p = self
            .plans
            .iter()
            .position(|(k, _)| *k == key)
            .ok_or_else(no_state)?;
        if dys.len() != g.outputs.len() {
            return Err(NvError::Config(format!(
                "graph: {} output gradients given, the graph has {} outputs",
                dys.len(),
                g.outputs.len()
            )));
        }
        let timing = self.timing;
        let plan = &mut self.plans[p].1;
        for (&o, dy) in g.outputs.iter().zip(dys) {
            if dy.shape() != plan.shapes[o.0].as_slice() {
                return Err(NvError::Shape {
                    layer: "Graph",
                    msg: format!(
                        "the gradient of output {} has shape {:?}, the output {:?}",
                        g.values[o.0].name,
                        dy.shape(),
                        plan.shapes[o.0]
                    ),
                });
            }
        }
        // which values need a gradient: the inputs when asked, and everything downstream of a parameter
        let n = g.values.len();
        let mut requires = vec![false; n];
        for &i in g.inputs {
            requires[i.0] = input_grads;
        }
        for s in &plan.steps {
            requires[s.output.0] = s.has_params || s.inputs.iter().any(|v| requires[v.0]);
        }
        let mut grads: Vec<Option<Grad<T>>> = vec![None; n];
        for (&o, dy) in g.outputs.iter().zip(dys) {
            accumulate(&mut grads[o.0], Arc::new((*dy).clone()));
        }
        let mut v = Values::new(saved.vals, inputs, g.inputs);
        for i in (0..plan.steps.len()).rev() {
            let step = &plan.steps[i];
            let Some(dy) = grads[step.output.0].take() else {
                continue; // no loss depends on this step
            };
            if !requires[step.output.0] {
                continue;
            }
            let needs: Vec<bool> = step.inputs.iter().map(|u| requires[u.0]).collect();
            let deferred = match &step.kind {
                step::StepKind::BatchNorm(b) => b
                    .defer_to
                    .is_some_and(|c| !requires[plan.steps[c].inputs[0].0]),
                _ => false,
            };
            let start = timing.then(Instant::now);
            let gin = exec::backward_step(plan, i, g.nodes, &v, dy, &needs, deferred, ctx)?;
            for (&u, gi) in step.inputs.iter().zip(gin) {
                if let Some(gi) = gi {
                    accumulate(&mut grads[u.0], gi);
                }
            }
            if let Some(s) = start {
                plan.times[i][1] += s.elapsed().as_secs_f64();
            }
            v.drop_values(&plan.bwd_free_after[i]);
        }
        // as in PyTorch (without retain_graph), the backward consumed the forward's activations: a second
        // backward needs a second forward
        Ok(g.inputs
            .iter()
            .map(|i| {
                if input_grads {
                    grads[i.0].take().map(Arc::unwrap_or_clone)
                } else {
                    None
                }
            })
            .collect())
    }

    pub fn step_times(&self, nodes: &[Node<T>]) -> Vec<StepTime> {
        let Some(key) = &self.last else {
            return vec![];
        };
        let Some((_, plan)) = self.plans.iter().find(|(k, _)| k == key) else {
            return vec![];
        };
        plan.steps
            .iter()
            .zip(&plan.times)
            .map(|(s, t)| {
                let (names, what) = s.describe(nodes);
                StepTime {
                    nodes: names,
                    what,
                    forward_s: t[0],
                    backward_s: t[1],
                }
            })
            .collect()
    }

    pub fn describe(
        &mut self,
        mut g: GraphView<T>,
        inputs: &[&[usize]],
        ctx: Ctx,
        inference: bool,
    ) -> Result<String> {
        let key = Self::key(&g, inputs, PlanKind::of(ctx.mode(), inference))?;
        let ctx = self.layer_ctx(ctx);
        let p = self.plan(&mut g, &key, ctx)?;
        let plan = &self.plans[p].1;
        let mut out = String::new();
        for s in &plan.steps {
            let (names, what) = s.describe(g.nodes);
            let shape = &plan.shapes[s.output.0];
            out += &format!("{names:<28} {what}  -> {shape:?}\n");
        }
        Ok(out)
    }

    pub fn memory(
        &mut self,
        mut g: GraphView<T>,
        inputs: &[&[usize]],
        ctx: Ctx,
        inference: bool,
    ) -> Result<(usize, usize)> {
        let key = Self::key(&g, inputs, PlanKind::of(ctx.mode(), inference))?;
        let ctx = self.layer_ctx(ctx);
        let p = self.plan(&mut g, &key, ctx)?;
        let plan = &self.plans[p].1;
        let bytes =
            |v: ValueId| plan.shapes[v.0].iter().product::<usize>() * std::mem::size_of::<T>();
        let kept: usize = (0..plan.keep.len())
            .filter(|&v| plan.keep[v] && !g.inputs.contains(&ValueId(v)))
            .map(|v| bytes(ValueId(v)))
            .sum();
        let (mut alive, mut peak) = (0usize, 0usize);
        for (i, s) in plan.steps.iter().enumerate() {
            alive += bytes(s.output);
            peak = peak.max(alive);
            for &d in &plan.free_after[i] {
                alive -= bytes(d);
            }
        }
        Ok((kept, peak))
    }
}
