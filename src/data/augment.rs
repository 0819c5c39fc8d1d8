//! Training-time augmentation of one `(C, H, W)` image of values in `[0, 1]` (before normalization),
//! driven by a caller-supplied RNG so a seeded run is reproducible.
//!
//! Order, when enabled: random crop with zero padding → horizontal flip (p = 0.5) → brightness → contrast.
//! (torchvision's `ColorJitter` shuffles brightness/contrast order; here it is fixed.)

use crate::{NvError, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Augmentation settings. `Augment::default()` does nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Augment {
    /// Zero padding on each side before a random crop back to `(H, W)`; 0 disables the crop
    /// (torchvision `RandomCrop(size, padding=crop_pad)`).
    pub crop_pad: usize,
    /// Mirror left-right with probability 0.5.
    pub hflip: bool,
    /// Multiply by a factor uniform in `[max(0, 1 - b), 1 + b]`, then clamp to `[0, 1]`; 0 disables.
    pub brightness: f32,
    /// Blend with the image's mean gray level: `f * x + (1 - f) * mean`, `f` uniform in `[max(0, 1 - c), 1 + c]`,
    /// then clamp to `[0, 1]`; 0 disables.
    pub contrast: f32,
}

impl Augment {
    /// No augmentation.
    pub fn none() -> Augment {
        Augment::default()
    }
    /// The usual small-image recipe: pad-4 crop and horizontal flip.
    pub fn crop_flip(pad: usize) -> Augment {
        Augment {
            crop_pad: pad,
            hflip: true,
            ..Default::default()
        }
    }
    pub fn is_identity(&self) -> bool {
        self.crop_pad == 0 && !self.hflip && self.brightness == 0.0 && self.contrast == 0.0
    }
    /// Checks ranges (finite, non-negative jitter).
    pub fn validate(&self) -> Result<()> {
        for (n, v) in [("brightness", self.brightness), ("contrast", self.contrast)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(NvError::Config(format!(
                    "augment: {n} must be finite and >= 0, got {v}"
                )));
            }
        }
        Ok(())
    }

    /// Augments one image in place. `img` holds `c * h * w` values, channel-major. `scratch` is reused storage.
    pub fn apply<R: Rng + ?Sized>(
        &self,
        img: &mut [f32],
        [c, h, w]: [usize; 3],
        rng: &mut R,
        scratch: &mut Vec<f32>,
    ) {
        debug_assert_eq!(img.len(), c * h * w);
        if self.crop_pad > 0 {
            let p = self.crop_pad;
            let dy = rng.gen_range(0..=2 * p);
            let dx = rng.gen_range(0..=2 * p);
            random_crop_at(img, [c, h, w], p, dy, dx, scratch);
        }
        if self.hflip && rng.gen_bool(0.5) {
            hflip(img, [c, h, w]);
        }
        if self.brightness > 0.0 {
            let lo = (1.0 - self.brightness).max(0.0);
            let f = rng.gen_range(lo..=1.0 + self.brightness);
            adjust_brightness(img, f);
        }
        if self.contrast > 0.0 {
            let lo = (1.0 - self.contrast).max(0.0);
            let f = rng.gen_range(lo..=1.0 + self.contrast);
            adjust_contrast(img, [c, h, w], f);
        }
    }
}

/// Crops `(h, w)` at offset `(dy, dx)` out of the image zero-padded by `pad` on every side
/// (`dy, dx` in `0..=2*pad`; `(pad, pad)` is the identity).
pub fn random_crop_at(
    img: &mut [f32],
    [c, h, w]: [usize; 3],
    pad: usize,
    dy: usize,
    dx: usize,
    scratch: &mut Vec<f32>,
) {
    scratch.clear();
    scratch.extend_from_slice(img);
    for ch in 0..c {
        let src = &scratch[ch * h * w..(ch + 1) * h * w];
        let dst = &mut img[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            // padded row y + dy is source row y + dy - pad
            let sy = (y + dy).wrapping_sub(pad);
            for x in 0..w {
                let sx = (x + dx).wrapping_sub(pad);
                dst[y * w + x] = if sy < h && sx < w {
                    src[sy * w + sx]
                } else {
                    0.0
                };
            }
        }
    }
}

/// Mirrors every row.
pub fn hflip(img: &mut [f32], [_c, _h, w]: [usize; 3]) {
    for row in img.chunks_exact_mut(w) {
        row.reverse();
    }
}

/// `x * f`, clamped to `[0, 1]` (torchvision `adjust_brightness`).
pub fn adjust_brightness(img: &mut [f32], f: f32) {
    for v in img.iter_mut() {
        *v = (*v * f).clamp(0.0, 1.0);
    }
}

/// `f * x + (1 - f) * m`, clamped, where `m` is the mean of the grayscale image
/// (0.299 R + 0.587 G + 0.114 B for 3 channels) — torchvision `adjust_contrast`.
pub fn adjust_contrast(img: &mut [f32], [c, h, w]: [usize; 3], f: f32) {
    let hw = h * w;
    let mean = if c == 3 {
        let (r, g, b) = (&img[..hw], &img[hw..2 * hw], &img[2 * hw..]);
        (0..hw)
            .map(|i| 0.299 * r[i] as f64 + 0.587 * g[i] as f64 + 0.114 * b[i] as f64)
            .sum::<f64>()
            / hw as f64
    } else {
        img.iter().map(|&v| v as f64).sum::<f64>() / img.len() as f64
    } as f32;
    for v in img.iter_mut() {
        *v = (f * *v + (1.0 - f) * mean).clamp(0.0, 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crop_shifts_and_pads_with_zeros() {
        // 1x3x3 image 1..9
        let orig: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let mut s = Vec::new();
        let mut a = orig.clone();
        random_crop_at(&mut a, [1, 3, 3], 2, 2, 2, &mut s);
        assert_eq!(a, orig, "centre crop is the identity");
        let mut a = orig.clone();
        random_crop_at(&mut a, [1, 3, 3], 2, 1, 3, &mut s); // shift: up 1 row of padding, right 1 col
        assert_eq!(a, vec![0., 0., 0., 2., 3., 0., 5., 6., 0.]);
        let mut a = orig.clone();
        random_crop_at(&mut a, [1, 3, 3], 2, 4, 0, &mut s);
        assert_eq!(a, vec![0., 0., 7., 0., 0., 0., 0., 0., 0.]);
    }

    #[test]
    fn flip_brightness_contrast() {
        let mut a = vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        hflip(&mut a, [1, 2, 3]);
        assert_eq!(a, vec![0.3, 0.2, 0.1, 0.6, 0.5, 0.4]);
        adjust_brightness(&mut a, 2.0);
        assert_eq!(a, vec![0.6, 0.4, 0.2, 1.0, 1.0, 0.8]);
        let mut b = vec![0.0, 1.0];
        adjust_contrast(&mut b, [1, 1, 2], 0.5);
        assert_eq!(b, vec![0.25, 0.75]);
    }

    #[test]
    fn seeded_apply_is_reproducible_and_in_range() {
        let aug = Augment {
            crop_pad: 2,
            hflip: true,
            brightness: 0.4,
            contrast: 0.4,
        };
        let orig: Vec<f32> = (0..3 * 8 * 8).map(|i| (i % 17) as f32 / 16.0).collect();
        let run = |seed| {
            let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
            let mut a = orig.clone();
            aug.apply(&mut a, [3, 8, 8], &mut rng, &mut Vec::new());
            a
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        assert!(run(7).iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(Augment::none().is_identity());
        assert!(Augment {
            brightness: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
