//! Garment scenes made from Fashion-MNIST, for segmentation and detection. Training can draw them on the fly
//! from a [`SceneGenerator`]; [`crate::io::scene_files`] streams them to disk as PNG images, Pascal-VOC-palette
//! masks and a COCO `annotations.json`.
//!
//! A scene: a textured background with 1-4 garments from a grayscale source dataset (Fashion-MNIST)
//! pasted over it, and its labels.
//!
//! - **Garments.** Each is a source image (from the train split for train scenes, the test split for test
//!   scenes), scaled by a factor drawn uniformly in [0.75, 1.5] (bilinear resampling), placed at a uniform
//!   position that keeps it inside the canvas, and drawn in the order drawn (so the z-order is random). A
//!   garment's pixel value v is its ink: it covers what is below with opacity a = v / 255 and colour v.
//! - **Background.** Low-frequency noise (a random 5×5 grid, bilinearly up-sampled) plus a linear gradient in a
//!   random direction, mapped to a random intensity range inside [0, 200]: garments and background overlap in
//!   intensity, so segmenting is more than thresholding.
//! - **Labels.** At each pixel the garment on top is the last drawn whose opacity there is at least
//!   [`EDGE`] (0.1); below that a garment is transparent. Where that garment's opacity is at least [`VISIBLE`]
//!   (0.5) its ink is visible and the pixel takes its class + 1; between the two it is the garment's
//!   anti-aliased edge and takes [`IGNORE`] (255). Elsewhere: background, 0. So 11 classes.
//! - **Objects** (for detection): a garment's visible pixels are those its class labels; its box is their extent
//!   and its area their count. A garment with fewer than [`MIN_VISIBLE`] (25%) of its own ink pixels visible
//!   (hidden beyond 75%) is left out of the objects (its visible pixels keep their labels).
//!
//! Scene `i` of seed `s` is a pure function of (source, size, s, i): its random draws come from
//! [`derive_rng`]`(s, i, 0)` only.

use crate::data::Dataset;
use crate::rng::derive_rng;
use crate::{NvError, Result};
use rand::Rng;
use std::sync::Arc;

/// Opacity from which a garment's ink is visible (its pixels take its class).
pub const VISIBLE: f32 = 0.5;
/// Opacity from which a garment covers what is below (between `EDGE` and `VISIBLE`: its edge, ignored).
pub const EDGE: f32 = 0.1;
/// The mask value of pixels a loss and mIoU ignore (the garments' anti-aliased edges).
pub const IGNORE: u8 = 255;
/// The least fraction of a garment's own ink pixels that must stay visible for it to be an object.
pub const MIN_VISIBLE: f64 = 0.25;
/// The smallest canvas: a garment at the largest scale (42 pixels) must fit.
pub const MIN_SIZE: usize = 42;
/// The most garments in a scene.
pub const MAX_GARMENTS: usize = 4;

/// The garment scenes' class names: background, then the source data set's (Fashion-MNIST's ten).
pub fn scene_classes(names: &[String]) -> Vec<String> {
    std::iter::once("background".to_string())
        .chain(names.iter().cloned())
        .collect()
}

/// A garment of a scene that stays visible enough to be an object.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SceneObject {
    /// Its index in the scene's drawing order ([`Scene::garments`], [`Scene::owner`]).
    pub garment: usize,
    /// The source class (0-based; the mask holds class + 1).
    pub class: usize,
    /// The visible extent: x, y, width, height in pixels (COCO's `bbox`).
    pub bbox: [usize; 4],
    /// Visible pixels.
    pub area: usize,
    /// Visible pixels over the garment's own ink pixels.
    pub visible_fraction: f64,
    /// The source sample it was drawn from, and the scale.
    pub source_index: usize,
    pub scale: f64,
}

/// One scene: the `size`×`size` grayscale image, its class mask, and its objects.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub size: usize,
    pub image: Vec<u8>,
    /// Class + 1 of the garment whose ink is visible, 0 for background, [`IGNORE`] on edges.
    pub mask: Vec<u8>,
    /// For each pixel, the index (in drawing order) of the garment whose ink is visible there, if any.
    pub owner: Vec<Option<u8>>,
    /// The garments drawn, in drawing order: (source index, class, scale, left, top, side).
    pub garments: Vec<(usize, usize, f64, usize, usize, usize)>,
    pub objects: Vec<SceneObject>,
}

/// Generates scenes from a grayscale source dataset (1×28×28, e.g. Fashion-MNIST's train or test split).
#[derive(Debug, Clone)]
pub struct SceneGenerator {
    source: Arc<Dataset>,
    size: usize,
    seed: u64,
}

impl SceneGenerator {
    /// Scenes of `size`×`size` pixels drawn from `source` with `seed`.
    pub fn new(source: Arc<Dataset>, size: usize, seed: u64) -> Result<Self> {
        if source.shape[0] != 1 {
            return Err(NvError::Config(format!(
                "scenes: the source images must be grayscale (1 channel), these have {}",
                source.shape[0]
            )));
        }
        if source.is_empty() {
            return Err(NvError::Config(
                "scenes: the source dataset is empty".into(),
            ));
        }
        if !(MIN_SIZE..=4096).contains(&size) {
            return Err(NvError::Config(format!(
                "scenes: --size must be in {MIN_SIZE}..=4096 pixels (a garment at scale 1.5 is 42 pixels wide), got {size}"
            )));
        }
        Ok(SceneGenerator { source, size, seed })
    }
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// The source's class names (the mask's class k + 1 is `classes()[k]`).
    pub fn classes(&self) -> &[String] {
        &self.source.classes
    }

