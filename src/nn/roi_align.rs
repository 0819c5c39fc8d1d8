//! RoIAlign (He et al., Mask R-CNN), as torchvision's `ops.roi_align(input, rois, output_size, spatial_scale,
//! sampling_ratio, aligned)` computes it on the CPU, operation for operation in the element type (so f32
//! results are torchvision's bits).
//!
//! For a region `[b, x1, y1, x2, y2]` (image index, then corners in input-image pixels):
//! - its corners are scaled by `spatial_scale` and shifted by −0.5 when `aligned` (pixel centres at half
//!   integers); without `aligned`, a region is made at least 1×1 feature pixels;
//! - it is cut into `out_h`×`out_w` bins; each bin averages `g_h`×`g_w` bilinear samples taken at the centres of
//!   a regular grid (`g = sampling_ratio`, or ⌈bin side⌉ when `sampling_ratio ≤ 0`);
//! - a sample more than one pixel outside the map contributes 0; one within is clamped to the map (torchvision's
//!   `bilinear_interpolate`).
//!
//! The backward scatters each output gradient back to the four pixels of each sample with the same weights,
//! divided by the sample count. It runs per (image, channel) plane, visiting the regions in order, so each
//! input gradient accumulates in torchvision's order (deterministic, and bitwise torchvision's in f32).

use crate::{NvError, Real, Result};
use ndarray::{ArrayD, ArrayView2, ArrayViewD, IxDyn};
use rayon::prelude::*;

/// RoIAlign's settings (torchvision's `RoIAlign(output_size, spatial_scale, sampling_ratio, aligned)`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoiAlign {
    /// (out_h, out_w): 7×7 in Faster R-CNN's box head.
    pub output_size: (usize, usize),
    /// Feature-map pixels per input-image pixel (1/stride).
    pub spatial_scale: f64,
    /// Samples per bin side; ≤ 0 means ⌈bin side⌉ (adaptive).
    pub sampling_ratio: i32,
    /// Pixel centres at half-integer coordinates (Detectron2's correction).
    pub aligned: bool,
}

/// One bilinear sample: the four pixel offsets in the plane and their weights (all 0 outside the map).
#[derive(Clone, Copy)]
struct Sample<T> {
    pos: [usize; 4],
    w: [T; 4],
    inside: bool,
}

/// A region's samples: `grid_h·grid_w` per bin, bins in row-major order.
struct RegionPlan<T> {
    batch: usize,
    samples: Vec<Sample<T>>,
    per_bin: usize,
}

impl RoiAlign {
    pub const NAME: &'static str = "RoIAlign";

    /// torchvision's defaults for Faster R-CNN's box head: 7×7, sampling ratio 2, at `spatial_scale`.
    pub fn new(
        output_size: (usize, usize),
        spatial_scale: f64,
        sampling_ratio: i32,
        aligned: bool,
    ) -> Result<Self> {
        if output_size.0 == 0 || output_size.1 == 0 {
            return Err(NvError::Config(format!(
                "{}: output size {output_size:?} has a zero side",
                Self::NAME
            )));
        }
        if !(spatial_scale.is_finite() && spatial_scale > 0.0) {
            return Err(NvError::Config(format!(
                "{}: spatial_scale must be positive and finite, got {spatial_scale}",
                Self::NAME
            )));
        }
        Ok(RoiAlign {
            output_size,
            spatial_scale,
            sampling_ratio,
            aligned,
        })
    }

