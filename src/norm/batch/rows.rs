//! BatchNorm kernels for the S = 1 layout (BatchNorm1d on (N, C)): channels are contiguous within a row.
//!
//! The tensor is cut into **tiles** of rows × channels (see `tiles`); each rayon task owns whole tiles. Inside a tile every pass walks the
//! rows in order and updates per-channel lane accumulators (vertical, vectorisable adds; no horizontal
//! reductions), flushed into `f64` every `FLUSH_ROWS` rows. When each tile holds every row of its channels, the
//! training forward computes the statistics (Σx, then the
//! shifted Σd and Σd²) and normalises the tile while it is still in cache, and the backward computes its two
//! reductions and dx the same way. On several threads the tiles are row blocks and the kernels run staged
//! (reduce tiles, add the partial sums across row blocks in a fixed order, then the elementwise pass).

use super::stats::{dx_coefficients, BackwardSums, BatchStats, Moments, Ncs};
use crate::kernels::elementwise::SyncPtr;
use crate::kernels::isa::isa_fn;
use crate::kernels::moments::moments_from_shifted;
use crate::{KernelOptions, Real};
use rayon::prelude::*;

/// Rows accumulated in `T` lanes before the partial sums are added into `f64` (as the S > 1 kernels flush
/// every 1024 values).
const FLUSH_ROWS: usize = 256;
/// Widest tile, in channels.
const MAX_WIDTH: usize = 4096;
/// Inputs up to this size are one tile: splitting them costs more in pool wake-ups than it saves.
const SMALL_BYTES: usize = 64 << 10;

/// One tile: rows `r0..r1`, channels `c0..c1`.
#[derive(Debug, Clone, Copy)]
struct Tile {
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
}

impl Tile {
    fn width(&self) -> usize {
        self.c1 - self.c0
    }
}

/// The tiles. On one thread (or for inputs of at most [`SMALL_BYTES`]): whole columns of up to [`MAX_WIDTH`]
/// channels, each holding all N values of its channels, so the fused kernels reduce and normalise a tile in one
/// parallel region. On several threads: one row block per thread (staged: reduce, add the partial sums across
/// row blocks in a fixed order, then the elementwise pass, in a second parallel region).
///
/// Column tiles per thread were the multi-thread layout before, and lost: a thread's columns of a row are a
/// fraction of each 4 KB row, so its half of x and of y maps onto that fraction of the L2 sets and evicts
/// itself. Narrow column tiles on one thread were slower too, because each short row segment starts a new
/// hardware-prefetch stream (see docs/PERFORMANCE.md, "Tuning constants"). Tiles are ordered row block by row block, so partial sums are
/// added in a fixed order. Returns the tiles and the number of row blocks.
fn tiles<T>(d: Ncs) -> (Vec<Tile>, usize) {
    let threads = rayon::current_num_threads().max(1);
    let bytes = d.numel() * std::mem::size_of::<T>();
    let width = d.c.min(MAX_WIDTH);
    let rows = if bytes <= SMALL_BYTES || threads == 1 {
        d.n
    } else {
        d.n.div_ceil(threads).max(1)
    };
    let mut out = Vec::new();
    let mut r0 = 0;
    let mut blocks = 0;
    while r0 < d.n {
        let r1 = (r0 + rows.max(1)).min(d.n);
        let mut c0 = 0;
        while c0 < d.c {
            let c1 = (c0 + width).min(d.c);
            out.push(Tile { r0, r1, c0, c1 });
            c0 = c1;
        }
        blocks += 1;
        r0 = r1;
    }
    (out, blocks)
}

/// Walks the rows of a tile, calling `row(offset of the row's first channel, acc1, acc2)` to accumulate one row
/// into `T` lanes, and adds the lanes into `out1`/`out2` every `FLUSH_ROWS` rows.
#[inline(always)]
fn reduce_tile<T: Real>(
    t: Tile,
    d: Ncs,
    out1: &mut [f64],
    out2: &mut [f64],
    mut row: impl FnMut(usize, &mut [T], &mut [T]),
) {
    let w = t.width();
    let mut a1 = vec![T::zero(); w];
    let mut a2 = vec![T::zero(); w];
    let mut r = t.r0;
    while r < t.r1 {
        let end = (r + FLUSH_ROWS).min(t.r1);
        for rr in r..end {
            row(rr * d.c + t.c0, &mut a1, &mut a2);
        }
        for i in 0..w {
            out1[i] += a1[i].as_f64();
            out2[i] += a2[i].as_f64();
            a1[i] = T::zero();
            a2[i] = T::zero();
        }
        r = end;
    }
}

