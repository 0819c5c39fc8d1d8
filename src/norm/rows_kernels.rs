//! BatchNorm kernels for the S = 1 layout (BatchNorm1d on (N, C)): channels are contiguous within a row, so the
//! work is split by **rows**. Each task reduces its own contiguous block of rows into per-channel `f64` sums
//! (vectorised across channels), the partial sums are added, and the elementwise passes run over the same
//! row blocks. Every memory access is sequential, unlike a channel-major walk with a stride of C.

use super::batch_kernels::{dx_coefficients, BackwardSums, BatchStats, Moments, Ncs};
use crate::Real;
use rayon::prelude::*;

fn rows_per_task(d: Ncs) -> usize {
    let threads = rayon::current_num_threads().max(1);
    d.n.div_ceil(threads).max(1)
}

fn add_into(acc: &mut [f64], v: &[f64]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// Per-channel reduction over row blocks: `f(row_x, row_other, acc1, acc2)` accumulates one row.
fn reduce_rows<T: Real, F>(x: &[T], other: Option<&[T]>, d: Ncs, f: F) -> (Vec<f64>, Vec<f64>)
where
    F: Fn(&[T], Option<&[T]>, &mut [f64], &mut [f64]) + Sync,
{
    let rpt = rows_per_task(d) * d.c;
    let parts: Vec<(Vec<f64>, Vec<f64>)> = x
        .par_chunks(rpt)
        .enumerate()
        .map(|(t, xb)| {
            let mut a1 = vec![0.0f64; d.c];
            let mut a2 = vec![0.0f64; d.c];
            for (j, xr) in xb.chunks(d.c).enumerate() {
                let off = t * rpt + j * d.c;
                f(xr, other.map(|o| &o[off..off + d.c]), &mut a1, &mut a2);
            }
            (a1, a2)
        })
        .collect();
    let mut s1 = vec![0.0f64; d.c];
    let mut s2 = vec![0.0f64; d.c];
    for (p1, p2) in parts {
        add_into(&mut s1, &p1);
        add_into(&mut s2, &p2);
    }
    (s1, s2)
}

/// Two-pass moments with the rounded mean as shift.
pub fn moments<T: Real>(x: &[T], d: Ncs) -> (Vec<T>, Moments) {
    let m = d.n as f64;
    let (tot, _) = reduce_rows(x, None, d, |xr, _, a1, _| {
        for (a, v) in a1.iter_mut().zip(xr) {
            *a += v.as_f64();
        }
    });
    let shift: Vec<T> = tot.iter().map(|t| T::of_f64(t / m)).collect();
    let (s1, s2) = reduce_rows(x, None, d, |xr, _, a1, a2| {
        for (((p, q), &v), &h) in a1.iter_mut().zip(a2.iter_mut()).zip(xr).zip(&shift) {
            let dv = (v - h).as_f64();
            *p += dv;
            *q += dv * dv;
        }
    });
    let mut out = Moments::empty(d.c);
    out.count = d.n as u64;
    for c in 0..d.c {
        let dm = s1[c] / m;
        out.mean[c] = shift[c].as_f64() + dm;
        out.m2[c] = (s2[c] - s1[c] * dm).max(0.0);
    }
    (shift, out)
}

/// y = (x - shift)·s + b' per channel, row blocks in parallel.
pub fn normalize<T: Real>(
    x: &[T],
    y: &mut [T],
    d: Ncs,
    st: &BatchStats<T>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
) {
    let (s, b): (Vec<T>, Vec<T>) = (0..d.c).map(|c| st.channel_affine(c, weight, bias)).unzip();
    let sh = &st.shift;
    let z = T::zero();
    let rpt = rows_per_task(d) * d.c;
    y.par_chunks_mut(rpt)
        .zip(x.par_chunks(rpt))
        .for_each(|(yb, xb)| {
            for (yr, xr) in yb.chunks_mut(d.c).zip(xb.chunks(d.c)) {
                let n = d.c;
                let (yr, xr, sh, s, b) = (&mut yr[..n], &xr[..n], &sh[..n], &s[..n], &b[..n]);
                if relu {
                    for i in 0..n {
                        let t = (xr[i] - sh[i]) * s[i] + b[i];
                        yr[i] = if t > z { t } else { z };
                    }
                } else {
                    for i in 0..n {
                        yr[i] = (xr[i] - sh[i]) * s[i] + b[i];
                    }
                }
            }
        });
}

/// Statistics and normalisation (the fused training forward for S = 1).
pub fn train_forward<T: Real>(
    x: &[T],
    y: &mut [T],
    d: Ncs,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
    relu: bool,
) -> BatchStats<T> {
    let (shift, mo) = moments(x, d);
    let mut st = BatchStats::<T>::from_moments(&mo, eps);
    st.shift = shift;
    normalize(x, y, d, &st, weight, bias, relu);
    st
}

/// Σdy and Σdy·(x - mean) per channel (dy masked by the fused ReLU).
pub fn backward_sums<T: Real>(
    x: &[T],
    dy: &[T],
    d: Ncs,
    st: &BatchStats<T>,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
) -> BackwardSums {
    let (s, b): (Vec<T>, Vec<T>) = (0..d.c).map(|c| st.channel_affine(c, weight, bias)).unzip();
    let sh = &st.shift;
    let z = T::zero();
    let (sd, dt) = reduce_rows(x, Some(dy), d, |xr, gr, a1, a2| {
        let gr = gr.expect("dy");
        let n = xr.len();
        let (xr, gr, a1, a2, sh, s, b) = (
            &xr[..n],
            &gr[..n],
            &mut a1[..n],
            &mut a2[..n],
            &sh[..n],
            &s[..n],
            &b[..n],
        );
        for i in 0..n {
            let dv = xr[i] - sh[i];
            let g = if relu && !(dv * s[i] + b[i] > z) {
                z
            } else {
                gr[i]
            };
            a1[i] += g.as_f64();
            a2[i] += (g * dv).as_f64();
        }
    });
    let dot = (0..d.c)
        .map(|c| dt[c] - (st.mean[c] - sh[c].as_f64()) * sd[c])
        .collect();
    BackwardSums { sum_dy: sd, dot }
}

/// dx = dy·k1 + (x - shift)·k2 + k3 per channel, from (possibly all-reduced) sums over `count` values.
#[allow(clippy::too_many_arguments)]
pub fn backward_dx<T: Real>(
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    d: Ncs,
    st: &BatchStats<T>,
    sums: &BackwardSums,
    count: u64,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    relu: bool,
) {
    let count = count as f64;
    let mut k1 = Vec::with_capacity(d.c);
    let mut k2 = Vec::with_capacity(d.c);
    let mut k3 = Vec::with_capacity(d.c);
    for c in 0..d.c {
        let (a, bq, cq) = dx_coefficients(st, c, sums, count, weight);
        k1.push(a);
        k2.push(bq);
        k3.push(cq);
    }
    let (s, b): (Vec<T>, Vec<T>) = (0..d.c).map(|c| st.channel_affine(c, weight, bias)).unzip();
    let sh = &st.shift;
    let z = T::zero();
    let rpt = rows_per_task(d) * d.c;
    dx.par_chunks_mut(rpt)
        .zip(x.par_chunks(rpt).zip(dy.par_chunks(rpt)))
        .for_each(|(ob, (xb, gb))| {
            for ((or, xr), gr) in ob.chunks_mut(d.c).zip(xb.chunks(d.c)).zip(gb.chunks(d.c)) {
                let n = d.c;
                let (or, xr, gr, sh, s, b) =
                    (&mut or[..n], &xr[..n], &gr[..n], &sh[..n], &s[..n], &b[..n]);
                let (k1, k2, k3) = (&k1[..n], &k2[..n], &k3[..n]);
                for i in 0..n {
                    let dv = xr[i] - sh[i];
                    let g = if relu && !(dv * s[i] + b[i] > z) {
                        z
                    } else {
                        gr[i]
                    };
                    or[i] = g * k1[i] + dv * k2[i] + k3[i];
                }
            }
        });
}

/// Eval-mode backward for S = 1: dx = dy·a (masked), and per channel (Σdy, Σdy·x) with the same mask.
pub fn eval_backward<T: Real>(
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    d: Ncs,
    a: &[T],
    b: &[T],
    relu: bool,
) -> (Vec<f64>, Vec<f64>) {
    let z = T::zero();
    let rpt = rows_per_task(d) * d.c;
    dx.par_chunks_mut(rpt)
        .zip(x.par_chunks(rpt).zip(dy.par_chunks(rpt)))
        .for_each(|(ob, (xb, gb))| {
            for ((or, xr), gr) in ob.chunks_mut(d.c).zip(xb.chunks(d.c)).zip(gb.chunks(d.c)) {
                let n = d.c;
                let (or, xr, gr, a, b) = (&mut or[..n], &xr[..n], &gr[..n], &a[..n], &b[..n]);
                for i in 0..n {
                    let g = if relu && !(xr[i] * a[i] + b[i] > z) {
                        z
                    } else {
                        gr[i]
                    };
                    or[i] = g * a[i];
                }
            }
        });
    reduce_rows(x, Some(dy), d, |xr, gr, a1, a2| {
        let gr = gr.expect("dy");
        let n = xr.len();
        let (xr, gr, a1, a2, a, b) = (
            &xr[..n],
            &gr[..n],
            &mut a1[..n],
            &mut a2[..n],
            &a[..n],
            &b[..n],
        );
        for i in 0..n {
            let g = if relu && !(xr[i] * a[i] + b[i] > z) {
                z
            } else {
                gr[i]
            };
            a1[i] += g.as_f64();
            a2[i] += (g * xr[i]).as_f64();
        }
    })
}
