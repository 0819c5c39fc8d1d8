//! Anchors, as torchvision's `AnchorGenerator` makes them for one feature map.
//!
//! - Cell anchors: for each aspect ratio r (h/w) and size s, a box of width s/√r and height s·√r centred on
//!   0, its corners rounded half to even: `round([-w, -h, w, h] / 2)`. Ratio-major order.
//! - Grid: the cell anchors shifted to every feature location, `(x·stride_w, y·stride_h)` with
//!   `stride = image side // map side` (the top-left pixel of the cell, not its centre, as in torchvision);
//!   location-major order (row by row), then the cell anchors.

use super::boxes::BoxF;
use crate::{NvError, Result};

/// Anchor sizes (pixels, the side of the square anchor) and aspect ratios (height / width) at one level.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AnchorGenerator {
    pub sizes: Vec<f32>,
    pub aspect_ratios: Vec<f32>,
}

impl AnchorGenerator {
    pub fn new(sizes: Vec<f32>, aspect_ratios: Vec<f32>) -> Result<AnchorGenerator> {
        if sizes.is_empty() || aspect_ratios.is_empty() {
            return Err(NvError::Config(
                "anchors: need at least one size and one aspect ratio".into(),
            ));
        }
        if sizes
            .iter()
            .chain(&aspect_ratios)
            .any(|v| !(v.is_finite() && *v > 0.0))
        {
            return Err(NvError::Config(format!(
                "anchors: sizes {sizes:?} and aspect ratios {aspect_ratios:?} must be positive"
            )));
        }
        Ok(AnchorGenerator {
            sizes,
            aspect_ratios,
        })
    }

    /// Anchors per feature location.
    pub fn per_location(&self) -> usize {
        self.sizes.len() * self.aspect_ratios.len()
    }

    /// The anchors centred on 0 (torchvision's `generate_anchors`).
    pub fn cell_anchors(&self) -> Vec<BoxF> {
        let mut out = Vec::with_capacity(self.per_location());
        for &r in &self.aspect_ratios {
            let hr = r.sqrt();
            let wr = 1.0 / hr;
            for &s in &self.sizes {
                let (w, h) = (wr * s, hr * s);
                out.push([
                    (-w / 2.0).round_ties_even(),
                    (-h / 2.0).round_ties_even(),
                    (w / 2.0).round_ties_even(),
                    (h / 2.0).round_ties_even(),
                ]);
            }
        }
        out
    }

    /// Every anchor of a `map_h`×`map_w` feature map of an `image_h`×`image_w` (padded) batch.
    pub fn grid(&self, map_h: usize, map_w: usize, image_h: usize, image_w: usize) -> Vec<BoxF> {
        let cells = self.cell_anchors();
        let (sh, sw) = (image_h / map_h.max(1), image_w / map_w.max(1));
        let mut out = Vec::with_capacity(map_h * map_w * cells.len());
        for y in 0..map_h {
            for x in 0..map_w {
                let (ox, oy) = ((x * sw) as f32, (y * sh) as f32);
                for c in &cells {
                    out.push([ox + c[0], oy + c[1], ox + c[2], oy + c[3]]);
                }
            }
        }
        out
    }
}
