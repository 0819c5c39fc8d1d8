//! Corrupted copies of a data set, for measuring covariate shift: eight corruptions at severities 1–5, in the
//! manner of ImageNet-C / CIFAR-10-C (Hendrycks & Dietterich 2019).
//!
//! A corruption maps a `u8` sample to a `u8` sample, before the `x / 255` scaling and the normalization, so a
//! corrupted data set is an ordinary [`Dataset`]: it can be evaluated, adapted to, or written out as IDX files.
//! Every random draw (noise, the occluder's position) comes from [`derive_rng`]`(seed, index, stream)` with the
//! sample's index, so a corrupted set is a pure function of the clean set, the corruption and the seed, whatever
//! the thread count.
//!
//! The severity parameters live in one table, [`SEVERITIES`]. Intensity corruptions take ImageNet-C's values
//! (they do not depend on the image size); spatial ones (blur, JPEG, pixelate) take CIFAR-10-C's, made for
//! 32-pixel images like Fashion-MNIST's 28.

use crate::data::Dataset;
use crate::rng::derive_rng;
use crate::{NvError, Result};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One of the eight corruptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CorruptionKind {
    Brightness,
    Contrast,
    GaussianNoise,
    GaussianBlur,
    Inversion,
    Jpeg,
    Pixelate,
    Occlusion,
}

/// A corruption's name, its five severity parameters, and what the parameter means.
pub struct SeverityRow {
    pub kind: CorruptionKind,
    pub name: &'static str,
    pub params: [f32; 5],
    pub meaning: &'static str,
}

/// The severity table: the one place where each corruption's strength is set. Pixel values are in `[0, 1]`
/// here; every result is clamped to `[0, 1]` and rounded back to `u8`.
pub const SEVERITIES: [SeverityRow; 8] = [
    SeverityRow {
        kind: CorruptionKind::Brightness,
        name: "brightness",
        params: [0.1, 0.2, 0.3, 0.4, 0.5],
        meaning: "b added to every pixel (ImageNet-C's values, which it adds to the HSV value channel)",
    },
    SeverityRow {
        kind: CorruptionKind::Contrast,
        name: "contrast",
        params: [0.4, 0.3, 0.2, 0.1, 0.05],
        meaning: "factor a in (x - m)·a + m, m the image's mean (ImageNet-C)",
    },
    SeverityRow {
        kind: CorruptionKind::GaussianNoise,
        name: "gaussian-noise",
        params: [0.08, 0.12, 0.18, 0.26, 0.38],
        meaning: "standard deviation of the N(0, s²) noise added to each pixel (ImageNet-C)",
    },
    SeverityRow {
        kind: CorruptionKind::GaussianBlur,
        name: "gaussian-blur",
        params: [0.4, 0.6, 0.7, 0.8, 1.0],
        meaning: "sigma in pixels of image::imageops::blur, edges clamped (CIFAR-10-C)",
    },
    SeverityRow {
        kind: CorruptionKind::Inversion,
        name: "inversion",
        params: [0.1, 0.2, 0.3, 0.7, 1.0],
        meaning: "alpha in (1 - alpha)·x + alpha·(1 - x): contrast 1 - 2·alpha = 0.8, 0.6, 0.4, -0.4, -1 \
                  (5 is the negative image)",
    },
    SeverityRow {
        kind: CorruptionKind::Jpeg,
        name: "jpeg",
        params: [80.0, 65.0, 58.0, 50.0, 40.0],
        meaning: "JPEG quality of an encode/decode round trip through the image crate (CIFAR-10-C)",
    },
    SeverityRow {
        kind: CorruptionKind::Pixelate,
        name: "pixelate",
        params: [0.95, 0.9, 0.85, 0.75, 0.65],
        meaning: "side factor f: box-averaged down to round(f·side) pixels, then nearest back up (CIFAR-10-C)",
    },
    SeverityRow {
        kind: CorruptionKind::Occlusion,
        name: "occlusion",
        params: [0.2, 0.3, 0.4, 0.5, 0.6],
        meaning: "side of a mid-gray (0.5) square at a uniformly random position, as a fraction of the image side",
    },
];

