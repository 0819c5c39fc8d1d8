//! Pooling over (N, C, H, W): `nn.MaxPool2d`, `nn.AvgPool2d` and global average pooling.
//!
//! | | PyTorch | here |
//! |---|---|---|
//! | stride default | = kernel_size | same (`stride: None`) |
//! | output size | ⌊(H + 2p − d(k−1) − 1 + (ceil ? s−1 : 0))/s⌋ + 1, minus 1 if ceil and the last window starts in the right padding | same |
//! | padding limit | p ≤ k/2, else error | same |
//! | max: padding value | −∞ (never selected) | same |
//! | max: ties / NaN | first maximum wins; NaN propagates | same |
//! | max: backward | dy routed to the argmax (indices saved in forward) | same |
//! | avg: `count_include_pad` | True: divisor counts the zero padding (window clipped to H+p) | same |
//! | avg: `divisor_override` | optional fixed divisor | same |
//! | global average | `adaptive_avg_pool2d(x, 1).flatten(1)` | (N, C, H, W) → (N, C) |
//!
//! Planes (n, c) are processed in parallel when the input is large.

use super::{stateless, IntoPair, Layer};
use crate::kernels::elementwise::{sum_f64, PAR_MIN};
use crate::kernels::shape::contiguous as cont;
use crate::kernels::shape::{check_nonempty, check_rank};
use crate::{Mode, NvError, Real, Result};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

/// The per-plane geometry of a pooling call.
#[derive(Debug, Clone, Copy)]
struct Geom {
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
}

impl Geom {
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn ohw(&self) -> usize {
        self.oh * self.ow
    }
}

/// PyTorch's `pooling_output_shape`; `None` when the output would be empty.
fn out_size(
    input: usize,
    k: usize,
    pad: usize,
    stride: usize,
    dil: usize,
    ceil: bool,
) -> Option<usize> {
    let num = input as isize + 2 * pad as isize - (dil * (k - 1)) as isize - 1
        + if ceil { stride as isize - 1 } else { 0 };
    let mut out = num.div_euclid(stride as isize) + 1;
    if ceil && (out - 1) * stride as isize >= input as isize + pad as isize {
        out -= 1;
    }
    (out >= 1).then_some(out as usize)
}

#[allow(clippy::too_many_arguments)]
fn geom(
    layer: &'static str,
    shape: &[usize],
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
    d: (usize, usize),
    ceil: bool,
) -> Result<Geom> {
    check_rank(layer, shape, 4, "4-D (N, C, H, W)")?;
    check_nonempty(layer, shape)?;
    let (h, w) = (shape[2], shape[3]);
    match (out_size(h, k.0, p.0, s.0, d.0, ceil), out_size(w, k.1, p.1, s.1, d.1, ceil)) {
        (Some(oh), Some(ow)) => Ok(Geom {
            planes: shape[0] * shape[1],
            h,
            w,
            oh,
            ow,
            kh: k.0,
            kw: k.1,
            sh: s.0,
            sw: s.1,
            ph: p.0,
            pw: p.1,
            dh: d.0,
            dw: d.1,
        }),
        _ => Err(NvError::Shape {
            layer,
            msg: format!(
                "Given input size: ({}x{}x{}). Calculated output size is empty. Output size is too small",
                shape[1], h, w
            ),
        }),
    }
}

fn check_cfg(
    layer: &str,
    k: (usize, usize),
    s: (usize, usize),
    p: (usize, usize),
    d: (usize, usize),
) -> Result<()> {
    for (what, (a, b)) in [("kernel_size", k), ("stride", s), ("dilation", d)] {
        if a == 0 || b == 0 {
            return Err(NvError::Config(format!(
                "{layer}: {what} must be > 0, got ({a}, {b})"
            )));
        }
    }
    if p.0 > k.0 / 2 || p.1 > k.1 / 2 {
        return Err(NvError::Config(format!(
            "{layer}: pad should be at most half of effective kernel size, but got pad={p:?} and kernel_size={k:?}"
        )));
    }
    Ok(())
}

