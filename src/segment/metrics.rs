//! Segmentation metrics from a confusion matrix, as torchvision's segmentation reference computes them:
//! IoU_k = TP_k / (TP_k + FP_k + FN_k), pixel accuracy = Σ TP / pixels, over the pixels whose label is not
//! ignored. mIoU averages IoU over the classes that occur (in the labels or the predictions); torchvision's
//! plain mean would be NaN where a class never occurs in either.

use crate::data::scenes::IGNORE;
use crate::{NvError, Result};

/// The predicted class of pixel `p` of one image's logits (K planes of `hw`): the first maximum, as argmax; NaN
/// never wins.
pub fn pixel_argmax(img: &[f32], k: usize, hw: usize, p: usize) -> usize {
    let mut best = 0;
    let mut bv = img[p];
    for c in 1..k {
        let v = img[c * hw + p];
        if v > bv || (bv.is_nan() && !v.is_nan()) {
            best = c;
            bv = v;
        }
    }
    best
}

/// Counts of (label, prediction) pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionMatrix {
    classes: usize,
    /// Row = label, column = prediction.
    counts: Vec<u64>,
}

/// mIoU, pixel accuracy and per-class IoU (`None` where a class occurs nowhere).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SegMetrics {
    pub miou: f64,
    pub pixel_acc: f64,
    pub iou: Vec<Option<f64>>,
    /// Pixels counted (not ignored).
    pub pixels: u64,
}

impl ConfusionMatrix {
    pub fn new(classes: usize) -> Self {
        ConfusionMatrix {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    /// Adds a batch: logits (N, K, H, W) as a slice, and N·H·W labels (255 ignored).
    pub fn add_logits(&mut self, logits: &[f32], shape: &[usize], labels: &[usize]) -> Result<()> {
        let (n, k) = (shape[0], shape[1]);
        let hw: usize = shape[2..].iter().product();
        if k != self.classes || labels.len() != n * hw || logits.len() != n * k * hw {
            return Err(NvError::Shape {
                layer: "ConfusionMatrix",
                msg: format!(
                    "logits {shape:?} and {} labels for {} classes",
                    labels.len(),
                    self.classes
                ),
            });
        }
        for b in 0..n {
            let img = &logits[b * k * hw..(b + 1) * k * hw];
            for p in 0..hw {
                let t = labels[b * hw + p];
                if t == IGNORE as usize {
                    continue;
                }
                if t >= k {
                    return Err(NvError::Config(format!(
                        "label {t} outside the {k} classes (and not the ignore value {IGNORE})"
                    )));
                }
                self.counts[t * k + pixel_argmax(img, k, hw, p)] += 1;
            }
        }
        Ok(())
    }

    /// Adds a (label, prediction) count directly.
    pub fn add(&mut self, label: usize, pred: usize, count: u64) {
        self.counts[label * self.classes + pred] += count;
    }

    /// Adds another matrix of the same classes.
    pub fn merge(&mut self, other: &ConfusionMatrix) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    pub fn metrics(&self) -> SegMetrics {
        let k = self.classes;
        let c = |t: usize, p: usize| self.counts[t * k + p];
        let total: u64 = self.counts.iter().sum();
        let tp: u64 = (0..k).map(|i| c(i, i)).sum();
        let iou: Vec<Option<f64>> = (0..k)
            .map(|i| {
                let row: u64 = (0..k).map(|j| c(i, j)).sum();
                let col: u64 = (0..k).map(|j| c(j, i)).sum();
                let union = row + col - c(i, i);
                (union > 0).then(|| c(i, i) as f64 / union as f64)
            })
            .collect();
        let present: Vec<f64> = iou.iter().flatten().copied().collect();
        SegMetrics {
            miou: if present.is_empty() {
                0.0
            } else {
                present.iter().sum::<f64>() / present.len() as f64
            },
            pixel_acc: if total == 0 {
                0.0
            } else {
                tp as f64 / total as f64
            },
            iou,
            pixels: total,
        }
    }
}
