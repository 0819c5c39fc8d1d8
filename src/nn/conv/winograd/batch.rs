//! Winograd F(2×2, 3×3) over the whole batch at once, for the small planes of a dilated network: DeepLab's last
//! stage and ASPP run 3×3 convolutions at dilations 1-4 on 8×8 maps, where the chunked driver
//! ([`super::forward`]) has too few tiles per image to keep its GEMMs long or both cores busy, and the im2col
//! path does 2.25× the multiplications.
//!
//! **Dilation by polyphase tiles.** A 3×3 convolution with dilation d and padding d maps the output pixels of
//! one phase (y mod d, x mod d) from the input pixels of the same phase: on that sub-grid it is an ordinary 3×3
//! convolution with padding 1. So a tile is anchored at output pixel (y₀, x₀) and covers the outputs
//! (y₀ + d·a, x₀ + d·b), a, b ∈ {0, 1}, from the inputs (y₀ + d·(a − 1), x₀ + d·(b − 1)), a, b ∈ 0..4; pixels
//! outside the map read as zero (the padding) and are not written. Every output pixel lies in exactly one tile.
//! On an 8×8 map that is 16 tiles at d = 1, 2 and 4 and 25 at d = 3 (16·25 = 400 products per channel pair
//! against the direct convolution's 9·64 = 576).
//!
//! **Split by tile position, not by image.** The input transform runs image by image (in parallel) into
//! `V[p]` (T×C, T = N·tiles per image, channels contiguous), then the 16 products `M[p] (T×K) = V[p]·U[p]ᵀ` run
//! one per task (long GEMMs whatever the batch, and each one on one thread, so the result does not depend on the
//! number of threads), then the output transform runs image by image again. The transforms work on
//! channel-last copies of each image's planes, so that one tile pixel is a contiguous row of channels and every
//! transform is a vector loop over channels.
//!
//! The backward is the exact adjoint of that linear map, as in [`super`]: `dM = A dY Aᵀ`, `dV[p] = dM[p]·U[p]`,
//! `dx = Σ_tiles B dV Bᵀ`, `dU[p] = dM[p]ᵀ·V[p]`, `dg = Gᵀ dU G`.

use super::weights::{adjoint_add, by_part, wide};
use crate::kernels::arena;
use crate::kernels::gemm::{matmul, Op, Par};
use rayon::prelude::*;

/// A convolution this driver computes: (N, C, H, W) input, K output channels, 3×3 kernel, stride 1, padding and
/// dilation `d` (so the output is (N, K, H, W)), one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub n: usize,
    pub c: usize,
    pub k: usize,
    pub h: usize,
    pub w: usize,
    pub d: usize,
}

impl BatchShape {
    /// The tiles of one image, phase by phase: the output pixel each is anchored at.
    pub fn tiles(&self) -> Vec<(usize, usize)> {
        let d = self.d.max(1);
        let mut t = vec![];
        for ry in 0..d.min(self.h) {
            for rx in 0..d.min(self.w) {
                for y0 in (ry..self.h).step_by(2 * d) {
                    for x0 in (rx..self.w).step_by(2 * d) {
                        t.push((y0, x0));
                    }
                }
            }
        }
        t
    }

    /// Multiplications per output pixel and channel pair (the direct convolution's is 9).
    pub fn products_per_pixel(&self) -> f64 {
        16.0 * self.tiles().len() as f64 / (self.h * self.w).max(1) as f64
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }

    /// The input pixel (row-major index) at position (a, b) ∈ 0..4 of the tile anchored at (y0, x0), if inside.
    fn input_pixel(&self, (y0, x0): (usize, usize), a: usize, b: usize) -> Option<usize> {
        let (y, x) = (
            (y0 + self.d * a).checked_sub(self.d)?,
            (x0 + self.d * b).checked_sub(self.d)?,
        );
        (y < self.h && x < self.w).then_some(y * self.w + x)
    }

    /// The output pixel at position (a, b) ∈ 0..2 of the tile anchored at (y0, x0), if inside.
    fn output_pixel(&self, (y0, x0): (usize, usize), a: usize, b: usize) -> Option<usize> {
        let (y, x) = (y0 + self.d * a, x0 + self.d * b);
        (y < self.h && x < self.w).then_some(y * self.w + x)
    }
}

