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

mod avg;
mod global;
mod max;

#[cfg(test)]
mod tests;

pub use avg::{AvgPool2d, AvgPool2dConfig};
pub use global::GlobalAvgPool;
pub use max::{MaxPool2d, MaxPool2dConfig};

use crate::kernels::shape::{check_nonempty, check_rank};
use crate::{NvError, Real, Result};
use rayon::prelude::*;

/// The per-plane geometry of a pooling call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub(super) planes: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) sh: usize,
    pub(super) sw: usize,
    pub(super) ph: usize,
    pub(super) pw: usize,
    pub(super) dh: usize,
    pub(super) dw: usize,
}

impl Geom {
    pub(super) fn hw(&self) -> usize {
        self.h * self.w
    }
    pub(super) fn ohw(&self) -> usize {
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
pub(super) fn geom(
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

pub(super) fn check_cfg(
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
pub(super) fn for_planes<T: Real, A: Send>(
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