impl CorruptionKind {
    /// Every corruption, in table order.
    pub fn all() -> impl Iterator<Item = CorruptionKind> {
        SEVERITIES.iter().map(|r| r.kind)
    }
    fn row(self) -> &'static SeverityRow {
        SEVERITIES
            .iter()
            .find(|r| r.kind == self)
            .expect("every kind has a row")
    }
    /// The command-line name (`gaussian-noise`).
    pub fn name(self) -> &'static str {
        self.row().name
    }
    /// The parameter at severity `s` (1–5).
    pub fn param(self, severity: u8) -> f32 {
        self.row().params[severity as usize - 1]
    }
    fn stream(self) -> u64 {
        0xC0_0000 + SEVERITIES.iter().position(|r| r.kind == self).unwrap() as u64
    }
}

/// A corruption at a severity from 1 to 5. Parses from `NAME:SEVERITY` (`gaussian-noise:3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Corruption {
    pub kind: CorruptionKind,
    pub severity: u8,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.name(), self.severity)
    }
}

impl FromStr for Corruption {
    type Err = NvError;
    fn from_str(s: &str) -> Result<Corruption> {
        let names = || {
            SEVERITIES
                .iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (name, sev) = s.split_once(':').ok_or_else(|| {
            NvError::Config(format!(
                "--corruption {s:?}: expected NAME:SEVERITY, e.g. contrast:3 (names: {})",
                names()
            ))
        })?;
        let key = name.trim().to_ascii_lowercase().replace('_', "-");
        let kind = SEVERITIES
            .iter()
            .find(|r| r.name == key)
            .map(|r| r.kind)
            .ok_or_else(|| {
                NvError::Config(format!(
                    "--corruption {s:?}: unknown corruption {name:?} (known: {})",
                    names()
                ))
            })?;
        Corruption::new(kind, sev.trim().parse::<u8>().unwrap_or(0)).map_err(|_| {
            NvError::Config(format!(
                "--corruption {s:?}: the severity must be an integer from 1 to 5, got {sev:?}"
            ))
        })
    }
}

impl Corruption {
    pub fn new(kind: CorruptionKind, severity: u8) -> Result<Corruption> {
        if !(1..=5).contains(&severity) {
            return Err(NvError::Config(format!(
                "corruption {}: the severity must be from 1 to 5, got {severity}",
                kind.name()
            )));
        }
        Ok(Corruption { kind, severity })
    }

    /// The table's parameter for this severity.
    pub fn param(&self) -> f32 {
        self.kind.param(self.severity)
    }

    /// Corrupts one sample in place: `img` holds `c·h·w` pixels, channel-major. `seed` and `index` (the
    /// sample's index in its data set) fix every random draw.
    pub fn apply(
        &self,
        img: &mut [u8],
        [c, h, w]: [usize; 3],
        seed: u64,
        index: usize,
    ) -> Result<()> {
        if img.len() != c * h * w || img.is_empty() {
            return Err(NvError::Config(format!(
                "corruption: a sample of shape {:?} needs {} pixels, got {}",
                [c, h, w],
                c * h * w,
                img.len()
            )));
        }
        let p = self.param();
        let mut rng = derive_rng(seed, index as u64, self.kind.stream());
        let unit = |v: u8| v as f32 / 255.0;
        let back = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        match self.kind {
            CorruptionKind::Brightness => img.iter_mut().for_each(|v| *v = back(unit(*v) + p)),
            CorruptionKind::Contrast => {
                // the mean over the whole image, all channels, as ImageNet-C does
                let m = img.iter().map(|&v| v as f64).sum::<f64>() / (255.0 * img.len() as f64);
                let m = m as f32;
                img.iter_mut()
                    .for_each(|v| *v = back((unit(*v) - m) * p + m));
            }
            CorruptionKind::GaussianNoise => img.iter_mut().for_each(|v| {
                let z: f32 = StandardNormal.sample(&mut rng);
                *v = back(unit(*v) + p * z)
            }),
            CorruptionKind::Inversion => img
                .iter_mut()
                .for_each(|v| *v = back((1.0 - p) * unit(*v) + p * (1.0 - unit(*v)))),
            CorruptionKind::GaussianBlur => {
                for plane in img.chunks_mut(h * w) {
                    let g = gray(plane, h, w)?;
                    let b = image::imageops::blur(&g, p);
                    plane.copy_from_slice(b.as_raw());
                }
            }
            CorruptionKind::Pixelate => {
                let (nh, nw) = (
                    ((h as f32 * p).round() as usize).max(1),
                    ((w as f32 * p).round() as usize).max(1),
                );
                for plane in img.chunks_mut(h * w) {
                    let small = box_down(plane, h, w, nh, nw);
                    for y in 0..h {
                        for x in 0..w {
                            plane[y * w + x] = small[(y * nh / h) * nw + x * nw / w];
                        }
                    }
                }
            }
            CorruptionKind::Jpeg => jpeg_round_trip(img, [c, h, w], p as u8)?,
            CorruptionKind::Occlusion => {
                let (sh, sw) = (
                    ((h as f32 * p).round() as usize).clamp(1, h),
                    ((w as f32 * p).round() as usize).clamp(1, w),
                );
                let y0 = rng.gen_range(0..=h - sh);
                let x0 = rng.gen_range(0..=w - sw);
                for plane in img.chunks_mut(h * w) {
                    for y in y0..y0 + sh {
                        plane[y * w + x0..y * w + x0 + sw].fill(128);
                    }
                }
            }
        }
        Ok(())
    }