/// Σx per channel of a tile.
#[inline(always)]
fn tile_sum<T: Real>(x: &[T], d: Ncs, t: Tile, out: &mut [f64]) {
    let w = t.width();
    let mut unused = vec![0.0f64; w];
    reduce_tile(t, d, out, &mut unused, |off, a1: &mut [T], _| {
        let xr = &x[off..off + w];
        for (a, &v) in a1.iter_mut().zip(xr) {
            *a = *a + v;
        }
    });
}

/// (Σ(x-shift), Σ(x-shift)²) per channel of a tile.
#[inline(always)]
fn tile_shifted<T: Real>(x: &[T], d: Ncs, t: Tile, shift: &[T], o1: &mut [f64], o2: &mut [f64]) {
    let w = t.width();
    let shift = &shift[..w];
    reduce_tile(t, d, o1, o2, |off, a1: &mut [T], a2: &mut [T]| {
        let xr = &x[off..off + w];
        let (a1, a2) = (&mut a1[..w], &mut a2[..w]);
        for i in 0..w {
            let dv = xr[i] - shift[i];
            a1[i] = a1[i] + dv;
            a2[i] = a2[i] + dv * dv;
        }
    });
}

/// (Σg, Σg·(x-shift)) per channel of a tile, g = dy masked by the fused ReLU when `relu`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_dy_sums<T: Real>(
    x: &[T],
    dy: &[T],
    d: Ncs,
    t: Tile,
    shift: &[T],
    s: &[T],
    b: &[T],
    relu: bool,
    o1: &mut [f64],
    o2: &mut [f64],
) {
    let w = t.width();
    let (shift, s, b) = (&shift[..w], &s[..w], &b[..w]);
    let z = T::zero();
    reduce_tile(t, d, o1, o2, |off, a1: &mut [T], a2: &mut [T]| {
        let (xr, gr) = (&x[off..off + w], &dy[off..off + w]);
        let (a1, a2) = (&mut a1[..w], &mut a2[..w]);
        for i in 0..w {
            let dv = xr[i] - shift[i];
            let g = if relu && !(dv * s[i] + b[i] > z) {
                z
            } else {
                gr[i]
            };
            a1[i] = a1[i] + g;
            a2[i] = a2[i] + g * dv;
        }
    });
}

/// y = (x - shift)·s + b (ReLU when `relu`) over a tile.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_normalize<T: Real>(
    x: &[T],
    y: SyncPtr<T>,
    d: Ncs,
    t: Tile,
    shift: &[T],
    s: &[T],
    b: &[T],
    relu: bool,
) {
    let w = t.width();
    let (shift, s, b) = (&shift[..w], &s[..w], &b[..w]);
    let z = T::zero();
    for r in t.r0..t.r1 {
        let off = r * d.c + t.c0;
        let xr = &x[off..off + w];
        // SAFETY: tiles are disjoint and each is written by one task.
        let yr = unsafe { y.slice(off, w) };
        if relu {
            for i in 0..w {
                let v = (xr[i] - shift[i]) * s[i] + b[i];
                yr[i] = if v > z { v } else { z };
            }
        } else {
            for i in 0..w {
                yr[i] = (xr[i] - shift[i]) * s[i] + b[i];
            }
        }
    }
}

/// dx = g·k1 + (x - shift)·k2 + k3 over a tile (g masked by the fused ReLU when `relu`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_dx<T: Real>(
    x: &[T],
    dy: &[T],
    dx: SyncPtr<T>,
    d: Ncs,
    t: Tile,
    shift: &[T],
    sb: (&[T], &[T]),
    k: (&[T], &[T], &[T]),
    relu: bool,
) {
    let w = t.width();
    let (shift, s, b) = (&shift[..w], &sb.0[..w], &sb.1[..w]);
    let (k1, k2, k3) = (&k.0[..w], &k.1[..w], &k.2[..w]);
    let z = T::zero();
    for r in t.r0..t.r1 {
        let off = r * d.c + t.c0;
        let (xr, gr) = (&x[off..off + w], &dy[off..off + w]);
        // SAFETY: tiles are disjoint and each is written by one task.
        let or = unsafe { dx.slice(off, w) };
        for i in 0..w {
            let dv = xr[i] - shift[i];
            let g = if relu && !(dv * s[i] + b[i] > z) {
                z
            } else {
                gr[i]
            };
            or[i] = g * k1[i] + dv * k2[i] + k3[i];
        }
    }
}

