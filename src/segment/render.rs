//! `predict --task segment`: the network's mask for whole images, written beside each input as a colour mask
//! (`NAME.mask.png`: indexed colour in the Pascal VOC palette, so the palette index is the class id and the
//! file is itself a valid mask) and an overlay (`NAME.overlay.png`: the image with each non-background class
//! blended in at half opacity).

use super::metrics::pixel_argmax;
use crate::data::decode::{decode_bytes, to_chw};
use crate::data::Normalization;
use crate::io::scene_files::{encode_png, voc_palette};
use crate::model::Graph;
use crate::{NvError, Result};
use ndarray::{ArrayD, IxDyn};
use std::path::{Path, PathBuf};

/// The class of each pixel of logits (1, K, H, W), as the metrics count it ([`pixel_argmax`]).
pub fn argmax_mask(logits: &ArrayD<f32>) -> Vec<u8> {
    let s = logits.shape();
    let (k, hw) = (s[1], s[2] * s[3]);
    let l = logits.as_slice().expect("standard layout");
    (0..hw).map(|p| pixel_argmax(l, k, hw, p) as u8).collect()
}

/// What [`predict_file`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub overlay: PathBuf,
    /// Pixels per class.
    pub pixels: Vec<u64>,
}

/// Segments the image at `path` (any size) with `graph` and writes its colour mask and overlay beside it.
pub fn predict_file(
    graph: &mut Graph,
    norm: &Normalization,
    classes: usize,
    path: &Path,
) -> Result<Prediction> {
    let bytes = std::fs::read(path).map_err(|e| NvError::io(path, "read", e))?;
    let img = decode_bytes(&bytes, path)?;
    let (h, w, c) = (img.height() as usize, img.width() as usize, norm.mean.len());
    let px = to_chw(&img, c, h, w)?;
    let x: Vec<f32> = px
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let ch = i / (h * w);
            (p as f32 / 255.0 - norm.mean[ch]) / norm.std[ch]
        })
        .collect();
    let x = ArrayD::from_shape_vec(IxDyn(&[1, c, h, w]), x).expect("sizes");
    let logits = graph.infer(&[&x])?.remove(0);
    let mask = argmax_mask(&logits);
    let mut pixels = vec![0u64; classes];
    for &m in &mask {
        pixels[m as usize] += 1;
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let dir = path.parent().unwrap_or(Path::new("."));
    let mask_path = dir.join(format!("{stem}.mask.png"));
    let overlay_path = dir.join(format!("{stem}.overlay.png"));
    let palette = voc_palette();
    let png = encode_png(&mask, w, h, Some(&palette), &mask_path)?;
    crate::io::atomic::write_atomic(&mask_path, &png)?;
    let rgb = img.to_rgb8();
    let mut out = image::RgbImage::new(w as u32, h as u32);
    for (i, (p, o)) in rgb.pixels().zip(out.pixels_mut()).enumerate() {
        let k = mask[i] as usize;
        o.0 = if k == 0 {
            p.0
        } else {
            let col = &palette[3 * k..3 * k + 3];
            [0, 1, 2].map(|j| ((p.0[j] as u16 + col[j] as u16) / 2) as u8)
        };
    }
    let mut buf = std::io::Cursor::new(Vec::new());
    out.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| NvError::Format {
            path: overlay_path.display().to_string(),
            msg: format!("cannot encode PNG: {e}"),
        })?;
    crate::io::atomic::write_atomic(&overlay_path, buf.get_ref())?;
    Ok(Prediction {
        image: path.to_path_buf(),
        mask: mask_path,
        overlay: overlay_path,
        pixels,
    })
}
