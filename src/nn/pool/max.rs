//! `nn.MaxPool2d`: the forward saves the argmax of every window for the backward.

use super::{check_cfg, for_planes, geom, Geom};
use crate::kernels::elementwise::PAR_MIN;
use crate::kernels::shape::check_output_grad;
use crate::kernels::shape::contiguous as cont;
use crate::layer::Layer;
use crate::nn::{stateless, IntoPair};
use crate::{Ctx, Isa, NvError, Real, Result};
use ndarray::ArrayD;
use rayon::prelude::*;

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
    cfg: MaxPool2dConfig,
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

    pub fn config(&self) -> &MaxPool2dConfig {
        &self.cfg
    }

    /// Whether this is a 2×2, stride-2 pool without padding, dilation or ceil mode (which plans fuse into the
    /// pass that writes its input).
    pub fn is_2x2(&self) -> bool {
        let c = &self.cfg;
        c.kernel_size == (2, 2)
            && c.stride.unwrap_or(c.kernel_size) == (2, 2)
            && c.padding == (0, 0)
            && c.dilation == (1, 1)
            && !c.ceil_mode
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

    fn run_forward(g: &Geom, x: &[T], y: &mut [T], idx: &mut [u32], isa: Isa) {
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
                    if isa.avx512() && crate::kernels::pool2x2::available() {
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

    fn forward_impl(&mut self, x: &ArrayD<T>, isa: Isa) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        let s = x.shape();
        // SAFETY: every window writes its output element.
        let mut y = unsafe { crate::kernels::arena::output_uninit(&[s[0], s[1], g.oh, g.ow]) };
        let mut idx = match self.saved.take() {
            Some((_, mut v)) => {
                v.resize(y.len(), 0);
                v
            }
            None => vec![0; y.len()],
        };
        let xs = cont(x);
        Self::run_forward(
            &g,
            &xs,
            y.as_slice_mut().expect("fresh array"),
            &mut idx,
            isa,
        );
        self.saved = Some((s.to_vec(), idx));
        Ok(y)
    }

    /// Routes every dy to its window's argmax. Uses the indices of the last forward when it saw an input of
    /// x's shape, else recomputes them from `x`.
    fn backward_impl(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, isa: Isa) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        let s = x.shape();
        check_output_grad(Self::NAME, dy.shape(), &[s[0], s[1], g.oh, g.ow])?;
        if !matches!(&self.saved, Some((shape, _)) if shape == s) {
            let mut idx = vec![0u32; dy.len()];
            let mut scratch = vec![T::zero(); dy.len()];
            Self::run_forward(&g, &cont(x), &mut scratch, &mut idx, isa);
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
            // SAFETY: every element of every plane is written below.
            let mut dx = unsafe { crate::kernels::arena::output_uninit(x.shape()) };
            let dxs = dx.as_slice_mut().expect("fresh array");
            let (w, ow) = (g.w, g.ow);
            let route = |(dxp, (gp, ip)): (&mut [T], (&[T], &[u32]))| {
                if let (Some(df), Some(gf)) = (
                    crate::kernels::cast::as_f32_mut(dxp),
                    crate::kernels::cast::as_f32(gp),
                ) {
                    if isa.avx512() && crate::kernels::pool2x2::available() {
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

impl<T: Real> MaxPool2d<T> {
    /// Eval and inference of the 2×2, stride-2 window: the maximum alone, no argmax indices (a backward
    /// recomputes them from x), by selects rather than branches. The same values as the training path (the
    /// first maximum wins; a NaN is taken and kept). `None` for other windows and for AVX-512, whose kernel
    /// already runs branch-free.
    fn forward_eval_2x2(&mut self, x: &ArrayD<T>, isa: Isa) -> Option<Result<ArrayD<T>>> {
        let g = match self.geom(x.shape()) {
            Ok(g) => g,
            Err(e) => return Some(Err(e)),
        };
        let simple = (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw) == (2, 2, 2, 2, 0, 0, 1, 1)
            && 2 * g.oh <= g.h
            && 2 * g.ow <= g.w;
        let avx512 = isa.avx512() && crate::kernels::pool2x2::available() && T::NAME == "f32";
        if !simple || avx512 {
            return None;
        }
        let s = x.shape();
        // SAFETY: every output element is written below.
        let mut y = unsafe { crate::kernels::arena::output_uninit(&[s[0], s[1], g.oh, g.ow]) };
        let xs = cont(x);
        let (w, ow, oh) = (g.w, g.ow, g.oh);
        let pick = |a: T, b: T| if (b > a) | b.is_nan() { b } else { a };
        let plane = |xp: &[T], yp: &mut [T]| {
            for oi in 0..oh {
                let r0 = &xp[2 * oi * w..2 * oi * w + w];
                let r1 = &xp[(2 * oi + 1) * w..(2 * oi + 1) * w + w];
                for (oj, o) in yp[oi * ow..(oi + 1) * ow].iter_mut().enumerate() {
                    let j = 2 * oj;
                    *o = pick(pick(pick(r0[j], r0[j + 1]), r1[j]), r1[j + 1]);
                }
            }
        };
        let ys = y.as_slice_mut().expect("fresh array");
        if g.planes * g.hw() >= PAR_MIN {
            use rayon::prelude::*;
            xs.par_chunks(g.hw())
                .zip(ys.par_chunks_mut(g.ohw()))
                .for_each(|(xp, yp)| plane(xp, yp));
        } else {
            for (xp, yp) in xs.chunks(g.hw()).zip(ys.chunks_mut(g.ohw())) {
                plane(xp, yp);
            }
        }
        self.saved = None;
        Some(Ok(y))
    }
}

impl<T: Real> Layer<T> for MaxPool2d<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        if !ctx.is_train() {
            if let Some(r) = self.forward_eval_2x2(x, ctx.isa()) {
                return r;
            }
        }
        self.forward_impl(x, ctx.isa())
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        self.backward_impl(x, dy, ctx.isa())
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let g = self.geom(input)?;
        Ok(vec![input[0], input[1], g.oh, g.ow])
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

stateless!(MaxPool2d);
