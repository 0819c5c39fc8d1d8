//! Inference: convolution (+ affine) + ReLU → 2×2, stride-2 max pool: when the convolution's algorithm can
//! (Winograd F(2×2): one output tile is one pool window), its output pass pools, and the unpooled activation
//! is never written. After [`super::conv_affine`] and [`super::conv_relu`], so it takes a convolution whose
//! ReLU came from either: one that absorbed an eval BatchNorm, and one whose BatchNorm was folded into it.

use super::super::builder::Builder;
use super::super::step::StepKind;
use crate::nn::MaxPool2d;
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    for i in b.live() {
        if b.steps[i].is_none() {
            continue;
        }
        let StepKind::Conv(conv) = &b.step(i).kind else {
            continue;
        };
        if !conv.relu || conv.pool || !conv.algo.fuses_affine_relu_pool() {
            continue;
        }
        let out = b.step(i).output;
        let shape = &b.shapes[out.0];
        let even = shape.len() == 4 && shape[2].is_multiple_of(2) && shape[3].is_multiple_of(2);
        if !even {
            continue;
        }
        let Some(p) = b.sole_reader(out) else {
            continue;
        };
        if b.layer_step::<MaxPool2d<T>>(p).is_some_and(|m| m.is_2x2()) {
            if let StepKind::Conv(c) = &mut b.step_mut(i).kind {
                c.pool = true;
            }
            b.absorb(i, p);
        }
    }
}
