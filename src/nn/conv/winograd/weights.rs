//! The F(2×2, 3×3) weight transform `U = G g Gᵀ` and its adjoint `dg = Gᵀ dU G`, shared by the chunked
//! ([`super::forward`]) and the whole-batch ([`super::batch`]) drivers.
//!
//! Both run in f64 and round once to f32, for every (output channel, input channel) pair: the pairs are one
//! flat range, split into blocks that run in parallel, each vectorised over its pairs (the taps are first
//! gathered tap-major, so that each row of the computation is contiguous). A training step transforms the
//! weights in the forward and again in the backward, so this is on the hot path of small convolutions
//! (128×128 channels: 16 384 pairs; 0.08 ms for the transform and 0.07 ms for the adjoint on two cores, where
//! the stride-9 transpositions compiled as AVX-512 gathers took 0.11 and 0.18 ms).
//!
//! G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]; U is laid out `[p][k][c]` with `p = 4·r + q` (r the
//! vertical, q the horizontal position in the 4×4 tile).

use crate::kernels::arena;
use rayon::prelude::*;

/// Splits `buf` (`blocks` blocks of `parts · len` values) into, for each part, its `blocks` rows of `len`
/// values: part `i` gets `buf[b·parts·len + i·len ..][..len]` for every block `b`, in block order.
pub(super) fn by_part(buf: &mut [f32], parts: usize, len: usize) -> Vec<Vec<&mut [f32]>> {
    let mut out: Vec<Vec<&mut [f32]>> = (0..parts).map(|_| Vec::new()).collect();
    if parts == 0 || len == 0 {
        return out;
    }
    for block in buf.chunks_exact_mut(parts * len) {
        for (i, row) in block.chunks_exact_mut(len).enumerate() {
            out[i].push(row);
        }
    }
    out
}

/// Runs the body compiled for AVX-512F where the CPU has it (the generic loops then vectorise 16 wide), and as
/// plain code elsewhere.
macro_rules! wide {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($a: $t),*) $body
            #[cfg(nv_x86)]
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn fast($($a: $t),*) {
                body($($a),*)
            }
            #[cfg(nv_x86)]
            if crate::kernels::gemm_avx512::available() {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { fast($($a),*) };
            }
            body($($a),*)
        }
    };
}
pub(super) use wide;

/// A layer's transformed weights, kept with the weights they came from: a training step's backward reuses
/// its forward's U (the optimizer changes the weights only after both), and any change to the weights (a step,
/// a load) is seen by comparing them, which costs a fifth of transforming them again.
///
/// The chunked forward's packed form of U ([`Transformed::packed`]) and the channel-last one
/// ([`Transformed::channel_last`]) are kept the same way, so inference, whose weights never change, transforms
/// and packs them once.
///
/// A [`Transformed::tracked`] one skips even the comparison while its owner vouches that the weights have not
/// changed: the owner calls [`Transformed::invalidate`] wherever they can change. At batch 1 the comparison read
/// each layer's weights and their copy from memory on one thread, and skipping it made the reference CNN's
/// inference 1.4× faster (docs/PERFORMANCE.md §7).
#[derive(Debug, Clone, Default)]
pub struct Transformed {
    of: Vec<f32>,
    u: Vec<f32>,
    packed: Vec<f32>,
    plen: usize,
    cl: Vec<f32>,
    /// The owner calls `invalidate` wherever the weights can change.
    tracked: bool,
    /// Tracked, and the kept U is that of the weights as they are (no change since the last comparison).
    current: bool,
}

impl Transformed {
    /// An empty one whose owner calls [`Transformed::invalidate`] wherever the weights it passes can change;
    /// until then, the weights are not compared again.
    pub fn tracked() -> Self {
        Transformed {
            tracked: true,
            ..Default::default()
        }
    }

    /// The weights may have changed: the next call compares them again.
    pub fn invalidate(&mut self) {
        self.current = false;
    }

