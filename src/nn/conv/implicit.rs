//! The implicit-GEMM convolution (AVX-512, f32) for stride-1 "same" convolutions: the rows of the column matrix
//! are shifted views of a zero-padded copy of the image, so the matrix is never built.

use super::direct::col_grad;
use super::geom::Geom;
use super::im2col::col2im;
use crate::kernels::elementwise::sum_f64;
use crate::kernels::gemm_avx512 as simd;

/// Row offsets of the implicit column matrices within one group's padded planes (Hp × Wp each):
/// forward / weight gradient, rows (c, ki, kj) at `c·HpWp + ki·dh·Wp + kj·dw` of the padded input; data gradient,
/// rows (o, ki, kj) at `o·HpWp + (kh−1−ki)·dh·Wp + (kw−1−kj)·dw` of the padded dy (a full convolution with the
/// flipped kernel: with "same" padding, 2·ph = dh·(kh−1)).
pub(super) fn implicit_offsets(g: &Geom) -> (Vec<usize>, Vec<usize>) {
    let (hpwp, wp) = (g.hp() * g.wp(), g.wp());
    let rows = |planes: usize, flip: bool| -> Vec<usize> {
        let mut v = Vec::with_capacity(planes * g.kh * g.kw);
        for c in 0..planes {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let (a, b) = if flip {
                        (g.kh - 1 - ki, g.kw - 1 - kj)
                    } else {
                        (ki, kj)
                    };
                    v.push(c * hpwp + a * g.dh * wp + b * g.dw);
                }
            }
        }
        v
    };
    (rows(g.c / g.groups, false), rows(g.og(), true))
}

/// Copies `planes` planes (H × W) into the interiors of zero-bordered (Hp × Wp) planes.
fn pad_into(g: &Geom, planes: usize, src: &[f32], dst: &mut [f32]) {
    let (hw, hpwp, wp) = (g.h * g.w, g.hp() * g.wp(), g.wp());
    for (sp, dp) in src[..planes * hw]
        .chunks_exact(hw)
        .zip(dst.chunks_exact_mut(hpwp))
    {
        for (sr, dr) in sp.chunks_exact(g.w).zip(dp[g.ph * wp..].chunks_mut(wp)) {
            for (d, s) in dr[g.pw..g.pw + g.w].iter_mut().zip(sr) {
                *d = *s;
            }
        }
    }
}

/// Copies rows × (H × W) results out of the implicit layout (row stride Q, column oh·Wp + ow), adding `bias[r]`.
/// Then max(·, 0) when `relu` (a ReLU applied in the output pass).
fn unpad_into(
    g: &Geom,
    rows: usize,
    src: &[f32],
    dst: &mut [f32],
    bias: Option<&[f32]>,
    relu: bool,
) {
    let (hw, q, wp) = (g.h * g.w, g.q(), g.wp());
    for (r, (sp, dp)) in src
        .chunks(q)
        .zip(dst.chunks_exact_mut(hw))
        .take(rows)
        .enumerate()
    {
        let b = bias.map_or(0.0, |b| b[r]);
        for (oh, dr) in dp.chunks_exact_mut(g.w).enumerate() {
            let sr = &sp[oh * wp..oh * wp + g.w];
            if relu {
                for (d, s) in dr.iter_mut().zip(sr) {
                    let v = *s + b;
                    *d = if v > 0.0 { v } else { 0.0 };
                }
            } else {
                for (d, s) in dr.iter_mut().zip(sr) {
                    *d = *s + b;
                }
            }
        }
    }
}

