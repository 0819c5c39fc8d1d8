//! BatchNorm (or FrozenBatchNorm) → ReLU: the norm's kernels apply the ReLU in the pass that writes its output,
//! and its backward masks dy by recomputing that output (bitwise the forward's).

use super::super::builder::Builder;
use super::super::step::StepKind;
use crate::nn::ReLU;
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    for i in b.live() {
        if b.steps[i].is_none()
            || !matches!(
                b.step(i).kind,
                StepKind::BatchNorm(_) | StepKind::Frozen { .. }
            )
        {
            continue;
        }
        let Some(r) = b.sole_reader(b.step(i).output) else {
            continue;
        };
        if b.layer_step::<ReLU<T>>(r).is_none() {
            continue;
        }
        match &mut b.step_mut(i).kind {
            StepKind::BatchNorm(bn) => bn.relu = true,
            StepKind::Frozen { relu, .. } => *relu = true,
            _ => unreachable!("matched above"),
        }
        b.absorb(i, r);
    }
}