/// Per-tile partial sums added across row blocks in tile order (deterministic for a given thread count); a
/// part's second vector may be empty.
fn add_partials(d: Ncs, tiles: &[Tile], parts: Vec<(Vec<f64>, Vec<f64>)>) -> (Vec<f64>, Vec<f64>) {
    let mut s1 = vec![0.0f64; d.c];
    let mut s2 = vec![0.0f64; d.c];
    for (t, (p1, p2)) in tiles.iter().zip(parts) {
        for i in 0..t.width() {
            s1[t.c0 + i] += p1[i];
            if !p2.is_empty() {
                s2[t.c0 + i] += p2[i];
            }
        }
    }
    (s1, s2)
}

fn affines<T: Real>(
    st: &BatchStats<T>,
    d: Ncs,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
) -> (Vec<T>, Vec<T>) {
    (0..d.c).map(|c| st.channel_affine(c, weight, bias)).unzip()
}

isa_fn! {
    isa = ko.isa;
    /// Two-pass moments with the rounded mean as shift.
    pub fn moments<T: Real, const X2: bool, const X512: bool>(x: &[T], d: Ncs, ko: KernelOptions) -> (Vec<T>, Moments) {
        let m = d.n as f64;
        let (tl, _) = tiles::<T>(d);
        let parts: Vec<_> = tl
            .par_iter()
            .map(|&t| {
                let mut o = vec![0.0f64; t.width()];
                tile_sum(x, d, t, &mut o);
                (o, Vec::new())
            })
            .collect();
        let (tot, _) = add_partials(d, &tl, parts);
        let shift: Vec<T> = tot.iter().map(|t| T::of_f64(t / m)).collect();
        let parts: Vec<_> = tl
            .par_iter()
            .map(|&t| {
                let (mut o1, mut o2) = (vec![0.0f64; t.width()], vec![0.0f64; t.width()]);
                tile_shifted(x, d, t, &shift[t.c0..t.c1], &mut o1, &mut o2);
                (o1, o2)
            })
            .collect();
        let (s1, s2) = add_partials(d, &tl, parts);
        let mut out = Moments::empty(d.c);
        out.count = d.n as u64;
        for c in 0..d.c {
            (out.mean[c], out.m2[c]) = moments_from_shifted(shift[c].as_f64(), s1[c], s2[c], m);
        }
        (shift, out)
    }
}

isa_fn! {
    isa = ko.isa;
    /// y = (x - shift)·s + b' per channel, tile by tile.
    pub fn normalize<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        y: &mut [T],
        d: Ncs,
        st: &BatchStats<T>,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        relu: bool,
        ko: KernelOptions,
    ) {
        let (s, b) = affines(st, d, weight, bias);
        let yp = SyncPtr(y.as_mut_ptr());
        let (tl, _) = tiles::<T>(d);
        tl.par_iter().for_each(|&t| {
            let r = t.c0..t.c1;
            tile_normalize(
                x,
                yp,
                d,
                t,
                &st.shift[r.clone()],
                &s[r.clone()],
                &b[r],
                relu,
            );
        });
    }
}

