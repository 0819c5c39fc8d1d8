//! Per-pixel softmax cross-entropy for segmentation: PyTorch's `F.cross_entropy(logits, target, weight=w,
//! ignore_index=i)` on logits (N, K, *spatial) and class targets (N, *spatial), mean reduction:
//!
//! loss = Σ_p w[t_p] · (−log softmax(x_p)[t_p]) / Σ_p w[t_p], over the pixels p whose target is not ignored,
//! and dlogits_p = w[t_p] · (softmax(x_p) − onehot(t_p)) / Σ w (0 at ignored pixels).
//!
//! Computed in f64 with a stabilised log-sum-exp, one image per task, the images' sums added in order
//! (deterministic). The pixels go 8 at a time through a vectorised f64 `exp` and `ln` ([`crate::kernels::exp`],
//! within 2 ulp of libm's): as libm calls, one exponential per class and pixel and one logarithm per pixel were
//! most of the loss's time. Where every pixel is ignored PyTorch returns NaN (0/0); here the loss is 0 with a zero
//! gradient: a crop with nothing to learn contributes nothing.

use crate::kernels::exp::{exp_lanes, ln_lanes, LANES};
use crate::kernels::isa::isa_fn;
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
        if total_w == 0.0 {
            return Ok((0.0, ArrayD::<T>::zeros(IxDyn(s))));
        }
        // SAFETY: `image_loss` writes every element of its image's gradient (0 at ignored pixels). A fresh
        // zeroed 1.4 MB (DeepLab's batch of 8 at 64×64) cost a third of the loss in page faults.
        let mut grad = unsafe { crate::kernels::arena::output_uninit::<T>(s) };
        let gs = grad.as_slice_mut().expect("fresh array");
        let inv = 1.0 / total_w;
        let isa = crate::Isa::detect();
        let weights = self.weights.as_deref();
        let image = |(i, (xi, gi)): (usize, (&[T], &mut [T]))| -> Result<f64> {
            let tg = &targets[i * hw..(i + 1) * hw];
            image_loss(isa, i, xi, gi, tg, k, self.ignore_index, weights, inv)
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

isa_fn! {
    /// One image's summed weighted loss, writing its dlogits `gi` (every element; 0 at ignored pixels): logits
    /// `xi` (K, HW), targets `tg` (HW), `inv` = 1 / the batch's total weight.
    fn image_loss<'a, T: Real, const X2: bool, const X512: bool>(
        i: usize,
        xi: &'a [T],
        gi: &'a mut [T],
        tg: &'a [usize],
        k: usize,
        ignore: Option<usize>,
        weights: Option<&'a [f64]>,
        inv: f64,
    ) -> Result<f64> {
        let hw = tg.len();
        let mut loss = 0.0f64;
        // e[c][l]: logit, then exp(logit − max), of class c at lane l
        let mut e = vec![[0f64; LANES]; k];
        for p0 in (0..hw).step_by(LANES) {
            let n = LANES.min(hw - p0);
            let live: [bool; LANES] = std::array::from_fn(|l| l < n && ignore != Some(tg[p0 + l]));
            let mut m = [f64::NEG_INFINITY; LANES];
            let mut finite = [true; LANES];
            for (c, ec) in e.iter_mut().enumerate() {
                let row = &xi[c * hw + p0..][..n];
                if n == LANES {
                    // a whole block: loops of a known length, which vectorise
                    for (d, v) in ec.iter_mut().zip(row) {
                        *d = v.as_f64();
                    }
                } else {
                    *ec = std::array::from_fn(|l| if l < n { row[l].as_f64() } else { 0.0 });
                }
                for l in 0..LANES {
                    m[l] = if ec[l] > m[l] { ec[l] } else { m[l] };
                    finite[l] &= ec[l].abs() < f64::INFINITY;
                }
            }
            for l in 0..n {
                if live[l] && !finite[l] {
                    return Err(NvError::NonFinite(format!(
                        "{NAME}: logits of image {i}, pixel {} are not finite",
                        p0 + l
                    )));
                }
            }
            // one exp per class: e_c = exp(x_c − m), softmax_c = e_c / Σe, lse = m + ln Σe
            let mut sum = [0f64; LANES];
            for ec in e.iter_mut() {
                for l in 0..LANES {
                    ec[l] -= m[l];
                }
                exp_lanes::<X2>(ec);
                for l in 0..LANES {
                    sum[l] += ec[l];
                }
            }
            let mut ln_sum = sum;
            ln_lanes::<X2>(&mut ln_sum);
            // per lane: the gradient's scale w·inv (0 where ignored or past the plane), 1/Σe, the target class
            // (as f64, −1 where none) and the loss term w·(lse − x_t)
            let (mut scale, mut inv_sum, mut target) = ([0f64; LANES], [0f64; LANES], [-1f64; LANES]);
            for l in 0..n {
                if live[l] {
                    let t = tg[p0 + l];
                    let w = weights.map_or(1.0, |w| w[t]);
                    loss += w * (ln_sum[l] - (xi[t * hw + p0 + l].as_f64() - m[l]));
                    (scale[l], target[l]) = (w * inv, t as f64);
                }
            }
            for l in 0..LANES {
                inv_sum[l] = 1.0 / sum[l];
            }
            let mut g = [0f64; LANES];
            for (c, ec) in e.iter().enumerate() {
                let cf = c as f64;
                for l in 0..LANES {
                    let q = if target[l] == cf { 1.0 } else { 0.0 };
                    let v = scale[l] * (ec[l] * inv_sum[l] - q);
                    g[l] = if live[l] { v } else { 0.0 };
                }
                let row = &mut gi[c * hw + p0..][..n];
                if let Ok(row) = <&mut [T; LANES]>::try_from(&mut *row) {
                    // a whole block: a loop of known length, which vectorises
                    for (d, v) in row.iter_mut().zip(&g) {
                        *d = T::of_f64(*v);
                    }
                } else {
                    for (d, v) in row.iter_mut().zip(&g) {
                        *d = T::of_f64(*v);
                    }
                }
            }
        }
        Ok(loss)
    }
}