/// Runs `f(plane index, input plane, output plane, aux plane)` over every (n, c) plane, in parallel when large.
#[allow(clippy::too_many_arguments)]
fn for_planes<T: Real, A: Send>(
    big: bool,
    a: &[T],
    a_len: usize,
    b: &mut [T],
    b_len: usize,
    aux: &mut [A],
    aux_len: usize,
    f: impl Fn(&[T], &mut [T], &mut [A]) + Sync,
) {
    if big {
        // Planes are small (a 28x28 plane is 3 KB): hand rayon at least ~16K values per task.
        let min = (16384 / a_len.max(1)).max(1);
        if aux_len == 0 {
            a.par_chunks(a_len)
                .zip(b.par_chunks_mut(b_len))
                .with_min_len(min)
                .for_each(|(a, b)| f(a, b, &mut []));
        } else {
            a.par_chunks(a_len)
                .zip(b.par_chunks_mut(b_len))
                .zip(aux.par_chunks_mut(aux_len))
                .with_min_len(min)
                .for_each(|((a, b), x)| f(a, b, x));
        }
    } else if aux_len == 0 {
        a.chunks(a_len)
            .zip(b.chunks_mut(b_len))
            .for_each(|(a, b)| f(a, b, &mut []));
    } else {
        a.chunks(a_len)
            .zip(b.chunks_mut(b_len))
            .zip(aux.chunks_mut(aux_len))
            .for_each(|((a, b), x)| f(a, b, x));
    }
}

// ------------------------------------------------------------------------------------------------
// MaxPool2d
// ------------------------------------------------------------------------------------------------

/// `nn.MaxPool2d` configuration (stride defaults to the kernel size).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MaxPool2dConfig {
    pub kernel_size: (usize, usize),
    /// `None`: equal to `kernel_size`.
    pub stride: Option<(usize, usize)>,
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub ceil_mode: bool,
}

impl MaxPool2dConfig {
    pub fn new(kernel_size: impl IntoPair) -> Self {
        MaxPool2dConfig {
            kernel_size: kernel_size.pair(),
            stride: None,
            padding: (0, 0),
            dilation: (1, 1),
            ceil_mode: false,
        }
    }
    pub fn stride(mut self, s: impl IntoPair) -> Self {
        self.stride = Some(s.pair());
        self
    }
    pub fn padding(mut self, p: impl IntoPair) -> Self {
        self.padding = p.pair();
        self
    }
    pub fn dilation(mut self, d: impl IntoPair) -> Self {
        self.dilation = d.pair();
        self
    }
    pub fn ceil_mode(mut self, c: bool) -> Self {
        self.ceil_mode = c;
        self
    }
    pub fn build<T: Real>(self) -> Result<MaxPool2d<T>> {
        MaxPool2d::new(self)
    }
}

/// Sentinel argmax for a window with no input element inside the image.
const NO_INDEX: u32 = u32::MAX;

