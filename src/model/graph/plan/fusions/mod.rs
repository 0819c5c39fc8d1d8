//! The fusion patterns, one per file. A pattern finds steps that it can run as one and marks the step that
//! stays (a flag of its kind) and removes the others; every fused step computes bitwise what the separate steps
//! would (finite values; a fused ReLU maps NaN to 0, as `max(·, 0)` does). The patterns run in this order:
//!
//! | pattern | plans | what it fuses |
//! |---|---|---|
//! | [`bn_relu`] | all | a ReLU into the BatchNorm (or FrozenBatchNorm) before it |
//! | [`add_relu`] | all | a ReLU into the addition before it (the residual join) |
//! | [`conv_moments`] | train, eval | the BatchNorm's statistics into the convolution that writes its input (plane moments) |
//! | [`bn_pool`] | train, eval | a 2×2 max pool into the batch-statistics BatchNorm before it |
//! | [`dx_planes`] | train | the BatchNorm's dx into the weight gradient of a first convolution, plane by plane |
//! | [`conv_affine`] | inference | an eval BatchNorm (+ ReLU) into the convolution's output pass |
//! | [`conv_relu`] | inference | a ReLU into the convolution's output pass |
//! | [`conv_pool`] | inference | a 2×2 max pool into the output pass of a convolution with a ReLU |
//! | [`channel_last`] | inference | Winograd F(2×2) on channel-last tiles, activations channel-last between two such convolutions |
//! | [`flatten_move`] | all | a flatten moves its input's buffer instead of copying it |
//!
//! [`fold`] is not a plan pattern but a rewrite of the graph that changes its weights (`Graph::fold_batch_norm`).

pub mod add_relu;
pub mod bn_pool;
pub mod bn_relu;
pub mod channel_last;
pub mod conv_affine;
pub mod conv_moments;
pub mod conv_pool;
pub mod conv_relu;
pub mod dx_planes;
pub mod flatten_move;
pub mod fold;

use super::builder::Builder;
use super::PlanKind;

/// Applies every pattern that applies to the builder's kind of plan, in the order of the module docs.
pub(crate) fn apply_all<T: crate::Real>(b: &mut Builder<T>) {
    bn_relu::apply(b);
    add_relu::apply(b);
    match b.kind {
        PlanKind::Train | PlanKind::Eval => {
            conv_moments::apply(b);
            bn_pool::apply(b);
            if b.kind == PlanKind::Train {
                dx_planes::apply(b);
            }
        }
        PlanKind::Inference => {
            conv_affine::apply(b);
            conv_relu::apply(b);
            conv_pool::apply(b);
            channel_last::apply(b);
        }
    }
    flatten_move::apply(b);
}