isa_fn! {
    isa = ko.isa;
    /// Statistics and normalisation (the fused training forward for S = 1).
    pub fn train_forward<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        y: &mut [T],
        d: Ncs,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        eps: f64,
        relu: bool,
        ko: KernelOptions,
    ) -> BatchStats<T> {
        let (tl, blocks) = tiles::<T>(d);
        if blocks != 1 {
            let (shift, mo) = moments(x, d, ko);
            let mut st = BatchStats::<T>::from_moments(&mo, eps);
            st.shift = shift;
            normalize(x, y, d, &st, weight, bias, relu, ko);
            return st;
        }
        // One row block: each tile holds all N values of its channels; reduce and normalise it while it is hot.
        let m = d.n as f64;
        let yp = SyncPtr(y.as_mut_ptr());
        let parts: Vec<(Vec<T>, Moments)> = tl
            .par_iter()
            .map(|&t| {
                let w = t.width();
                let mut tot = vec![0.0f64; w];
                tile_sum(x, d, t, &mut tot);
                let shift: Vec<T> = tot.iter().map(|v| T::of_f64(v / m)).collect();
                let (mut s1, mut s2) = (vec![0.0f64; w], vec![0.0f64; w]);
                tile_shifted(x, d, t, &shift, &mut s1, &mut s2);
                let mut mo = Moments::empty(w);
                mo.count = d.n as u64;
                for i in 0..w {
                    (mo.mean[i], mo.m2[i]) = moments_from_shifted(shift[i].as_f64(), s1[i], s2[i], m);
                }
                let mut st = BatchStats::<T>::from_moments(&mo, eps);
                st.shift = shift;
                let r = t.c0..t.c1;
                let (s, b): (Vec<T>, Vec<T>) = (0..w)
                    .map(|i| {
                        st.channel_affine(
                            i,
                            weight.map(|v| &v[r.clone()]),
                            bias.map(|v| &v[r.clone()]),
                        )
                    })
                    .unzip();
                tile_normalize(x, yp, d, t, &st.shift, &s, &b, relu);
                (st.shift, mo)
            })
            .collect();
        let mut mo = Moments::empty(d.c);
        mo.count = d.n as u64;
        let mut shift = vec![T::zero(); d.c];
        for (t, (sh, part)) in tl.iter().zip(parts) {
            shift[t.c0..t.c1].copy_from_slice(&sh);
            mo.mean[t.c0..t.c1].copy_from_slice(&part.mean);
            mo.m2[t.c0..t.c1].copy_from_slice(&part.m2);
        }
        let mut st = BatchStats::<T>::from_moments(&mo, eps);
        st.shift = shift;
        st
    }
}

isa_fn! {
    isa = ko.isa;
    /// Σdy and Σdy·(x - mean) per channel (dy masked by the fused ReLU).
    pub fn backward_sums<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        dy: &[T],
        d: Ncs,
        st: &BatchStats<T>,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        relu: bool,
        ko: KernelOptions,
    ) -> BackwardSums {
        let (s, b) = affines(st, d, weight, bias);
        let sh = &st.shift;
        let (tl, _) = tiles::<T>(d);
        let parts: Vec<_> = tl
            .par_iter()
            .map(|&t| {
                let r = t.c0..t.c1;
                let (mut o1, mut o2) = (vec![0.0f64; t.width()], vec![0.0f64; t.width()]);
                tile_dy_sums(
                    x,
                    dy,
                    d,
                    t,
                    &sh[r.clone()],
                    &s[r.clone()],
                    &b[r],
                    relu,
                    &mut o1,
                    &mut o2,
                );
                (o1, o2)
            })
            .collect();
        let (sd, dt) = add_partials(d, &tl, parts);
        let dot = (0..d.c)
            .map(|c| dt[c] - (st.mean[c] - sh[c].as_f64()) * sd[c])
            .collect();
        BackwardSums { sum_dy: sd, dot }
    }
}

/// The (k1, k2, k3) of [`dx_coefficients`] for channels `cs`, from their Σdy and Σdy·(x-mean) (indexed from
/// `cs.start`).
fn coefficients<T: Real>(
    st: &BatchStats<T>,
    cs: std::ops::Range<usize>,
    sum_dy: &[f64],
    dot: &[f64],
    count: f64,
    weight: Option<&[T]>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut k = (
        Vec::with_capacity(cs.len()),
        Vec::with_capacity(cs.len()),
        Vec::with_capacity(cs.len()),
    );
    for (i, c) in cs.enumerate() {
        let (a, b, e) = dx_coefficients(st, c, sum_dy[i], dot[i], count, weight);
        k.0.push(a);
        k.1.push(b);
        k.2.push(e);
    }
    k
}

isa_fn! {
    isa = ko.isa;
    /// dx = dy·k1 + (x - shift)·k2 + k3 per channel, from (possibly all-reduced) sums over `count` values.
    pub fn backward_dx<T: Real, const X2: bool, const X512: bool>(
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
        ko: KernelOptions,
    ) {
        let (k1, k2, k3) = coefficients(st, 0..d.c, &sums.sum_dy, &sums.dot, count as f64, weight);
        let (s, b) = affines(st, d, weight, bias);
        let dxp = SyncPtr(dx.as_mut_ptr());
        let (tl, _) = tiles::<T>(d);
        tl.par_iter().for_each(|&t| {
            let r = t.c0..t.c1;
            tile_dx(
                x,
                dy,
                dxp,
                d,
                t,
                &st.shift[r.clone()],
                (&s[r.clone()], &b[r.clone()]),
                (&k1[r.clone()], &k2[r.clone()], &k3[r]),
                relu,
            );
        });
    }
}

