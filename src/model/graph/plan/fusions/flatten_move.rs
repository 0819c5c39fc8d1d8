//! A flatten whose input is read by nothing else and kept for no backward takes over its input's buffer
//! instead of copying it (its backward reshapes dy back, moving it when it is not shared).

use super::super::builder::Builder;
use super::super::step::StepKind;
use super::super::PlanKind;
use crate::Real;

pub(crate) fn apply<T: Real>(b: &mut Builder<T>) {
    for i in b.live() {
        let StepKind::Reshape { .. } = b.step(i).kind else {
            continue;
        };
        let input = b.step(i).inputs[0];
        if b.inputs.contains(&input) || b.sole_reader(input) != Some(i) {
            continue;
        }
        // the step that writes the input must not read its own output in its backward
        let kept_by_producer = b.kind != PlanKind::Inference
            && b.live()
                .into_iter()
                .any(|p| b.step(p).output == input && b.step(p).backward_reads_output());
        if kept_by_producer {
            continue;
        }
        if let StepKind::Reshape { moved, .. } = &mut b.step_mut(i).kind {
            *moved = true;
        }
    }
}