/// Max pooling; the forward saves the argmax of every window for the backward.
#[derive(Debug, Clone)]
pub struct MaxPool2d<T: Real = f32> {
    pub cfg: MaxPool2dConfig,
    /// (input shape, argmax index within its plane for every output element) of the last forward.
    saved: Option<(Vec<usize>, Vec<u32>)>,
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> MaxPool2d<T> {
    pub const NAME: &'static str = "MaxPool2d";

    pub fn new(cfg: MaxPool2dConfig) -> Result<Self> {
        let s = cfg.stride.unwrap_or(cfg.kernel_size);
        check_cfg(Self::NAME, cfg.kernel_size, s, cfg.padding, cfg.dilation)?;
        Ok(MaxPool2d {
            cfg,
            saved: None,
            _t: std::marker::PhantomData,
        })
    }

    fn geom(&self, shape: &[usize]) -> Result<Geom> {
        let c = &self.cfg;
        let g = geom(
            Self::NAME,
            shape,
            c.kernel_size,
            c.stride.unwrap_or(c.kernel_size),
            c.padding,
            c.dilation,
            c.ceil_mode,
        )?;
        if g.hw() >= NO_INDEX as usize {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!("planes of {} elements are too large", g.hw()),
            });
        }
        Ok(g)
    }

    pub fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let g = self.geom(input)?;
        Ok(vec![input[0], input[1], g.oh, g.ow])
    }

    /// Max and argmax of every window of one plane. `rows[oh]` / `cols[ow]` are the in-image kernel ranges of
    /// each window; `kj_cols[kj] = (off, lo, hi)`: kernel column kj reads iw = ow·sw + off, in-image for ow in
    /// [lo, hi). The loops run over a whole output row per kernel element (independent lanes, no dependency
    /// chain through one window), in PyTorch's order (ki, kj), so the result is the sequential one: the first
    /// in-image element sets the index, then `(val > maxval) || isnan(val)` takes over.
    fn plane(
        g: &Geom,
        rows: &[(usize, usize)],
        cols: &[(usize, usize)],
        kj_cols: &[(isize, usize, usize)],
        x: &[T],
        y: &mut [T],
        idx: &mut [u32],
    ) {
        for (oh, &(ki_lo, ki_hi)) in rows.iter().enumerate() {
            let h0 = (oh * g.sh) as isize - g.ph as isize;
            let yr = &mut y[oh * g.ow..(oh + 1) * g.ow];
            let ir = &mut idx[oh * g.ow..(oh + 1) * g.ow];
            for (ow, (yv, iv)) in yr.iter_mut().zip(ir.iter_mut()).enumerate() {
                let (kj_lo, kj_hi) = cols[ow];
                *yv = T::neg_infinity();
                *iv = if ki_lo == ki_hi || kj_lo == kj_hi {
                    NO_INDEX
                } else {
                    let ih = (h0 + (ki_lo * g.dh) as isize) as usize;
                    let iw = (ow * g.sw) as isize + kj_cols[kj_lo].0;
                    (ih * g.w + iw as usize) as u32
                };
            }
            for ki in ki_lo..ki_hi {
                let ih = (h0 + (ki * g.dh) as isize) as usize;
                let xr = &x[ih * g.w..(ih + 1) * g.w];
                let base = (ih * g.w) as u32;
                for &(off, lo, hi) in kj_cols {
                    if lo >= hi {
                        continue;
                    }
                    // iterators and wrapping index steps keep the loop free of bounds and overflow checks
                    let start = ((lo * g.sw) as isize + off) as usize;
                    let mut i = base + start as u32;
                    let step = g.sw as u32;
                    let lanes = yr[lo..hi].iter_mut().zip(ir[lo..hi].iter_mut());
                    for ((yv, iv), &v) in lanes.zip(xr[start..].iter().step_by(g.sw)) {
                        let take = (v > *yv) | v.is_nan(); // `|`, not `||`: no unpredictable branch
                        *yv = if take { v } else { *yv };
                        *iv = if take { i } else { *iv };
                        i = i.wrapping_add(step);
                    }
                }
            }
        }
    }

    /// For every kernel column kj: (off, lo, hi) with iw = ow·sw + off in-image for ow in [lo, hi).
    fn kernel_cols(g: &Geom) -> Vec<(isize, usize, usize)> {
        (0..g.kw)
            .map(|kj| {
                let off = (kj * g.dw) as isize - g.pw as isize;
                let ok = |ow: usize| {
                    let iw = (ow * g.sw) as isize + off;
                    iw >= 0 && iw < g.w as isize
                };
                let lo = (0..g.ow).find(|&o| ok(o)).unwrap_or(g.ow);
                let hi = (lo..g.ow).rev().find(|&o| ok(o)).map_or(lo, |o| o + 1);
                (off, lo, hi)
            })
            .collect()
    }

    /// In-image kernel index range [lo, hi) for every output position along one dimension.
    fn ranges(
        out: usize,
        input: usize,
        k: usize,
        s: usize,
        p: usize,
        d: usize,
    ) -> Vec<(usize, usize)> {
        (0..out)
            .map(|o| {
                let start = (o * s) as isize - p as isize;
                let ok = |t: usize| {
                    let i = start + (t * d) as isize;
                    i >= 0 && i < input as isize
                };
                let lo = (0..k).find(|&t| ok(t)).unwrap_or(k);
                let hi = (lo..k).rev().find(|&t| ok(t)).map_or(lo, |t| t + 1);
                (lo, hi)
            })
            .collect()
    }

    fn run_forward(g: &Geom, x: &[T], y: &mut [T], idx: &mut [u32]) {
        let big = g.planes * g.hw() >= PAR_MIN;
        if (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw) == (2, 2, 2, 2, 0, 0, 1, 1)
            && 2 * g.oh <= g.h
            && 2 * g.ow <= g.w
        {
            // The common 2x2/stride-2 window: a straight-line max over two input rows per output row.
            // Ties go to the first element in row-major window order, as in the general path and PyTorch.
            let (w, ow) = (g.w, g.ow);
            for_planes(big, x, g.hw(), y, g.ohw(), idx, g.ohw(), |x, y, ix| {
                if let (Some(xf), Some(yf)) = (
                    crate::kernels::cast::as_f32(x),
                    crate::kernels::cast::as_f32_mut(y),
                ) {
                    if crate::kernels::pool2x2::available() {
                        return crate::kernels::pool2x2::plane(xf, w, g.oh, ow, yf, ix);
                    }
                }
                for oi in 0..g.oh {
                    let r0 = &x[2 * oi * w..2 * oi * w + w];
                    let r1 = &x[(2 * oi + 1) * w..(2 * oi + 1) * w + w];
                    let yo = &mut y[oi * ow..(oi + 1) * ow];
                    let io = &mut ix[oi * ow..(oi + 1) * ow];
                    let base = (2 * oi * w) as u32;
                    for oj in 0..ow {
                        let j = 2 * oj;
                        let (mut best, mut at) = (r0[j], base + j as u32);
                        // A NaN is taken and then kept, as in the general path (PyTorch propagates NaN).
                        if (r0[j + 1] > best) | r0[j + 1].is_nan() {
                            best = r0[j + 1];
                            at = base + j as u32 + 1;
                        }
                        if (r1[j] > best) | r1[j].is_nan() {
                            best = r1[j];
                            at = base + (w + j) as u32;
                        }
                        if (r1[j + 1] > best) | r1[j + 1].is_nan() {
                            best = r1[j + 1];
                            at = base + (w + j) as u32 + 1;
                        }
                        yo[oj] = best;
                        io[oj] = at;
                    }
                }
            });
            return;
        }
        let rows = Self::ranges(g.oh, g.h, g.kh, g.sh, g.ph, g.dh);
        let cols = Self::ranges(g.ow, g.w, g.kw, g.sw, g.pw, g.dw);
        let kj_cols = Self::kernel_cols(g);
        for_planes(big, x, g.hw(), y, g.ohw(), idx, g.ohw(), |x, y, i| {
            Self::plane(g, &rows, &cols, &kj_cols, x, y, i)
        });
    }

    pub fn forward(&mut self, x: &ArrayD<T>) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        let s = x.shape();
        let mut y = crate::kernels::arena::output(&[s[0], s[1], g.oh, g.ow]);
        let mut idx = match self.saved.take() {
            Some((_, mut v)) => {
                v.resize(y.len(), 0);
                v
            }
            None => vec![0; y.len()],
        };
        let xs = cont(x);
        Self::run_forward(&g, &xs, y.as_slice_mut().expect("fresh array"), &mut idx);
        self.saved = Some((s.to_vec(), idx));
        Ok(y)
    }

    /// Routes every dy to its window's argmax. Uses the indices of the last forward when it saw an input of
    /// x's shape, else recomputes them from `x`.
    pub fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        let s = x.shape();
        let want = [s[0], s[1], g.oh, g.ow];
        if dy.shape() != want {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "dy has shape {:?}, the output has shape {want:?}",
                    dy.shape()
                ),
            });
        }
        if !matches!(&self.saved, Some((shape, _)) if shape == s) {
            let mut idx = vec![0u32; dy.len()];
            let mut scratch = vec![T::zero(); dy.len()];
            Self::run_forward(&g, &cont(x), &mut scratch, &mut idx);
            self.saved = Some((s.to_vec(), idx));
        }
        let idx = &self.saved.as_ref().expect("set above").1;
        let gs = cont(dy);
        let big = g.planes * g.hw() >= PAR_MIN;
        if (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw) == (2, 2, 2, 2, 0, 0, 1, 1)
            && 2 * g.oh <= g.h
            && 2 * g.ow <= g.w
        {
            // Non-overlapping 2x2 windows: every input element is in at most one window, so dx is written in
            // one pass (dy at the window's argmax, zero elsewhere and outside every window) instead of
            // zero-filling it and scattering.
            let mut dx = crate::kernels::arena::output(x.shape());
            let dxs = dx.as_slice_mut().expect("fresh array");
            let (w, ow) = (g.w, g.ow);
            let route = |(dxp, (gp, ip)): (&mut [T], (&[T], &[u32]))| {
                if let (Some(df), Some(gf)) = (
                    crate::kernels::cast::as_f32_mut(dxp),
                    crate::kernels::cast::as_f32(gp),
                ) {
                    if crate::kernels::pool2x2::available() {
                        return crate::kernels::pool2x2::plane_backward(
                            gf, ip, w, g.h, g.oh, ow, df,
                        );
                    }
                }
                for oi in 0..g.oh {
                    let base = 2 * oi * w;
                    let (r0, rest) = dxp[base..].split_at_mut(w);
                    let r1 = &mut rest[..w];
                    for oj in 0..ow {
                        let (v, at) = (gp[oi * ow + oj], ip[oi * ow + oj] as usize);
                        let j = 2 * oj;
                        // 0 + v, as the zero-fill-and-add of the general path (and PyTorch) gives: +0 for -0
                        let z = T::zero();
                        let v = z + v;
                        r0[j] = if at == base + j { v } else { z };
                        r0[j + 1] = if at == base + j + 1 { v } else { z };
                        r1[j] = if at == base + w + j { v } else { z };
                        r1[j + 1] = if at == base + w + j + 1 { v } else { z };
                    }
                    r0[2 * ow..].fill(T::zero());
                    r1[2 * ow..].fill(T::zero());
                }
                dxp[2 * g.oh * w..].fill(T::zero());
            };
            if big {
                dxs.par_chunks_mut(g.hw())
                    .zip(gs.par_chunks(g.ohw()).zip(idx.par_chunks(g.ohw())))
                    .with_min_len((16384 / g.hw().max(1)).max(1))
                    .for_each(route);
            } else {
                dxs.chunks_mut(g.hw())
                    .zip(gs.chunks(g.ohw()).zip(idx.chunks(g.ohw())))
                    .for_each(route);
            }
            return Ok(dx);
        }
        let mut dx = ArrayD::zeros(x.raw_dim());
        let dxs = dx.as_slice_mut().expect("fresh array");
        let route = |(dxp, (gp, ip)): (&mut [T], (&[T], &[u32]))| {
            for (&v, &i) in gp.iter().zip(ip) {
                if i != NO_INDEX {
                    dxp[i as usize] = dxp[i as usize] + v;
                }
            }
        };
        if big {
            dxs.par_chunks_mut(g.hw())
                .zip(gs.par_chunks(g.ohw()).zip(idx.par_chunks(g.ohw())))
                .for_each(route);
        } else {
            dxs.chunks_mut(g.hw())
                .zip(gs.chunks(g.ohw()).zip(idx.chunks(g.ohw())))
                .for_each(route);
        }
        Ok(dx)
    }
}