    /// Transforms `w` again unless it is the kept weights (and U of the same K×C): whether it did. A tracked
    /// one that is current skips the comparison.
    fn refresh(&mut self, w: &[f32], k: usize, c: usize) -> bool {
        let same_shape = self.u.len() == 16 * k * c && self.of.len() == w.len();
        if self.current && same_shape {
            return false;
        }
        self.current = self.tracked;
        if self.of.as_slice() == w && same_shape {
            return false;
        }
        arena::give(std::mem::take(&mut self.u));
        self.u = transform(w, k, c);
        self.packed.clear();
        self.cl.clear();
        self.of.clear();
        self.of.extend_from_slice(w);
        true
    }

    /// U for weights `w` (K, C, 3, 3): the kept one if `w` has not changed since, else a new one.
    pub fn get(&mut self, w: &[f32], k: usize, c: usize) -> &[f32] {
        self.refresh(w, k, c);
        &self.u
    }

    /// U for weights `w` (K, C, 3, 3) packed for the chunked forward's GEMMs (see [`super::pack_weights`]),
    /// with the length of one product's matrix: the kept one if `w` has not changed since.
    pub fn packed(&mut self, w: &[f32], k: usize, c: usize) -> (&[f32], usize) {
        self.refresh(w, k, c);
        if self.packed.is_empty() && !self.u.is_empty() {
            let (p, plen) = super::pack_weights(&self.u, k, c, false);
            self.packed = p;
            self.plen = plen;
        }
        (&self.packed, self.plen)
    }

    /// U for weights `w` (K, C, 3, 3) channel-last, `U[p][c][k]` (the products of the channel-last forward,
    /// [`super::channel_last`], are vectorised over k): the kept one if `w` has not changed since.
    pub fn channel_last(&mut self, w: &[f32], k: usize, c: usize) -> &[f32] {
        self.refresh(w, k, c);
        if self.cl.is_empty() && !self.u.is_empty() {
            self.cl = vec![0.0; self.u.len()];
            for (up, cp) in self
                .u
                .chunks_exact(k * c)
                .zip(self.cl.chunks_exact_mut(k * c))
            {
                for kk in 0..k {
                    for ch in 0..c {
                        cp[ch * k + kk] = up[kk * c + ch];
                    }
                }
            }
        }
        &self.cl
    }
}

/// `U[p][k][c] = (G g Gᵀ)[p]` for every (k, c) of weights `w` (K, C, 3, 3), in a buffer from the arena (a
/// fresh 1 MB allocation for 128×128 channels costs more in page faults than the transform itself; hand it back
/// with [`arena::give`]). The (k, c) pairs are one flat range, taken [`PAIRS`] at a time.
pub(super) fn transform(w: &[f32], k: usize, c: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * c * 9, "weights of shape (K, C, 3, 3)");
    let mut u = arena::take(16 * k * c);
    if k == 0 || c == 0 {
        return u;
    }
    by_block(&mut u, 16, PAIRS)
        .into_par_iter()
        .zip(w.par_chunks(PAIRS * 9))
        .for_each(|(mut rows, wb)| transform_block(wb, &mut rows));
    u
}

/// (k, c) pairs per task of the weight transforms: the f64 scratch (21 values a pair) stays in L1.
const PAIRS: usize = 128;

/// Splits `buf` (`rows` rows of equal length) into blocks of `len` columns (the last may be shorter): block `i`
/// gets columns `i·len ..` of every row, in row order.
fn by_block(buf: &mut [f32], rows: usize, len: usize) -> Vec<Vec<&mut [f32]>> {
    let row_len = buf.len() / rows.max(1);
    let blocks = row_len.div_ceil(len.max(1));
    let mut out: Vec<Vec<&mut [f32]>> = (0..blocks).map(|_| Vec::with_capacity(rows)).collect();
    if row_len == 0 {
        return out;
    }
    for row in buf.chunks_exact_mut(row_len) {
        for (i, part) in row.chunks_mut(len).enumerate() {
            out[i].push(part);
        }
    }
    out
}

