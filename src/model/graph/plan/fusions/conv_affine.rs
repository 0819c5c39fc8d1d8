//! Inference: convolution → eval BatchNorm or FrozenBatchNorm (+ ReLU): the convolution's output pass applies
//! the norm's per-channel affine y·a + b, b = bias − running_mean·a (PyTorch's formula) and the ReLU (a 2×2
//! max pool after it is [`super::conv_pool`]'s). The
//! separate layers compute (y − running_mean)·a + bias, exact at any |mean|/std; the two agree to f32
//! rounding of y·a, which matters only where |mean| ≫ std (the bound of [`super::fold`]).

use super::super::builder::Builder;
use super::super::step::StepKind;
use crate::norm::{BatchNorm, FrozenBatchNorm};
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    for i in b.live() {
        if b.steps[i].is_none() {
            continue;
        }
        let StepKind::Conv(conv) = &b.step(i).kind else {
            continue;
        };
        if !conv.algo.fuses_affine() || conv.affine.is_some() || conv.relu {
            continue;
        }
        let Some(r) = b.sole_reader(b.step(i).output) else {
            continue;
        };
        let (norm, relu) = match &b.step(r).kind {
            StepKind::BatchNorm(bn) if !bn.pool => {
                let layer = b.nodes[bn.node]
                    .layer_as::<BatchNorm<T>>()
                    .expect("a BatchNorm step's node");
                if layer.eval_affine().is_none() {
                    continue;
                }
                (bn.node, bn.relu)
            }
            StepKind::Frozen { node, relu } => {
                debug_assert!(b.nodes[*node].layer_as::<FrozenBatchNorm<T>>().is_some());
                (*node, *relu)
            }
            _ => continue,
        };
        if let StepKind::Conv(c) = &mut b.step_mut(i).kind {
            c.affine = Some(norm);
            c.relu = relu;
        }
        b.absorb(i, r);
    }
}
