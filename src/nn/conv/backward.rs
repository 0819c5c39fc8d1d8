//! The convolution's backward: dx (when asked) and the accumulated weight and bias gradients, by the
//! algorithm the plan chose, and the weight gradient from dy handed over plane by plane.

use super::geom::{ensure_padded, Geom, Workspace};
use super::implicit::WGRAD_GROUP;
use super::{algo, direct, implicit, one_channel, winograd};
use super::{f32s, f32s_mut, Conv2d, ConvAlgo, Pack};
use crate::kernels::shape::check_output_grad;
use crate::kernels::shape::contiguous;
use crate::{NvError, Param, Real, Result};
use ndarray::ArrayD;
use rayon::prelude::*;

impl<T: Real> Conv2d<T> {
    /// Adds per-channel Σdy (f64) to the bias gradient, when the layer has a bias.
    fn add_bias_grad(&mut self, db: Option<Vec<f64>>) {
        if let (Some(b), Some(db)) = (self.bias.as_mut(), db) {
            for (d, s) in b.grads_mut().iter_mut().zip(db) {
                *d = *d + T::of_f64(s);
            }
        }
    }

    /// The backward with algorithm `algo`: writes dx into `dx` when given (x's number of elements) and
    /// accumulates dweight and dbias.
    pub fn backward_with(
        &mut self,
        x: &ArrayD<T>,
        dy: &ArrayD<T>,
        dx: Option<&mut [T]>,
        algo: ConvAlgo,
    ) -> Result<()> {
        let g = self.geom(x.shape())?;
        self.check_algo(&g, algo)?;
        check_output_grad(Self::NAME, dy.shape(), &[g.n, g.o, g.oh, g.ow])?;
        if let Some(d) = &dx {
            if d.len() != x.len() {
                return Err(NvError::Shape {
                    layer: Self::NAME,
                    msg: format!("dx buffer has {} elements, input {}", d.len(), x.len()),
                });
            }
        }
        if g.n == 0 {
            return Ok(());
        }
        let (xs, gs) = (contiguous(x), contiguous(dy));
        match algo {
            ConvAlgo::Winograd4 | ConvAlgo::Winograd2 | ConvAlgo::Winograd2Batch => {
                let mut db = self.bias.as_ref().map(|_| vec![0f64; g.o]);
                let Param { value, grad, .. } = &mut self.weight;
                let (xf, gf) = (f32s(&xs), f32s(&gs));
                let w = f32s(value.as_slice().expect("contiguous weights"));
                let dw = f32s_mut(grad.as_slice_mut().expect("contiguous gradients"));
                let (dx, db_) = (dx.map(f32s_mut), db.as_deref_mut());
                match algo {
                    ConvAlgo::Winograd4 => {
                        let ws = algo::winograd_shape(&g).expect("checked");
                        winograd::f4::backward(ws, xf, gf, w, dx, dw, db_)
                    }
                    ConvAlgo::Winograd2 => {
                        let ws = algo::winograd_shape(&g).expect("checked");
                        winograd::backward(ws, xf, gf, w, dx, dw, db_)
                    }
                    _ => {
                        let bs = algo::batch_shape(&g).expect("checked");
                        let u = dx.is_some().then(|| self.wino.get(w, bs.k, bs.c));
                        winograd::batch::backward(bs, xf, gf, u, dx, dw, db_)
                    }
                }
                self.add_bias_grad(db);
            }
            ConvAlgo::OneChannel => {
                let os = algo::one_channel_shape(&g).expect("checked");
                let mut db = self.bias.as_ref().map(|_| vec![0f64; g.o]);
                let Param { value, grad, .. } = &mut self.weight;
                if let Some(d) = dx {
                    let w = f32s(value.as_slice().expect("contiguous weights"));
                    one_channel::backward_data(os, f32s(&gs), w, f32s_mut(d));
                }
                let grad = f32s_mut(grad.as_slice_mut().expect("contiguous gradients"));
                one_channel::backward_params(os, f32s(&xs), f32s(&gs), grad, db.as_deref_mut());
                self.add_bias_grad(db);
            }
            _ => self.backward_direct(&g, &xs, &gs, dx, algo),
        }
        Ok(())
    }

