//! Convolution → batch-statistics BatchNorm: the convolution reduces each output plane to (mean, M2) while the
//! plane is in cache, and the BatchNorm merges those (Chan et al., exact) instead of reading its input for
//! statistics, so its only pass over the input is the normalizing one. The convolution's output is bitwise its
//! plain forward's; the statistics agree with the BatchNorm's own to rounding.

use super::super::builder::Builder;
use super::super::step::StepKind;
use crate::norm::BatchNorm;
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    let mode = b.ctx.mode();
    for i in b.live() {
        let StepKind::Conv(conv) = &b.step(i).kind else {
            continue;
        };
        let out = b.step(i).output;
        if !conv.algo.emits_moments()
            || conv.affine.is_some()
            || conv.relu
            || b.shapes[out.0][0] == 0
        {
            continue;
        }
        // any BatchNorm reading the output may take them; the plan gives them to the first
        let Some(r) = b
            .readers(out)
            .into_iter()
            .find(|&r| matches!(b.step(r).kind, StepKind::BatchNorm(_)))
        else {
            continue;
        };
        let StepKind::BatchNorm(bn) = &b.step(r).kind else {
            unreachable!("found above")
        };
        let layer = b.nodes[bn.node]
            .layer_as::<BatchNorm<T>>()
            .expect("a BatchNorm step's node");
        if !layer.takes_plane_moments(&b.shapes[out.0], mode) {
            continue;
        }
        if let StepKind::Conv(c) = &mut b.step_mut(i).kind {
            c.moments = true;
        }
        if let StepKind::BatchNorm(bn) = &mut b.step_mut(r).kind {
            bn.moments = true;
        }
    }
}
