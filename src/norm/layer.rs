//! Layer normalization over the trailing `normalized_shape` dimensions of each sample.
//!
//! | | |
//! |---|---|
//! | defaults | eps 1e-5, elementwise_affine, bias |
//! | statistics | per row of D = prod(normalized_shape) values; biased variance; same in train and eval |
//! | affine | element-wise, weight and bias of shape `normalized_shape` |
//!
//! Kernels: one task per block of rows; each row's statistics (Σx, shifted Σd, Σd²) then its normalisation while
//! the row is hot. Backward: per row Σu and Σu·x̂ (u = dy·w) with dweight/dbias accumulated per task, then dx.

use super::buffers::{load_affine, save_affine, visit_affine};
use super::{
    check_dx_len, check_eps, check_same_shape, contiguous, group_kernels::block_stats, lanes,
};
use crate::state::{StateDict, Stateful};
use crate::{Mode, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD};
use rayon::prelude::*;

#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormConfig {
    pub normalized_shape: Vec<usize>,
    pub eps: f64,
    pub elementwise_affine: bool,
    pub bias: bool,
}

impl LayerNormConfig {
    pub fn new(normalized_shape: &[usize]) -> Self {
        LayerNormConfig {
            normalized_shape: normalized_shape.to_vec(),
            eps: 1e-5,
            elementwise_affine: true,
            bias: true,
        }
    }
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    pub fn elementwise_affine(mut self, a: bool) -> Self {
        self.elementwise_affine = a;
        self
    }
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
    pub fn build<T: Real>(self) -> Result<LayerNorm<T>> {
        LayerNorm::new(self)
    }
}

/// Per-row statistics saved by the forward.
#[derive(Debug, Clone)]
struct RowStats<T> {
    shift: Vec<T>,
    mean: Vec<f64>,
    invstd: Vec<f64>,
    shape: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct LayerNorm<T: Real = f32> {
    pub cfg: LayerNormConfig,
    pub weight: Option<Param<T>>,
    pub bias: Option<Param<T>>,
    saved: Option<RowStats<T>>,
}

fn rows_per_task(rows: usize, d: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_count = rows.div_ceil(threads * 4).max(1);
    // keep tasks at least ~16K elements so small rows do not drown in scheduling
    by_count.max((16384 / d.max(1)).max(1)).min(rows.max(1))
}

impl<T: Real> LayerNorm<T> {
    pub const NAME: &'static str = "LayerNorm";

    pub fn new(cfg: LayerNormConfig) -> Result<Self> {
        check_eps(cfg.eps)?;
        if cfg.normalized_shape.is_empty() || cfg.normalized_shape.contains(&0) {
            return Err(NvError::Config(format!(
                "normalized_shape must be non-empty with positive sizes, got {:?}",
                cfg.normalized_shape
            )));
        }
        let ns = cfg.normalized_shape.clone();
        let weight = cfg.elementwise_affine.then(|| Param::filled(&ns, T::one()));
        let bias = (cfg.elementwise_affine && cfg.bias).then(|| Param::filled(&ns, T::zero()));
        Ok(LayerNorm {
            cfg,
            weight,
            bias,
            saved: None,
        })
    }