/// Forward: `y (N, K, H, W) = conv3x3_d(x (N, C, H, W), w (K, C, 3, 3)) (+ bias)`, then `y·a + b` per channel
/// with `affine = (a, b)` (an eval BatchNorm, multiply and add rounded separately as its own pass rounds them),
/// then max(·, 0) when `relu`; `u` holds the transformed weights ([`super::Transformed`]). Every element of
/// `y` is written.
pub fn forward(
    s: BatchShape,
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
    y: &mut [f32],
) {
    let hw = s.plane();
    assert_eq!(x.len(), s.n * s.c * hw, "input length");
    assert_eq!(u.len(), 16 * s.k * s.c, "transformed weights");
    assert_eq!(y.len(), s.n * s.k * hw, "output length");
    assert!(bias.is_none_or(|b| b.len() == s.k), "bias length");
    assert!(
        affine.is_none_or(|(a, b)| a.len() == s.k && b.len() == s.k),
        "affine length"
    );
    if y.is_empty() {
        return;
    }
    let tiles = s.tiles();
    let t = s.n * tiles.len();
    let mut v = arena::take(16 * t * s.c);
    transform_inputs(&s, &tiles, x, &mut v);
    let mut m = arena::take(16 * t * s.k);
    m.par_chunks_mut(t * s.k)
        .zip(v.par_chunks(t * s.c.max(1)))
        .zip(u.par_chunks(s.k * s.c.max(1)))
        .for_each(|((mp, vp), up)| {
            if s.c == 0 {
                mp.fill(0.0);
            } else {
                matmul(t, s.k, s.c, vp, Op::N, up, Op::T, mp, false, Par::Seq);
            }
        });
    let rows = tiles.len() * s.k;
    y.par_chunks_mut(s.k * hw).enumerate().for_each(|(i, yi)| {
        let mi: Vec<&[f32]> = m
            .chunks_exact(t * s.k)
            .map(|b| &b[i * rows..][..rows])
            .collect();
        output_image(&s, &tiles, &mi, bias, affine, relu, yi);
    });
    arena::give(v);
    arena::give(m);
}

/// Backward: writes dx (when given; every element) and adds the weight gradient to `dw` (K, C, 3, 3) and, when
/// given, Σ dy per output channel to `db`. `u`, the transformed weights, is needed for dx only.
pub fn backward(
    s: BatchShape,
    x: &[f32],
    dy: &[f32],
    u: Option<&[f32]>,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f64]>,
) {
    let hw = s.plane();
    assert_eq!(x.len(), s.n * s.c * hw, "input length");
    assert_eq!(dy.len(), s.n * s.k * hw, "dy length");
    assert_eq!(dw.len(), s.k * s.c * 9, "dweight of shape (K, C, 3, 3)");
    assert!(
        dx.is_none() || u.is_some_and(|u| u.len() == 16 * s.k * s.c),
        "dx needs U"
    );
    assert!(dx.as_ref().is_none_or(|d| d.len() == x.len()), "dx length");
    assert!(db.as_ref().is_none_or(|d| d.len() == s.k), "dbias length");
    if let Some(db) = db {
        let sums: Vec<f64> = dy
            .par_chunks(hw.max(1))
            .map(|plane| plane.iter().map(|&v| v as f64).sum())
            .collect();
        for (o, v) in sums.iter().enumerate() {
            db[o % s.k] += v; // image by image, in order
        }
    }
    if x.is_empty() || dy.is_empty() {
        if let Some(d) = dx {
            d.fill(0.0);
        }
        return;
    }
    let tiles = s.tiles();
    let t = s.n * tiles.len();
    let mut dm = arena::take(16 * t * s.k);
    by_part(&mut dm, s.n, tiles.len() * s.k)
        .into_par_iter()
        .zip(dy.par_chunks(s.k * hw))
        .for_each(|(mut rows, dyi)| dy_image(&s, &tiles, dyi, &mut rows));
    let mut v = arena::take(16 * t * s.c);
    transform_inputs(&s, &tiles, x, &mut v);
    let u = u.filter(|_| dx.is_some());
    let mut dv = u.map(|_| arena::take(16 * t * s.c));
    let mut du = arena::take(16 * s.k * s.c); // every value written by its product
    let dv_parts = crate::kernels::elementwise::optional_chunks(dv.as_deref_mut(), t * s.c, 16);
    du.par_chunks_mut(s.k * s.c)
        .zip(dv_parts)
        .enumerate()
        .for_each(|(p, (dup, dvp))| {
            let dmp = &dm[p * t * s.k..][..t * s.k];
            let vp = &v[p * t * s.c..][..t * s.c];
            matmul(s.k, s.c, t, dmp, Op::T, vp, Op::N, dup, false, Par::Seq);
            if let (Some(dvp), Some(u)) = (dvp, u) {
                let up = &u[p * s.k * s.c..][..s.k * s.c];
                matmul(t, s.c, s.k, dmp, Op::N, up, Op::N, dvp, false, Par::Seq);
            }
        });
    if let (Some(dx), Some(dv)) = (dx, &dv) {
        let rows = tiles.len() * s.c;
        dx.par_chunks_mut(s.c * hw)
            .enumerate()
            .for_each(|(i, dxi)| {
                let dvi: Vec<&[f32]> = dv
                    .chunks_exact(t * s.c)
                    .map(|b| &b[i * rows..][..rows])
                    .collect();
                dx_image(&s, &tiles, &dvi, dxi);
            });
    }
    adjoint_add(&du, s.k, s.c, dw);
    arena::give(du);
    arena::give(dm);
    arena::give(v);
    if let Some(dv) = dv {
        arena::give(dv);
    }
}