impl<T: Real> Layer<T> for MaxPool2d<T> {
    fn forward(&mut self, x: &ArrayD<T>, _mode: Mode) -> Result<ArrayD<T>> {
        MaxPool2d::forward(self, x)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _mode: Mode) -> Result<ArrayD<T>> {
        MaxPool2d::backward(self, x, dy)
    }
    fn is_max_pool_2x2(&self) -> bool {
        let c = &self.cfg;
        c.kernel_size == (2, 2)
            && c.stride.unwrap_or(c.kernel_size) == (2, 2)
            && c.padding == (0, 0)
            && c.dilation == (1, 1)
            && !c.ceil_mode
    }
    fn name(&self) -> String {
        let c = &self.cfg;
        format!(
            "MaxPool2d(kernel_size={:?}, stride={:?}, padding={:?}, dilation={:?}, ceil_mode={})",
            c.kernel_size,
            c.stride.unwrap_or(c.kernel_size),
            c.padding,
            c.dilation,
            c.ceil_mode
        )
    }
}

// ------------------------------------------------------------------------------------------------
// AvgPool2d
// ------------------------------------------------------------------------------------------------

/// `nn.AvgPool2d` configuration (stride defaults to the kernel size, `count_include_pad` to true).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AvgPool2dConfig {
    pub kernel_size: (usize, usize),
    pub stride: Option<(usize, usize)>,
    pub padding: (usize, usize),
    pub ceil_mode: bool,
    pub count_include_pad: bool,
    pub divisor_override: Option<usize>,
}

