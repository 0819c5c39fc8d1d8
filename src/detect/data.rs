//! Detection data: garment scenes drawn on the fly ([`SceneGenerator`]), or a COCO `annotations.json` with its
//! image directory. Batches are normalized per channel, zero-padded (after normalization, as torchvision's
//! `GeneralizedRCNNTransform` pads) to the batch's largest size rounded up to the stride, and optionally
//! flipped left-right with their boxes (each flip a function of (seed, epoch, sample)).

use super::boxes::BoxF;
use super::coco::{CocoAnnotation, CocoCategory, CocoDataset, CocoImage};
use super::detector::Target;
use crate::data::decode::{decode_file, to_chw};
use crate::data::scenes::SceneGenerator;
use crate::data::Normalization;
use crate::rng::derive_rng;
use crate::{NvError, Result};
use ndarray::{ArrayD, IxDyn};
use rand::Rng;
use std::path::{Path, PathBuf};

/// One image and its ground truth.
#[derive(Debug, Clone, PartialEq)]
pub struct DetSample {
    /// C×H×W bytes.
    pub pixels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub target: Target,
    /// Its id in [`DetSource::ground_truth`].
    pub image_id: i64,
}

/// Where detection images come from.
pub enum DetSource {
    /// Scenes `0..count` of a generator (grayscale).
    Scenes { gen: SceneGenerator, count: usize },
    /// A COCO data set: `annotations.json` and the directory its `file_name`s are relative to. Crowd
    /// annotations are not training targets (torchvision's references drop them too) but stay in the ground
    /// truth for evaluation.
    Coco {
        data: CocoDataset,
        images: PathBuf,
        channels: usize,
        /// What was mended at load (boxes sticking out of their image, clipped), for the caller to show.
        warnings: Vec<String>,
    },
}

impl DetSource {
    /// Scenes of `gen`, `count` of them.
    pub fn scenes(gen: SceneGenerator, count: usize) -> Result<DetSource> {
        if count == 0 {
            return Err(NvError::Config(
                "detection: the scene count must be at least 1".into(),
            ));
        }
        Ok(DetSource::Scenes { gen, count })
    }

    /// A COCO data set; `channels` 1 reads images as grayscale, 3 as RGB. Checked at load, with errors that
    /// name the file and the annotation: every image file must exist; a box of zero area, or wholly outside its
    /// image (when the image's size is given), is an error; a box that sticks out of its image is clipped to
    /// it, with a warning ([`DetSource::warnings`]), as real COCO files need. Crowd annotations are kept for
    /// evaluation only and are not checked.
    pub fn coco(annotations: &Path, images: &Path, channels: usize) -> Result<DetSource> {
        if channels != 1 && channels != 3 {
            return Err(NvError::Config(format!(
                "detection: images have 1 or 3 channels, not {channels}"
            )));
        }
        let mut data = CocoDataset::load(annotations)?;
        let bad = |msg: String| NvError::Format {
            path: annotations.display().to_string(),
            msg,
        };
        if data.images.is_empty() || data.categories.is_empty() {
            return Err(bad("no images or no categories".into()));
        }
        for im in &data.images {
            if im.file_name.is_empty() {
                return Err(bad(format!("image {} has no file_name", im.id)));
            }
            let p = images.join(&im.file_name);
            if !p.is_file() {
                return Err(bad(format!(
                    "image {} names {}, which does not exist",
                    im.id,
                    p.display()
                )));
            }
        }
        let warnings = check_annotations(&mut data, annotations)?;
        Ok(DetSource::Coco {
            data,
            images: images.to_path_buf(),
            channels,
            warnings,
        })
    }

    /// What was mended at load (see [`DetSource::coco`]).
    pub fn warnings(&self) -> &[String] {
        match self {
            DetSource::Coco { warnings, .. } => warnings,
            DetSource::Scenes { .. } => &[],
        }
    }

