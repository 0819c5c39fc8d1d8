//! Losses: softmax cross-entropy on logits (`nn.CrossEntropyLoss`, here with argmax and accuracy), mean
//! squared error ([`mse`], `nn.MSELoss`), and the weighted sum of one loss per output of a multi-output model
//! ([`WeightedLosses`]). Each loss returns `(loss, dloss/dinput)`; the gradient goes to the model's backward.
//!
//! Cross-entropy:
//!
//! | | PyTorch `nn.CrossEntropyLoss` | here |
//! |---|---|---|
//! | input | logits (N, K), class-index targets (N) | same (`&[usize]` targets) |
//! | reduction | `mean` over N | same (only `mean`) |
//! | `label_smoothing` ε | target distribution (1−ε)·onehot + ε/K | same |
//! | loss per sample | −(1−ε)·log p_y − (ε/K)·Σ_k log p_k | same, log-sum-exp stabilised, in f64 |
//! | gradient | — (autograd) | dlogits = (softmax − q)/N, returned with the loss |
//! | target out of range | "Target 7 is out of bounds." | [`NvError::Shape`] |
//! | NaN / ±inf logits | propagates NaN | [`NvError::NonFinite`] |
//! | class weights, `ignore_index` | supported | not here; per-pixel (segmentation): [`PixelCrossEntropy`] |

mod mse;
mod pixel;
mod weighted;

pub use mse::{mse, MseLoss};
pub use pixel::PixelCrossEntropy;
pub use weighted::{Combined, WeightedLosses};

use crate::kernels::shape::contiguous as cont;
use crate::{NvError, Real, Result};
use ndarray::{ArrayD, IxDyn};

const NAME: &str = "CrossEntropyLoss";

/// Cross-entropy with optional label smoothing (mean reduction).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct CrossEntropyLoss {
    pub label_smoothing: f64,
}

impl CrossEntropyLoss {
    pub fn new() -> Self {
        Self::default()
    }
    /// PyTorch's `label_smoothing`, in [0, 1].
    pub fn label_smoothing(eps: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&eps) {
            return Err(NvError::Config(format!(
                "label_smoothing must be between 0.0 and 1.0. Got: {eps}"
            )));
        }
        Ok(CrossEntropyLoss {
            label_smoothing: eps,
        })
    }
    /// (mean loss, dloss/dlogits).
    pub fn forward<T: Real>(
        &self,
        logits: &ArrayD<T>,
        targets: &[usize],
    ) -> Result<(f64, ArrayD<T>)> {
        cross_entropy(logits, targets, self.label_smoothing)
    }
}

fn dims<T: Real>(logits: &ArrayD<T>) -> Result<(usize, usize)> {
    let s = logits.shape();
    if s.len() != 2 {
        return Err(NvError::Rank {
            layer: NAME,
            expected: "2-D (N, K) logits".into(),
            got: s.to_vec(),
        });
    }
    if s[0] == 0 || s[1] == 0 {
        return Err(NvError::Shape {
            layer: NAME,
            msg: format!("logits of shape {s:?}: need at least one sample and one class"),
        });
    }
    Ok((s[0], s[1]))
}

