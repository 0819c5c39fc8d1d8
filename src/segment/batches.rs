//! Training and evaluation batches for segmentation, with torchvision's segmentation recipe of augmentation:
//! a random scale, padding to the crop (image 0, mask 255) where the scaled image is smaller, a random crop
//! and a random horizontal flip. Evaluation takes whole images.
//!
//! Every random draw is a pure function of (seed, epoch, sample, draw) through SplitMix64 ([`draw`]), and an
//! epoch's order sorts the samples by a draw, so that a script in another language reproduces the exact
//! batches (`tools/seg_twin.py` does, for the PyTorch twin) with nothing but 64-bit integer arithmetic:
//!
//! - order of epoch e: the sample indices i sorted by (draw(seed, 0, e, i), i);
//! - scale s = lo + (hi − lo) · u₁; the scaled size is ⌊h·s + ½⌋ × ⌊w·s + ½⌋ (at least 1);
//! - the image (as x / 255) is resized bilinearly (`align_corners=False`, no antialiasing), the mask by nearest
//!   neighbour, source index ⌊d · in / out⌋ (exact integer arithmetic);
//! - padded at the bottom and right to at least crop × crop; the crop's top is ⌊u₂ · (H − crop + 1)⌋ and its
//!   left ⌊u₃ · (W − crop + 1)⌋; flipped left-right when u₄ < ½;
//! - then normalized, (x − mean) / std per channel, padding included;
//!
//! where u_k = (draw(seed, k, e, i) >> 11) / 2⁵³.

use super::data::{SegSample, SegSource};
use crate::data::scenes::IGNORE;
use crate::data::Normalization;
use crate::layer::Layer;
use crate::nn::{UpsampleBilinear, UpsampleSize};
use crate::{Ctx, NvError, Result};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

/// SplitMix64's finalizer.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draw `k` of sample `i` in epoch `e` of a run seeded `seed`.
pub fn draw(seed: u64, k: u64, e: u64, i: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ k) ^ e) ^ i)
}

/// A uniform number in [0, 1) from a draw.
pub fn uniform(d: u64) -> f64 {
    (d >> 11) as f64 / (1u64 << 53) as f64
}

/// The order of the samples in epoch `epoch`.
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut keys: Vec<(u64, usize)> = (0..n)
        .map(|i| (draw(seed, 0, epoch, i as u64), i))
        .collect();
    keys.sort_unstable();
    keys.into_iter().map(|(_, i)| i).collect()
}

/// The training augmentation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SegAugment {
    /// Square crop side.
    pub crop: usize,
    /// Scale range (torchvision: 0.5-2.0 of the base size).
    pub scale: (f64, f64),
    pub flip: bool,
}

impl SegAugment {
    pub fn validate(&self) -> Result<()> {
        if !(8..=2048).contains(&self.crop) {
            return Err(NvError::Config(format!(
                "segmentation: --crop must be in 8..=2048, got {}",
                self.crop
            )));
        }
        let (lo, hi) = self.scale;
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi && hi <= 8.0) {
            return Err(NvError::Config(format!(
                "segmentation: the scale range {lo}-{hi} must satisfy 0 < min <= max <= 8"
            )));
        }
        Ok(())
    }
}

/// A batch: images (N, C, H, W), normalized, and one target per pixel (image-major; 255 ignored).
pub struct SegBatch {
    pub x: ArrayD<f32>,
    pub targets: Vec<usize>,
}

/// `s`'s pixels as x / 255 in an (1, C, H, W) array.
fn unit_image(s: &SegSample) -> ArrayD<f32> {
    ArrayD::from_shape_vec(
        IxDyn(&[1, s.channels, s.height, s.width]),
        s.image.iter().map(|&p| p as f32 / 255.0).collect(),
    )
    .expect("C x H x W bytes")
}

/// Nearest-neighbour resize of a mask, source index ⌊d · in / out⌋.
fn resize_mask(m: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let sy = y * h / oh;
        for x in 0..ow {
            out.push(m[sy * w + x * w / ow]);
        }
    }
    out
}