    pub fn len(&self) -> usize {
        match self {
            DetSource::Scenes { count, .. } => *count,
            DetSource::Coco { data, .. } => data.images.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn channels(&self) -> usize {
        match self {
            DetSource::Scenes { .. } => 1,
            DetSource::Coco { channels, .. } => *channels,
        }
    }

    /// Category names in label order (label k + 1 is the k-th; 0 is background).
    pub fn class_names(&self) -> Vec<String> {
        match self {
            DetSource::Scenes { gen, .. } => gen.classes().to_vec(),
            DetSource::Coco { data, .. } => sorted_categories(data)
                .iter()
                .map(|c| c.name.clone())
                .collect(),
        }
    }

    /// The COCO category id of each label (index = label − 1).
    pub fn category_ids(&self) -> Vec<i64> {
        match self {
            DetSource::Scenes { gen, .. } => (1..=gen.classes().len() as i64).collect(),
            DetSource::Coco { data, .. } => sorted_categories(data).iter().map(|c| c.id).collect(),
        }
    }

    /// Sample `i`.
    pub fn sample(&self, i: usize) -> Result<DetSample> {
        match self {
            DetSource::Scenes { gen, .. } => {
                let s = gen.scene(i as u64)?;
                let n = s.size;
                let target = Target {
                    boxes: s
                        .objects
                        .iter()
                        .map(|o| {
                            let [x, y, w, h] = o.bbox.map(|v| v as f32);
                            [x, y, x + w, y + h]
                        })
                        .collect(),
                    labels: s.objects.iter().map(|o| o.class + 1).collect(),
                };
                Ok(DetSample {
                    pixels: s.image,
                    channels: 1,
                    height: n,
                    width: n,
                    target,
                    image_id: i as i64,
                })
            }
            DetSource::Coco {
                data,
                images,
                channels,
                ..
            } => {
                let im = &data.images[i];
                let img = decode_file(&images.join(&im.file_name))?;
                let (w, h) = (img.width() as usize, img.height() as usize);
                let pixels = to_chw(&img, *channels, h, w)?;
                let labels = label_map(data);
                let mut target = Target::default();
                let (wf, hf) = (w as f32, h as f32);
                for a in data
                    .annotations
                    .iter()
                    .filter(|a| a.image_id == im.id && !a.iscrowd)
                {
                    let [x, y, bw, bh] = a.bbox.map(|v| v as f32);
                    // clipped to the decoded image (its size may be missing from the annotations)
                    let b = [x.max(0.0), y.max(0.0), (x + bw).min(wf), (y + bh).min(hf)];
                    if b[2] - b[0] < 1e-3 || b[3] - b[1] < 1e-3 {
                        continue;
                    }
                    target.boxes.push(b);
                    target.labels.push(labels[&a.category_id]);
                }
                Ok(DetSample {
                    pixels,
                    channels: *channels,
                    height: h,
                    width: w,
                    target,
                    image_id: im.id,
                })
            }
        }
    }

    /// The ground truth in COCO form, for [`super::coco_eval::evaluate`].
    pub fn ground_truth(&self) -> Result<CocoDataset> {
        match self {
            DetSource::Coco { data, .. } => Ok(data.clone()),
            DetSource::Scenes { gen, count } => {
                let mut ds = CocoDataset {
                    categories: gen
                        .classes()
                        .iter()
                        .enumerate()
                        .map(|(k, n)| CocoCategory {
                            id: k as i64 + 1,
                            name: n.clone(),
                        })
                        .collect(),
                    ..Default::default()
                };
                let mut next = 1;
                for i in 0..*count {
                    let s = gen.scene(i as u64)?;
                    ds.images.push(CocoImage {
                        id: i as i64,
                        file_name: format!("{i:06}.png"),
                        width: s.size,
                        height: s.size,
                    });
                    for o in &s.objects {
                        ds.annotations.push(CocoAnnotation {
                            id: next,
                            image_id: i as i64,
                            category_id: o.class as i64 + 1,
                            bbox: o.bbox.map(|v| v as f64),
                            area: o.area as f64,
                            iscrowd: false,
                        });
                        next += 1;
                    }
                }
                Ok(ds)
            }
        }
    }
}

fn sorted_categories(data: &CocoDataset) -> Vec<CocoCategory> {
    let mut c = data.categories.clone();
    c.sort_by_key(|c| c.id);
    c
}

fn label_map(data: &CocoDataset) -> std::collections::HashMap<i64, usize> {
    sorted_categories(data)
        .iter()
        .enumerate()
        .map(|(k, c)| (c.id, k + 1))
        .collect()
}

/// The checks [`DetSource::coco`] makes of a COCO data set's boxes, `path` naming it in errors: a non-crowd box
/// of zero area, or wholly outside its image (when the image's size is given), is an error naming the
/// annotation; a box that sticks out of its image is clipped to it, and the returned warnings name each one.
pub fn check_annotations(data: &mut CocoDataset, path: &Path) -> Result<Vec<String>> {
    let bad = |msg: String| NvError::Format {
        path: path.display().to_string(),
        msg,
    };
    let sizes: std::collections::HashMap<i64, (f64, f64)> = data
        .images
        .iter()
        .map(|im| (im.id, (im.width as f64, im.height as f64)))
        .collect();
    let mut warnings = vec![];
    for (k, a) in data.annotations.iter_mut().enumerate() {
        if a.iscrowd {
            continue;
        }
        let [x, y, w, h] = a.bbox;
        if w <= 0.0 || h <= 0.0 {
            return Err(bad(format!(
                "annotations[{k}] (id {}): the box {:?} has zero area",
                a.id, a.bbox
            )));
        }
        let Some(&(iw, ih)) = sizes.get(&a.image_id) else {
            return Err(bad(format!(
                "annotations[{k}] (id {}): image_id {} is not in \"images\"",
                a.id, a.image_id
            )));
        };
        if iw <= 0.0 || ih <= 0.0 {
            continue; // no size given: clipped to the decoded image when read
        }
        if x >= iw || y >= ih || x + w <= 0.0 || y + h <= 0.0 {
            return Err(bad(format!(
                "annotations[{k}] (id {}): the box {:?} lies wholly outside its {iw}x{ih} image {}",
                a.id, a.bbox, a.image_id
            )));
        }
        let (x1, y1) = (x.max(0.0), y.max(0.0));
        let (x2, y2) = ((x + w).min(iw), (y + h).min(ih));
        if (x1, y1, x2, y2) != (x, y, x + w, y + h) {
            warnings.push(format!(
                "annotations[{k}] (id {}): the box {:?} sticks out of its {iw}x{ih} image; clipped",
                a.id, a.bbox
            ));
            a.bbox = [x1, y1, x2 - x1, y2 - y1];
        }
    }
    Ok(warnings)
}

/// Per-channel mean and std of pixel / 255 over the first `limit` samples.
pub fn normalization(src: &DetSource, limit: usize) -> Result<Normalization> {
    let c = src.channels();
    let (mut s, mut s2, mut n) = (vec![0f64; c], vec![0f64; c], vec![0f64; c]);
    for i in 0..src.len().min(limit.max(1)) {
        let smp = src.sample(i)?;
        let plane = smp.height * smp.width;
        for ch in 0..c {
            for &v in &smp.pixels[ch * plane..(ch + 1) * plane] {
                let x = v as f64 / 255.0;
                s[ch] += x;
                s2[ch] += x * x;
            }
            n[ch] += plane as f64;
        }
    }
    let mean: Vec<f32> = (0..c).map(|k| (s[k] / n[k]) as f32).collect();
    let std: Vec<f32> = (0..c)
        .map(|k| {
            let m = s[k] / n[k];
            ((s2[k] / n[k] - m * m).max(1e-12).sqrt()) as f32
        })
        .collect();
    Normalization::new(mean, std)
}

/// A batch of samples as normalized, zero-padded (N, C, H, W) images and their targets; with `flip`, each
/// sample is mirrored left-right with probability ½ from `(seed, epoch, sample index)`.
pub fn batch(
    samples: &[(usize, DetSample)],
    norm: &Normalization,
    stride: usize,
    flip: Option<(u64, u64)>,
) -> (ArrayD<f32>, Vec<Target>) {
    let c = samples.first().map_or(1, |s| s.1.channels);
    let round = |v: usize| v.div_ceil(stride) * stride;
    let h = round(samples.iter().map(|s| s.1.height).max().unwrap_or(stride));
    let w = round(samples.iter().map(|s| s.1.width).max().unwrap_or(stride));
    let mut x = ArrayD::<f32>::zeros(IxDyn(&[samples.len(), c, h, w]));
    let mut targets = Vec::with_capacity(samples.len());
    let xs = x.as_slice_mut().expect("contiguous");
    for (n, (idx, s)) in samples.iter().enumerate() {
        let mirrored = flip.is_some_and(|(seed, epoch)| {
            derive_rng(seed, epoch, *idx as u64 ^ (3 << 40)).gen_bool(0.5)
        });
        for ch in 0..c {
            let (m, sd) = (norm.mean[ch], norm.std[ch]);
            for y in 0..s.height {
                for xx in 0..s.width {
                    let src = s.pixels[(ch * s.height + y) * s.width + xx] as f32 / 255.0;
                    let dx = if mirrored { s.width - 1 - xx } else { xx };
                    xs[((n * c + ch) * h + y) * w + dx] = (src - m) / sd;
                }
            }
        }
        let mut t = s.target.clone();
        if mirrored {
            let wf = s.width as f32;
            for b in &mut t.boxes {
                *b = [wf - b[2], b[1], wf - b[0], b[3]];
            }
        }
        targets.push(t);
    }
    (x, targets)
}

/// The boxes of `t` as COCO's `[x, y, w, h]`.
pub fn to_xywh(b: &BoxF) -> [f64; 4] {
    [
        b[0] as f64,
        b[1] as f64,
        (b[2] - b[0]) as f64,
        (b[3] - b[1]) as f64,
    ]
}