impl AvgPool2dConfig {
    pub fn new(kernel_size: impl IntoPair) -> Self {
        AvgPool2dConfig {
            kernel_size: kernel_size.pair(),
            stride: None,
            padding: (0, 0),
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        }
    }
    pub fn stride(mut self, s: impl IntoPair) -> Self {
        self.stride = Some(s.pair());
        self
    }
    pub fn padding(mut self, p: impl IntoPair) -> Self {
        self.padding = p.pair();
        self
    }
    pub fn ceil_mode(mut self, c: bool) -> Self {
        self.ceil_mode = c;
        self
    }
    pub fn count_include_pad(mut self, c: bool) -> Self {
        self.count_include_pad = c;
        self
    }
    pub fn divisor_override(mut self, d: Option<usize>) -> Self {
        self.divisor_override = d;
        self
    }
    pub fn build<T: Real>(self) -> Result<AvgPool2d<T>> {
        AvgPool2d::new(self)
    }
}

/// Average pooling (stateless).
#[derive(Debug, Clone)]
pub struct AvgPool2d<T: Real = f32> {
    pub cfg: AvgPool2dConfig,
    _t: std::marker::PhantomData<T>,
}

/// A window clipped to the image, and its divisor.
struct Window {
    h0: usize,
    h1: usize,
    w0: usize,
    w1: usize,
    div: f64,
}