/// Forward of one sample on the implicit path: `y = W · rows(xpad) + b`, per group, through `out` (og × Q).
#[allow(clippy::too_many_arguments)]
pub(super) fn implicit_forward_sample(
    g: &Geom,
    x: &[f32],
    y: &mut [f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    offs: &[usize],
    xpad: &mut [f32],
    out: &mut [f32],
    relu: bool,
) {
    pad_into(g, g.c, x, xpad);
    let (og, cg, kdim, q, hpwp) = (g.og(), g.c / g.groups, g.kdim(), g.q(), g.hp() * g.wp());
    let plen = simd::packed_len(og, kdim);
    let hw = g.h * g.w;
    for gi in 0..g.groups {
        simd::gemm_nn_rows(
            og,
            q,
            kdim,
            &wp[gi * plen..(gi + 1) * plen],
            &xpad[gi * cg * hpwp..(gi + 1) * cg * hpwp],
            offs,
            &mut out[..og * q],
            q,
            false,
        );
        unpad_into(
            g,
            og,
            out,
            &mut y[gi * og * hw..(gi + 1) * og * hw],
            bias.map(|b| &b[gi * og..(gi + 1) * og]),
            relu,
        );
    }
}

/// Samples per weight-gradient call on the implicit path: their dot products accumulate in the same registers
/// and are reduced once ([`simd::gemm_nt_rows_multi`]); 4 won on the 14×14 layers and changed nothing on
/// 28×28 (see docs/PERFORMANCE.md, "Tuning constants").
pub(super) const WGRAD_GROUP: usize = 4;

/// Backward of a group of samples on the implicit path: `dw += Σ_s dy_s · rows(xpad_s)ᵀ` (dy read in the
/// implicit layout from its padded copy, zero at the discarded columns), `db += Σ dy`, and per sample
/// `dx = W' · rows(dypad)` when asked (or `col2im(Wᵀ·dy)` with fewer than 8 channels per group; `wdp` is
/// packed to match, see `Geom::implicit_dx`). `xpad` / `dypad` hold one padded copy per sample of the group.
#[allow(clippy::too_many_arguments)]
pub(super) fn implicit_backward_group(
    g: &Geom,
    xs: &[&[f32]],
    dys: &[&[f32]],
    mut dxs: Vec<Option<&mut [f32]>>,
    wdp: &[f32],
    offs: (&[usize], &[usize]),
    xpad: &mut [f32],
    dypad: &mut [f32],
    out: &mut [f32],
    dw: &mut [f32],
    db: &mut [f64],
) {
    let (og, cg, kdim, q, hpwp) = (g.og(), g.c / g.groups, g.kdim(), g.q(), g.hp() * g.wp());
    let hw = g.h * g.w;
    let (xsz, ysz) = (g.c * hpwp, g.o * hpwp);
    for (k, ((x, dy), dx)) in xs.iter().zip(dys).zip(dxs.iter_mut()).enumerate() {
        for (d, dyo) in db.iter_mut().zip(dy.chunks_exact(hw)) {
            *d += sum_f64(dyo);
        }
        let xp = &mut xpad[k * xsz..(k + 1) * xsz];
        let yp = &mut dypad[k * ysz..(k + 1) * ysz];
        pad_into(g, g.c, x, xp);
        pad_into(g, g.o, dy, yp);
        let Some(dx) = dx.as_deref_mut() else {
            continue;
        };
        if !g.implicit_dx() {
            // few input channels: d(col) = Wᵀ·dy into `out`, folded back by col2im
            col_grad(g, wdp, dy, out);
            col2im(g, out, dx);
            continue;
        }
        let k2 = og * g.kh * g.kw;
        let plen = simd::packed_len(cg, k2);
        for gi in 0..g.groups {
            simd::gemm_nn_rows(
                cg,
                q,
                k2,
                &wdp[gi * plen..(gi + 1) * plen],
                &yp[gi * og * hpwp..(gi + 1) * og * hpwp],
                offs.1,
                &mut out[..cg * q],
                q,
                false,
            );
            unpad_into(
                g,
                cg,
                out,
                &mut dx[gi * cg * hw..(gi + 1) * cg * hw],
                None,
                false,
            );
        }
    }
    let first = g.ph * g.wp() + g.pw;
    let n = xs.len();
    for gi in 0..g.groups {
        let a: Vec<&[f32]> = (0..n)
            .map(|k| &dypad[k * ysz + gi * og * hpwp + first..k * ysz + (gi + 1) * og * hpwp])
            .collect();
        let b: Vec<&[f32]> = (0..n)
            .map(|k| &xpad[k * xsz + gi * cg * hpwp..k * xsz + (gi + 1) * cg * hpwp])
            .collect();
        simd::gemm_nt_rows_multi(
            og,
            kdim,
            q,
            &a,
            hpwp,
            &b,
            offs.0,
            &mut dw[gi * og * kdim..(gi + 1) * og * kdim],
            kdim,
            true,
        );
    }
}