isa_fn! {
    isa = ko.isa;
    /// The fused training backward for S = 1: per tile the two reductions, then dx while the tile is in cache.
    pub fn train_backward<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        d: Ncs,
        st: &BatchStats<T>,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        relu: bool,
        ko: KernelOptions,
    ) -> BackwardSums {
        let (tl, blocks) = tiles::<T>(d);
        if blocks != 1 {
            let sums = backward_sums(x, dy, d, st, weight, bias, relu, ko);
            backward_dx(x, dy, dx, d, st, &sums, st.count, weight, bias, relu, ko);
            return sums;
        }
        let (s, b) = affines(st, d, weight, bias);
        let count = st.count as f64;
        let dxp = SyncPtr(dx.as_mut_ptr());
        let parts: Vec<(Vec<f64>, Vec<f64>)> = tl
            .par_iter()
            .map(|&t| {
                let w = t.width();
                let r = t.c0..t.c1;
                let (sh, sr, br) = (&st.shift[r.clone()], &s[r.clone()], &b[r.clone()]);
                let (mut sd, mut dt) = (vec![0.0f64; w], vec![0.0f64; w]);
                tile_dy_sums(x, dy, d, t, sh, sr, br, relu, &mut sd, &mut dt);
                for i in 0..w {
                    let c = t.c0 + i;
                    dt[i] -= (st.mean[c] - st.shift[c].as_f64()) * sd[i];
                }
                let k = coefficients(st, r.clone(), &sd, &dt, count, weight);
                tile_dx(x, dy, dxp, d, t, sh, (sr, br), (&k.0, &k.1, &k.2), relu);
                (sd, dt)
            })
            .collect();
        let mut sums = BackwardSums {
            sum_dy: vec![0.0; d.c],
            dot: vec![0.0; d.c],
        };
        for (t, (sd, dt)) in tl.iter().zip(parts) {
            sums.sum_dy[t.c0..t.c1].copy_from_slice(&sd);
            sums.dot[t.c0..t.c1].copy_from_slice(&dt);
        }
        sums
    }
}

isa_fn! {
    isa = ko.isa;
    /// Eval-mode backward for S = 1 of y = (x - m)·a + b: dx = dy·a (masked), and per channel
    /// (Σdy, Σdy·(x - m)) with the same mask, in one pass per tile.
    pub fn eval_backward<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        d: Ncs,
        m: &[T],
        a: &[T],
        b: &[T],
        relu: bool,
        ko: KernelOptions,
    ) -> (Vec<f64>, Vec<f64>) {
        let z = T::zero();
        let dxp = SyncPtr(dx.as_mut_ptr());
        let (tl, _) = tiles::<T>(d);
        let parts: Vec<_> = tl
            .par_iter()
            .map(|&t| {
                let w = t.width();
                let (m, a, b) = (&m[t.c0..t.c1], &a[t.c0..t.c1], &b[t.c0..t.c1]);
                let (mut o1, mut o2) = (vec![0.0f64; w], vec![0.0f64; w]);
                reduce_tile(t, d, &mut o1, &mut o2, |off, a1: &mut [T], a2: &mut [T]| {
                    let (xr, gr) = (&x[off..off + w], &dy[off..off + w]);
                    // SAFETY: tiles are disjoint and each is written by one task.
                    let or = unsafe { dxp.slice(off, w) };
                    let (a1, a2) = (&mut a1[..w], &mut a2[..w]);
                    for i in 0..w {
                        let xm = xr[i] - m[i];
                        let g = if relu && !(xm * a[i] + b[i] > z) {
                            z
                        } else {
                            gr[i]
                        };
                        or[i] = g * a[i];
                        a1[i] = a1[i] + g;
                        a2[i] = a2[i] + g * xm;
                    }
                });
                (o1, o2)
            })
            .collect();
        add_partials(d, &tl, parts)
    }
}
