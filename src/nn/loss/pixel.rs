//! Per-pixel softmax cross-entropy for segmentation: PyTorch's `F.cross_entropy(logits, target, weight=w,
//! ignore_index=i)` on logits (N, K, *spatial) and class targets (N, *spatial), mean reduction:
//!
//! loss = Σ_p w[t_p] · (−log softmax(x_p)[t_p]) / Σ_p w[t_p], over the pixels p whose target is not ignored,
//! and dlogits_p = w[t_p] · (softmax(x_p) − onehot(t_p)) / Σ w (0 at ignored pixels).
//!
//! Computed in f64 with a stabilised log-sum-exp, one image per task, the images' sums added in order
//! (deterministic). Where every pixel is ignored PyTorch returns NaN (0/0); here the loss is 0 with a zero
//! gradient: a crop with nothing to learn contributes nothing.

use crate::kernels::shape::contiguous as cont;
use crate::{NvError, Real, Result};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

const NAME: &str = "PixelCrossEntropy";

/// Per-pixel cross-entropy settings: class weights (PyTorch's `weight`) and the ignored target value.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct PixelCrossEntropy {
    /// One weight per class (K), each finite and non-negative; `None`: all 1.
    pub weights: Option<Vec<f64>>,
    /// Targets equal to this are ignored (PyTorch's `ignore_index`; 255 in Pascal VOC masks).
    pub ignore_index: Option<usize>,
}

impl PixelCrossEntropy {
    /// Ignoring `ignore_index`, without class weights.
    pub fn ignoring(ignore_index: usize) -> Self {
        PixelCrossEntropy {
            weights: None,
            ignore_index: Some(ignore_index),
        }
    }
    /// With class weights.
    pub fn with_weights(mut self, w: Vec<f64>) -> Result<Self> {
        if let Some((k, v)) = w
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(NvError::Config(format!(
                "{NAME}: class weight {k} is {v}; weights must be finite and non-negative"
            )));
        }
        self.weights = Some(w);
        Ok(self)
    }

    /// The mean's denominator Σ_p w(t_p) over the targets that are not ignored (a target outside the
    /// weights counts 1 here; [`PixelCrossEntropy::forward`] rejects it). Data-parallel training weighs each
    /// rank's mean loss by it to form the mean over the global batch.
    pub fn total_weight(&self, targets: &[usize]) -> f64 {
        targets
            .iter()
            .filter(|&&t| self.ignore_index != Some(t))
            .map(|&t| {
                self.weights
                    .as_ref()
                    .and_then(|w| w.get(t).copied())
                    .unwrap_or(1.0)
            })
            .sum()
    }

    /// (mean loss, dloss/dlogits) for logits (N, K, *spatial) and targets (N · spatial values, image-major).
    pub fn forward<T: Real>(
        &self,
        logits: &ArrayD<T>,
        targets: &[usize],
    ) -> Result<(f64, ArrayD<T>)> {
        let s = logits.shape();
        if s.len() < 3 {
            return Err(NvError::Rank {
                layer: NAME,
                expected: "(N, K, *spatial) logits".into(),
                got: s.to_vec(),
            });
        }
        let (n, k) = (s[0], s[1]);
        let hw: usize = s[2..].iter().product();
        if k == 0 || n * hw == 0 {
            return Err(NvError::Shape {
                layer: NAME,
                msg: format!("logits of shape {s:?}: need at least one class and one pixel"),
            });
        }
        if targets.len() != n * hw {
            return Err(NvError::Shape {
                layer: NAME,
                msg: format!(
                    "{} targets for logits {s:?}: expected N x spatial = {}",
                    targets.len(),
                    n * hw
                ),
            });
        }
        if let Some(w) = &self.weights {
            if w.len() != k {
                return Err(NvError::Shape {
                    layer: NAME,
                    msg: format!("{} class weights for {k} classes", w.len()),
                });
            }
        }
        let ignored = |t: usize| self.ignore_index == Some(t);
        let weight = |t: usize| self.weights.as_ref().map_or(1.0, |w| w[t]);
        let mut total_w = 0.0f64;
        for (p, &t) in targets.iter().enumerate() {
            if ignored(t) {
                continue;
            }
            if t >= k {
                return Err(NvError::Shape {
                    layer: NAME,
                    msg: format!(
                        "target {t} at image {}, pixel {} is outside the {k} classes (and is not the ignore value{})",
                        p / hw,
                        p % hw,
                        self.ignore_index.map_or(String::new(), |i| format!(" {i}"))
                    ),
                });
            }
            total_w += weight(t);
        }
        let xs = cont(logits);
        let mut grad = ArrayD::<T>::zeros(IxDyn(s));
        if total_w == 0.0 {
            return Ok((0.0, grad));
        }
        let gs = grad.as_slice_mut().expect("fresh array");
        let inv = 1.0 / total_w;
        let image = |(i, (xi, gi)): (usize, (&[T], &mut [T]))| -> Result<f64> {
            let mut loss = 0.0f64;
            let mut row = vec![0f64; k];
            for p in 0..hw {
                let t = targets[i * hw + p];
                if ignored(t) {
                    continue;
                }
                let mut m = f64::NEG_INFINITY;
                for (c, r) in row.iter_mut().enumerate() {
                    *r = xi[c * hw + p].as_f64();
                    m = m.max(*r);
                }
                if !m.is_finite() || row.iter().any(|v| !v.is_finite()) {
                    return Err(NvError::NonFinite(format!(
                        "{NAME}: logits of image {i}, pixel {p} are not finite"
                    )));
                }
                // one exp per class: e_c = exp(x_c - m), softmax_c = e_c / Σe, lse = m + ln Σe
                let mut sum = 0.0f64;
                for r in row.iter_mut() {
                    *r = (*r - m).exp();
                    sum += *r;
                }
                let w = weight(t);
                loss += w * (sum.ln() - (xi[t * hw + p].as_f64() - m));
                let (scale, inv_sum) = (w * inv, 1.0 / sum);
                for (c, &e) in row.iter().enumerate() {
                    let q = if c == t { 1.0 } else { 0.0 };
                    gi[c * hw + p] = T::of_f64(scale * (e * inv_sum - q));
                }
            }
            Ok(loss)
        };
        let per: Vec<Result<f64>> = if n > 1 && n * k * hw >= 1 << 15 {
            xs.par_chunks(k * hw)
                .zip(gs.par_chunks_mut(k * hw))
                .enumerate()
                .map(image)
                .collect()
        } else {
            xs.chunks(k * hw)
                .zip(gs.chunks_mut(k * hw))
                .enumerate()
                .map(image)
                .collect()
        };
        let mut sum = 0.0;
        for l in per {
            sum += l?;
        }
        Ok((sum * inv, grad))
    }
}