    /// The direct paths' backward, chunked over the batch; the chunks' private dW/db are added in chunk order.
    fn backward_direct(
        &mut self,
        g: &Geom,
        xs: &[T],
        gs: &[T],
        dx: Option<&mut [T]>,
        algo: ConvAlgo,
    ) {
        let g = *g;
        let (chunks, per) = Self::split(g.n, algo);
        let par = Self::gemm_par(algo);
        let want_db = self.bias.is_some();
        let wlen = self.weight.len();
        let implicit = algo == ConvAlgo::Implicit;
        let fast = implicit || algo == ConvAlgo::Explicit;
        if fast && dx.is_some() {
            // the implicit data gradient reads its own packing; the explicit one (col_grad) the transposed
            // weights, whatever the shape
            let mode = if implicit && g.implicit_dx() {
                Pack::DataGrad
            } else {
                Pack::Transposed
            };
            self.pack_weights(&g, mode);
        }
        let col_len = match (implicit, dx.is_some()) {
            (true, false) => 0,
            (true, true) if g.implicit_dx() => (g.c / g.groups) * g.q(),
            _ => g.col_len(),
        };
        self.prepare_ws(chunks, col_len, wlen, if want_db { g.o } else { 0 });
        let (offs_f, offs_b) = if implicit {
            implicit::implicit_offsets(&g)
        } else {
            (vec![], vec![])
        };
        let w = self.weight.values();
        let packed = &self.packed[..];
        let (is, os) = (g.in_size(), g.out_size());
        let run = |xc: &[T], gc: &[T], mut dxc: Option<&mut [T]>, ws: &mut Workspace<T>| {
            if implicit {
                let (hp, wp) = (g.hp(), g.wp());
                ensure_padded(&mut ws.xpad, &mut ws.xpad_key, (g.c * WGRAD_GROUP, hp, wp));
                ensure_padded(
                    &mut ws.dypad,
                    &mut ws.dypad_key,
                    (g.o * WGRAD_GROUP, hp, wp),
                );
                let samples = xc.len() / is;
                let mut s0 = 0;
                while s0 < samples {
                    let s1 = (s0 + WGRAD_GROUP).min(samples);
                    let xg: Vec<&[f32]> =
                        (s0..s1).map(|s| f32s(&xc[s * is..(s + 1) * is])).collect();
                    let yg: Vec<&[f32]> =
                        (s0..s1).map(|s| f32s(&gc[s * os..(s + 1) * os])).collect();
                    let dxg: Vec<Option<&mut [f32]>> = match dxc.as_deref_mut() {
                        Some(d) => d[s0 * is..s1 * is]
                            .chunks_exact_mut(is)
                            .map(|c| Some(f32s_mut(c)))
                            .collect(),
                        None => (s0..s1).map(|_| None).collect(),
                    };
                    implicit::implicit_backward_group(
                        &g,
                        &xg,
                        &yg,
                        dxg,
                        packed,
                        (&offs_f, &offs_b),
                        f32s_mut(&mut ws.xpad),
                        f32s_mut(&mut ws.dypad),
                        f32s_mut(&mut ws.col),
                        f32s_mut(&mut ws.dw),
                        &mut ws.db,
                    );
                    s0 = s1;
                }
                return;
            }
            for (s, (xs, gs)) in xc.chunks_exact(is).zip(gc.chunks_exact(os)).enumerate() {
                let dxs = dxc.as_deref_mut().map(|d| &mut d[s * is..(s + 1) * is]);
                if fast {
                    direct::fast_backward_sample(
                        &g,
                        f32s(xs),
                        f32s(gs),
                        dxs.map(f32s_mut),
                        packed,
                        f32s_mut(&mut ws.col),
                        f32s_mut(&mut ws.dw),
                        &mut ws.db,
                    );
                } else {
                    direct::backward_sample(&g, xs, gs, dxs, w, ws, want_db, par);
                }
            }
        };
        if chunks == 1 {
            run(xs, gs, dx, &mut self.ws[0]);
        } else {
            let mut dx_chunks: Vec<Option<&mut [T]>> = match dx {
                Some(d) => d.chunks_mut(per * is).map(Some).collect(),
                None => (0..chunks).map(|_| None).collect(),
            };
            xs.par_chunks(per * is)
                .zip(gs.par_chunks(per * os))
                .zip(dx_chunks.par_iter_mut())
                .zip(self.ws[..chunks].par_iter_mut())
                .for_each(|(((xc, gc), dxc), ws)| run(xc, gc, dxc.as_deref_mut(), ws));
        }
        let used = chunks.min(g.n.div_ceil(per));
        let dw = self.weight.grads_mut();
        for ws in &self.ws[..used] {
            for (d, s) in dw.iter_mut().zip(&ws.dw) {
                *d = *d + *s;
            }
        }
        if let Some(b) = self.bias.as_mut() {
            let db = b.grads_mut();
            for (o, d) in db.iter_mut().enumerate() {
                let s: f64 = self.ws[..used].iter().map(|ws| ws.db[o]).sum();
                *d = *d + T::of_f64(s);
            }
        }
    }

    /// The parameter gradients from dy given plane by plane: `fill(k, out)` writes plane k (= n·O + o) of dy,
    /// `planes` = (N, O, OH·OW). Only [`ConvAlgo::OneChannel`] takes it (its weight gradient consumes dy image by
    /// image from a buffer in cache, so a dy that a following BatchNorm computes plane by plane is never written
    /// out in full); `Ok(false)` (nothing done) for every other algorithm.
    pub fn backward_params_from_planes(
        &mut self,
        x: &ArrayD<T>,
        planes: (usize, usize, usize),
        fill: &(dyn Fn(usize, &mut [T]) + Sync),
        algo: ConvAlgo,
    ) -> Result<bool> {
        let g = self.geom(x.shape())?;
        if !algo.takes_dy_planes() {
            return Ok(false);
        }
        self.check_algo(&g, algo)?;
        let os = algo::one_channel_shape(&g).expect("checked");
        if planes != (g.n, g.o, g.oh * g.ow) {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "dy has (N, C, H·W) = {planes:?}, the output ({}, {}, {})",
                    g.n,
                    g.o,
                    g.oh * g.ow
                ),
            });
        }
        let xs = contiguous(x);
        let mut db = self.bias.as_ref().map(|_| vec![0f64; g.o]);
        let grad = f32s_mut(
            self.weight
                .grad
                .as_slice_mut()
                .expect("contiguous gradients"),
        );
        one_channel::backward_params_from_planes(
            os,
            f32s(&xs),
            |p, out: &mut [f32]| fill(p, crate::kernels::cast::f32_as_mut(out).expect("f32")),
            grad,
            db.as_deref_mut(),
        );
        self.add_bias_grad(db);
        Ok(true)
    }
}
