//! Fused kernels for statistics taken per sample over contiguous blocks: GroupNorm (a block is one group of
//! C/G channels × S spatial values) and InstanceNorm (G = C), with a per-channel affine inside each block.
//!
//! Forward: one task per (sample, group) computes the block's statistics (Σx, then shifted Σd and Σd²) and
//! normalises the block while it is hot in cache. Backward: one task per (sample, group) computes per channel
//! Σdy and Σdy·(x-shift), combines them into the group's Σu and Σu·x̂ (u = dy·γ), then writes dx.

use super::batch::stats::Ncs;
use crate::kernels::isa::{isa_fn, isa_leaf};
use crate::kernels::lanes;
use crate::{KernelOptions, Real};
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

/// Blocks per phase of the kernels' runs (see [`forward`]).
const RUN: usize = 32;

/// Blocks per run: [`RUN`] for blocks of one chunk ([`lanes::BLOCK_CHUNK`] values or fewer), whose statistics
/// cost more than their data. For blocks of several chunks, up to [`RUN_MAX_BLOCK`] values, made of several
/// channels' planes (`cpg` > 1: GroupNorm), as many blocks as fit [`RUN_BYTES`] with at most [`RUN`] chunks in
/// all; one block per run otherwise. Runs won for GroupNorm's multi-plane blocks of up to 784 values and lost
/// for single planes that long and for longer blocks (see docs/PERFORMANCE.md, "Tuning constants").
fn run_len<T>(blk: usize, cpg: usize) -> usize {
    let q = blk.div_ceil(lanes::BLOCK_CHUNK);
    if q <= 1 {
        RUN
    } else if blk <= RUN_MAX_BLOCK && cpg > 1 {
        (RUN / q)
            .min(RUN_BYTES / (blk * std::mem::size_of::<T>()))
            .max(1)
    } else {
        1
    }
}

/// Largest multi-chunk block (values) run in phases with others (see [`run_len`]).
const RUN_MAX_BLOCK: usize = 800;
/// Bytes of input per run of multi-chunk blocks.
const RUN_BYTES: usize = 32 << 10;

isa_leaf! {
    /// Statistics of one contiguous block in one pass ([`lanes::block_moments`]): (shift = mean rounded to T, mean, biased var).
    pub fn block_stats / block_stats_with<T: Real, const X2: bool, const X512: bool>(xb: &[T]) -> (T, f64, f64) {
        if xb.is_empty() {
            return (T::zero(), 0.0, 0.0);
        }
        let (mean, m2) = lanes::block_moments_with::<T, X2, X512>(xb);
        stats_from_moments(mean, m2, xb.len())
    }
}

/// (shift = mean rounded to T, mean, biased var) from a block's (mean, M2) over `len` values.
#[inline]
fn stats_from_moments<T: Real>(mean: f64, m2: f64, len: usize) -> (T, f64, f64) {
    (T::of_f64(mean), mean, (m2 / len as f64).max(0.0))
}

