//! The F(2×2, 3×3) inference forward on channel-last tiles, one tile row at a time: the row's input tiles are
//! transformed (vectorised over input channels), multiplied with U (vectorised over output channels) and
//! transformed back while they are in L1, so no image-sized buffer of transformed tiles exists.
//!
//! The planar forward ([`super::forward_kept`]) transforms a whole image (or band) into V before its 16 GEMMs:
//! on the reference CNN's 28×28, 32→32 layer that is 400 KB of V and 400 KB of products per image, written to
//! and read back from L2, and inside the model those layers ran at 1.5-2× their hot-cache time. Here one tile
//! row's V is 28 KB, and its products overwrite it in place (K ≤ 64): with V and the products in separate
//! buffers the row's three stages did not fit L1 together, and took 71 µs against 56 µs one at a time.
//!
//! Input and output are planar (N, C, H, W) or channel-last (N, H, W, C), independently ([`Layouts`]): the
//! inference plan keeps an activation channel-last between two convolutions that both run here, and the
//! others are transposed on the fly (a band's input rows before its first tile row, each tile row's output
//! after it). C and K must be multiples of 16 ([`supports`]).
//!
//! Every value is computed by the same operations in the same order as in the planar forward (see
//! the kernels in `cl_x86.rs`), so the result is bitwise its result, for any layout and any number of threads.

use super::cl_x86::x86;
use super::{at_least, available, with_scratch, Epilogue, WinoShape};
use crate::kernels::elementwise::SyncPtr;
use crate::kernels::transpose;
use rayon::prelude::*;

/// Where a channel-last forward reads its input and writes its output: channel-last (N, H, W, C) when set,
/// planar (N, C, H, W) otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layouts {
    pub input: bool,
    pub output: bool,
}

/// Whether [`forward`] computes a convolution of `c` input and `k` output channels here: AVX-512F, and both
/// multiples of 16 (whole vectors of channels).
pub fn supports(c: usize, k: usize) -> bool {
    available() && c > 0 && k > 0 && c.is_multiple_of(16) && k.is_multiple_of(16)
}

/// Tiles a product block may read past the end of its row's V (the largest block is 14 tiles).
const PAD_TILES: usize = 14;

/// Forward of `s` with `u`, the transformed weights channel-last (`U[p][c][k]`, see
/// [`super::Transformed::channel_last`]), then `ep`; `y` holds N·K·H·W values, or N·K·(H/2)·(W/2) with the
/// pool, in the layout `lay.output`. Every value of `y` is written. Bitwise [`super::forward_kept`]'s result.
pub fn forward(s: WinoShape, x: &[f32], u: &[f32], ep: Epilogue, lay: Layouts, y: &mut [f32]) {
    assert!(
        supports(s.c, s.k),
        "channel-last Winograd needs AVX-512F and C, K multiples of 16"
    );
    assert!(!ep.pool || (ep.relu && s.h.is_multiple_of(2) && s.w.is_multiple_of(2)));
    let (th, tw) = (s.th(), s.tw());
    let (oh, ow) = if ep.pool { (th, tw) } else { (s.h, s.w) };
    let (is, os) = (s.in_size(), s.k * oh * ow);
    assert_eq!(x.len(), s.n * is, "input length");
    assert_eq!(y.len(), s.n * os, "output length");
    assert_eq!(u.len(), 16 * s.c * s.k, "transformed weights");
    assert!(ep.bias.is_none_or(|b| b.len() == s.k), "bias length");
    assert!(
        ep.affine
            .is_none_or(|(a, b)| a.len() == s.k && b.len() == s.k),
        "affine length"
    );
    if y.is_empty() {
        return;
    }
    let threads = rayon::current_num_threads();
    let tiles = th * tw;
    if s.n >= threads || tiles == 1 {
        x.par_chunks(is)
            .zip(y.par_chunks_mut(os))
            .for_each(|(xi, yi)| {
                band(
                    &s,
                    xi,
                    u,
                    ep,
                    lay,
                    (SyncPtr(yi.as_mut_ptr()), os),
                    (0, tiles),
                )
            });
        return;
    }
    // below one image per thread, each image's tiles (row-major) are split into equal runs, which may start
    // and end inside a tile row: 49 tiles split 25 + 24, where whole tile rows would split 4 + 3
    let parts = threads.min(tiles);
    for (xi, yi) in x.chunks(is).zip(y.chunks_mut(os)) {
        let out = (SyncPtr(yi.as_mut_ptr()), os);
        (0..parts).into_par_iter().for_each(|b| {
            band(
                &s,
                xi,
                u,
                ep,
                lay,
                out,
                (b * tiles / parts, (b + 1) * tiles / parts),
            )
        });
    }
}

