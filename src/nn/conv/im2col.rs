//! The column matrix of the direct convolution: im2col (unfold one sample into (C·kh·kw) × (OH·OW) columns)
//! and its adjoint col2im.

use super::geom::Geom;
use crate::Real;

/// Unfolds one sample (C, H, W) into `col` (C·kh·kw, OH·OW), rows ordered (c, ki, kj), zeros for padding.
pub(super) fn im2col<T: Real>(g: &Geom, x: &[T], col: &mut [T]) {
    if g.flat_rows() {
        im2col_flat(g, x, col)
    } else {
        im2col_rows(g, x, col)
    }
}

/// For stride 1 with OW = W, row (c, ki, kj) of the column matrix is the flat input plane shifted by a constant
/// `delta = (ki·dh − ph)·W + kj·dw − pw`, except at padding positions. Returns, for that row: the valid output
/// rows [oh_lo, oh_hi), the valid output columns [lo, hi), and the flat destination range [d0, d1) whose source
/// `d + delta` lies inside the plane.
fn flat_row(g: &Geom, ki: usize, kj: usize) -> (usize, usize, usize, usize, usize, usize, isize) {
    let (h, w) = (g.h as isize, g.w as isize);
    let dy = (ki * g.dh) as isize - g.ph as isize;
    // valid oh: 0 <= oh + dy < h
    let oh_lo = (-dy).clamp(0, g.oh as isize) as usize;
    let oh_hi = (h - dy).clamp(oh_lo as isize, g.oh as isize) as usize;
    let (dxo, lo, hi) = g.col_range(kj);
    let delta = dy * w + dxo;
    let d0 = ((oh_lo as isize) * w).max(-delta).min(oh_hi as isize * w);
    let d1 = ((oh_hi as isize) * w).min(h * w - delta).max(d0);
    (oh_lo, oh_hi, lo, hi, d0 as usize, d1 as usize, delta)
}

fn im2col_flat<T: Real>(g: &Geom, x: &[T], col: &mut [T]) {
    let (p, hw, ow) = (g.p(), g.h * g.w, g.ow);
    let rows: Vec<_> = (0..g.kh)
        .flat_map(|ki| (0..g.kw).map(move |kj| (ki, kj)))
        .map(|(ki, kj)| flat_row(g, ki, kj))
        .collect();
    let mut out = col[..g.c * g.kh * g.kw * p].chunks_exact_mut(p);
    for c in 0..g.c {
        let xc = &x[c * hw..(c + 1) * hw];
        for &(oh_lo, oh_hi, lo, hi, d0, d1, delta) in &rows {
            let row = out.next().expect("sized by the caller");
            row[..d0].fill(T::zero());
            row[d1..].fill(T::zero());
            if d1 > d0 {
                let s0 = (d0 as isize + delta) as usize;
                row[d0..d1].copy_from_slice(&xc[s0..s0 + (d1 - d0)]);
            }
            if lo > 0 || hi < ow {
                for r in row[oh_lo * ow..oh_hi * ow].chunks_exact_mut(ow) {
                    r[..lo].fill(T::zero());
                    r[hi..].fill(T::zero());
                }
            }
        }
    }
}