impl<T: Real> AvgPool2d<T> {
    pub const NAME: &'static str = "AvgPool2d";

    pub fn new(cfg: AvgPool2dConfig) -> Result<Self> {
        let s = cfg.stride.unwrap_or(cfg.kernel_size);
        check_cfg(Self::NAME, cfg.kernel_size, s, cfg.padding, (1, 1))?;
        if cfg.divisor_override == Some(0) {
            return Err(NvError::Config(
                "AvgPool2d: divisor must be not zero".into(),
            ));
        }
        Ok(AvgPool2d {
            cfg,
            _t: std::marker::PhantomData,
        })
    }

    fn geom(&self, shape: &[usize]) -> Result<Geom> {
        let c = &self.cfg;
        geom(
            Self::NAME,
            shape,
            c.kernel_size,
            c.stride.unwrap_or(c.kernel_size),
            c.padding,
            (1, 1),
            c.ceil_mode,
        )
    }

    pub fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let g = self.geom(input)?;
        Ok(vec![input[0], input[1], g.oh, g.ow])
    }

    /// PyTorch's window and divisor for output (oh, ow); `None` if the clipped window is empty.
    fn window(&self, g: &Geom, oh: usize, ow: usize) -> Option<Window> {
        let h0 = (oh * g.sh) as isize - g.ph as isize;
        let w0 = (ow * g.sw) as isize - g.pw as isize;
        let h1 = (h0 + g.kh as isize).min((g.h + g.ph) as isize);
        let w1 = (w0 + g.kw as isize).min((g.w + g.pw) as isize);
        let pool = ((h1 - h0) * (w1 - w0)) as f64;
        let (h0, w0) = (h0.max(0) as usize, w0.max(0) as usize);
        let (h1, w1) = (h1.min(g.h as isize) as usize, w1.min(g.w as isize) as usize);
        if h0 >= h1 || w0 >= w1 {
            return None;
        }
        let div = match self.cfg.divisor_override {
            Some(d) => d as f64,
            None if self.cfg.count_include_pad => pool,
            None => ((h1 - h0) * (w1 - w0)) as f64,
        };
        Some(Window {
            h0,
            h1,
            w0,
            w1,
            div,
        })
    }

    pub fn forward(&mut self, x: &ArrayD<T>) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        let s = x.shape();
        let mut y = ArrayD::zeros(IxDyn(&[s[0], s[1], g.oh, g.ow]));
        let xs = cont(x);
        let big = g.planes * g.hw() >= PAR_MIN;
        let plane = |xp: &[T], yp: &mut [T], _: &mut [()]| {
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    yp[oh * g.ow + ow] = match self.window(&g, oh, ow) {
                        None => T::zero(),
                        Some(wd) => {
                            let mut acc = 0.0;
                            for ih in wd.h0..wd.h1 {
                                for &v in &xp[ih * g.w + wd.w0..ih * g.w + wd.w1] {
                                    acc += v.as_f64();
                                }
                            }
                            T::of_f64(acc / wd.div)
                        }
                    };
                }
            }
        };
        for_planes(
            big,
            &xs,
            g.hw(),
            y.as_slice_mut().expect("fresh"),
            g.ohw(),
            &mut [],
            0,
            plane,
        );
        Ok(y)
    }

    pub fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        let s = x.shape();
        let want = [s[0], s[1], g.oh, g.ow];
        if dy.shape() != want {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "dy has shape {:?}, the output has shape {want:?}",
                    dy.shape()
                ),
            });
        }
        let gs = cont(dy);
        let mut dx = ArrayD::zeros(x.raw_dim());
        let big = g.planes * g.hw() >= PAR_MIN;
        let plane = |gp: &[T], dxp: &mut [T], _: &mut [()]| {
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    if let Some(wd) = self.window(&g, oh, ow) {
                        let v = T::of_f64(gp[oh * g.ow + ow].as_f64() / wd.div);
                        for ih in wd.h0..wd.h1 {
                            for d in &mut dxp[ih * g.w + wd.w0..ih * g.w + wd.w1] {
                                *d = *d + v;
                            }
                        }
                    }
                }
            }
        };
        for_planes(
            big,
            &gs,
            g.ohw(),
            dx.as_slice_mut().expect("fresh"),
            g.hw(),
            &mut [],
            0,
            plane,
        );
        Ok(dx)
    }
}