    /// Scene `index`.
    pub fn scene(&self, index: u64) -> Result<Scene> {
        let n = self.size;
        let mut rng = derive_rng(self.seed, index, 0);
        let mut img = background(n, &mut rng);
        let [_, sh, sw] = self.source.shape;
        let k = 1 + rng.gen_range(0..MAX_GARMENTS);
        // per garment: its opacity over the canvas (0 outside it)
        let mut alphas: Vec<Vec<f32>> = Vec::with_capacity(k);
        let mut garments = Vec::with_capacity(k);
        for _ in 0..k {
            let j = rng.gen_range(0..self.source.len());
            let scale: f64 = rng.gen_range(0.75..=1.5);
            let side_h = ((sh as f64 * scale).round() as usize).clamp(1, n);
            let side_w = ((sw as f64 * scale).round() as usize).clamp(1, n);
            let top = rng.gen_range(0..=n - side_h);
            let left = rng.gen_range(0..=n - side_w);
            let src = self.source.sample(j)?;
            let patch = resize_bilinear(&src, sh, sw, side_h, side_w);
            let mut a = vec![0f32; n * n];
            for y in 0..side_h {
                for x in 0..side_w {
                    let v = patch[y * side_w + x];
                    let p = (top + y) * n + left + x;
                    let op = v / 255.0;
                    a[p] = op;
                    img[p] = op * v + (1.0 - op) * img[p];
                }
            }
            alphas.push(a);
            garments.push((j, self.source.labels[j], scale, left, top, side_w));
        }
        let mut mask = vec![0u8; n * n];
        let mut owner = vec![None; n * n];
        for p in 0..n * n {
            if let Some(g) = (0..k).rev().find(|&g| alphas[g][p] >= EDGE) {
                if alphas[g][p] >= VISIBLE {
                    mask[p] = garments[g].1 as u8 + 1;
                    owner[p] = Some(g as u8);
                } else {
                    mask[p] = IGNORE;
                }
            }
        }
        let mut objects = vec![];
        for (g, &(j, class, scale, ..)) in garments.iter().enumerate() {
            let own = alphas[g].iter().filter(|&&a| a >= VISIBLE).count();
            let (mut x0, mut y0, mut x1, mut y1, mut area) = (usize::MAX, usize::MAX, 0, 0, 0);
            for (p, _) in owner
                .iter()
                .enumerate()
                .filter(|(_, o)| **o == Some(g as u8))
            {
                let (y, x) = (p / n, p % n);
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                area += 1;
            }
            let frac = if own == 0 {
                0.0
            } else {
                area as f64 / own as f64
            };
            if area > 0 && frac >= MIN_VISIBLE {
                objects.push(SceneObject {
                    garment: g,
                    class,
                    bbox: [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                    area,
                    visible_fraction: frac,
                    source_index: j,
                    scale,
                });
            }
        }
        Ok(Scene {
            size: n,
            image: img
                .iter()
                .map(|&v| v.round().clamp(0.0, 255.0) as u8)
                .collect(),
            mask,
            owner,
            garments,
            objects,
        })
    }
}

/// A `n`×`n` background: a random 5×5 grid bilinearly up-sampled, plus a linear gradient in a random direction,
/// mapped to a random intensity range [lo, hi] with 0 ≤ lo, hi ≤ 200 and hi − lo ≥ 40.
fn background(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    const G: usize = 5;
    let grid: Vec<f32> = (0..G * G).map(|_| rng.gen::<f32>()).collect();
    let noise = resize_bilinear_f32(&grid, G, G, n, n);
    let angle: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    let mix: f32 = rng.gen_range(0.2..0.8);
    let lo: f32 = rng.gen_range(0.0..120.0);
    let hi: f32 = rng.gen_range(lo + 40.0..=200.0);
    let mut out = vec![0f32; n * n];
    let c = (n as f32 - 1.0) / 2.0;
    let r = (n as f32 / 2.0).max(1.0) * std::f32::consts::SQRT_2;
    for y in 0..n {
        for x in 0..n {
            let g = 0.5 + 0.5 * ((x as f32 - c) * dx + (y as f32 - c) * dy) / r;
            let t = (1.0 - mix) * noise[y * n + x] + mix * g;
            out[y * n + x] = lo + (hi - lo) * t.clamp(0.0, 1.0);
        }
    }
    out
}

/// Bilinear resampling of an `h`×`w` u8 image to `oh`×`ow` (pixel centres aligned, as PyTorch's
/// `interpolate(..., align_corners=False)` without antialiasing), as f32.
fn resize_bilinear(src: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let f: Vec<f32> = src.iter().map(|&v| v as f32).collect();
    resize_bilinear_f32(&f, h, w, oh, ow)
}

fn resize_bilinear_f32(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let src_coord = |o: usize, out: usize, inp: usize| {
        let s = ((o as f32 + 0.5) * inp as f32 / out as f32 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        (i0, i1, s - i0 as f32)
    };
    let mut out = vec![0f32; oh * ow];
    for y in 0..oh {
        let (y0, y1, fy) = src_coord(y, oh, h);
        for x in 0..ow {
            let (x0, x1, fx) = src_coord(x, ow, w);
            let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
            let bot = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
            out[y * ow + x] = top * (1.0 - fy) + bot * fy;
        }
    }
    out
}