fn im2col_rows<T: Real>(g: &Geom, x: &[T], col: &mut [T]) {
    let (p, hw) = (g.p(), g.h * g.w);
    let ranges: Vec<_> = (0..g.kw).map(|kj| g.col_range(kj)).collect();
    let mut rows = col[..g.c * g.kh * g.kw * p].chunks_exact_mut(p);
    for c in 0..g.c {
        let xc = &x[c * hw..(c + 1) * hw];
        for ki in 0..g.kh {
            for &(off, lo, hi) in &ranges {
                let row = rows.next().expect("sized by the caller");
                for (oh, r) in row.chunks_exact_mut(g.ow).enumerate() {
                    let ih = (oh * g.sh + ki * g.dh) as isize - g.ph as isize;
                    if ih < 0 || ih >= g.h as isize {
                        r.fill(T::zero());
                        continue;
                    }
                    let xr = &xc[ih as usize * g.w..(ih as usize + 1) * g.w];
                    r[..lo].fill(T::zero());
                    r[hi..].fill(T::zero());
                    if lo == hi {
                        continue;
                    }
                    let start = (lo as isize * g.sw as isize + off) as usize;
                    if g.sw == 1 {
                        r[lo..hi].copy_from_slice(&xr[start..start + (hi - lo)]);
                    } else if g.sw == 2 {
                        // pairs, so that the loop vectorises (a deinterleaving shuffle; `step_by` does not);
                        // the last value alone, as its pair may end past the row
                        let n = hi - lo;
                        for (d, s) in r[lo..hi - 1]
                            .iter_mut()
                            .zip(xr[start..start + 2 * (n - 1)].chunks_exact(2))
                        {
                            *d = s[0];
                        }
                        r[hi - 1] = xr[start + 2 * (n - 1)];
                    } else {
                        for (d, s) in r[lo..hi].iter_mut().zip(xr[start..].iter().step_by(g.sw)) {
                            *d = *s;
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: `dx = 0`, then every column entry is added back to the input position it came from.
/// Entries of `col` at padding positions may be overwritten (set to zero).
pub(super) fn col2im<T: Real>(g: &Geom, col: &mut [T], dx: &mut [T]) {
    if g.flat_rows() {
        col2im_flat(g, col, dx)
    } else {
        col2im_rows(g, col, dx)
    }
}

fn col2im_flat<T: Real>(g: &Geom, col: &mut [T], dx: &mut [T]) {
    let (p, hw, ow) = (g.p(), g.h * g.w, g.ow);
    dx[..g.c * hw].fill(T::zero());
    let rows: Vec<_> = (0..g.kh)
        .flat_map(|ki| (0..g.kw).map(move |kj| (ki, kj)))
        .map(|(ki, kj)| flat_row(g, ki, kj))
        .collect();
    let mut inp = col[..g.c * g.kh * g.kw * p].chunks_exact_mut(p);
    for c in 0..g.c {
        let dxc = &mut dx[c * hw..(c + 1) * hw];
        for &(oh_lo, oh_hi, lo, hi, d0, d1, delta) in &rows {
            let row = inp.next().expect("sized by the caller");
            // padding columns would wrap around to the neighbouring input row: drop them first
            if lo > 0 || hi < ow {
                for r in row[oh_lo * ow..oh_hi * ow].chunks_exact_mut(ow) {
                    r[..lo].fill(T::zero());
                    r[hi..].fill(T::zero());
                }
            }
            if d1 > d0 {
                let s0 = (d0 as isize + delta) as usize;
                for (d, v) in dxc[s0..s0 + (d1 - d0)].iter_mut().zip(&row[d0..d1]) {
                    *d = *d + *v;
                }
            }
        }
    }
}

fn col2im_rows<T: Real>(g: &Geom, col: &[T], dx: &mut [T]) {
    let (p, hw) = (g.p(), g.h * g.w);
    dx[..g.c * hw].fill(T::zero());
    let ranges: Vec<_> = (0..g.kw).map(|kj| g.col_range(kj)).collect();
    let mut rows = col[..g.c * g.kh * g.kw * p].chunks_exact(p);
    for c in 0..g.c {
        let dxc = &mut dx[c * hw..(c + 1) * hw];
        for ki in 0..g.kh {
            for &(off, lo, hi) in &ranges {
                let row = rows.next().expect("sized by the caller");
                if lo == hi {
                    continue;
                }
                for (oh, r) in row.chunks_exact(g.ow).enumerate() {
                    let ih = (oh * g.sh + ki * g.dh) as isize - g.ph as isize;
                    if ih < 0 || ih >= g.h as isize {
                        continue;
                    }
                    let dr = &mut dxc[ih as usize * g.w..(ih as usize + 1) * g.w];
                    let start = (lo as isize * g.sw as isize + off) as usize;
                    if g.sw == 1 {
                        for (d, s) in dr[start..start + (hi - lo)].iter_mut().zip(&r[lo..hi]) {
                            *d = *d + *s;
                        }
                    } else if g.sw == 2 {
                        // pairs, so that the loop vectorises; the last value alone
                        let n = hi - lo;
                        for (d, s) in dr[start..start + 2 * (n - 1)]
                            .chunks_exact_mut(2)
                            .zip(&r[lo..hi - 1])
                        {
                            d[0] = d[0] + *s;
                        }
                        let last = &mut dr[start + 2 * (n - 1)];
                        *last = *last + r[hi - 1];
                    } else {
                        for (d, s) in dr[start..].iter_mut().step_by(g.sw).zip(&r[lo..hi]) {
                            *d = *d + *s;
                        }
                    }
                }
            }
        }
    }
}