/// One augmented sample: (C·crop·crop normalized pixels, crop·crop targets).
fn augmented(
    s: &SegSample,
    aug: &SegAugment,
    norm: &Normalization,
    seed: u64,
    epoch: u64,
    i: u64,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let u = |k: u64| uniform(draw(seed, k, epoch, i));
    let (lo, hi) = aug.scale;
    let sc = lo + (hi - lo) * u(1);
    let nh = ((s.height as f64 * sc + 0.5).floor() as usize).max(1);
    let nw = ((s.width as f64 * sc + 0.5).floor() as usize).max(1);
    let img = if (nh, nw) == (s.height, s.width) {
        unit_image(s)
    } else {
        UpsampleBilinear::<f32>::new(UpsampleSize::Size(nh, nw), false)?
            .forward(&unit_image(s), Ctx::eval())?
    };
    let img = img.as_slice().expect("standard layout");
    let mask = resize_mask(&s.mask, s.height, s.width, nh, nw);
    let (ph, pw) = (nh.max(aug.crop), nw.max(aug.crop));
    let top = (u(2) * (ph - aug.crop + 1) as f64).floor() as usize;
    let left = (u(3) * (pw - aug.crop + 1) as f64).floor() as usize;
    let flip = aug.flip && u(4) < 0.5;
    let c = aug.crop;
    let mut x = vec![0f32; s.channels * c * c];
    let mut t = vec![IGNORE as usize; c * c];
    for ch in 0..s.channels {
        let (m, sd) = (norm.mean[ch], norm.std[ch]);
        for y in 0..c {
            for xx in 0..c {
                let sx = if flip { c - 1 - xx } else { xx };
                let (py, px) = (top + y, left + sx);
                let v = if py < nh && px < nw {
                    img[(ch * nh + py) * nw + px]
                } else {
                    0.0
                };
                x[(ch * c + y) * c + xx] = (v - m) / sd;
                if ch == 0 && py < nh && px < nw {
                    t[y * c + xx] = mask[py * nw + px] as usize;
                }
            }
        }
    }
    Ok((x, t))
}

/// The training batch of samples `indices` (of epoch `epoch`), augmented.
pub fn train_batch(
    src: &SegSource,
    indices: &[usize],
    aug: &SegAugment,
    norm: &Normalization,
    seed: u64,
    epoch: u64,
) -> Result<SegBatch> {
    let parts: Vec<(Vec<f32>, Vec<usize>)> = indices
        .par_iter()
        .map(|&i| augmented(&*src.sample(i)?, aug, norm, seed, epoch, i as u64))
        .collect::<Result<_>>()?;
    let (n, c, k) = (indices.len(), src.channels(), aug.crop);
    let mut x = Vec::with_capacity(n * c * k * k);
    let mut targets = Vec::with_capacity(n * k * k);
    for (xi, ti) in parts {
        x.extend(xi);
        targets.extend(ti);
    }
    Ok(SegBatch {
        x: ArrayD::from_shape_vec(IxDyn(&[n, c, k, k]), x).expect("sizes"),
        targets,
    })
}

/// Whole, normalized images `indices` (all of one size) with their targets, for evaluation.
pub fn eval_batch(src: &SegSource, indices: &[usize], norm: &Normalization) -> Result<SegBatch> {
    let samples: Vec<std::borrow::Cow<'_, SegSample>> = indices
        .par_iter()
        .map(|&i| src.sample(i))
        .collect::<Result<_>>()?;
    let (c, h, w) = (samples[0].channels, samples[0].height, samples[0].width);
    let mut x = Vec::with_capacity(samples.len() * c * h * w);
    let mut targets = Vec::with_capacity(samples.len() * h * w);
    for s in &samples {
        if (s.height, s.width) != (h, w) {
            return Err(NvError::Config(
                "segmentation: an evaluation batch mixes image sizes".into(),
            ));
        }
        for ch in 0..c {
            let (m, sd) = (norm.mean[ch], norm.std[ch]);
            x.extend(
                s.image[ch * h * w..(ch + 1) * h * w]
                    .iter()
                    .map(|&p| (p as f32 / 255.0 - m) / sd),
            );
        }
        targets.extend(s.mask.iter().map(|&v| v as usize));
    }
    Ok(SegBatch {
        x: ArrayD::from_shape_vec(IxDyn(&[samples.len(), c, h, w]), x).expect("sizes"),
        targets,
    })
}

/// Per-channel mean and std of x / 255 over (up to) the first `limit` samples, in f64.
pub fn normalization(src: &SegSource, limit: usize) -> Result<Normalization> {
    let n = src.len().min(limit).max(1);
    let c = src.channels();
    let sums: Vec<(Vec<f64>, Vec<f64>, f64)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let s = src.sample(i)?;
            let hw = s.height * s.width;
            let mut a = vec![0f64; c];
            let mut b = vec![0f64; c];
            for ch in 0..c {
                for &p in &s.image[ch * hw..(ch + 1) * hw] {
                    let v = p as f64 / 255.0;
                    a[ch] += v;
                    b[ch] += v * v;
                }
            }
            Ok((a, b, hw as f64))
        })
        .collect::<Result<_>>()?;
    let mut mean = vec![0f64; c];
    let mut sq = vec![0f64; c];
    let mut count = 0.0;
    for (a, b, k) in sums {
        for ch in 0..c {
            mean[ch] += a[ch];
            sq[ch] += b[ch];
        }
        count += k;
    }
    let m: Vec<f32> = mean.iter().map(|v| (v / count) as f32).collect();
    let s: Vec<f32> = (0..c)
        .map(|ch| {
            let mu = mean[ch] / count;
            ((sq[ch] / count - mu * mu).max(1e-12).sqrt()) as f32
        })
        .collect();
    Normalization::new(m, s)
}