/// V (16 blocks of T×C) for every image of `x`, in parallel over images.
fn transform_inputs(s: &BatchShape, tiles: &[(usize, usize)], x: &[f32], v: &mut [f32]) {
    by_part(v, s.n, tiles.len() * s.c)
        .into_par_iter()
        .zip(x.par_chunks((s.c * s.plane()).max(1)))
        .for_each(|(mut rows, xi)| input_image(s, tiles, xi, &mut rows));
}

/// `to[p·rows + r] = from[r·cols + p]`: a (rows × cols) matrix transposed, plus `extra` zero rows.
fn transposed(from: &[f32], rows: usize, cols: usize, extra: usize) -> Vec<f32> {
    let mut to = vec![0f32; (cols + extra) * rows];
    for (r, row) in from.chunks_exact(cols).enumerate() {
        for (p, &val) in row.iter().enumerate() {
            to[p * rows + r] = val;
        }
    }
    to
}

/// Four rows of `len` values from the start of `buf`, `stride` apart.
fn rows4(buf: &mut [f32], stride: usize, len: usize) -> [&mut [f32]; 4] {
    let (a, rest) = buf.split_at_mut(stride);
    let (b, rest) = rest.split_at_mut(stride);
    let (e, rest) = rest.split_at_mut(stride);
    [
        &mut a[..len],
        &mut b[..len],
        &mut e[..len],
        &mut rest[..len],
    ]
}

/// Bᵀ along one axis: (d0, d1, d2, d3) → (d0 − d2, d1 + d2, d2 − d1, d1 − d3).
#[inline(always)]
fn bt(i: [&[f32]; 4], o: [&mut [f32]; 4]) {
    let n = o[0].len();
    let (i0, i1, i2, i3) = (&i[0][..n], &i[1][..n], &i[2][..n], &i[3][..n]);
    let [o0, o1, o2, o3] = o;
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for j in 0..n {
        let (a, b, c, d) = (i0[j], i1[j], i2[j], i3[j]);
        o0[j] = a - c;
        o1[j] = b + c;
        o2[j] = c - b;
        o3[j] = b - d;
    }
}

