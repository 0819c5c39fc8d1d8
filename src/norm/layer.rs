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
use super::check_eps;
use super::group_kernels::block_stats_with;
use super::NormLayer;
use crate::kernels::isa::isa_fn;
use crate::kernels::lanes;
use crate::kernels::shape::{check_dx_len, check_same_shape, contiguous};
use crate::layer::Layer;
use crate::param::ParamRole;
use crate::state::{StateDict, Stateful};
use crate::{Ctx, KernelOptions, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD};
use rayon::prelude::*;

/// Configuration with PyTorch's defaults (eps 1e-5, elementwise affine with bias).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// Layer normalization.
#[derive(Debug, Clone)]
pub struct LayerNorm<T: Real = f32> {
    cfg: LayerNormConfig,
    weight: Option<Param<T>>,
    bias: Option<Param<T>>,
    saved: Option<RowStats<T>>,
}

/// One column chunk's dweight, dbias and per-row (Σu, Σu·x̂) from the backward's first phase.
type ChunkGrads<T> = (Vec<T>, Vec<T>, Vec<(f64, f64)>);

/// Rows up to this many bytes take the per-row backward (the row stays in L1/L2 between its two passes); longer
/// rows the two-phase column-chunked one (see docs/PERFORMANCE.md, "Tuning constants").
const SHORT_ROW_BYTES: usize = 256 << 10;

/// Values per chunk of the short-row backward's first pass (its x̂ and u scratch, 2 × 4 KB of f32, and the
/// chunk's x, dy, weight and gradients stay in L1).
const ROW_CHUNK: usize = 1024;

/// Values per scratch chunk of the elementwise passes (16 KB of f32: stays in L1).
const CHUNK: usize = 4096;

/// The (r, c0) of x̂ = (x - shift)·r + c0 for a row with this shift, exact mean and 1/sqrt(var + eps).
#[inline]
fn xhat_consts<T: Real>(shift: T, mean: f64, r: f64) -> (T, T) {
    (T::of_f64(r), T::of_f64(-(mean - shift.as_f64()) * r))
}

isa_fn! {
    isa = ko.isa;
    /// The forward of rows of `d` values: per row its statistics (one pass, [`block_stats`]), then the normalized,
    /// scaled and shifted row; returns each row's (shift, mean, 1/std).
    fn forward_rows<T: Real, const X2: bool, const X512: bool>(
        xs: &[T],
        y: &mut [T],
        rows: usize,
        d: usize,
        w: Option<&[T]>,
        b: Option<&[T]>,
        eps: f64,
        ko: KernelOptions,
    ) -> Vec<Vec<(T, f64, f64)>> {
        let rpt = rows_per_task(rows, d);
        let stream = ko.streams(std::mem::size_of_val(y), 2);
    let per: Vec<Vec<(T, f64, f64)>> = y
            .par_chunks_mut(rpt * d)
            .zip(xs.par_chunks(rpt * d))
            .map(|(yb, xb)| {
                let mut out = Vec::with_capacity(rpt);
                let mut buf = vec![T::zero(); if stream { CHUNK.min(d) } else { 0 }];
                for (yr, xr) in yb.chunks_mut(d).zip(xb.chunks(d)) {
                    let (shift, mean, var) = block_stats_with::<T, X2, X512>(xr);
                    let r = 1.0 / (var + eps).sqrt();
                    let (rt, c0) = xhat_consts(shift, mean, r);
                    write_chunked::<T, X2, X512>(yr, &mut buf, stream, |lo, o| {
                        let n = o.len();
                        let xr = &xr[lo..lo + n];
                        match (w, b) {
                            (Some(w), Some(b)) => {
                                let (w, b) = (&w[lo..lo + n], &b[lo..lo + n]);
                                for i in 0..n {
                                    o[i] = ((xr[i] - shift) * rt + c0) * w[i] + b[i];
                                }
                            }
                            (Some(w), None) => {
                                let w = &w[lo..lo + n];
                                for i in 0..n {
                                    o[i] = ((xr[i] - shift) * rt + c0) * w[i];
                                }
                            }
                            _ => {
                                for i in 0..n {
                                    o[i] = (xr[i] - shift) * rt + c0;
                                }
                            }
                        }
                    });
                    out.push((shift, mean, r));
                }
                if stream {
                    lanes::stream_fence();
                }
                out
            })
            .collect();
        per
    }
}

