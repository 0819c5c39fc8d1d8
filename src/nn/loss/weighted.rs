//! One loss per output of a multi-output model, combined with weights the user sets: L = Σᵢ wᵢ·Lᵢ, so
//! dL/d(outputᵢ) = wᵢ·dLᵢ/d(outputᵢ). This is what `loss = w1 * l1 + w2 * l2; loss.backward()` computes in
//! PyTorch. The gradients go to [`Graph::backward`](crate::model::Graph::backward) in the graph's output order.

use crate::{NvError, Real, Result};
use ndarray::ArrayD;

/// The weights of a multi-output model's losses, one per output.
///
/// ```
/// use normvision::ndarray::{arr1, arr2};
/// use normvision::nn::loss::{cross_entropy, mse, WeightedLosses};
/// let logits = arr2(&[[2.0f32, 0.5], [0.1, 1.0]]).into_dyn();
/// let depth = arr1(&[0.5f32, 1.5]).into_dyn();
/// let losses = WeightedLosses::new(&[1.0, 0.5]).unwrap();
/// let c = losses
///     .combine(vec![cross_entropy(&logits, &[0, 1], 0.0).unwrap(), mse(&depth, &arr1(&[0.0, 1.0]).into_dyn()).unwrap()])
///     .unwrap();
/// assert!((c.loss - (c.parts[0] + 0.5 * c.parts[1])).abs() < 1e-12);
/// assert_eq!(c.grads.len(), 2); // dL/d(logits), dL/d(depth), for Graph::backward
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedLosses {
    weights: Vec<f64>,
}

/// The combined loss, each output's own loss, and dL/d(output) for each output.
#[derive(Debug, Clone)]
pub struct Combined<T> {
    pub loss: f64,
    pub parts: Vec<f64>,
    pub grads: Vec<ArrayD<T>>,
}

impl<T> Combined<T> {
    /// The gradients as [`Graph::backward`](crate::model::Graph::backward) takes them.
    pub fn grad_refs(&self) -> Vec<&ArrayD<T>> {
        self.grads.iter().collect()
    }
}

impl WeightedLosses {
    /// One finite weight per output (a weight of 0 keeps the output out of the gradient).
    pub fn new(weights: &[f64]) -> Result<Self> {
        if weights.is_empty() {
            return Err(NvError::Config(
                "loss weights: need one weight per output, got none".into(),
            ));
        }
        if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
            return Err(NvError::Config(format!(
                "loss weights: weight {i} is {w}, not a finite number"
            )));
        }
        Ok(WeightedLosses {
            weights: weights.to_vec(),
        })
    }

    /// Equal weights of 1 for `n` outputs.
    pub fn equal(n: usize) -> Result<Self> {
        Self::new(&vec![1.0; n])
    }

    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Combines each output's `(loss, dloss/doutput)`, in the graph's output order. A weight of 1 leaves its
    /// gradient untouched (bitwise); any other scales it, rounded once.
    pub fn combine<T: Real>(&self, parts: Vec<(f64, ArrayD<T>)>) -> Result<Combined<T>> {
        if parts.len() != self.weights.len() {
            return Err(NvError::Config(format!(
                "loss weights: {} weights for {} losses (one per model output)",
                self.weights.len(),
                parts.len()
            )));
        }
        let mut loss = 0.0;
        let mut losses = Vec::with_capacity(parts.len());
        let mut grads = Vec::with_capacity(parts.len());
        for (&w, (l, mut g)) in self.weights.iter().zip(parts) {
            loss += w * l;
            losses.push(l);
            if w != 1.0 {
                let wt = T::of_f64(w);
                g.mapv_inplace(|v| v * wt);
            }
            grads.push(g);
        }
        if !loss.is_finite() {
            return Err(NvError::NonFinite(format!(
                "weighted loss is {loss} (losses {losses:?})"
            )));
        }
        Ok(Combined {
            loss,
            parts: losses,
            grads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn weights_scale_the_loss_and_each_gradient() {
        let g = |v: f32| ArrayD::from_elem(IxDyn(&[2]), v);
        let c = WeightedLosses::new(&[1.0, 0.25, 0.0])
            .unwrap()
            .combine(vec![(2.0, g(1.0)), (4.0, g(8.0)), (100.0, g(3.0))])
            .unwrap();
        assert_eq!(c.loss, 3.0);
        assert_eq!(c.parts, vec![2.0, 4.0, 100.0]);
        assert_eq!(c.grads[0], g(1.0));
        assert_eq!(c.grads[1], g(2.0));
        assert_eq!(c.grads[2], g(0.0));
    }

    #[test]
    fn wrong_counts_and_weights_are_config_errors() {
        assert!(WeightedLosses::new(&[]).is_err());
        let e = WeightedLosses::new(&[1.0, f64::NAN])
            .unwrap_err()
            .to_string();
        assert!(e.contains("weight 1"), "{e}");
        let e = WeightedLosses::equal(2)
            .unwrap()
            .combine(vec![(1.0, ArrayD::<f32>::zeros(IxDyn(&[1])))])
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 weights for 1 losses"), "{e}");
    }
}
