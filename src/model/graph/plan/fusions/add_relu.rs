//! Add → ReLU (a residual join): one pass writes relu(a + b); the backward masks dy by that output.

use super::super::builder::Builder;
use super::super::step::StepKind;
use crate::nn::ReLU;
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    for i in b.live() {
        if b.steps[i].is_none() || !matches!(b.step(i).kind, StepKind::Add { relu: false }) {
            continue;
        }
        let Some(r) = b.sole_reader(b.step(i).output) else {
            continue;
        };
        if b.layer_step::<ReLU<T>>(r).is_none() {
            continue;
        }
        b.step_mut(i).kind = StepKind::Add { relu: true };
        b.absorb(i, r);
    }
}