/// Fills `dst` through `f(offset, out)`: directly when not streaming, otherwise chunk by chunk into the L1
/// scratch `buf`, each chunk then written out with streaming stores (same arithmetic either way).
#[inline(always)]
fn write_chunked<T: Real, const X2: bool, const X512: bool>(
    dst: &mut [T],
    buf: &mut [T],
    stream: bool,
    mut f: impl FnMut(usize, &mut [T]),
) {
    if !stream {
        return f(0, dst);
    }
    for lo in (0..dst.len()).step_by(CHUNK) {
        let n = CHUNK.min(dst.len() - lo);
        f(lo, &mut buf[..n]);
        lanes::store_to_with::<T, X2, X512>(&buf[..n], &mut dst[lo..lo + n]);
    }
}

/// Columns per task in the backward's first phase: at most 1024 (the chunk's x̂, u, weight and two gradient
/// rows, 5 × 4 KB of f32, stay in L1), fewer when that is what it takes to give every thread a chunk.
fn col_chunk(d: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    d.div_ceil(threads)
        .clamp(1, 1024)
        .next_multiple_of(16)
        .min(d.max(1))
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
        let weight = cfg
            .elementwise_affine
            .then(|| Param::filled(&ns, T::one()).with_role(ParamRole::NormWeight));
        let bias = (cfg.elementwise_affine && cfg.bias)
            .then(|| Param::filled(&ns, T::zero()).with_role(ParamRole::NormBias));
        Ok(LayerNorm {
            cfg,
            weight,
            bias,
            saved: None,
        })
    }

    pub fn config(&self) -> &LayerNormConfig {
        &self.cfg
    }
    pub fn weight(&self) -> Option<&Param<T>> {
        self.weight.as_ref()
    }
    pub fn weight_mut(&mut self) -> Option<&mut Param<T>> {
        self.weight.as_mut()
    }
    pub fn bias(&self) -> Option<&Param<T>> {
        self.bias.as_ref()
    }
    pub fn bias_mut(&mut self) -> Option<&mut Param<T>> {
        self.bias.as_mut()
    }
    /// LayerNorm keeps no running statistics (every sample is normalized by its own rows in both modes).
    pub fn running_mean(&self) -> Option<&ArrayD<T>> {
        None
    }
    /// See [`LayerNorm::running_mean`].
    pub fn running_var(&self) -> Option<&ArrayD<T>> {
        None
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
}

impl<T: Real> NormLayer<T> for LayerNorm<T> {
    /// Forward into a caller-owned buffer (same computation in both modes).
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
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
        let per = forward_rows(&xs, y, rows, d, w, b, eps, ctx.kernels());
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
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        ctx: Ctx,
    ) -> Result<()> {
        let mode = ctx.mode();
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
        let (gw_all, gb_all) = if d * std::mem::size_of::<T>() <= SHORT_ROW_BYTES {
            short_rows_backward(&xs, &gs, dx, rows, d, st, w, want_w, want_b, ctx.kernels())
        } else {
            long_rows_backward(&xs, &gs, dx, rows, d, st, w, want_w, want_b, ctx.kernels())
        };
        if let Some(wp) = self.weight.as_mut() {
            for (gi, v) in wp.grads_mut().iter_mut().zip(&gw_all) {
                *gi = *gi + *v;
            }
        }
        if let Some(bp) = self.bias.as_mut() {
            for (gi, v) in bp.grads_mut().iter_mut().zip(&gb_all) {
                *gi = *gi + *v;
            }
        }
        Ok(())
    }
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)> {
        None
    }
}