/// The tiles `t0..t1` (row-major) of one image: `xi` its input, `yo` its output (`ylen` values, of which only
/// the output pixels of these tiles are written, so that bands can run at once).
fn band(
    s: &WinoShape,
    xi: &[f32],
    u: &[f32],
    ep: Epilogue,
    lay: Layouts,
    (yo, ylen): (SyncPtr<f32>, usize),
    (t0, t1): (usize, usize),
) {
    let (h, w, c, k) = (s.h, s.w, s.c, s.k);
    let (th, tw) = (s.th(), s.tw());
    assert!(t0 < t1 && t1 <= th * tw, "tiles within the image");
    let plane = if ep.pool { th * tw } else { h * w };
    assert_eq!(ylen, k * plane, "one image's output");
    // the first and last tile rows, and the input rows their tiles read
    let (ia, ib) = (t0 / tw, (t1 - 1) / tw);
    let (r0, r1) = ((2 * ia).saturating_sub(1), (2 * ib + 3).min(h));
    // M overwrites V in place when one block of output-channel vectors computes all of it (K ≤ 64): a tile's
    // products are stored after their last read of its V. Rows of ld = max(C, K) values for both.
    let (shared, ld) = (k <= 64, c.max(k));
    with_scratch(|sc| {
        at_least(&mut sc.a, (16 * tw + PAD_TILES) * ld);
        if !shared {
            at_least(&mut sc.b, 16 * tw * ld);
        }
        // the staged input rows (when planar), then c zeros for the pixels outside the image
        let stage = if lay.input { 0 } else { (r1 - r0) * w * c };
        at_least(&mut sc.rows, stage + c);
        sc.rows[stage..stage + c].fill(0.0);
        if !lay.input {
            transpose::planar_rows_to_cl(xi, (c, h, w), (r0, r1), &mut sc.rows[..stage]);
        }
        let src = if lay.input {
            xi[r0 * w * c..].as_ptr()
        } else {
            sc.rows.as_ptr()
        };
        let zeros = sc.rows[stage..].as_ptr();
        if !lay.output {
            at_least(&mut sc.out, if ep.pool { tw * k } else { 2 * w * k });
        }
        let epi = (ep.bias, ep.affine, (ep.relu, ep.pool));
        for i in ia..=ib {
            // the band's tiles of tile row i
            let j0 = if i == ia { t0 % tw } else { 0 };
            let j1 = if i == ib { (t1 - 1) % tw + 1 } else { tw };
            let rows = (h - 2 * i).min(2);
            // SAFETY: AVX-512F (asserted by `forward`); the tile reads are of rows 2i-1..2i+2 within r0..r1 at
            // columns < w (or of `zeros`), c values each, and V's stores are at (p·tw + j - j0)·ld + ch
            // < 16·tw·ld.
            let v = sc.a.as_mut_ptr();
            unsafe { x86::input_row(src, r0, (c, h, w), i, (j0, j1), zeros, v, (tw, ld)) };
            let mp = if shared { v } else { sc.b.as_mut_ptr() };
            // SAFETY: V holds (16·tw + PAD_TILES)·ld values and M (the same buffer, or sc.b) 16·tw·ld.
            unsafe { products(j1 - j0, (tw, ld), c, k, v, u, mp) };
            let m: &[f32] = if shared { &sc.a } else { &sc.b };
            let seg = (j0, j1, w, rows);
            // the stores below are these tiles' output pixels only: no other band writes them
            if lay.output {
                let pix0 = if ep.pool { i * tw } else { 2 * i * w };
                let npix = if ep.pool { j1 } else { rows * w };
                assert!((pix0 + npix) * k <= ylen, "tile row outside the output");
                // SAFETY: M's loads are within 16·tw·ld; the stores are channel-last pixels of the tile row
                // (from pix0) within the image's output (asserted), which outlives the call.
                unsafe { output_row(m, (tw, ld), k, seg, epi, yo.0.add(pix0 * k)) };
                continue;
            }
            // SAFETY: as above, into the staging of one tile row's output pixels.
            unsafe { output_row(m, (tw, ld), k, seg, epi, sc.out.as_mut_ptr()) };
            // each output row's pixels of these tiles, channel-last in the staging, into the K planes
            let runs: &[(usize, usize, usize)] = if ep.pool {
                &[(j0, i * tw + j0, j1 - j0)]
            } else {
                let (x0, x1) = (2 * j0, (2 * j1).min(w));
                &[
                    (x0, 2 * i * w + x0, x1 - x0),
                    (w + x0, (2 * i + 1) * w + x0, x1 - x0),
                ][..rows]
            };
            for &(from, pix, n) in runs {
                assert!(
                    (k - 1) * plane + pix + n <= ylen,
                    "tile row outside the output"
                );
                // SAFETY: plane kk's pixels pix..pix + n, within the image's output (asserted), written by
                // no other band.
                unsafe { transpose::cl_to_planar(&sc.out[from * k..], k, n, yo.0.add(pix), plane) };
            }
        }
    })
}

