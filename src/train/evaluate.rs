//! Evaluation: accuracy and mean loss of a model in eval mode over a loader, and the training loop's checked
//! form, which reports a diverged model (non-finite parameters or outputs) instead of failing. In data-parallel
//! training each rank evaluates its slice of the test set and the sums are all-reduced.

use super::distributed::{self, Distributed};
use crate::data::DataLoader;
use crate::model::Model;
use crate::nn::loss::{count_correct, cross_entropy};
use crate::state::Stateful;
use crate::{NvError, Result};

/// Accuracy and mean loss of `model` in eval mode over a loader.
pub fn evaluate(model: &mut Model, loader: &DataLoader) -> Result<(f64, f64)> {
    evaluate_with(model, loader, &mut |m, x| m.forward_inference(x))
}

/// Computes a batch's logits for [`evaluate_with`].
pub type LogitsFn<'a> =
    dyn FnMut(&mut Model, &ndarray::ArrayD<f32>) -> Result<ndarray::ArrayD<f32>> + 'a;

/// [`evaluate`] with the logits of each batch computed by `logits` (e.g. with online BN adaptation:
/// [`crate::train::adapt::infer_adapted`]).
pub fn evaluate_with(
    model: &mut Model,
    loader: &DataLoader,
    logits: &mut LogitsFn<'_>,
) -> Result<(f64, f64)> {
    let (correct, loss_sum, n) = sums(model, loader, logits)?;
    if n == 0 {
        return Err(NvError::Config("evaluation set is empty".into()));
    }
    Ok((correct as f64 / n as f64, loss_sum / n as f64))
}

/// (correct, loss sum, samples) over a loader; an empty loader gives zeros.
fn sums(
    model: &mut Model,
    loader: &DataLoader,
    logits: &mut LogitsFn<'_>,
) -> Result<(usize, f64, usize)> {
    let (mut correct, mut n, mut loss_sum) = (0usize, 0usize, 0.0f64);
    let mut batches = loader.epoch(0);
    for (x, y) in &mut batches {
        let logits = logits(model, &x.into_dyn())?;
        let (loss, _) = cross_entropy(&logits, &y, 0.0)?;
        correct += count_correct(&logits, &y)?;
        loss_sum += loss * y.len() as f64;
        n += y.len();
    }
    batches.error()?;
    model.graph_mut().clear_saved();
    // the eval batches' recycled activations are not reused by training batches of another shape
    crate::kernels::arena::clear();
    Ok((correct, loss_sum, n))
}

/// The name of the first parameter holding a NaN or an infinity, if any.
pub(super) fn non_finite_param(model: &mut Model) -> Option<String> {
    let mut bad = None;
    model.visit_params("", &mut |name, p| {
        if bad.is_none() && p.value.iter().any(|v| !v.is_finite()) {
            bad = Some(name.to_string());
        }
    });
    bad
}

/// [`evaluate`] during training: non-finite parameters or outputs (a diverged model) are `Ok(Err(reason))`,
/// so the run reports a divergence instead of failing. With a group, `loader` holds this rank's slice of the
/// test set: the replicas are checked equal, take rank 0's buffers, and the sums are all-reduced, so every rank
/// returns the same.
pub(super) fn evaluate_checked(
    model: &mut Model,
    loader: &DataLoader,
    step: u64,
    dist: Option<&Distributed>,
) -> Result<std::result::Result<(f64, f64), String>> {
    if let Some(d) = dist {
        distributed::check_replicas(d.comm.as_ref(), model)?;
        distributed::broadcast_state(d.comm.as_ref(), model, None)?;
    }
    if let Some(p) = non_finite_param(model) {
        return Ok(Err(format!(
            "non-finite values in parameter {p} after step {step}"
        )));
    }
    let (mut v, mut why) = match sums(model, loader, &mut |m, x| m.forward_inference(x)) {
        Ok((c, l, n)) => ([c as f64, l, n as f64, 0.0], None),
        Err(NvError::NonFinite(msg)) => ([0.0, 0.0, 0.0, 1.0], Some(msg)),
        Err(e) => return Err(e),
    };
    distributed::sum_over(dist, &mut v)?;
    if v[3] > 0.0 {
        let msg = why.take().unwrap_or_else(|| "on another rank".into());
        return Ok(Err(format!(
            "non-finite values when evaluating after step {step} ({msg})"
        )));
    }
    if v[2] == 0.0 {
        return Err(NvError::Config("evaluation set is empty".into()));
    }
    Ok(Ok((v[0] / v[2], v[1] / v[2])))
}