impl<T: Real> Layer<T> for LayerNorm<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        super::forward_new(self, x, ctx)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        super::backward_new(self, x, dy, ctx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.dims(input)?;
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        let c = &self.cfg;
        format!(
            "LayerNorm({:?}, eps={}, elementwise_affine={})",
            c.normalized_shape,
            c.eps,
            super::batch::py_bool(c.elementwise_affine)
        )
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

/// One row's chunk of the backward: fills x̂ = (x - shift)·r + c0 and u = dy·w (w = the chunk's weights, or
/// none), adds dy·x̂ to `gw` and dy to `gb` when they are non-empty (dweight/dbias wanted), and returns the
/// chunk's (Σu, Σu·x̂).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_chunk_sums<T: Real, const X2: bool, const X512: bool>(
    xr: &[T],
    g: &[T],
    w: Option<&[T]>,
    (shift, rt, c0): (T, T, T),
    xh: &mut [T],
    u: &mut [T],
    gw: &mut [T],
    gb: &mut [T],
) -> (f64, f64) {
    let n = xr.len();
    let (xh, u, g) = (&mut xh[..n], &mut u[..n], &g[..n]);
    for i in 0..n {
        xh[i] = (xr[i] - shift) * rt + c0;
    }
    match w {
        Some(w) => {
            let w = &w[..n];
            for i in 0..n {
                u[i] = g[i] * w[i];
            }
        }
        None => u.copy_from_slice(g),
    }
    if !gw.is_empty() {
        let gw = &mut gw[..n];
        for i in 0..n {
            gw[i] = gw[i] + g[i] * xh[i];
        }
    }
    if !gb.is_empty() {
        let gb = &mut gb[..n];
        for i in 0..n {
            gb[i] = gb[i] + g[i];
        }
    }
    lanes::dy_moments_with::<T, X2, X512>(u, xh, T::zero())
}

/// One row's dx = r·(u − k_su − x̂·k_sux), with x̂ = (x − shift)·r + c0 and u = dy·w recomputed from the row,
/// through the L1 chunk `buf` and streamed out when `stream` ([`write_chunked`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_dx<T: Real, const X2: bool, const X512: bool>(
    xr: &[T],
    gr: &[T],
    w: Option<&[T]>,
    (shift, rt, c0): (T, T, T),
    (k_su, k_sux): (T, T),
    dxr: &mut [T],
    buf: &mut [T],
    stream: bool,
) {
    write_chunked::<T, X2, X512>(dxr, buf, stream, |lo, o| {
        let n = o.len();
        let (xc, gc) = (&xr[lo..lo + n], &gr[lo..lo + n]);
        match w {
            Some(w) => {
                let w = &w[lo..lo + n];
                for i in 0..n {
                    let h = (xc[i] - shift) * rt + c0;
                    o[i] = rt * (gc[i] * w[i] - k_su - h * k_sux);
                }
            }
            None => {
                for i in 0..n {
                    let h = (xc[i] - shift) * rt + c0;
                    o[i] = rt * (gc[i] - k_su - h * k_sux);
                }
            }
        }
    });
}

