//! Inference: convolution → ReLU (a convolution without a norm after it, or one that absorbed its BatchNorm by
//! folding): the convolution's output pass applies the ReLU.

use super::super::builder::Builder;
use super::super::step::StepKind;
use crate::nn::ReLU;
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    for i in b.live() {
        if b.steps[i].is_none() {
            continue;
        }
        let StepKind::Conv(conv) = &b.step(i).kind else {
            continue;
        };
        if conv.relu || conv.pool {
            continue;
        }
        let Some(r) = b.sole_reader(b.step(i).output) else {
            continue;
        };
        if b.layer_step::<ReLU<T>>(r).is_none() {
            continue;
        }
        if let StepKind::Conv(c) = &mut b.step_mut(i).kind {
            c.relu = true;
        }
        b.absorb(i, r);
    }
}