isa_fn! {
    isa = ko.isa;
    /// Fused forward. `weight`/`bias` are per channel (length C) or absent.
    ///
    /// Tasks of whole blocks; within a task, runs of blocks (`run_len`) in three phases (statistics, their f64
    /// finish, normalisation). A block's statistics end in a chain of dependent scalar operations (a few hundred cycles),
    /// which for small blocks (InstanceNorm on 7×7 planes: 49 values) cost more than the block's data; phased, the
    /// chains of a run overlap and the finish is vectorised, and the run's blocks are still in L1/L2 when they are
    /// normalised.
    pub fn forward<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        y: &mut [T],
        d: Ncs,
        groups: usize,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        eps: f64,
        ko: KernelOptions,
    ) -> GroupStats<T> {
        assert_eq!(x.len(), d.numel());
        assert_eq!(y.len(), d.numel());
        assert!(groups > 0 && d.c.is_multiple_of(groups));
        let cpg = d.c / groups;
        let blk = cpg * d.s;
        let nblk = d.n * groups;
        let mut st = GroupStats {
            groups,
            shift: vec![T::zero(); nblk],
            mean: vec![0.0; nblk],
            var: vec![0.0; nblk],
            invstd: vec![0.0; nblk],
        };
        if blk == 0 {
            return st;
        }
        let stream = ko.streams(std::mem::size_of_val(y), 2);
        let per_task = min_blocks(blk);
        y.par_chunks_mut(blk * per_task)
            .zip(x.par_chunks(blk * per_task))
            .zip(
                st.shift
                    .par_chunks_mut(per_task)
                    .zip(st.mean.par_chunks_mut(per_task)),
            )
            .zip(
                st.var
                    .par_chunks_mut(per_task)
                    .zip(st.invstd.par_chunks_mut(per_task)),
            )
            .enumerate()
            .for_each(|(t, (((yt, xt), (shift, mean)), (var, invstd)))| {
                let nb = xt.len() / blk;
                for r0 in (0..nb).step_by(run_len::<T>(blk, cpg)) {
                    let r1 = (r0 + run_len::<T>(blk, cpg)).min(nb);
                    let xr = &xt[r0 * blk..r1 * blk];
                    if blk <= lanes::BLOCK_CHUNK {
                        // one chunk per block: the run's sums, then their finish in one loop over arrays
                        let (mut ks, mut s1, mut s2) = ([0.0f64; RUN], [0.0f64; RUN], [0.0f64; RUN]);
                        for (i, xb) in xr.chunks(blk).enumerate() {
                            let (k, a, b) = lanes::chunk_sums_with::<T, X2, X512>(xb);
                            (ks[i], s1[i], s2[i]) = (k.as_f64(), a, b);
                        }
                        let (mut mu, mut v, mut inv) = ([0.0f64; RUN], [0.0f64; RUN], [0.0f64; RUN]);
                        let m = blk as f64;
                        for i in 0..RUN {
                            let (mi, m2) = lanes::chunk_moments(ks[i], s1[i], s2[i], m);
                            let vi = (m2 / m).max(0.0);
                            (mu[i], v[i], inv[i]) = (mi, vi, 1.0 / (vi + eps).sqrt());
                        }
                        for i in 0..r1 - r0 {
                            let j = r0 + i;
                            (shift[j], mean[j], var[j], invstd[j]) =
                                (T::of_f64(mu[i]), mu[i], v[i], inv[i]);
                        }
                    } else if r1 - r0 > 1 {
                        // several chunks per block: every chunk's sums first, then each block's merge of its chunks
                        // (`lanes::ChunkMerge`, in order, as `lanes::block_moments`: bitwise what `block_stats` gives)
                        let q = blk.div_ceil(lanes::BLOCK_CHUNK);
                        let mut sums = [(T::zero(), 0.0f64, 0.0f64); RUN];
                        for (i, xb) in xr.chunks(blk).enumerate() {
                            for (k, c) in xb.chunks(lanes::BLOCK_CHUNK).enumerate() {
                                sums[i * q + k] = lanes::chunk_sums_with::<T, X2, X512>(c);
                            }
                        }
                        for (i, bs) in sums[..(r1 - r0) * q].chunks(q).enumerate() {
                            let mut acc = lanes::ChunkMerge::default();
                            for (k, &cs) in bs.iter().enumerate() {
                                acc.add(cs, (blk - k * lanes::BLOCK_CHUNK).min(lanes::BLOCK_CHUNK));
                            }
                            let (mu, m2) = acc.moments();
                            let j = r0 + i;
                            let (sh, mi, vi) = stats_from_moments(mu, m2, blk);
                            (shift[j], mean[j], var[j], invstd[j]) =
                                (sh, mi, vi, 1.0 / (vi + eps).sqrt());
                        }
                    } else {
                        for (i, xb) in xr.chunks(blk).enumerate() {
                            let j = r0 + i;
                            let (sh, mi, vi) = block_stats_with::<T, X2, X512>(xb);
                            (shift[j], mean[j], var[j], invstd[j]) =
                                (sh, mi, vi, 1.0 / (vi + eps).sqrt());
                        }
                    }
                    for (i, (yb, xb)) in yt[r0 * blk..r1 * blk]
                        .chunks_mut(blk)
                        .zip(xr.chunks(blk))
                        .enumerate()
                    {
                        let j = r0 + i;
                        let g = (t * per_task + j) % groups;
                        let delta = mean[j] - shift[j].as_f64();
                        for ch in 0..cpg {
                            let c = g * cpg + ch;
                            let s = weight.map_or(1.0, |w| w[c].as_f64()) * invstd[j];
                            let b = bias.map_or(0.0, |b| b[c].as_f64()) - delta * s;
                            let r = ch * d.s..(ch + 1) * d.s;
                            lanes::affine_shifted_to_with::<T, X2, X512>(
                                &xb[r.clone()],
                                &mut yb[r],
                                shift[j],
                                T::of_f64(s),
                                T::of_f64(b),
                                false,
                                stream,
                            );
                        }
                    }
                }
                if stream {
                    lanes::stream_fence();
                }
            });
        st
    }
}