impl<T: Real> Layer<T> for AvgPool2d<T> {
    fn forward(&mut self, x: &ArrayD<T>, _mode: Mode) -> Result<ArrayD<T>> {
        AvgPool2d::forward(self, x)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _mode: Mode) -> Result<ArrayD<T>> {
        AvgPool2d::backward(self, x, dy)
    }
    fn name(&self) -> String {
        let c = &self.cfg;
        format!(
            "AvgPool2d(kernel_size={:?}, stride={:?}, padding={:?}, ceil_mode={}, count_include_pad={})",
            c.kernel_size,
            c.stride.unwrap_or(c.kernel_size),
            c.padding,
            c.ceil_mode,
            c.count_include_pad
        )
    }
}

// ------------------------------------------------------------------------------------------------
// GlobalAvgPool
// ------------------------------------------------------------------------------------------------

/// Mean over the spatial dimensions: (N, C, H, W) → (N, C).
#[derive(Debug, Clone, Default)]
pub struct GlobalAvgPool<T: Real = f32> {
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> GlobalAvgPool<T> {
    pub const NAME: &'static str = "GlobalAvgPool";

    pub fn new() -> Self {
        GlobalAvgPool {
            _t: std::marker::PhantomData,
        }
    }

    fn check(shape: &[usize]) -> Result<(usize, usize)> {
        check_rank(Self::NAME, shape, 4, "4-D (N, C, H, W)")?;
        check_nonempty(Self::NAME, shape)?;
        Ok((shape[0] * shape[1], shape[2] * shape[3]))
    }

    pub fn forward(&mut self, x: &ArrayD<T>) -> Result<ArrayD<T>> {
        let (planes, hw) = Self::check(x.shape())?;
        let xs = cont(x);
        let mut y = ArrayD::zeros(IxDyn(&x.shape()[..2]));
        let ys = y.as_slice_mut().expect("fresh");
        let mean = |(yv, xp): (&mut T, &[T])| {
            *yv = T::of_f64(sum_f64(xp) / hw as f64);
        };
        if planes * hw >= PAR_MIN {
            ys.par_iter_mut().zip(xs.par_chunks(hw)).for_each(mean);
        } else {
            ys.iter_mut().zip(xs.chunks(hw)).for_each(mean);
        }
        Ok(y)
    }

    pub fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>) -> Result<ArrayD<T>> {
        let (planes, hw) = Self::check(x.shape())?;
        if dy.shape() != &x.shape()[..2] {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "dy has shape {:?}, the output has shape {:?}",
                    dy.shape(),
                    &x.shape()[..2]
                ),
            });
        }
        let gs = cont(dy);
        let mut dx = ArrayD::zeros(x.raw_dim());
        let dxs = dx.as_slice_mut().expect("fresh");
        let spread = |(dp, &g): (&mut [T], &T)| dp.fill(T::of_f64(g.as_f64() / hw as f64));
        if planes * hw >= PAR_MIN {
            dxs.par_chunks_mut(hw).zip(gs.par_iter()).for_each(spread);
        } else {
            dxs.chunks_mut(hw).zip(gs.iter()).for_each(spread);
        }
        Ok(dx)
    }
}

