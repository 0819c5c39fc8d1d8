//! Bilinear up- (or down-) sampling of (N, C, H, W) maps, as PyTorch's `F.interpolate(x, size=..., or
//! scale_factor=..., mode="bilinear", align_corners=...)` without antialiasing.
//!
//! Each output coordinate d maps to a source coordinate s (PyTorch's `area_pixel_compute_source_index`):
//! - `align_corners = true`: s = d · (in − 1)/(out − 1) (0 when out = 1): the corner pixels' centres align;
//! - `align_corners = false`: s = max(0, (d + 0.5) · scale − 0.5) with scale = in/out, or 1/scale_factor when
//!   a scale factor was given: the corners of the pixel grids align.
//!
//! Then i0 = ⌊s⌋, i1 = min(i0 + 1, in − 1), and the output is the bilinear mix of the four pixels with weights
//! (1 − λ, λ), λ = s − i0, per axis, computed as PyTorch does (the row mix of the column mixes). The backward
//! scatters dy back with the same weights; its sums run over each plane in order (deterministic).

use crate::kernels::shape::check_output_grad;
use crate::kernels::shape::contiguous as cont;
use crate::kernels::shape::{check_nonempty, check_rank};
use crate::layer::Layer;
use crate::nn::stateless;
use crate::{Ctx, NvError, Real, Result};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

/// The output size, as a size or a scale factor.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum UpsampleSize {
    /// (out_h, out_w).
    Size(usize, usize),
    /// (scale_h, scale_w): out = ⌊in · scale⌋.
    Scale(f64, f64),
}

/// Bilinear resampling of (N, C, H, W) maps ([`UpsampleSize`], `align_corners`).
#[derive(Debug, Clone)]
pub struct UpsampleBilinear<T: Real = f32> {
    size: UpsampleSize,
    align_corners: bool,
    _t: std::marker::PhantomData<T>,
}

/// One axis's source pixels and weights: for each output coordinate (i0, i1, λ).
type AxisTable = Vec<(usize, usize, f64)>;

fn axis_table(inp: usize, out: usize, scale: Option<f64>, align: bool) -> AxisTable {
    let ratio = if align {
        if out > 1 {
            (inp as f64 - 1.0) / (out as f64 - 1.0)
        } else {
            0.0
        }
    } else {
        match scale {
            Some(s) if s > 0.0 => 1.0 / s,
            _ => inp as f64 / out as f64,
        }
    };
    (0..out)
        .map(|d| {
            let s = if align {
                ratio * d as f64
            } else {
                (ratio * (d as f64 + 0.5) - 0.5).max(0.0)
            };
            let i0 = (s as usize).min(inp - 1);
            let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
            (i0, i1, s - i0 as f64)
        })
        .collect()
}

impl<T: Real> UpsampleBilinear<T> {
    pub const NAME: &'static str = "UpsampleBilinear";

    /// A layer resampling to `size` (each side in 1..=65536), corners aligned or not.
    pub fn new(size: UpsampleSize, align_corners: bool) -> Result<Self> {
        match size {
            UpsampleSize::Size(h, w) if !(1..=65536).contains(&h) || !(1..=65536).contains(&w) => {
                return Err(NvError::Config(format!(
                    "{}: the output size ({h}, {w}) must be in 1..=65536 per side",
                    Self::NAME
                )))
            }
            UpsampleSize::Scale(a, b)
                if !(a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0) =>
            {
                return Err(NvError::Config(format!(
                    "{}: the scale factors ({a}, {b}) must be finite and positive",
                    Self::NAME
                )))
            }
            _ => {}
        }
        Ok(UpsampleBilinear {
            size,
            align_corners,
            _t: std::marker::PhantomData,
        })
    }
    pub fn size(&self) -> UpsampleSize {
        self.size
    }
    pub fn align_corners(&self) -> bool {
        self.align_corners
    }