/// The adjoint of [`bt`]: (o0, o1, o2, o3) → (o0, o1 − o2 + o3, o1 + o2 − o0, −o3).
#[inline(always)]
fn b_adj(i: [&[f32]; 4], o: [&mut [f32]; 4]) {
    let n = o[0].len();
    let (i0, i1, i2, i3) = (&i[0][..n], &i[1][..n], &i[2][..n], &i[3][..n]);
    let [o0, o1, o2, o3] = o;
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for j in 0..n {
        let (a, b, c, d) = (i0[j], i1[j], i2[j], i3[j]);
        o0[j] = a;
        o1[j] = b - c + d;
        o2[j] = b + c - a;
        o3[j] = -d;
    }
}

/// Aᵀ along one axis: (m0, m1, m2, m3) → (m0 + m1 + m2, m1 − m2 − m3).
#[inline(always)]
fn at(i: [&[f32]; 4], o0: &mut [f32], o1: &mut [f32]) {
    let n = o0.len();
    let (i0, i1, i2, i3) = (&i[0][..n], &i[1][..n], &i[2][..n], &i[3][..n]);
    let o1 = &mut o1[..n];
    for j in 0..n {
        let (a, b, c, d) = (i0[j], i1[j], i2[j], i3[j]);
        o0[j] = a + b + c;
        o1[j] = b - c - d;
    }
}

/// The adjoint of [`at`]: (g0, g1) → (g0, g0 + g1, g0 − g1, −g1).
#[inline(always)]
fn a_adj(g0: &[f32], g1: &[f32], o: [&mut [f32]; 4]) {
    let n = o[0].len();
    let (g0, g1) = (&g0[..n], &g1[..n]);
    let [o0, o1, o2, o3] = o;
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for j in 0..n {
        let (a, b) = (g0[j], g1[j]);
        o0[j] = a;
        o1[j] = a + b;
        o2[j] = a - b;
        o3[j] = -b;
    }
}

/// Rows `t·len ..` of the four blocks `q`, `4 + q`, `8 + q`, `12 + q` of `blocks`.
fn column_rows<'a>(
    blocks: &'a mut [&mut [f32]],
    q: usize,
    t: usize,
    len: usize,
) -> [&'a mut [f32]; 4] {
    blocks
        .get_disjoint_mut([q, 4 + q, 8 + q, 12 + q])
        .expect("16 distinct blocks")
        .map(|b| &mut b[t * len..][..len])
}

wide! {
    /// `V = Bᵀ d B` for every tile of one image `x` (C, H, W), into the image's rows of the 16 blocks `v`.
    fn input_image(s: &BatchShape, tiles: &[(usize, usize)], x: &[f32], v: &mut [&mut [f32]]) {
        let (c, hw) = (s.c, s.plane());
        let xt = transposed(x, c, hw, 1); // channel-last, with a zero row at pixel hw
        let row = |p: Option<usize>| &xt[p.unwrap_or(hw) * c..][..c];
        let mut tmp = vec![0f32; 16 * c];
        for (t, &anchor) in tiles.iter().enumerate() {
            for a in 0..4 {
                let ins = [0, 1, 2, 3].map(|b| row(s.input_pixel(anchor, a, b)));
                bt(ins, rows4(&mut tmp[a * 4 * c..], c, c));
            }
            for q in 0..4 {
                let ins = [q, 4 + q, 8 + q, 12 + q].map(|j| &tmp[j * c..][..c]);
                bt(ins, column_rows(v, q, t, c));
            }
        }
    }
}