isa_fn! {
    isa = ko.isa;
    /// LayerNorm backward for short rows (≤ [`SHORT_ROW_BYTES`]): one task per block of rows. Per row, a first pass
    /// over [`ROW_CHUNK`]-value chunks materialises x̂ and u = dy·w in an L1 scratch, adds dy·x̂ and dy into the task's
    /// dweight/dbias partials and sums Σu and Σu·x̂ (per chunk, then across chunks in f64); a second pass recomputes
    /// x̂ and u from the row (still in L1/L2) with the same arithmetic and writes dx, with streaming stores when the
    /// tensors exceed the cache. Materialising x̂ and u for the whole row instead (arrays as long as the row, in L2
    /// rather than L1), with dx always through the cache, was slower (see docs/PERFORMANCE.md, "Tuning constants").
    fn short_rows_backward<T: Real, const X2: bool, const X512: bool>(
        xs: &[T],
        gs: &[T],
        dx: &mut [T],
        rows: usize,
        d: usize,
        st: &RowStats<T>,
        w: Option<&[T]>,
        want_w: bool,
        want_b: bool,
        ko: KernelOptions,
    ) -> (Vec<T>, Vec<T>) {
        let rpt = rows_per_task(rows, d);
        let df = d as f64;
        let stream = ko.streams(std::mem::size_of_val(dx), 3);
        let partials: Vec<(Vec<T>, Vec<T>)> = dx
            .par_chunks_mut(rpt * d)
            .zip(xs.par_chunks(rpt * d).zip(gs.par_chunks(rpt * d)))
            .enumerate()
            .map(|(t, (dxb, (xb, gb)))| {
                let mut gw = if want_w { vec![T::zero(); d] } else { vec![] };
                let mut gbias = if want_b { vec![T::zero(); d] } else { vec![] };
                let ch = d.min(ROW_CHUNK);
                let mut buf = vec![T::zero(); if stream { CHUNK.min(d) } else { 0 }];
                let mut xh = vec![T::zero(); ch];
                let mut u = vec![T::zero(); ch];
                for (j, ((dxr, xr), gr)) in dxb
                    .chunks_mut(d)
                    .zip(xb.chunks(d))
                    .zip(gb.chunks(d))
                    .enumerate()
                {
                    let row = t * rpt + j;
                    let shift = st.shift[row];
                    let (rt, c0) = xhat_consts(shift, st.mean[row], st.invstd[row]);
                    // Pass 1 over L1-sized chunks: x̂ and u in the scratch, dweight/dbias, and the row's sums.
                    let (mut su, mut sux) = (0.0f64, 0.0f64);
                    for lo in (0..d).step_by(ch) {
                        let n = ch.min(d - lo);
                        let (a, b) = row_chunk_sums::<T, X2, X512>(
                            &xr[lo..lo + n],
                            &gr[lo..lo + n],
                            w.map(|w| &w[lo..lo + n]),
                            (shift, rt, c0),
                            &mut xh,
                            &mut u,
                            if want_w { &mut gw[lo..lo + n] } else { &mut [] },
                            if want_b {
                                &mut gbias[lo..lo + n]
                            } else {
                                &mut []
                            },
                        );
                        su += a;
                        sux += b;
                    }
                    // Pass 2: dx, recomputing x̂ and u from the row (still in L1/L2) exactly as pass 1 did; streamed
                    // out when the tensors are too large for the cache.
                    let k = (T::of_f64(su / df), T::of_f64(sux / df));
                    row_dx::<T, X2, X512>(xr, gr, w, (shift, rt, c0), k, dxr, &mut buf, stream);
                }
                if stream {
                    lanes::stream_fence();
                }
                (gw, gbias)
            })
            .collect();
        let mut gw_all = vec![T::zero(); if want_w { d } else { 0 }];
        let mut gb_all = vec![T::zero(); if want_b { d } else { 0 }];
        for (pw, pb) in &partials {
            for (gi, v) in gw_all.iter_mut().zip(pw) {
                *gi = *gi + *v;
            }
            for (gi, v) in gb_all.iter_mut().zip(pb) {
                *gi = *gi + *v;
            }
        }
        (gw_all, gb_all)
    }
}

