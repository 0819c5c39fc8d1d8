//! The plan under construction, as the fusion patterns see it: the steps (a fused-away step is `None`), every
//! value's shape, and the queries and rewrites the patterns share.

use super::step::{Step, StepKind};
use super::PlanKind;
use crate::model::graph::{Node, ValueId};
use crate::{Ctx, Real};

/// The plan under construction, as the fusion patterns see it.
pub(crate) struct Builder<'a, T: Real> {
    pub nodes: &'a [Node<T>],
    pub steps: Vec<Option<Step>>,
    pub shapes: Vec<Vec<usize>>,
    pub kind: PlanKind,
    pub ctx: Ctx,
    pub inputs: &'a [ValueId],
    pub outputs: &'a [ValueId],
}

impl<T: Real> Builder<'_, T> {
    /// The live steps reading `v`.
    pub fn readers(&self, v: ValueId) -> Vec<usize> {
        self.steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.inputs.contains(&v)))
            .map(|(i, _)| i)
            .collect()
    }

    /// The one step reading `v`, when exactly one does and `v` is not a graph output.
    pub fn sole_reader(&self, v: ValueId) -> Option<usize> {
        if self.outputs.contains(&v) {
            return None;
        }
        match self.readers(v).as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    pub fn step(&self, i: usize) -> &Step {
        self.steps[i].as_ref().expect("live step")
    }

    pub fn step_mut(&mut self, i: usize) -> &mut Step {
        self.steps[i].as_mut().expect("live step")
    }

    /// The live step indices, in order.
    pub fn live(&self) -> Vec<usize> {
        (0..self.steps.len())
            .filter(|&i| self.steps[i].is_some())
            .collect()
    }

    /// Step `into` takes over step `from` (which reads only `into`'s output): `into` now writes `from`'s output
    /// and runs its nodes, and `from` is gone.
    pub fn absorb(&mut self, into: usize, from: usize) {
        let gone = self.steps[from].take().expect("live step");
        let s = self.step_mut(into);
        s.output = gone.output;
        s.nodes.extend(gone.nodes);
        s.has_params |= gone.has_params;
    }

    /// The node of a `Layer` step whose layer is an `L`.
    pub fn layer_step<L: 'static>(&self, i: usize) -> Option<&L> {
        match &self.step(i).kind {
            StepKind::Layer { node } => self.nodes[*node].layer_as::<L>(),
            _ => None,
        }
    }

    /// The input shape of step `i`'s first input.
    pub fn in_shape(&self, i: usize) -> &[usize] {
        &self.shapes[self.step(i).inputs[0].0]
    }
}