type Epi<'a> = (
    Option<&'a [f32]>,
    Option<(&'a [f32], &'a [f32])>,
    (bool, bool),
);

/// # Safety
/// AVX-512F; `dst` must hold the tile row's output pixels (k values each) that `seg` (j0, j1, w, rows) covers.
unsafe fn output_row(
    m: &[f32],
    (ts, ld): (usize, usize),
    k: usize,
    seg: (usize, usize, usize, usize),
    epi: Epi,
    dst: *mut f32,
) {
    assert!(k <= ld && seg.0 < seg.1 && seg.1 - seg.0 <= ts && m.len() >= 16 * ts * ld);
    let (bias, affine, flags) = epi;
    x86::output_row(m.as_ptr(), (ts, ld), k, seg, bias, affine, flags, dst)
}

/// `m[p][t][..]` = V[p] (nt × c, `v[(p·ts + t)·ld + ch]`) · U[p] (c × k) for the 16 points, into rows of `ld`
/// as well, in blocks of output-channel vectors (at most 4) and of tiles. `m` may be `v` when K ≤ 64 (one block
/// of vectors): each tile block stores its products after reading its V.
///
/// # Safety
/// AVX-512F; `v` holds (16·ts + PAD_TILES)·ld values and `m` 16·ts·ld; `u` holds 16·c·k.
unsafe fn products(
    nt: usize,
    (ts, ld): (usize, usize),
    c: usize,
    k: usize,
    v: *const f32,
    u: &[f32],
    m: *mut f32,
) {
    assert!(nt <= ts && c <= ld && k <= ld && u.len() >= 16 * c * k);
    assert!(
        !std::ptr::eq(v, m) || k <= 64,
        "products overwrite V only in one block of vectors"
    );
    let nkv = k / 16;
    for p in 0..16 {
        let mut kv = 0;
        while kv < nkv {
            let part = (nkv - kv).min(4);
            let (vp, up) = (v.add(p * ts * ld), u[p * c * k + 16 * kv..].as_ptr());
            let mp = m.add(p * ts * ld + 16 * kv);
            // each block reads NT ≤ 14 tiles of V from tile t0 < nt (within the PAD_TILES padding), c rows of
            // U's `part` vectors at kv, and stores its valid tiles' `part` vectors at kv of M's rows
            match (part, nt) {
                (4, _) => blocks::<4, 7>(nt, (c, k, ld), vp, up, mp),
                (3, _) => blocks::<3, 9>(nt, (c, k, ld), vp, up, mp),
                // a band's partial tile row of up to 7 tiles: 14 accumulators, not 28 with half unused
                (2, ..=7) => blocks::<2, 7>(nt, (c, k, ld), vp, up, mp),
                (2, _) => blocks::<2, 14>(nt, (c, k, ld), vp, up, mp),
                _ => blocks::<1, 14>(nt, (c, k, ld), vp, up, mp),
            }
            kv += part;
        }
    }
}