/// Mean softmax cross-entropy of `logits` (N, K) against class indices, with label smoothing `eps`;
/// returns the loss and its gradient with respect to the logits.
pub fn cross_entropy<T: Real>(
    logits: &ArrayD<T>,
    targets: &[usize],
    eps: f64,
) -> Result<(f64, ArrayD<T>)> {
    let (n, k) = dims(logits)?;
    if !(0.0..=1.0).contains(&eps) {
        return Err(NvError::Config(format!(
            "label_smoothing must be between 0.0 and 1.0. Got: {eps}"
        )));
    }
    if targets.len() != n {
        return Err(NvError::Shape {
            layer: NAME,
            msg: format!(
                "Expected input batch_size ({n}) to match target batch_size ({})",
                targets.len()
            ),
        });
    }
    let xs = cont(logits);
    let mut grad = vec![T::zero(); n * k];
    let mut total = 0.0f64;
    let (inv_n, smooth) = (1.0 / n as f64, eps / k as f64);
    let mut row = vec![0f64; k];
    for (i, (xr, gr)) in xs.chunks_exact(k).zip(grad.chunks_exact_mut(k)).enumerate() {
        let t = targets[i];
        if t >= k {
            return Err(NvError::Shape {
                layer: NAME,
                msg: format!("Target {t} is out of bounds (sample {i}, {k} classes)."),
            });
        }
        let mut m = f64::NEG_INFINITY;
        for (r, v) in row.iter_mut().zip(xr) {
            *r = v.as_f64();
            if !r.is_finite() {
                return Err(NvError::NonFinite(format!(
                    "{NAME}: logits of sample {i} contain {r}"
                )));
            }
            m = m.max(*r);
        }
        let sum_exp: f64 = row.iter().map(|&v| (v - m).exp()).sum();
        let lse = m + sum_exp.ln();
        // −(1−ε)·log p_t − (ε/K)·Σ log p_k, with log p_k = x_k − lse.
        let mut loss = -(1.0 - eps) * (row[t] - lse);
        if eps > 0.0 {
            let sum_logp: f64 = row.iter().map(|&v| v - lse).sum();
            loss -= smooth * sum_logp;
        }
        total += loss;
        for (j, (g, &v)) in gr.iter_mut().zip(&row).enumerate() {
            let q = if j == t { 1.0 - eps + smooth } else { smooth };
            *g = T::of_f64(((v - lse).exp() - q) * inv_n);
        }
    }
    let loss = total * inv_n;
    if !loss.is_finite() {
        return Err(NvError::NonFinite(format!("{NAME}: loss is {loss}")));
    }
    Ok((
        loss,
        ArrayD::from_shape_vec(IxDyn(&[n, k]), grad).expect("n·k elements"),
    ))
}

/// Index of the largest logit of every row (first one on ties; NaN counts as the largest, as `torch.argmax`).
pub fn argmax<T: Real>(logits: &ArrayD<T>) -> Result<Vec<usize>> {
    let (_, k) = dims(logits)?;
    let xs = cont(logits);
    Ok(xs
        .chunks_exact(k)
        .map(|r| {
            let mut best = 0;
            for (j, &v) in r.iter().enumerate().skip(1) {
                if r[best].is_nan() {
                    break;
                }
                if v > r[best] || v.is_nan() {
                    best = j;
                }
            }
            best
        })
        .collect())
}

/// Number of rows whose argmax equals the target.
pub fn count_correct<T: Real>(logits: &ArrayD<T>, targets: &[usize]) -> Result<usize> {
    let pred = argmax(logits)?;
    if pred.len() != targets.len() {
        return Err(NvError::Shape {
            layer: NAME,
            msg: format!("{} predictions but {} targets", pred.len(), targets.len()),
        });
    }
    Ok(pred.iter().zip(targets).filter(|(p, t)| p == t).count())
}

/// Fraction of rows whose argmax equals the target.
pub fn accuracy<T: Real>(logits: &ArrayD<T>, targets: &[usize]) -> Result<f64> {
    Ok(count_correct(logits, targets)? as f64 / targets.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_log_k_and_stable_large_values() {
        let x = ArrayD::from_elem(IxDyn(&[3, 4]), 1000.0f32);
        let (l, g) = cross_entropy(&x, &[0, 1, 3], 0.0).unwrap();
        assert!((l - 4f64.ln()).abs() < 1e-9);
        assert!((g[[0, 0]] - (0.25 - 1.0) / 3.0).abs() < 1e-7);
        let x =
            ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, 2.0, 3.0, 0.5, 0.1, -4.0f64]).unwrap();
        assert_eq!(argmax(&x).unwrap(), vec![2, 0]);
        assert_eq!(accuracy(&x, &[2, 1]).unwrap(), 0.5);
    }
}
