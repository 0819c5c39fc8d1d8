//! The direct convolution of one sample as GEMMs over its column matrix: the generic path (the `gemm` crate,
//! any element type) and the explicit AVX-512 path (the project's f32 kernels).

use super::geom::{Geom, Workspace};
use super::im2col::{col2im, im2col};
use crate::kernels::elementwise::sum_f64;
use crate::kernels::gemm::{matmul, Op, Par};
use crate::kernels::gemm_avx512 as simd;
use crate::Real;

/// Forward of one sample: `y (O, P) = W · col + b`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_sample<T: Real>(
    g: &Geom,
    x: &[T],
    y: &mut [T],
    w: &[T],
    bias: Option<&[T]>,
    col: &mut [T],
    par: Par,
) {
    let (p, og, kdim) = (g.p(), g.og(), g.kdim());
    let cols: &[T] = if g.pointwise() {
        x
    } else {
        im2col(g, x, col);
        col
    };
    if let Some(b) = bias {
        for (yo, &bo) in y.chunks_exact_mut(p).zip(b) {
            yo.fill(bo);
        }
    }
    // threads (batch-1 inference): each thread multiplies a block of output channels by the shared columns,
    // which measured faster than the gemm crate's own threading at these sizes
    if let Par::Threads(t) = par {
        let t = t.min(og / 8);
        if g.groups == 1 && t > 1 {
            use rayon::prelude::*;
            let rows = og.div_ceil(t);
            y[..og * p]
                .par_chunks_mut(rows * p)
                .zip(w[..og * kdim].par_chunks(rows * kdim))
                .for_each(|(yc, wc)| {
                    let m = wc.len() / kdim;
                    matmul(
                        m,
                        p,
                        kdim,
                        wc,
                        Op::N,
                        &cols[..kdim * p],
                        Op::N,
                        yc,
                        bias.is_some(),
                        Par::Seq,
                    )
                });
            return;
        }
    }
    for gi in 0..g.groups {
        matmul(
            og,
            p,
            kdim,
            &w[gi * og * kdim..(gi + 1) * og * kdim],
            Op::N,
            &cols[gi * kdim * p..(gi + 1) * kdim * p],
            Op::N,
            &mut y[gi * og * p..(gi + 1) * og * p],
            bias.is_some(),
            par,
        );
    }
}

/// Backward of one sample: `dw += dy · colᵀ`, `db += Σ_p dy`, and `dx = col2im(Wᵀ · dy)` when asked.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_sample<T: Real>(
    g: &Geom,
    x: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    w: &[T],
    ws: &mut Workspace<T>,
    want_db: bool,
    par: Par,
) {
    let (p, og, kdim) = (g.p(), g.og(), g.kdim());
    if want_db {
        for (d, dyo) in ws.db.iter_mut().zip(dy.chunks_exact(p)) {
            *d += sum_f64(dyo);
        }
    }
    {
        let cols: &[T] = if g.pointwise() {
            x
        } else {
            im2col(g, x, &mut ws.col);
            &ws.col
        };
        for gi in 0..g.groups {
            matmul(
                og,
                kdim,
                p,
                &dy[gi * og * p..(gi + 1) * og * p],
                Op::N,
                &cols[gi * kdim * p..(gi + 1) * kdim * p],
                Op::T,
                &mut ws.dw[gi * og * kdim..(gi + 1) * og * kdim],
                true,
                par,
            );
        }
    }
    let Some(dx) = dx else { return };
    // d(col) = Wᵀ · dy, straight into dx for a pointwise convolution, else into the workspace and folded back.
    let wt_dy = |dcol: &mut [T]| {
        for gi in 0..g.groups {
            matmul(
                kdim,
                p,
                og,
                &w[gi * og * kdim..(gi + 1) * og * kdim],
                Op::T,
                &dy[gi * og * p..(gi + 1) * og * p],
                Op::N,
                &mut dcol[gi * kdim * p..(gi + 1) * kdim * p],
                false,
                par,
            );
        }
    };
    if g.pointwise() {
        wt_dy(dx);
    } else {
        wt_dy(&mut ws.col);
        col2im(g, &mut ws.col, dx);
    }
}

/// [`forward_sample`] for f32 with the AVX-512 kernel; `wp` holds the packed weights of every group.
pub(super) fn fast_forward_sample(
    g: &Geom,
    x: &[f32],
    y: &mut [f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    col: &mut [f32],
) {
    let (p, og, kdim) = (g.p(), g.og(), g.kdim());
    let cols: &[f32] = if g.pointwise() {
        x
    } else {
        im2col(g, x, col);
        col
    };
    if let Some(b) = bias {
        for (yo, &bo) in y.chunks_exact_mut(p).zip(b) {
            yo.fill(bo);
        }
    }
    group_gemm(g, og, kdim, wp, cols, y, bias.is_some());
}

/// Per conv group, `C_g (m × P) = [C_g +] A_g · B_g` with `A_g` packed (m × k, [`simd::pack_a`]) and `B_g`
/// k × P: the forward (A = W, B = columns) and the column gradient (A = Wᵀ, B = dy) of the explicit path.
fn group_gemm(g: &Geom, m: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], acc: bool) {
    let (p, plen) = (g.p(), simd::packed_len(m, k));
    for gi in 0..g.groups {
        simd::gemm_nn(
            m,
            p,
            k,
            &a[gi * plen..(gi + 1) * plen],
            &b[gi * k * p..(gi + 1) * k * p],
            p,
            &mut c[gi * m * p..(gi + 1) * m * p],
            p,
            acc,
        );
    }
}

/// [`backward_sample`] for f32 with the AVX-512 kernels; `wpt` holds the packed transposed weights.
#[allow(clippy::too_many_arguments)]
pub(super) fn fast_backward_sample(
    g: &Geom,
    x: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    wpt: &[f32],
    col: &mut [f32],
    dw: &mut [f32],
    db: &mut [f64],
) {
    let (p, og, kdim) = (g.p(), g.og(), g.kdim());
    for (d, dyo) in db.iter_mut().zip(dy.chunks_exact(p)) {
        *d += sum_f64(dyo);
    }
    {
        let cols: &[f32] = if g.pointwise() {
            x
        } else {
            im2col(g, x, col);
            col
        };
        for gi in 0..g.groups {
            simd::gemm_nt(
                og,
                kdim,
                p,
                &dy[gi * og * p..(gi + 1) * og * p],
                p,
                &cols[gi * kdim * p..(gi + 1) * kdim * p],
                p,
                &mut dw[gi * og * kdim..(gi + 1) * og * kdim],
                kdim,
                true,
            );
        }
    }
    let Some(dx) = dx else { return };
    if g.pointwise() {
        col_grad(g, wpt, dy, dx);
    } else {
        col_grad(g, wpt, dy, col);
        col2im(g, col, dx);
    }
}

/// d(col) = Wᵀ·dy per group (`kdim·groups × P`), with `wpt` the transposed weights packed by
/// [`simd::pack_a`]: the data gradient before col2im folds it back.
pub(super) fn col_grad(g: &Geom, wpt: &[f32], dy: &[f32], dcol: &mut [f32]) {
    group_gemm(g, g.kdim(), g.og(), wpt, dy, dcol, false);
}