isa_fn! {
    isa = ko.isa;
    /// LayerNorm backward for long rows: two phases (see the comments), so that no per-task copies of
    /// dweight/dbias are made and each pass's working set stays in cache.
    fn long_rows_backward<T: Real, const X2: bool, const X512: bool>(
        xs: &[T],
        gs: &[T],
        dx: &mut [T],
        rows: usize,
        d: usize,
        st: &RowStats<T>,
        w: Option<&[T]>,
        want_w: bool,
        want_b: bool,
        ko: KernelOptions,
    ) -> (Vec<T>, Vec<T>) {
        let df = d as f64;
        // Per-row constants of x̂ = (x - shift)·r + c0.
        let rc: Vec<(T, T, T)> = (0..rows)
            .map(|row| {
                let shift = st.shift[row];
                let (rt, c0) = xhat_consts(shift, st.mean[row], st.invstd[row]);
                (shift, rt, c0)
            })
            .collect();
        // Phase 1, by column chunks over all rows: dweight and dbias of the chunk's columns (each task owns its
        // columns, so no partial copies), and every row's Σu and Σu·x̂ over the chunk (u = dy·w). One read of x
        // and dy; the chunk's weight, gradients and scratch stay in L1.
        let chunk = col_chunk(d);
        let mut gw_all = vec![T::zero(); if want_w { d } else { 0 }];
        let mut gb_all = vec![T::zero(); if want_b { d } else { 0 }];
        let starts: Vec<usize> = (0..d).step_by(chunk).collect();
        let parts: Vec<ChunkGrads<T>> = starts
            .par_iter()
            .map(|&lo| {
                let n = chunk.min(d - lo);
                let mut gw = vec![T::zero(); if want_w { n } else { 0 }];
                let mut gbias = vec![T::zero(); if want_b { n } else { 0 }];
                let mut xh = vec![T::zero(); n];
                let mut u = vec![T::zero(); n];
                let mut sums = Vec::with_capacity(rows);
                for (row, &(shift, rt, c0)) in rc.iter().enumerate() {
                    let off = row * d + lo;
                    let (xr, g) = (&xs[off..off + n], &gs[off..off + n]);
                    let wc = w.map(|w| &w[lo..lo + n]);
                    sums.push(row_chunk_sums::<T, X2, X512>(
                        xr,
                        g,
                        wc,
                        (shift, rt, c0),
                        &mut xh,
                        &mut u,
                        &mut gw,
                        &mut gbias,
                    ));
                }
                (gw, gbias, sums)
            })
            .collect();
        let mut row_sums = vec![(0.0f64, 0.0f64); rows];
        for (&lo, (gw, gbias, sums)) in starts.iter().zip(parts) {
            if want_w {
                gw_all[lo..lo + gw.len()].copy_from_slice(&gw);
            }
            if want_b {
                gb_all[lo..lo + gbias.len()].copy_from_slice(&gbias);
            }
            for (acc, (a, b)) in row_sums.iter_mut().zip(sums) {
                acc.0 += a;
                acc.1 += b;
            }
        }
        // Phase 2, by rows: dx = r·(u - Σu/D - x̂·Σu·x̂/D), through an L1 chunk (streamed out when large).
        let rpt = rows_per_task(rows, d);
        let stream = ko.streams(std::mem::size_of_val(dx), 3);
        dx.par_chunks_mut(rpt * d)
            .zip(xs.par_chunks(rpt * d).zip(gs.par_chunks(rpt * d)))
            .enumerate()
            .for_each(|(t, (dxb, (xb, gb)))| {
                let mut buf = vec![T::zero(); if stream { CHUNK.min(d) } else { 0 }];
                for (j, ((or, xr), gr)) in dxb
                    .chunks_mut(d)
                    .zip(xb.chunks(d))
                    .zip(gb.chunks(d))
                    .enumerate()
                {
                    let row = t * rpt + j;
                    let (shift, rt, c0) = rc[row];
                    let (su, sux) = row_sums[row];
                    let k = (T::of_f64(su / df), T::of_f64(sux / df));
                    row_dx::<T, X2, X512>(xr, gr, w, (shift, rt, c0), k, or, &mut buf, stream);
                }
                if stream {
                    lanes::stream_fence();
                }
            });
        (gw_all, gb_all)
    }
}