impl<T: Real> Layer<T> for GlobalAvgPool<T> {
    fn forward(&mut self, x: &ArrayD<T>, _mode: Mode) -> Result<ArrayD<T>> {
        GlobalAvgPool::forward(self, x)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _mode: Mode) -> Result<ArrayD<T>> {
        GlobalAvgPool::backward(self, x, dy)
    }
    fn name(&self) -> String {
        "GlobalAvgPool".into()
    }
}

stateless!(MaxPool2d, AvgPool2d, GlobalAvgPool);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max2x2_forward_and_backward_route_to_the_first_maximum() {
        // ties, NaN and -0 gradients, odd and wide planes (more than 16 outputs per row), 1 and 2 threads
        use rand::{Rng, SeedableRng};
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(9);
        for &(n, c, h, w) in &[(2, 3, 7, 9), (1, 2, 28, 28), (2, 1, 6, 37), (3, 4, 14, 14)] {
            let x = ArrayD::from_shape_fn(IxDyn(&[n, c, h, w]), |_| match rng.gen_range(0..20) {
                0 => f32::NAN,
                1..=6 => 1.0, // ties
                _ => rng.gen::<f32>(),
            });
            let dy = ArrayD::from_shape_fn(IxDyn(&[n, c, h / 2, w / 2]), |_| {
                match rng.gen_range(0..8) {
                    0 => -0.0,
                    _ => rng.gen::<f32>() - 0.5,
                }
            });
            // reference: scalar argmax (first maximum in row-major window order; a NaN is taken and kept)
            let (oh, ow) = (h / 2, w / 2);
            let mut y_ref = vec![0f32; n * c * oh * ow];
            let mut dx_ref = vec![0f32; n * c * h * w];
            for p in 0..n * c {
                for oi in 0..oh {
                    for oj in 0..ow {
                        let at = |r: usize, q: usize| p * h * w + (2 * oi + r) * w + 2 * oj + q;
                        let xs = x.as_slice().unwrap();
                        let mut best = at(0, 0);
                        for (r, q) in [(0, 1), (1, 0), (1, 1)] {
                            let v = xs[at(r, q)];
                            if v > xs[best] || v.is_nan() {
                                best = at(r, q);
                            }
                        }
                        let o = (p * oh + oi) * ow + oj;
                        y_ref[o] = xs[best];
                        dx_ref[best] = 0.0 + dy.as_slice().unwrap()[o];
                    }
                }
            }
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut mp = MaxPool2dConfig::new(2).build::<f32>().unwrap();
                    let y = mp.forward(&x).unwrap();
                    let dx = mp.backward(&x, &dy).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(y.as_slice().unwrap()),
                        bits(&y_ref),
                        "y {:?}",
                        (n, c, h, w)
                    );
                    assert_eq!(
                        bits(dx.as_slice().unwrap()),
                        bits(&dx_ref),
                        "dx {:?}",
                        (n, c, h, w)
                    );
                });
            }
        }
    }

    #[test]
    fn output_sizes_follow_pytorch() {
        assert_eq!(out_size(28, 2, 0, 2, 1, false), Some(14));
        assert_eq!(out_size(5, 2, 0, 2, 1, false), Some(2));
        assert_eq!(out_size(5, 2, 0, 2, 1, true), Some(3));
        // ceil mode: the last window may not start in the right padding
        assert_eq!(out_size(6, 3, 1, 2, 1, true), Some(4));
        assert_eq!(out_size(5, 3, 1, 2, 1, true), Some(3));
        assert_eq!(out_size(5, 2, 1, 2, 1, true), Some(3));
        assert_eq!(out_size(1, 2, 0, 2, 1, false), None);
        assert_eq!(out_size(7, 3, 1, 2, 2, false), Some(3));
    }
}
