//! Fused kernels for statistics taken per sample over contiguous blocks: GroupNorm (a block is one group of
//! C/G channels × S spatial values) and InstanceNorm (G = C), with a per-channel affine inside each block.
//!
//! Forward: one task per (sample, group) computes the block's statistics (Σx, then shifted Σd and Σd²) and
//! normalises the block while it is hot in cache. Backward: one task per (sample, group) computes per channel
//! Σdy and Σdy·(x-shift), combines them into the group's Σu and Σu·x̂ (u = dy·γ), then writes dx.

use super::batch_kernels::Ncs;
use super::lanes;
use crate::Real;
use rayon::prelude::*;

/// Per (sample, group) statistics saved by the forward, indexed `n * groups + g`.
#[derive(Debug, Clone)]
pub struct GroupStats<T> {
    pub groups: usize,
    pub shift: Vec<T>,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub invstd: Vec<f64>,
}

/// Blocks per rayon task so that a task has at least ~16K values (tiny per-task work drowns in scheduling).
pub(crate) fn min_blocks(blk: usize) -> usize {
    (16384 / blk.max(1)).max(1)
}

/// Statistics of one contiguous block in one pass ([`lanes::block_moments`]): (shift = mean rounded to T, mean, biased var).
#[inline]
pub fn block_stats<T: Real>(xb: &[T]) -> (T, f64, f64) {
    let m = xb.len() as f64;
    if xb.is_empty() {
        return (T::zero(), 0.0, 0.0);
    }
    let (mean, m2) = lanes::block_moments(xb);
    (T::of_f64(mean), mean, (m2 / m).max(0.0))
}

/// Fused forward. `weight`/`bias` are per channel (length C) or absent.
pub fn forward<T: Real>(
    x: &[T],
    y: &mut [T],
    d: Ncs,
    groups: usize,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> GroupStats<T> {
    assert_eq!(x.len(), d.numel());
    assert_eq!(y.len(), d.numel());
    assert!(groups > 0 && d.c.is_multiple_of(groups));
    let cpg = d.c / groups;
    let blk = cpg * d.s;
    let stream = lanes::stream_output(std::mem::size_of_val(y), 2);
    let per: Vec<(T, f64, f64, f64)> = if blk == 0 {
        vec![(T::zero(), 0.0, 0.0, 0.0); d.n * groups]
    } else {
        y.par_chunks_mut(blk)
            .zip(x.par_chunks(blk))
            .with_min_len(min_blocks(blk))
            .enumerate()
            .map(|(k, (yb, xb))| {
                let g = k % groups;
                let (shift, mean, var) = block_stats(xb);
                let invstd = 1.0 / (var + eps).sqrt();
                let delta = mean - shift.as_f64();
                for j in 0..cpg {
                    let c = g * cpg + j;
                    let s = weight.map_or(1.0, |w| w[c].as_f64()) * invstd;
                    let b = bias.map_or(0.0, |b| b[c].as_f64()) - delta * s;
                    let r = j * d.s..(j + 1) * d.s;
                    lanes::affine_shifted_to(
                        &xb[r.clone()],
                        &mut yb[r],
                        shift,
                        T::of_f64(s),
                        T::of_f64(b),
                        false,
                        stream,
                    );
                }
                if stream {
                    lanes::stream_fence();
                }
                (shift, mean, var, invstd)
            })
            .collect()
    };
    let mut st = GroupStats {
        groups,
        shift: vec![],
        mean: vec![],
        var: vec![],
        invstd: vec![],
    };
    for (sh, m, v, i) in per {
        st.shift.push(sh);
        st.mean.push(m);
        st.var.push(v);
        st.invstd.push(i);
    }
    st
}

/// Fused backward: writes dx and returns per (n, c) the pair (Σdy, Σdy·x̂) for dweight/dbias (indexed n·C + c).
pub fn backward<T: Real>(
    x: &[T],
    dy: &[T],
    dx: &mut [T],
    d: Ncs,
    st: &GroupStats<T>,
    weight: Option<&[T]>,
) -> Vec<(f64, f64)> {
    let groups = st.groups;
    let cpg = d.c / groups;
    let blk = cpg * d.s;
    if blk == 0 {
        return vec![(0.0, 0.0); d.n * d.c];
    }
    let m = blk as f64;
    let stream = lanes::stream_output(std::mem::size_of_val(dx), 3);
    // Tasks of several blocks, each filling one vector of (Σdy, Σdy·x̂) per channel: a vector per block was a
    // heap allocation per (sample, group), 16K of them for InstanceNorm on (128, 128, 7, 7).
    let per_task = min_blocks(blk);
    let per: Vec<Vec<(f64, f64)>> = dx
        .par_chunks_mut(blk * per_task)
        .zip(
            x.par_chunks(blk * per_task)
                .zip(dy.par_chunks(blk * per_task)),
        )
        .enumerate()
        .map(|(t, (dxt, (xt, gt)))| {
            let mut sums = Vec::with_capacity(dxt.len() / blk * cpg);
            for (kk, (dxb, (xb, gb))) in dxt
                .chunks_mut(blk)
                .zip(xt.chunks(blk).zip(gt.chunks(blk)))
                .enumerate()
            {
                let k = t * per_task + kk;
                let g = k % groups;
                let (shift, r) = (st.shift[k], st.invstd[k]);
                let delta = st.mean[k] - shift.as_f64();
                let (mut su, mut sux) = (0.0, 0.0);
                for j in 0..cpg {
                    let c = g * cpg + j;
                    let rr = j * d.s..(j + 1) * d.s;
                    let (a, p) = lanes::dy_moments(&gb[rr.clone()], &xb[rr], shift);
                    let gx = r * (p - delta * a); // Σdy·x̂ over this channel's slice
                    let gam = weight.map_or(1.0, |w| w[c].as_f64());
                    su += gam * a;
                    sux += gam * gx;
                    sums.push((a, gx));
                }
                let k2 = -r * sux / m * r;
                let k3 = -r * su / m - delta * k2;
                for j in 0..cpg {
                    let c = g * cpg + j;
                    let gam = weight.map_or(1.0, |w| w[c].as_f64());
                    let rr = j * d.s..(j + 1) * d.s;
                    lanes::bwd_dx_to(
                        &gb[rr.clone()],
                        &xb[rr.clone()],
                        &mut dxb[rr],
                        shift,
                        None,
                        (T::of_f64(r * gam), T::of_f64(k2), T::of_f64(k3)),
                        stream,
                    );
                }
            }
            if stream {
                lanes::stream_fence();
            }
            sums
        })
        .collect();
    per.into_iter().flatten().collect()
}