wide! {
    /// One block of pairs: `wb` (pairs × 9 taps) into its columns of the 16 rows of U.
    fn transform_block(wb: &[f32], rows: &mut [&mut [f32]]) {
        let n = wb.len() / 9;
        // g9[j][i]: tap j of pair i
        let mut g9 = [0f64; 9 * PAIRS];
        taps_major(wb, &mut g9);
        // t[r][s] = (G g)[r][s] at (3r + s)·PAIRS, then U[r][q] = (t Gᵀ)[r][q]
        let mut t = [0f64; 12 * PAIRS];
        for s in 0..3 {
            let row = |j: usize| &g9[j * PAIRS..][..n];
            let (a, b, e) = (row(s), row(3 + s), row(6 + s));
            let [t0, t1, t2, t3] = t
                .get_disjoint_mut([s..s + 1, 3 + s..4 + s, 6 + s..7 + s, 9 + s..10 + s].map(|r| r.start * PAIRS..r.start * PAIRS + n))
                .expect("distinct rows");
            for i in 0..n {
                t0[i] = a[i];
                t1[i] = (a[i] + b[i] + e[i]) * 0.5;
                t2[i] = (a[i] - b[i] + e[i]) * 0.5;
                t3[i] = e[i];
            }
        }
        for r in 0..4 {
            let row = |j: usize| &t[j * PAIRS..][..n];
            let (a, b, e) = (row(r * 3), row(r * 3 + 1), row(r * 3 + 2));
            let [u0, u1, u2, u3] = rows
                .get_disjoint_mut([r * 4, r * 4 + 1, r * 4 + 2, r * 4 + 3])
                .expect("16 distinct rows");
            let (u0, u1, u2, u3) = (&mut u0[..n], &mut u1[..n], &mut u2[..n], &mut u3[..n]);
            for i in 0..n {
                u0[i] = a[i] as f32;
                u1[i] = ((a[i] + b[i] + e[i]) * 0.5) as f32;
                u2[i] = ((a[i] - b[i] + e[i]) * 0.5) as f32;
                u3[i] = e[i] as f32;
            }
        }
    }
}

/// `dw (K, C, 3, 3) += Gᵀ dU G` for the gradient `du` of U (`[p][k][c]`), [`PAIRS`] pairs per task.
pub(super) fn adjoint_add(du: &[f32], k: usize, c: usize, dw: &mut [f32]) {
    assert_eq!(du.len(), 16 * k * c, "dU of 16 K×C matrices");
    assert_eq!(dw.len(), k * c * 9, "dweight of shape (K, C, 3, 3)");
    if k == 0 || c == 0 {
        return;
    }
    let kc = k * c;
    dw.par_chunks_mut(PAIRS * 9)
        .enumerate()
        .for_each(|(b, dwb)| {
            let rows: Vec<&[f32]> = (0..16)
                .map(|p| &du[p * kc + b * PAIRS..][..dwb.len() / 9])
                .collect();
            adjoint_block(&rows, dwb)
        });
}

