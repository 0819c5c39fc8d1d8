//! Add → ReLU (a residual join): one pass writes relu(a + b); the backward masks dy by that output.

use super::super::compile::Builder;
use super::super::step::StepKind;
use crate::nn::ReLU;

pub(crate) fn apply(b: &mut Builder) {
    for i in b.live() {
        if b.steps[i].is_none() || !matches!(b.step(i).kind, StepKind::Add { relu: false }) {
            continue;
        }
        let Some(r) = b.sole_reader(b.step(i).output) else {
            continue;
        };
        if b.layer_step::<ReLU<f32>>(r).is_none() {
            continue;
        }
        b.step_mut(i).kind = StepKind::Add { relu: true };
        b.absorb(i, r);
    }
}
