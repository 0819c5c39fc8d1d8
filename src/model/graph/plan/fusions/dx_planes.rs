//! First convolution ← BatchNorm (backward): when the convolution's input needs no gradient (the images), it
//! needs dy only for its weight gradient, so the BatchNorm after it hands dx over plane by plane instead of
//! writing it: the single-channel convolution consumes each image's planes from a buffer in cache, and other
//! algorithms take the planes gathered into one array. Bitwise the separate backwards.

use super::super::builder::Builder;
use super::super::step::StepKind;
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    for i in b.live() {
        let StepKind::Conv(conv) = &b.step(i).kind else {
            continue;
        };
        let input = b.step(i).inputs[0];
        if conv.affine.is_some() || conv.relu || !b.inputs.contains(&input) {
            continue;
        }
        let Some(r) = b.sole_reader(b.step(i).output) else {
            continue;
        };
        let StepKind::BatchNorm(bn) = &b.step(r).kind else {
            continue;
        };
        let spatial: usize = b.in_shape(r)[2..].iter().product();
        let synced = b.nodes[bn.node]
            .layer_as::<crate::norm::BatchNorm<T>>()
            .is_some_and(|l| l.sync_group().is_some_and(|g| g.size() > 1));
        if bn.pool || synced || b.in_shape(r).len() < 3 || spatial < 2 {
            continue;
        }
        if let StepKind::BatchNorm(bn) = &mut b.step_mut(r).kind {
            bn.defer_to = Some(i);
        }
    }
}