    fn check(&self, shape: &[usize], rois: &ArrayView2<'_, impl Real>) -> Result<()> {
        if shape.len() != 4 {
            return Err(NvError::Rank {
                layer: Self::NAME,
                expected: "4-D (N, C, H, W)".into(),
                got: shape.to_vec(),
            });
        }
        if rois.ncols() != 5 {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "regions must be (K, 5) [batch, x1, y1, x2, y2], got {:?}",
                    rois.shape()
                ),
            });
        }
        for (k, r) in rois.rows().into_iter().enumerate() {
            let b = r[0].as_f64();
            if !(b >= 0.0 && b.fract() == 0.0 && (b as usize) < shape[0]) {
                return Err(NvError::Shape {
                    layer: Self::NAME,
                    msg: format!(
                        "region {k}: batch index {b} is not an image of the batch of {}",
                        shape[0]
                    ),
                });
            }
            if r.iter().any(|v| !v.as_f64().is_finite()) {
                return Err(NvError::NonFinite(format!(
                    "{}: region {k} has a non-finite coordinate",
                    Self::NAME
                )));
            }
        }
        Ok(())
    }

    /// The samples of region `r` over an `h`×`w` map, computed as torchvision computes them, in `T`.
    fn plan<T: Real>(&self, r: &[T], h: usize, w: usize) -> RegionPlan<T> {
        let (ph_n, pw_n) = self.output_size;
        let scale = T::of_f64(self.spatial_scale);
        let offset = if self.aligned {
            T::of_f64(0.5)
        } else {
            T::zero()
        };
        let start_w = r[1] * scale - offset;
        let start_h = r[2] * scale - offset;
        let end_w = r[3] * scale - offset;
        let end_h = r[4] * scale - offset;
        let (mut roi_w, mut roi_h) = (end_w - start_w, end_h - start_h);
        if !self.aligned {
            roi_w = roi_w.max(T::one());
            roi_h = roi_h.max(T::one());
        }
        let bin_h = roi_h / T::from_usize(ph_n);
        let bin_w = roi_w / T::from_usize(pw_n);
        let (gh, gw) = if self.sampling_ratio > 0 {
            (self.sampling_ratio as usize, self.sampling_ratio as usize)
        } else {
            (
                (roi_h / T::from_usize(ph_n)).ceil().as_f64().max(0.0) as usize,
                (roi_w / T::from_usize(pw_n)).ceil().as_f64().max(0.0) as usize,
            )
        };
        let (hf, wf) = (T::from_usize(h), T::from_usize(w));
        let mut samples = Vec::with_capacity(ph_n * pw_n * gh * gw);
        for ph in 0..ph_n {
            for pw in 0..pw_n {
                for iy in 0..gh {
                    let yy = start_h
                        + T::from_usize(ph) * bin_h
                        + T::of_f64(iy as f64 + 0.5) * bin_h / T::from_usize(gh);
                    for ix in 0..gw {
                        let xx = start_w
                            + T::from_usize(pw) * bin_w
                            + T::of_f64(ix as f64 + 0.5) * bin_w / T::from_usize(gw);
                        samples.push(bilinear(yy, xx, h, w, hf, wf));
                    }
                }
            }
        }
        RegionPlan {
            batch: r[0].as_f64() as usize,
            samples,
            per_bin: gh * gw,
        }
    }

    /// The samples of every region.
    fn plans<T: Real>(&self, rois: &ArrayView2<'_, T>, h: usize, w: usize) -> Vec<RegionPlan<T>> {
        rois.rows()
            .into_iter()
            .map(|r| self.plan(&r.to_vec(), h, w))
            .collect()
    }

    /// The pooled features of each region: `x` is (N, C, H, W), `rois` is (K, 5); the output is
    /// (K, C, out_h, out_w).
    pub fn forward<T: Real>(
        &self,
        x: &ArrayViewD<'_, T>,
        rois: &ArrayView2<'_, T>,
    ) -> Result<ArrayD<T>> {
        self.check(x.shape(), rois)?;
        let (c, h, w) = (x.shape()[1], x.shape()[2], x.shape()[3]);
        let (ph_n, pw_n) = self.output_size;
        let k_n = rois.nrows();
        let x = x.as_standard_layout();
        let xs = x.as_slice().expect("standard layout");
        let plans = self.plans(rois, h, w);
        let bins = ph_n * pw_n;
        let mut out = vec![T::zero(); k_n * c * bins];
        if !out.is_empty() {
            out.par_chunks_mut(bins).enumerate().for_each(|(kc, o)| {
                let (k, ch) = (kc / c, kc % c);
                let p = &plans[k];
                let plane = &xs[(p.batch * c + ch) * h * w..][..h * w];
                let count = T::from_usize(p.per_bin.max(1));
                for (b, ob) in o.iter_mut().enumerate() {
                    let mut v = T::zero();
                    for s in &p.samples[b * p.per_bin..(b + 1) * p.per_bin] {
                        v = v
                            + (s.w[0] * plane[s.pos[0]]
                                + s.w[1] * plane[s.pos[1]]
                                + s.w[2] * plane[s.pos[2]]
                                + s.w[3] * plane[s.pos[3]]);
                    }
                    *ob = v / count;
                }
            });
        }
        Ok(ArrayD::from_shape_vec(IxDyn(&[k_n, c, ph_n, pw_n]), out).expect("shape"))
    }

    /// The gradient with respect to the features (shaped `input_shape`), given the output gradient `dy`
    /// (K, C, out_h, out_w) of [`RoiAlign::forward`] on the same regions. Regions get no gradient (torchvision
    /// does not differentiate through them either).
    pub fn backward<T: Real>(
        &self,
        dy: &ArrayViewD<'_, T>,
        rois: &ArrayView2<'_, T>,
        input_shape: &[usize],
    ) -> Result<ArrayD<T>> {
        self.check(input_shape, rois)?;
        let (n, c, h, w) = (
            input_shape[0],
            input_shape[1],
            input_shape[2],
            input_shape[3],
        );
        let (ph_n, pw_n) = self.output_size;
        let want = [rois.nrows(), c, ph_n, pw_n];
        if dy.shape() != want {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!("output gradient {:?}, expected {want:?}", dy.shape()),
            });
        }
        let dy = dy.as_standard_layout();
        let g = dy.as_slice().expect("standard layout");
        let plans = self.plans(rois, h, w);
        let bins = ph_n * pw_n;
        let mut dx = vec![T::zero(); n * c * h * w];
        if !dx.is_empty() {
            dx.par_chunks_mut(h * w)
                .enumerate()
                .for_each(|(bc, plane)| {
                    let (b, ch) = (bc / c, bc % c);
                    for (k, p) in plans.iter().enumerate() {
                        if p.batch != b {
                            continue;
                        }
                        // torchvision's backward divides by the plain count (no max with 1: an empty grid has
                        // no samples to divide)
                        let count = T::from_usize(p.per_bin);
                        let gk = &g[(k * c + ch) * bins..][..bins];
                        for (bin, &gb) in gk.iter().enumerate() {
                            for s in &p.samples[bin * p.per_bin..(bin + 1) * p.per_bin] {
                                if !s.inside {
                                    continue;
                                }
                                for q in 0..4 {
                                    plane[s.pos[q]] = plane[s.pos[q]] + gb * s.w[q] / count;
                                }
                            }
                        }
                    }
                });
        }
        Ok(ArrayD::from_shape_vec(IxDyn(input_shape), dx).expect("shape"))
    }
}