wide! {
    /// `y = Aᵀ M A` (+ bias, affine, ReLU) for every tile of one image, from its rows of the 16 blocks `m`.
    fn output_image(
        s: &BatchShape,
        tiles: &[(usize, usize)],
        m: &[&[f32]],
        bias: Option<&[f32]>,
        affine: Option<(&[f32], &[f32])>,
        relu: bool,
        y: &mut [f32],
    ) {
        let (k, hw) = (s.k, s.plane());
        let mut yt = vec![0f32; hw * k];
        let mut h = vec![0f32; 8 * k]; // h[r][j] at (2r + j)·k
        let mut o = vec![0f32; 4 * k]; // y[a][b] at (2a + b)·k
        for (t, &anchor) in tiles.iter().enumerate() {
            for r in 0..4 {
                let ins = [0, 1, 2, 3].map(|q| &m[r * 4 + q][t * k..][..k]);
                let (h0, h1) = h[2 * r * k..][..2 * k].split_at_mut(k);
                at(ins, h0, h1);
            }
            for j in 0..2 {
                let ins = [0, 1, 2, 3].map(|r| &h[(2 * r + j) * k..][..k]);
                let (o0, o1) = o.split_at_mut(2 * k);
                at(ins, &mut o0[j * k..][..k], &mut o1[j * k..][..k]);
            }
            for a in 0..2 {
                for b in 0..2 {
                    if let Some(p) = s.output_pixel(anchor, a, b) {
                        yt[p * k..][..k].copy_from_slice(&o[(2 * a + b) * k..][..k]);
                    }
                }
            }
        }
        for (kk, plane) in y.chunks_exact_mut(hw).enumerate() {
            let add = bias.map_or(0.0, |b| b[kk]);
            let (a, b) = affine.map_or((1.0, 0.0), |(a, b)| (a[kk], b[kk]));
            for (p, out) in plane.iter_mut().enumerate() {
                let mut val = yt[p * k + kk] + add;
                if affine.is_some() {
                    val = val * a + b;
                }
                *out = if relu { val.max(0.0) } else { val };
            }
        }
    }
}

wide! {
    /// `dM = A dY Aᵀ` for every tile of one image's `dy` (K, H, W), into its rows of the 16 blocks `dm`.
    fn dy_image(s: &BatchShape, tiles: &[(usize, usize)], dy: &[f32], dm: &mut [&mut [f32]]) {
        let (k, hw) = (s.k, s.plane());
        let gt = transposed(dy, k, hw, 1);
        let row = |p: Option<usize>| &gt[p.unwrap_or(hw) * k..][..k];
        let mut h = vec![0f32; 8 * k]; // h[a][q] at (4a + q)·k
        for (t, &anchor) in tiles.iter().enumerate() {
            for a in 0..2 {
                let (g0, g1) = (row(s.output_pixel(anchor, a, 0)), row(s.output_pixel(anchor, a, 1)));
                a_adj(g0, g1, rows4(&mut h[4 * a * k..], k, k));
            }
            for q in 0..4 {
                let (g0, g1) = (&h[q * k..][..k], &h[(4 + q) * k..][..k]);
                a_adj(g0, g1, column_rows(dm, q, t, k));
            }
        }
    }
}

wide! {
    /// `dx = Σ_tiles B dV Bᵀ` for one image (C, H, W; overwritten), from its rows of the 16 blocks `dv`.
    fn dx_image(s: &BatchShape, tiles: &[(usize, usize)], dv: &[&[f32]], dx: &mut [f32]) {
        let (c, hw) = (s.c, s.plane());
        let mut dxt = vec![0f32; hw * c];
        let mut h = vec![0f32; 16 * c]; // h[r][b] at (4r + b)·c
        let mut e = vec![0f32; 16 * c]; // dd[a][b] at (4a + b)·c
        for (t, &anchor) in tiles.iter().enumerate() {
            for r in 0..4 {
                let ins = [0, 1, 2, 3].map(|q| &dv[r * 4 + q][t * c..][..c]);
                b_adj(ins, rows4(&mut h[4 * r * c..], c, c));
            }
            for b in 0..4 {
                let ins = [0, 1, 2, 3].map(|r| &h[(4 * r + b) * c..][..c]);
                b_adj(ins, rows4(&mut e[b * c..], 4 * c, c));
            }
            for a in 0..4 {
                for b in 0..4 {
                    if let Some(p) = s.input_pixel(anchor, a, b) {
                        let src = &e[(4 * a + b) * c..][..c];
                        for (d, &g) in dxt[p * c..][..c].iter_mut().zip(src) {
                            *d += g;
                        }
                    }
                }
            }
        }
        for (cc, plane) in dx.chunks_exact_mut(hw).enumerate() {
            for (p, out) in plane.iter_mut().enumerate() {
                *out = dxt[p * c + cc];
            }
        }
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