    /// (N·C planes, H, W, out H, out W) of an input shape.
    fn dims(&self, shape: &[usize]) -> Result<(usize, usize, usize, usize, usize)> {
        check_rank(Self::NAME, shape, 4, "4-D (N, C, H, W)")?;
        let (h, w) = (shape[2], shape[3]);
        if h == 0 || w == 0 {
            check_nonempty(Self::NAME, shape)?;
        }
        let (oh, ow) = match self.size {
            UpsampleSize::Size(a, b) => (a, b),
            UpsampleSize::Scale(a, b) => (
                (h as f64 * a).floor() as usize,
                (w as f64 * b).floor() as usize,
            ),
        };
        if oh == 0 || ow == 0 || oh > 65536 || ow > 65536 {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!("input {shape:?} would give an output of {oh}x{ow}"),
            });
        }
        Ok((shape[0] * shape[1], h, w, oh, ow))
    }

    /// The backward for an input of `x_shape`: it reads only the input's shape (a graph keeps no input for it).
    pub fn backward_for_shape(&self, x_shape: &[usize], dy: &ArrayD<T>) -> Result<ArrayD<T>> {
        let (planes, h, w, oh, ow) = self.dims(x_shape)?;
        check_output_grad(Self::NAME, dy.shape(), &[x_shape[0], x_shape[1], oh, ow])?;
        let (rows, cols) = self.tables(h, w, oh, ow);
        let gs = cont(dy);
        let mut dx = ArrayD::<T>::zeros(IxDyn(x_shape));
        let dxs = dx.as_slice_mut().expect("fresh array");
        // the adjoint of the forward's two passes: rows first (whole output rows, vectorised), then the
        // columns of the h input rows
        let plane = |(dp, gp): (&mut [T], &[T])| {
            let mut dh = vec![0f64; h * ow];
            for (oy, &(y0, y1, ly)) in rows.iter().enumerate() {
                let g = &gp[oy * ow..(oy + 1) * ow];
                for (d, v) in dh[y0 * ow..(y0 + 1) * ow].iter_mut().zip(g) {
                    *d += (1.0 - ly) * v.as_f64();
                }
                for (d, v) in dh[y1 * ow..(y1 + 1) * ow].iter_mut().zip(g) {
                    *d += ly * v.as_f64();
                }
            }
            let mut acc = vec![0f64; w];
            for (y, drow) in dh.chunks_exact(ow).enumerate() {
                acc.fill(0.0);
                for (&(x0, x1, lx), &g) in cols.iter().zip(drow) {
                    acc[x0] += (1.0 - lx) * g;
                    acc[x1] += lx * g;
                }
                for (d, a) in dp[y * w..(y + 1) * w].iter_mut().zip(&acc) {
                    *d = T::of_f64(*a);
                }
            }
        };
        if planes > 1 && planes * oh * ow >= 1 << 14 {
            dxs.par_chunks_mut(h * w)
                .zip(gs.par_chunks(oh * ow))
                .for_each(plane);
        } else {
            dxs.chunks_mut(h * w)
                .zip(gs.chunks(oh * ow))
                .for_each(plane);
        }
        Ok(dx)
    }

    fn tables(&self, h: usize, w: usize, oh: usize, ow: usize) -> (AxisTable, AxisTable) {
        let (sh, sw) = match self.size {
            UpsampleSize::Scale(a, b) => (Some(a), Some(b)),
            UpsampleSize::Size(..) => (None, None),
        };
        (
            axis_table(h, oh, sh, self.align_corners),
            axis_table(w, ow, sw, self.align_corners),
        )
    }
}

impl<T: Real> Layer<T> for UpsampleBilinear<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let (planes, h, w, oh, ow) = self.dims(x.shape())?;
        let (rows, cols) = self.tables(h, w, oh, ow);
        let xs = cont(x);
        let mut y = ArrayD::<T>::zeros(IxDyn(&[x.shape()[0], x.shape()[1], oh, ow]));
        let ys = y.as_slice_mut().expect("fresh array");
        // separable: each input row interpolated along x once (h rows, not oh), then each output row is a
        // blend of two of them, a loop over whole rows that vectorises (the same arithmetic, in the same order,
        // as interpolating every output pixel from its four inputs)
        let plane = |(yp, xp): (&mut [T], &[T])| {
            let mut hr = vec![0f64; h * ow];
            for (y, row) in hr.chunks_exact_mut(ow).enumerate() {
                let r = &xp[y * w..(y + 1) * w];
                for (o, &(x0, x1, lx)) in row.iter_mut().zip(&cols) {
                    *o = (1.0 - lx) * r[x0].as_f64() + lx * r[x1].as_f64();
                }
            }
            for (oy, &(y0, y1, ly)) in rows.iter().enumerate() {
                let (top, bot) = (&hr[y0 * ow..(y0 + 1) * ow], &hr[y1 * ow..(y1 + 1) * ow]);
                let out = &mut yp[oy * ow..(oy + 1) * ow];
                for ((o, t), b) in out.iter_mut().zip(top).zip(bot) {
                    *o = T::of_f64((1.0 - ly) * t + ly * b);
                }
            }
        };
        if planes > 1 && planes * oh * ow >= 1 << 14 {
            ys.par_chunks_mut(oh * ow)
                .zip(xs.par_chunks(h * w))
                .for_each(plane);
        } else {
            ys.chunks_mut(oh * ow).zip(xs.chunks(h * w)).for_each(plane);
        }
        Ok(y)
    }

    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        self.backward_for_shape(x.shape(), dy)
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let (_, _, _, oh, ow) = self.dims(input)?;
        Ok(vec![input[0], input[1], oh, ow])
    }

    fn name(&self) -> String {
        let size = match self.size {
            UpsampleSize::Size(h, w) => format!("size=({h}, {w})"),
            UpsampleSize::Scale(a, b) => format!("scale_factor=({a:?}, {b:?})"),
        };
        format!(
            "Upsample({size}, mode='bilinear', align_corners={})",
            if self.align_corners { "True" } else { "False" }
        )
    }
}

stateless!(UpsampleBilinear);