wide! {
    /// One block of pairs: its columns of the 16 rows of dU into `dwb` (pairs × 9 taps), added.
    fn adjoint_block(rows: &[&[f32]], dwb: &mut [f32]) {
        let n = dwb.len() / 9;
        // t[r][q] = (Gᵀ dU)[r][q] at (4r + q)·PAIRS for r < 3, then dg[r][s] = (t G)[r][s] at (3r + s)·PAIRS
        let mut t = [0f64; 12 * PAIRS];
        for q in 0..4 {
            let (a0, a1, a2, a3) = (&rows[q][..n], &rows[4 + q][..n], &rows[8 + q][..n], &rows[12 + q][..n]);
            let [t0, t1, t2] = t
                .get_disjoint_mut([q, 4 + q, 8 + q].map(|j| j * PAIRS..j * PAIRS + n))
                .expect("distinct rows");
            for i in 0..n {
                let (a0, a1, a2, a3) = (a0[i] as f64, a1[i] as f64, a2[i] as f64, a3[i] as f64);
                t0[i] = a0 + 0.5 * (a1 + a2);
                t1[i] = 0.5 * (a1 - a2);
                t2[i] = 0.5 * (a1 + a2) + a3;
            }
        }
        let mut g = [0f64; 9 * PAIRS];
        for r in 0..3 {
            let row = |j: usize| &t[j * PAIRS..][..n];
            let (a0, a1, a2, a3) = (row(4 * r), row(4 * r + 1), row(4 * r + 2), row(4 * r + 3));
            let [g0, g1, g2] = g
                .get_disjoint_mut([3 * r, 3 * r + 1, 3 * r + 2].map(|j| j * PAIRS..j * PAIRS + n))
                .expect("distinct rows");
            for i in 0..n {
                g0[i] = a0[i] + 0.5 * (a1[i] + a2[i]);
                g1[i] = 0.5 * (a1[i] - a2[i]);
                g2[i] = 0.5 * (a1[i] + a2[i]) + a3[i];
            }
        }
        add_pairs_major(&g, dwb);
    }
}

/// `g9[j·PAIRS + i] = wb[9i + j]`: the stride-9 transposition, outside the AVX-512 bodies on purpose. Compiled
/// for AVX-512 it became gathers, which AMD's cores run about one element per cycle; as plain loads and
/// stores it is 2-3× faster.
#[inline(never)]
fn taps_major(wb: &[f32], g9: &mut [f64; 9 * PAIRS]) {
    for (i, taps) in wb.chunks_exact(9).enumerate() {
        for (j, &v) in taps.iter().enumerate() {
            g9[j * PAIRS + i] = v as f64;
        }
    }
}

/// `dwb[9i + j] += g[j·PAIRS + i]`: the adjoint's transposition back, kept out of the AVX-512 bodies for the
/// same reason as [`taps_major`].
#[inline(never)]
fn add_pairs_major(g: &[f64; 9 * PAIRS], dwb: &mut [f32]) {
    for (i, out) in dwb.chunks_exact_mut(9).enumerate() {
        for (j, o) in out.iter_mut().enumerate() {
            *o += g[j * PAIRS + i] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_weights_follow_every_change_of_the_weights() {
        let (k, c) = (3, 5);
        let mut w: Vec<f32> = (0..k * c * 9).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut kept = Transformed::default();
        assert_eq!(kept.get(&w, k, c), transform(&w, k, c).as_slice());
        w[17] += 1e-6; // one weight, by one rounding step or so
        assert_eq!(kept.get(&w, k, c), transform(&w, k, c).as_slice());
        // other shapes over the same values
        assert_eq!(
            kept.get(&w[..c * 9], 1, c),
            transform(&w[..c * 9], 1, c).as_slice()
        );
    }

    #[test]
    fn the_adjoint_is_the_transpose_of_the_transform() {
        // <U(g), dU> = <g, Uᵀ(dU)> for random g and dU
        let (k, c) = (2, 300); // more pairs than one block
        let g: Vec<f32> = (0..k * c * 9).map(|i| (i as f32 * 0.71).cos()).collect();
        let du: Vec<f32> = (0..16 * k * c).map(|i| (i as f32 * 0.13).sin()).collect();
        let u = transform(&g, k, c);
        let mut dg = vec![0f32; g.len()];
        adjoint_add(&du, k, c, &mut dg);
        let lhs: f64 = u.iter().zip(&du).map(|(a, b)| *a as f64 * *b as f64).sum();
        let rhs: f64 = g.iter().zip(&dg).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(
            (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }
}