    /// (rows, D) of an input whose trailing dims must equal normalized_shape.
    fn dims(&self, shape: &[usize]) -> Result<(usize, usize)> {
        let ns = &self.cfg.normalized_shape;
        if shape.len() < ns.len() || &shape[shape.len() - ns.len()..] != ns.as_slice() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!("normalized_shape {ns:?} does not match the trailing dims of input shape {shape:?}"),
            });
        }
        let d: usize = ns.iter().product();
        Ok((shape.iter().product::<usize>() / d, d))
    }

    pub fn forward(&mut self, x: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>> {
        let mut y = ArrayD::zeros(x.raw_dim());
        self.forward_into(x.view(), y.as_slice_mut().unwrap(), mode)?;
        Ok(y)
    }

    /// Forward into a caller-owned buffer (same computation in both modes).
    pub fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], _mode: Mode) -> Result<()> {
        let (rows, d) = self.dims(x.shape())?;
        if y.len() != rows * d {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: "output buffer size".into(),
            });
        }
        let xs = contiguous(&x);
        let w = self.weight.as_ref().map(|p| p.values());
        let b = self.bias.as_ref().map(|p| p.values());
        let eps = self.cfg.eps;
        let rpt = rows_per_task(rows, d);
        let per: Vec<Vec<(T, f64, f64)>> = y
            .par_chunks_mut(rpt * d)
            .zip(xs.par_chunks(rpt * d))
            .map(|(yb, xb)| {
                let mut out = Vec::with_capacity(rpt);
                for (yr, xr) in yb.chunks_mut(d).zip(xb.chunks(d)) {
                    let (shift, mean, var) = block_stats(xr);
                    let r = 1.0 / (var + eps).sqrt();
                    let (rt, c0) = (T::of_f64(r), T::of_f64(-(mean - shift.as_f64()) * r));
                    match (w, b) {
                        (Some(w), Some(b)) => {
                            for i in 0..d {
                                yr[i] = ((xr[i] - shift) * rt + c0) * w[i] + b[i];
                            }
                        }
                        (Some(w), None) => {
                            for i in 0..d {
                                yr[i] = ((xr[i] - shift) * rt + c0) * w[i];
                            }
                        }
                        _ => {
                            for i in 0..d {
                                yr[i] = (xr[i] - shift) * rt + c0;
                            }
                        }
                    }
                    out.push((shift, mean, r));
                }
                out
            })
            .collect();
        let mut st = RowStats {
            shift: vec![],
            mean: vec![],
            invstd: vec![],
            shape: x.shape().to_vec(),
        };
        for (sh, m, r) in per.into_iter().flatten() {
            st.shift.push(sh);
            st.mean.push(m);
            st.invstd.push(r);
        }
        self.saved = Some(st);
        Ok(())
    }

    pub fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>> {
        let mut dx = ArrayD::zeros(x.raw_dim());
        self.backward_into(x.view(), dy.view(), dx.as_slice_mut().unwrap(), mode)?;
        Ok(dx)
    }

    pub fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        mode: Mode,
    ) -> Result<()> {
        check_same_shape(Self::NAME, x.shape(), dy.shape())?;
        check_dx_len(Self::NAME, dx.len(), x.shape())?;
        let (rows, d) = self.dims(x.shape())?;
        let st = match &self.saved {
            Some(st) if st.shape == x.shape() => st,
            _ => {
                return Err(NvError::NoSavedState {
                    layer: Self::NAME,
                    mode,
                })
            }
        };
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        let w = self.weight.as_ref().map(|p| p.values());
        let want_w = self.weight.is_some();
        let want_b = self.bias.is_some();
        let rpt = rows_per_task(rows, d);
        let df = d as f64;
        let partials: Vec<(Vec<T>, Vec<T>)> = dx
            .par_chunks_mut(rpt * d)
            .zip(xs.par_chunks(rpt * d).zip(gs.par_chunks(rpt * d)))
            .enumerate()
            .map(|(t, (dxb, (xb, gb)))| {
                let mut gw = if want_w { vec![T::zero(); d] } else { vec![] };
                let mut gbias = if want_b { vec![T::zero(); d] } else { vec![] };
                // per-task scratch rows: x̂ and u = dy·w
                let mut xh = vec![T::zero(); d];
                let mut u = vec![T::zero(); d];
                for (j, ((dxr, xr), gr)) in dxb
                    .chunks_mut(d)
                    .zip(xb.chunks(d))
                    .zip(gb.chunks(d))
                    .enumerate()
                {
                    let row = t * rpt + j;
                    let (shift, r) = (st.shift[row], st.invstd[row]);
                    let (rt, c0) = (
                        T::of_f64(r),
                        T::of_f64(-(st.mean[row] - shift.as_f64()) * r),
                    );
                    for i in 0..d {
                        xh[i] = (xr[i] - shift) * rt + c0;
                    }
                    match w {
                        Some(w) => {
                            for i in 0..d {
                                u[i] = gr[i] * w[i];
                            }
                        }
                        None => u.copy_from_slice(gr),
                    }
                    if want_w {
                        for i in 0..d {
                            gw[i] = gw[i] + gr[i] * xh[i];
                        }
                    }
                    if want_b {
                        for i in 0..d {
                            gbias[i] = gbias[i] + gr[i];
                        }
                    }
                    let (su, sux) = lanes::dy_moments(&u, &xh, T::zero());
                    let (k_su, k_sux) = (T::of_f64(su / df), T::of_f64(sux / df));
                    for i in 0..d {
                        dxr[i] = rt * (u[i] - k_su - xh[i] * k_sux);
                    }
                }
                (gw, gbias)
            })
            .collect();
        if let Some(wp) = self.weight.as_mut() {
            let g = wp.grads_mut();
            for (pw, _) in &partials {
                for (gi, v) in g.iter_mut().zip(pw) {
                    *gi = *gi + *v;
                }
            }
        }
        if let Some(bp) = self.bias.as_mut() {
            let g = bp.grads_mut();
            for (_, pb) in &partials {
                for (gi, v) in g.iter_mut().zip(pb) {
                    *gi = *gi + *v;
                }
            }
        }
        Ok(())
    }
}

impl<T: Real> Stateful<T> for LayerNorm<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        save_affine(prefix, &self.weight, &self.bias, sd);
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        load_affine(prefix, &mut self.weight, &mut self.bias, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        visit_affine(prefix, &mut self.weight, &mut self.bias, f);
    }
}