isa_fn! {
    isa = ko.isa;
    /// Fused backward: writes dx and returns per (n, c) the pair (Σdy, Σdy·x̂) for dweight/dbias (indexed n·C + c).
    pub fn backward<T: Real, const X2: bool, const X512: bool>(
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        d: Ncs,
        st: &GroupStats<T>,
        weight: Option<&[T]>,
        ko: KernelOptions,
    ) -> Vec<(f64, f64)> {
        let groups = st.groups;
        let cpg = d.c / groups;
        let blk = cpg * d.s;
        if blk == 0 {
            return vec![(0.0, 0.0); d.n * d.c];
        }
        let m = blk as f64;
        let stream = ko.streams(std::mem::size_of_val(dx), 3);
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
                let nb = xt.len() / blk;
                // runs of blocks in phases, as in [`forward`]: the sums, their f64 finish, then dx
                for r0 in (0..nb).step_by(run_len::<T>(blk, cpg)) {
                    let r1 = (r0 + run_len::<T>(blk, cpg)).min(nb);
                    let (mut su, mut sux) = ([0.0f64; RUN], [0.0f64; RUN]);
                    for i in 0..r1 - r0 {
                        let k = t * per_task + r0 + i;
                        let g = k % groups;
                        let (shift, r) = (st.shift[k], st.invstd[k]);
                        let delta = st.mean[k] - shift.as_f64();
                        let o = (r0 + i) * blk;
                        let (xb, gb) = (&xt[o..o + blk], &gt[o..o + blk]);
                        for j in 0..cpg {
                            let c = g * cpg + j;
                            let rr = j * d.s..(j + 1) * d.s;
                            let (a, p) = lanes::dy_moments_with::<T, X2, X512>(&gb[rr.clone()], &xb[rr], shift);
                            let gx = r * (p - delta * a); // Σdy·x̂ over this channel's slice
                            let gam = weight.map_or(1.0, |w| w[c].as_f64());
                            su[i] += gam * a;
                            sux[i] += gam * gx;
                            sums.push((a, gx));
                        }
                    }
                    let (mut k2s, mut k3s) = ([0.0f64; RUN], [0.0f64; RUN]);
                    for i in 0..r1 - r0 {
                        let k = t * per_task + r0 + i;
                        let r = st.invstd[k];
                        let delta = st.mean[k] - st.shift[k].as_f64();
                        k2s[i] = -r * sux[i] / m * r;
                        k3s[i] = -r * su[i] / m - delta * k2s[i];
                    }
                    for i in 0..r1 - r0 {
                        let k = t * per_task + r0 + i;
                        let g = k % groups;
                        let (shift, r) = (st.shift[k], st.invstd[k]);
                        let o = (r0 + i) * blk;
                        let (xb, gb, dxb) = (&xt[o..o + blk], &gt[o..o + blk], &mut dxt[o..o + blk]);
                        for j in 0..cpg {
                            let c = g * cpg + j;
                            let gam = weight.map_or(1.0, |w| w[c].as_f64());
                            let rr = j * d.s..(j + 1) * d.s;
                            lanes::bwd_dx_to_with::<T, X2, X512>(
                                &gb[rr.clone()],
                                &xb[rr.clone()],
                                &mut dxb[rr],
                                shift,
                                None,
                                (T::of_f64(r * gam), T::of_f64(k2s[i]), T::of_f64(k3s[i])),
                                stream,
                            );
                        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The phased runs give bitwise the statistics of [`block_stats`] on each block alone: blocks of one chunk,
    /// of two chunks run in phases (784 = 16 planes of 49, 800, 513 with a one-value second chunk), and of two
    /// chunks run one at a time (InstanceNorm's one plane of 784).
    #[test]
    fn phased_runs_give_the_statistics_of_each_block_alone() {
        let mut g = rand_pcg::Pcg64::seed_from_u64(5);
        for (n, c, s, groups) in [
            (23usize, 16usize, 49usize, 1usize),
            (5, 16, 50, 1),
            (7, 27, 19, 1),
            (3, 32, 49, 2),
            (9, 4, 784, 4),
            (40, 8, 7, 8),
        ] {
            let d = Ncs { n, c, s };
            let x: Vec<f32> = (0..d.numel())
                .map(|_| 1e3 + g.gen_range(-1.0f32..1.0))
                .collect();
            let mut y = vec![0.0f32; x.len()];
            let st = forward(
                &x,
                &mut y,
                d,
                groups,
                None,
                None,
                1e-5,
                KernelOptions::default(),
            );
            let blk = c / groups * s;
            for (k, xb) in x.chunks(blk).enumerate() {
                let (sh, mean, var) = block_stats(crate::Isa::detect(), xb);
                assert_eq!(
                    sh.to_bits(),
                    st.shift[k].to_bits(),
                    "{d:?} G={groups} block {k}"
                );
                assert_eq!(
                    mean.to_bits(),
                    st.mean[k].to_bits(),
                    "{d:?} G={groups} block {k}"
                );
                assert_eq!(
                    var.to_bits(),
                    st.var[k].to_bits(),
                    "{d:?} G={groups} block {k}"
                );
            }
        }
    }
}
