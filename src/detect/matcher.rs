//! Matching anchors or proposals to ground truth, and sampling them for the losses, as torchvision's
//! `Matcher` and `BalancedPositiveNegativeSampler` do.

use crate::rng::derive_rng;
use rand::seq::SliceRandom;

/// What a prediction was matched to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// The index of its ground-truth box: a positive.
    Gt(usize),
    /// Best IoU below the low threshold: a negative.
    Below,
    /// Best IoU between the thresholds: neither (ignored by the loss).
    Between,
}

/// torchvision's `Matcher(high, low, allow_low_quality_matches)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matcher {
    pub high: f32,
    pub low: f32,
    /// Also match each gt to the predictions of its highest IoU, even below `high` (the RPN's rule).
    pub allow_low_quality: bool,
}

impl Matcher {
    /// Matches each of `n_pred` predictions given the IoU matrix `iou[gt][pred]` (row-major). With no ground
    /// truth every prediction is `Below`.
    pub fn matches(&self, iou: &[f32], n_gt: usize, n_pred: usize) -> Vec<Match> {
        if n_gt == 0 {
            return vec![Match::Below; n_pred];
        }
        // per prediction: the best gt, the first on ties (torch's max over dim 0)
        let mut best = vec![(f32::NEG_INFINITY, 0usize); n_pred];
        for g in 0..n_gt {
            for (p, b) in best.iter_mut().enumerate() {
                let v = iou[g * n_pred + p];
                if v > b.0 {
                    *b = (v, g);
                }
            }
        }
        let mut out: Vec<Match> = best
            .iter()
            .map(|&(v, g)| {
                if v < self.low {
                    Match::Below
                } else if v < self.high {
                    Match::Between
                } else {
                    Match::Gt(g)
                }
            })
            .collect();
        if self.allow_low_quality {
            // every prediction that ties a gt's highest IoU takes its own best gt (even when that IoU is 0,
            // as in torchvision)
            for g in 0..n_gt {
                let row = &iou[g * n_pred..(g + 1) * n_pred];
                let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (p, &v) in row.iter().enumerate() {
                    if v == top {
                        out[p] = Match::Gt(best[p].1);
                    }
                }
            }
        }
        out
    }
}

/// torchvision's `BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)`: at most
/// `fraction·per_image` positives, then negatives to fill `per_image`, each drawn uniformly without
/// replacement. The draws come from `(seed, stream)` (torchvision uses `torch.randperm`; its draws cannot be
/// reproduced, only their distribution).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    pub per_image: usize,
    pub positive_fraction: f32,
}

impl Sampler {
    /// The indices of the sampled positives and negatives, each in ascending order.
    pub fn sample(&self, matches: &[Match], seed: u64, stream: u64) -> (Vec<usize>, Vec<usize>) {
        let mut pos: Vec<usize> = (0..matches.len())
            .filter(|&i| matches!(matches[i], Match::Gt(_)))
            .collect();
        let mut neg: Vec<usize> = (0..matches.len())
            .filter(|&i| matches[i] == Match::Below)
            .collect();
        let n_pos = ((self.per_image as f32 * self.positive_fraction) as usize).min(pos.len());
        let n_neg = (self.per_image - n_pos).min(neg.len());
        let mut rng = derive_rng(seed, stream, 7);
        pos.shuffle(&mut rng);
        neg.shuffle(&mut rng);
        pos.truncate(n_pos);
        neg.truncate(n_neg);
        pos.sort_unstable();
        neg.sort_unstable();
        (pos, neg)
    }
}
