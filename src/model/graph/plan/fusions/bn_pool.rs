//! Batch-statistics BatchNorm (+ ReLU) → 2×2, stride-2 max pool: one kernel normalizes each plane into an L1
//! buffer and pools from there, so the unpooled activation is never written; the pool's backward needs only
//! the argmax indices, which the BatchNorm keeps, and rebuilds each plane's unpooled dy in L1.

use super::super::builder::Builder;
use super::super::step::StepKind;
use crate::nn::MaxPool2d;
use crate::norm::BatchNorm;
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    for i in b.live() {
        if b.steps[i].is_none() {
            continue;
        }
        let StepKind::BatchNorm(bn) = &b.step(i).kind else {
            continue;
        };
        let layer = b.nodes[bn.node]
            .layer_as::<BatchNorm<T>>()
            .expect("a BatchNorm step's node");
        if bn.pool || !layer.can_pool2x2(b.in_shape(i), b.ctx) {
            continue;
        }
        let Some(r) = b.sole_reader(b.step(i).output) else {
            continue;
        };
        if !b.layer_step::<MaxPool2d<T>>(r).is_some_and(|p| p.is_2x2()) {
            continue;
        }
        if let StepKind::BatchNorm(bn) = &mut b.step_mut(i).kind {
            bn.pool = true;
        }
        b.absorb(i, r);
    }
}