/// # Safety
/// As [`x86::products`], for the tiles 0..nt in blocks of NT.
unsafe fn blocks<const NKV: usize, const NT: usize>(
    nt: usize,
    (c, k, ld): (usize, usize, usize),
    v: *const f32,
    u: *const f32,
    m: *mut f32,
) {
    let mut t0 = 0;
    while t0 < nt {
        x86::products::<NKV, NT>(
            c,
            v.add(t0 * ld),
            u,
            k,
            m.add(t0 * ld),
            ld,
            (nt - t0).min(NT),
        );
        t0 += NT;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::conv::winograd::{forward_kept, Transformed};

    fn planar_to_cl(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
        let mut o = vec![0.0; x.len()];
        for i in 0..n {
            for ch in 0..c {
                for p in 0..hw {
                    o[(i * hw + p) * c + ch] = x[(i * c + ch) * hw + p];
                }
            }
        }
        o
    }

    /// Every layout, shape, epilogue and thread count gives bitwise the planar forward's output.
    #[test]
    fn is_bitwise_the_planar_forward_in_every_layout() {
        if !supports(16, 16) {
            return;
        }
        use rand::SeedableRng;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
        let mut normal = move || -> f32 {
            use rand::Rng;
            rng.gen_range(-2.0..2.0)
        };
        let shapes = [
            (1, 16, 32, 28, 28),
            (3, 32, 16, 14, 14),
            (2, 32, 64, 7, 9),
            (1, 48, 80, 5, 4),
            (2, 16, 16, 1, 3),
            (5, 16, 48, 6, 6),
        ];
        for (n, c, k, h, w) in shapes {
            let s = WinoShape { n, c, k, h, w };
            let x: Vec<f32> = (0..n * c * h * w).map(|_| normal()).collect();
            let wt: Vec<f32> = (0..k * c * 9).map(|_| 0.2 * normal()).collect();
            let bias: Vec<f32> = (0..k).map(|_| normal()).collect();
            let a: Vec<f32> = (0..k).map(|_| normal()).collect();
            let b: Vec<f32> = (0..k).map(|_| normal()).collect();
            let mut kept = Transformed::default();
            let u = kept.channel_last(&wt, k, c).to_vec();
            for (bias_on, aff_on, relu, pool) in [
                (false, false, false, false),
                (true, false, true, false),
                (true, true, true, true),
                (false, true, false, false),
            ] {
                if pool && (h % 2 == 1 || w % 2 == 1) {
                    continue;
                }
                let bias = bias_on.then_some(bias.as_slice());
                let affine = aff_on.then_some((a.as_slice(), b.as_slice()));
                let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
                let mut want = vec![0.0; n * k * oh * ow];
                forward_kept(s, &x, &wt, &mut kept, bias, affine, relu, pool, &mut want);
                let ep = Epilogue {
                    bias,
                    affine,
                    relu,
                    pool,
                };
                let xcl = planar_to_cl(&x, n, c, h * w);
                let want_cl = planar_to_cl(&want, n, k, oh * ow);
                for threads in [1, 2, 3, 4] {
                    let pool_rt = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    for (li, lo) in [(false, false), (true, false), (false, true), (true, true)] {
                        let mut got = vec![f32::NAN; want.len()];
                        let xin = if li { &xcl } else { &x };
                        let lay = Layouts {
                            input: li,
                            output: lo,
                        };
                        pool_rt.install(|| forward(s, xin, &u, ep, lay, &mut got));
                        let want = if lo { &want_cl } else { &want };
                        let same = got
                            .iter()
                            .zip(want)
                            .all(|(g, w)| g.to_bits() == w.to_bits());
                        assert!(
                            same,
                            "{s:?} bias {bias_on} affine {aff_on} relu {relu} pool {pool} \
                             threads {threads} layouts {lay:?}"
                        );
                    }
                }
            }
        }
    }
}