    /// A corrupted in-memory copy of `ds` (a streaming data set is read once, sample by sample), samples in
    /// parallel on the calling thread's rayon pool. Labels and classes are kept.
    pub fn apply_to(&self, ds: &Dataset, seed: u64) -> Result<Dataset> {
        self.apply_to_with_progress(ds, seed, &mut |_| {})
    }

    /// [`Corruption::apply_to`], calling `progress(done)` after each chunk of samples.
    pub fn apply_to_with_progress(
        &self,
        ds: &Dataset,
        seed: u64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Dataset> {
        const CHUNK: usize = 2048;
        let s = ds.sample_len();
        let mut images = vec![0u8; ds.len() * s];
        for (k, block) in images.chunks_mut(CHUNK * s).enumerate() {
            block
                .par_chunks_mut(s)
                .enumerate()
                .try_for_each(|(j, dst)| -> Result<()> {
                    let i = k * CHUNK + j;
                    dst.copy_from_slice(&ds.sample(i)?);
                    self.apply(dst, ds.shape, seed, i)
                })?;
            progress((k * CHUNK + block.len() / s).min(ds.len()));
        }
        Dataset::new(images, ds.labels.clone(), ds.classes.clone(), ds.shape)
    }
}

/// The seed a split is corrupted with: `seed` itself for a test split, a derived one for a training split, so
/// that `corrupt --split both` does not give the two splits the same noise.
pub fn split_seed(seed: u64, train: bool) -> u64 {
    if train {
        crate::rng::mix64(seed ^ 0x0074_7261_696e)
    } else {
        seed
    }
}

fn gray(plane: &[u8], h: usize, w: usize) -> Result<image::GrayImage> {
    image::GrayImage::from_raw(w as u32, h as u32, plane.to_vec())
        .ok_or_else(|| NvError::Config(format!("corruption: a {h}x{w} plane does not fit u32")))
}

/// Box (area) down-sampling of one `h × w` plane to `nh × nw`, as PIL's `Image.BOX` does: each output pixel is
/// the area-weighted mean of the input pixels its footprint covers.
fn box_down(plane: &[u8], h: usize, w: usize, nh: usize, nw: usize) -> Vec<u8> {
    // the overlap of output cell [o·n/m, (o+1)·n/m) with input pixel [i, i+1), in units of 1/m
    let weights = |n: usize, m: usize| -> Vec<Vec<(usize, f64)>> {
        (0..m)
            .map(|o| {
                let (lo, hi) = (o * n, (o + 1) * n); // in units of 1/m
                (lo / m..hi.div_ceil(m))
                    .map(|i| {
                        let a = lo.max(i * m);
                        let b = hi.min((i + 1) * m);
                        (i, (b - a) as f64 / n as f64)
                    })
                    .collect()
            })
            .collect()
    };
    let (wy, wx) = (weights(h, nh), weights(w, nw));
    let mut out = vec![0u8; nh * nw];
    for (oy, ry) in wy.iter().enumerate() {
        for (ox, rx) in wx.iter().enumerate() {
            let mut acc = 0.0;
            for &(iy, fy) in ry {
                for &(ix, fx) in rx {
                    acc += fy * fx * plane[iy * w + ix] as f64;
                }
            }
            out[oy * nw + ox] = acc.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Encodes the sample as JPEG at `quality` and decodes it back: one RGB image for 3 channels, one grayscale
/// image per channel otherwise.
fn jpeg_round_trip(img: &mut [u8], [c, h, w]: [usize; 3], quality: u8) -> Result<()> {
    use image::codecs::jpeg::JpegEncoder;
    use image::ExtendedColorType;
    let err = |e: image::ImageError| NvError::Config(format!("corruption jpeg: {e}"));
    let round_trip = |px: &[u8], color: ExtendedColorType| -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        JpegEncoder::new_with_quality(&mut buf, quality)
            .encode(px, w as u32, h as u32, color)
            .map_err(err)?;
        let dec =
            image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg).map_err(err)?;
        Ok(match color {
            ExtendedColorType::Rgb8 => dec.into_rgb8().into_raw(),
            _ => dec.into_luma8().into_raw(),
        })
    };
    if c == 3 {
        let plane = h * w;
        let mut rgb = vec![0u8; 3 * plane];
        for i in 0..plane {
            for k in 0..3 {
                rgb[3 * i + k] = img[k * plane + i];
            }
        }
        let out = round_trip(&rgb, ExtendedColorType::Rgb8)?;
        for i in 0..plane {
            for k in 0..3 {
                img[k * plane + i] = out[3 * i + k];
            }
        }
    } else {
        for plane in img.chunks_mut(h * w) {
            let out = round_trip(plane, ExtendedColorType::L8)?;
            plane.copy_from_slice(&out);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(h: usize, w: usize) -> Vec<u8> {
        (0..h * w).map(|i| ((i * 37) % 256) as u8).collect()
    }

    #[test]
    fn parses_names_and_refuses_bad_ones() {
        let c: Corruption = "Gaussian_Noise:3".parse().unwrap();
        assert_eq!(c.kind, CorruptionKind::GaussianNoise);
        assert_eq!(c.to_string(), "gaussian-noise:3");
        let m = "fog:2".parse::<Corruption>().unwrap_err().to_string();
        assert!(
            m.contains("unknown corruption \"fog\"") && m.contains("pixelate"),
            "{m}"
        );
        for bad in ["contrast:0", "contrast:6", "contrast:x", "contrast:-1"] {
            let m = bad.parse::<Corruption>().unwrap_err().to_string();
            assert!(m.contains("from 1 to 5"), "{bad}: {m}");
        }
        assert!("contrast"
            .parse::<Corruption>()
            .unwrap_err()
            .to_string()
            .contains("NAME:SEVERITY"));
    }

    #[test]
    fn box_down_averages_areas() {
        // 4 -> 2: pairs; 3 -> 2: [a, b/2] and [b/2, c] weighted by 2/3 and 1/3
        assert_eq!(box_down(&[0, 100, 200, 255], 1, 4, 1, 2), vec![50, 228]);
        let v = box_down(&[30, 90, 150], 1, 3, 1, 2);
        assert_eq!(v, vec![50, 130]); // (30*1 + 90*0.5)/1.5 = 50; (90*0.5+150)/1.5 = 130
        assert_eq!(box_down(&ramp(5, 7), 5, 7, 5, 7), ramp(5, 7));
    }

    #[test]
    fn severities_grow_monotonically_in_damage() {
        let base = ramp(28, 28);
        for kind in CorruptionKind::all() {
            let (mut last, mut first) = (-1.0, 0.0);
            for s in 1..=5 {
                let mut img = base.clone();
                Corruption::new(kind, s)
                    .unwrap()
                    .apply(&mut img, [1, 28, 28], 7, 3)
                    .unwrap();
                let d = img
                    .iter()
                    .zip(&base)
                    .map(|(&a, &b)| (a as f64 - b as f64).abs())
                    .sum::<f64>();
                assert!(d > 0.0, "{kind:?}:{s} changed nothing");
                // JPEG, pixelate and occlusion alias or move with the severity: only their ends are ordered
                let spatial = matches!(
                    kind,
                    CorruptionKind::Occlusion | CorruptionKind::Jpeg | CorruptionKind::Pixelate
                );
                if !spatial {
                    assert!(d >= last, "{kind:?}:{s}: {d} < {last}");
                }
                if s == 1 {
                    first = d;
                }
                last = d;
            }
            assert!(
                last > first,
                "{kind:?}: severity 5 ({last}) no worse than 1 ({first})"
            );
        }
    }
}