/// torchvision's `bilinear_interpolate` (and its gradient twin): the four pixels and weights of the sample at
/// (y, x) on an `h`×`w` map.
fn bilinear<T: Real>(y: T, x: T, h: usize, w: usize, hf: T, wf: T) -> Sample<T> {
    let neg1 = -T::one();
    if y < neg1 || y > hf || x < neg1 || x > wf {
        return Sample {
            pos: [0; 4],
            w: [T::zero(); 4],
            inside: false,
        };
    }
    let (mut y, mut x) = (y, x);
    if y <= T::zero() {
        y = T::zero();
    }
    if x <= T::zero() {
        x = T::zero();
    }
    let (mut y_lo, mut x_lo) = (y.as_f64() as usize, x.as_f64() as usize);
    let (y_hi, x_hi);
    if y_lo >= h - 1 {
        y_lo = h - 1;
        y_hi = h - 1;
        y = T::from_usize(y_lo);
    } else {
        y_hi = y_lo + 1;
    }
    if x_lo >= w - 1 {
        x_lo = w - 1;
        x_hi = w - 1;
        x = T::from_usize(x_lo);
    } else {
        x_hi = x_lo + 1;
    }
    let ly = y - T::from_usize(y_lo);
    let lx = x - T::from_usize(x_lo);
    let (hy, hx) = (T::one() - ly, T::one() - lx);
    Sample {
        pos: [
            y_lo * w + x_lo,
            y_lo * w + x_hi,
            y_hi * w + x_lo,
            y_hi * w + x_hi,
        ],
        w: [hy * hx, hy * lx, ly * hx, ly * lx],
        inside: true,
    }
}
