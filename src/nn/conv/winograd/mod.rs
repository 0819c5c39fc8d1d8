//! Winograd convolution: F(2×2, 3×3) here, F(4×4, 3×3) in [`f4`], and F(2×2, 3×3) over a whole batch with any dilation in [`batch`] (the small dilated maps of DeepLab), with the chunk drivers the first two share, for 3×3 kernels with stride 1, padding 1, dilation 1 and one group (every
//! large convolution of the reference CNN and of the ResNet), forward and backward, f32 on AVX-512.
//!
//! Each 2×2 output tile is computed from a 4×4 input tile as `Y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A` (Lavin & Gray 2015,
//! arXiv:1509.09308): 16 multiplications per tile and channel pair instead of 36, so the GEMM work is 2.25×
//! smaller than the direct convolution's. The sum over input channels of the 16 elementwise products is 16
//! independent GEMMs, one per tile position `p`:
//!
//! - forward: `M[p] (K×T) = U[p] (K×C) · V[p] (C×T)`, with `U = G g Gᵀ` (weights), `V = Bᵀ d B` (input tiles);
//! - data gradient: `dV[p] (C×T) = U[p]ᵀ · dM[p]` with `dM = A dY Aᵀ`, then dx = the sum over tiles of
//!   `B dV Bᵀ` (the adjoint of the input transform; neighbouring tiles overlap by two rows and columns), which
//!   overwrites dx;
//! - weight gradient: `dU[p] (K×C) = Σ_tiles dM[p] · V[p]ᵀ`, then `dg = Gᵀ dU G`.
//!
//! The backward passes are the exact adjoints of the forward's linear maps, so they are the gradients of the
//! function the forward computes. The transforms use only ±1 and ½ (exact in binary), which keeps the rounding
//! error close to the direct convolution's (the tests compare both against an f64 reference).
//!
//! Work is split by images: a chunk of images (about [`TILE_TARGET`] tiles) is transformed into a scratch buffer
//! that stays in L2, multiplied with the kernel floor's AVX-512 `gemm_nn` (forward, data gradient) or the `gemm` crate (weight
//! gradient) and transformed back. The tile
//! transforms are vectorised over the tiles of a tile row (16 lanes with a mask), on inputs split into even and
//! odd columns first, so that every vector load is contiguous.

use crate::kernels::gemm_avx512 as simd;
use crate::kernels::moments::plane_moments_into;
use rayon::prelude::*;
use std::ops::Range;

/// Tiles per chunk the work is split into (a chunk holds whole images): large enough for long GEMM rows, small
/// enough for the chunk's transformed tiles (16·C·T floats, two or three buffers) to stay in L2; 100 beat 50,
/// 200 and 400 on the 14×14 layers (see docs/PERFORMANCE.md, "Tuning constants"). 28×28 images (196 tiles) are one per chunk whatever
/// the target.
pub const TILE_TARGET: usize = 100;

/// A convolution the Winograd path computes: (N, C, H, W) input, K output channels, 3×3 kernel, stride 1,
/// padding 1, dilation 1, one group (so the output is (N, K, H, W)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WinoShape {
    pub n: usize,
    pub c: usize,
    pub k: usize,
    pub h: usize,
    pub w: usize,
}

impl WinoShape {
    fn th(&self) -> usize {
        self.h.div_ceil(2)
    }
    fn tw(&self) -> usize {
        self.w.div_ceil(2)
    }
    fn tiles(&self) -> usize {
        self.th() * self.tw()
    }
    fn in_size(&self) -> usize {
        self.c * self.h * self.w
    }
    fn out_size(&self) -> usize {
        self.k * self.h * self.w
    }
}

/// Whether the Winograd kernels can run here (AVX-512F).
pub fn available() -> bool {
    simd::available()
}

/// Packs the matrices U[p] (K×C; 16 for F(2×2), 36 for F(4×4)) for [`simd::gemm_nn`], transposed (C×K) when
/// `transposed`. Returns the packed matrices and the length of one.
pub(super) fn pack_weights(u: &[f32], k: usize, c: usize, transposed: bool) -> (Vec<f32>, usize) {
    assert!(
        k * c > 0 && u.len().is_multiple_of(k * c),
        "U of whole K×C matrices"
    );
    let points = u.len() / (k * c);
    let plen = if transposed {
        simd::packed_len(c, k)
    } else {
        simd::packed_len(k, c)
    };
    let mut out = Vec::with_capacity(points * plen);
    let mut one = Vec::new();
    for p in 0..points {
        let up = &u[p * k * c..(p + 1) * k * c];
        if transposed {
            simd::pack_a(c, k, up, 1, c, &mut one);
        } else {
            simd::pack_a(k, c, up, c, 1, &mut one);
        }
        out.extend_from_slice(&one);
    }
    (out, plen)
}

/// Per-thread scratch: transformed tiles and the even/odd row buffers of one plane.
#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    rows: Vec<f32>,
    /// The channel-last forward's staging of one tile row's output ([`channel_last`]).
    out: Vec<f32>,
}

std::thread_local! {
    /// Each worker thread keeps its scratch across chunks, calls and layers: the buffers (up to a few MB) are
    /// allocated and zero-filled once per thread instead of once per task and call. The transforms and GEMMs
    /// overwrite every value they read back, so stale contents are never seen.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch. `f` must not re-enter (it runs no rayon work of its own).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|sc| f(&mut sc.borrow_mut()))
}

/// Grows `v` to at least `len` values (never shrinks it, so a buffer reaches its largest size once).
fn at_least(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// Forward: `y (N, K, H, W) = conv3x3(x (N, C, H, W), w (K, C, 3, 3)) (+ bias)`, then max(·, 0) when `relu`.
/// Every element of `y` is written. Panics on inconsistent lengths or without AVX-512F.
pub fn forward(
    s: WinoShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    forward_affine(s, x, w, bias, None, relu, y)
}

/// [`forward`] followed, in the same output pass, by a per-channel `y·a + b` (a rounded product, then a rounded
/// sum, as BatchNorm's eval forward computes it) before the ReLU: an eval-mode BatchNorm
/// applied with bitwise the same result as running it afterwards.
pub fn forward_affine(
    s: WinoShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
    y: &mut [f32],
) {
    forward_impl(s, x, Weights::Raw(w), bias, affine, relu, false, None, y)
}

/// [`forward`] (no ReLU) that also reduces every output plane to its (mean, M2) while the plane is still in
/// cache (the kernel floor's `plane_moments`; `moments` has N·K entries, n-major): the statistics a
/// following training BatchNorm needs, without a pass of its own over `y`.
pub fn forward_with_moments(
    s: WinoShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    moments: &mut [(f64, f64)],
) {
    assert_eq!(moments.len(), s.n * s.k, "one (mean, M2) per output plane");
    forward_impl(
        s,
        x,
        Weights::Raw(w),
        bias,
        None,
        false,
        false,
        Some(moments),
        y,
    )
}

/// [`forward_affine`] with ReLU, followed in the same output pass by a 2×2, stride-2 max pool: `y` is
/// (N, K, H/2, W/2). Every F(2×2, 3×3) output tile is one pooling window, so the full-size output is never
/// written. After the ReLU (`max(·, +0)`) no value is NaN or -0, so the pooled maximum is bitwise what
/// [`crate::nn::MaxPool2d`] returns on the unpooled output. Panics unless H and W are even.
pub fn forward_affine_relu_maxpool(
    s: WinoShape,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    y: &mut [f32],
) {
    assert!(
        s.h.is_multiple_of(2) && s.w.is_multiple_of(2),
        "fused 2×2 max pool needs even H and W"
    );
    forward_impl(s, x, Weights::Raw(w), bias, affine, true, true, None, y)
}

/// [`forward_affine`] (with `pool`, [`forward_affine_relu_maxpool`]) with the transformed and packed weights
/// kept in `kept` from call to call while `w` is unchanged: the inference path, whose weights never change.
#[allow(clippy::too_many_arguments)]
pub fn forward_kept(
    s: WinoShape,
    x: &[f32],
    w: &[f32],
    kept: &mut Transformed,
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
    pool: bool,
    y: &mut [f32],
) {
    assert!(
        !pool || (relu && s.h.is_multiple_of(2) && s.w.is_multiple_of(2)),
        "fused 2×2 max pool needs ReLU and even H and W"
    );
    forward_impl(
        s,
        x,
        Weights::Kept(w, kept),
        bias,
        affine,
        relu,
        pool,
        None,
        y,
    )
}

/// The weights of a forward: transformed and packed for this call, or kept from call to call.
enum Weights<'a> {
    Raw(&'a [f32]),
    Kept(&'a [f32], &'a mut Transformed),
}

#[allow(clippy::too_many_arguments)]
fn forward_impl(
    s: WinoShape,
    x: &[f32],
    w: Weights,
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
    pool: bool,
    moments: Option<&mut [(f64, f64)]>,
    y: &mut [f32],
) {
    assert!(available(), "Winograd kernels need AVX-512F");
    assert_eq!(x.len(), s.n * s.in_size(), "input length");
    let os = if pool { s.out_size() / 4 } else { s.out_size() };
    assert_eq!(y.len(), s.n * os, "output length");
    if let Some(b) = bias {
        assert_eq!(b.len(), s.k, "bias length");
    }
    if let Some((a, b)) = affine {
        assert!(a.len() == s.k && b.len() == s.k, "affine length");
    }
    if s.n == 0 || s.out_size() == 0 {
        if let Some(m) = moments {
            m.fill((0.0, 0.0));
        }
        return;
    }
    if s.c == 0 {
        let plane = if pool { s.h * s.w / 4 } else { s.h * s.w };
        for (o, v) in y.iter_mut().enumerate() {
            let k = (o / plane) % s.k;
            let mut t = 0.0 + bias.map_or(0.0, |b| b[k]);
            if let Some((a, b)) = affine {
                t = t * a[k] + b[k];
            }
            *v = if relu && !(t > 0.0) { 0.0 } else { t };
        }
        if let Some(m) = moments {
            plane_moments_into(y, plane, m);
        }
        return;
    }
    let raw;
    let packed = match w {
        Weights::Raw(w) => {
            let u = weights::transform(w, s.k, s.c);
            raw = pack_weights(&u, s.k, s.c, false);
            crate::kernels::arena::give(u);
            (raw.0.as_slice(), raw.1)
        }
        Weights::Kept(w, kept) => kept.packed(w, s.k, s.c),
    };
    let ep = Epilogue {
        bias,
        affine,
        relu,
        pool,
    };
    if moments.is_none() && s.n < rayon::current_num_threads() && s.th() > 1 {
        return bands::forward(&s, x, packed, ep, y);
    }
    let tf = Transforms {
        points: 16,
        tiles: s.tiles(),
        input: &|imgs, xc, v, rows| input_transform(&s, xc, imgs, (0, s.th()), v, rows),
    };
    run_forward(&s, &tf, x, packed, os, y, moments, &|imgs, ks, m, yc| {
        output_transform(&s, m, imgs, ks, ep, yc)
    });
}

/// The output pass of a F(2×2) forward: bias, eval BatchNorm `y·a + b`, ReLU, 2×2 max pool.
#[derive(Clone, Copy)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub affine: Option<(&'a [f32], &'a [f32])>,
    pub relu: bool,
    pub pool: bool,
}

/// What the chunk drivers ([`run_forward`], [`run_backward`]) need of a Winograd algorithm: products per tile,
/// tiles per image, and the input transform (`input(imgs, x, V, rows)`: the chunk's image count, its input,
/// the transformed tiles, a per-thread row buffer).
pub(super) struct Transforms<'a> {
    pub points: usize,
    pub tiles: usize,
    #[allow(clippy::type_complexity)]
    pub input: &'a (dyn Fn(usize, &[f32], &mut [f32], &mut Vec<f32>) + Sync),
}

impl Transforms<'_> {
    /// Images per chunk: about [`TILE_TARGET`] tiles (at least one image). It does not depend on the number of
    /// threads, so neither does the order in which the weight gradient is summed.
    fn per_chunk(&self) -> usize {
        (TILE_TARGET / self.tiles.max(1)).max(1)
    }
}

/// `dst[p] (M×T) = A[p] · src[p] (Kd×T)` for every product p, with the A[p] packed by [`pack_weights`]; `rows`
/// picks rows of each A[p] (at a multiple of the packed panel height, or all of them), so M = its length.
fn point_products(
    rows: Range<usize>,
    kd: usize,
    t: usize,
    (packed, plen): (&[f32], usize),
    src: &[f32],
    dst: &mut [f32],
) {
    let m = rows.len();
    let sub = simd::packed_len(m, kd);
    for (p, ap) in packed.chunks_exact(plen).enumerate() {
        simd::gemm_nn(
            m,
            t,
            kd,
            &ap[rows.start * kd..][..sub],
            &src[p * kd * t..(p + 1) * kd * t],
            t,
            &mut dst[p * m * t..(p + 1) * m * t],
            t,
            false,
        );
    }
}

/// The forward over chunks of images: input transform, the products with the packed U, then `output(imgs, ks,
/// M, y)` (which writes the `os` values per image of the output channels `ks`); with `moments`, each output
/// plane's (mean, M2) while it is in cache.
///
/// With fewer images than threads, each image's output channels are split instead, at multiples of the packed
/// panel height: every part transforms the whole input and computes its channels' products and output. That
/// serves F(4×4) and the forward with moments; F(2×2)'s inference forwards split by bands of tile rows
/// instead ([`bands`]), which transform nothing twice. A second parallel pass that split the input transform
/// by input channels was slower at batch 1 (see docs/PERFORMANCE.md §7). Each output value is computed by the
/// same operations in the same order either way, so the splits give bitwise the same result.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(super) fn run_forward(
    s: &WinoShape,
    tf: &Transforms,
    x: &[f32],
    (packed, plen): (&[f32], usize),
    os: usize,
    y: &mut [f32],
    moments: Option<&mut [(f64, f64)]>,
    output: &(dyn Fn(usize, Range<usize>, &[f32], &mut [f32]) + Sync),
) {
    let is = s.in_size();
    let plane = s.h * s.w;
    let parts = rayon::current_num_threads().min(s.k / simd::MR);
    if s.n < rayon::current_num_threads() && parts > 1 {
        let per = (s.k / parts).next_multiple_of(simd::MR);
        let psize = os / s.k;
        let mut moments = moments;
        for img in 0..s.n {
            let xi = &x[img * is..(img + 1) * is];
            let yi = &mut y[img * os..(img + 1) * os];
            let mi = moments
                .as_deref_mut()
                .map(|m| &mut m[img * s.k..(img + 1) * s.k]);
            let mom_parts =
                crate::kernels::elementwise::optional_chunks(mi, per, s.k.div_ceil(per));
            yi.par_chunks_mut(per * psize)
                .zip(mom_parts)
                .enumerate()
                .for_each(|(pi, (yc, mc))| {
                    let ks = pi * per..((pi + 1) * per).min(s.k);
                    let kn = ks.len();
                    with_scratch(|sc| {
                        let t = tf.tiles;
                        at_least(&mut sc.a, tf.points * s.c * t);
                        at_least(&mut sc.b, tf.points * kn * t);
                        (tf.input)(1, xi, &mut sc.a, &mut sc.rows);
                        point_products(ks.clone(), s.c, t, (packed, plen), &sc.a, &mut sc.b);
                        output(1, ks, &sc.b, yc);
                        if let Some(mc) = mc {
                            plane_moments_into(yc, plane, mc);
                        }
                    })
                });
        }
        return;
    }
    let nb = tf.per_chunk();
    let chunks = s.n.div_ceil(nb);
    let mom_chunks = crate::kernels::elementwise::optional_chunks(moments, nb * s.k, chunks);
    x.par_chunks(nb * is)
        .zip(y.par_chunks_mut(nb * os))
        .zip(mom_chunks)
        .for_each(|((xc, yc), mc)| {
            with_scratch(|sc| {
                let imgs = xc.len() / is;
                let t = imgs * tf.tiles;
                at_least(&mut sc.a, tf.points * s.c * t);
                at_least(&mut sc.b, tf.points * s.k * t);
                (tf.input)(imgs, xc, &mut sc.a, &mut sc.rows);
                point_products(0..s.k, s.c, t, (packed, plen), &sc.a, &mut sc.b);
                output(imgs, 0..s.k, &sc.b, yc);
                if let Some(mc) = mc {
                    // each plane was written just now: reduce it while it is in L1/L2
                    plane_moments_into(yc, plane, mc);
                }
            })
        });
}

/// The backward over chunks of images: `dy_tf(imgs, dy, dM, rows)`, then (with `packed_t`, the transposed
/// packed U) the data gradient `adjoint(imgs, dV, dx, rows)`, then the input transform and the weight-gradient
/// products. Returns dU (summed over the chunks in a fixed order, so bitwise the same for any number of
/// threads) and, with `want_db`, Σ dy per output channel.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(super) fn run_backward(
    s: &WinoShape,
    tf: &Transforms,
    x: &[f32],
    dy: &[f32],
    packed_t: Option<&(Vec<f32>, usize)>,
    dx: Option<&mut [f32]>,
    want_db: bool,
    dy_tf: &(dyn Fn(usize, &[f32], &mut [f32], &mut Vec<f32>) + Sync),
    adjoint: &(dyn Fn(usize, &[f32], &mut [f32], &mut Vec<f32>) + Sync),
) -> (Vec<f32>, Vec<f64>) {
    let nb = tf.per_chunk();
    let (is, os) = (s.in_size(), s.out_size());
    let chunks = s.n.div_ceil(nb);
    let mut dx_chunks = crate::kernels::elementwise::optional_chunks(dx, nb * is, chunks);
    let ulen = tf.points * s.k * s.c;
    // The weight and bias gradients are summed over chunks in fixed groups, each group's partial sum in chunk
    // order and the groups in index order, so the result is bitwise the same from run to run and for any
    // number of threads (a rayon fold/reduce would follow the work stealing).
    let per_group = chunks.div_ceil(16).max(4);
    let partials: Vec<(Vec<f32>, Vec<f64>)> = dx_chunks
        .par_chunks_mut(per_group)
        .enumerate()
        .map(|(gi, group)| {
            let mut du = vec![0f32; ulen];
            let mut dbp = vec![0f64; s.k];
            with_scratch(|sc| {
                for (j, dxc) in group.iter_mut().enumerate() {
                    let i0 = (gi * per_group + j) * nb;
                    let imgs = nb.min(s.n - i0);
                    let t = imgs * tf.tiles;
                    let xc = &x[i0 * is..(i0 + imgs) * is];
                    let gc = &dy[i0 * os..(i0 + imgs) * os];
                    // dM first; then the data gradient (dV in `a`, consumed by the adjoint), then V in the
                    // same buffer for the weight gradient: two transformed buffers live at a time, not three
                    at_least(&mut sc.a, tf.points * s.c * t); // dV, then V
                    at_least(&mut sc.b, tf.points * s.k * t); // dM
                    dy_tf(imgs, gc, &mut sc.b, &mut sc.rows);
                    if let (Some(dxc), Some((packed, plen))) = (dxc.take(), packed_t) {
                        point_products(0..s.c, s.k, t, (packed, *plen), &sc.b, &mut sc.a);
                        adjoint(imgs, &sc.a, dxc, &mut sc.rows);
                    }
                    (tf.input)(imgs, xc, &mut sc.a, &mut sc.rows);
                    // the `gemm` crate's packed kernel: faster here than the dot-product form of [`simd::gemm_nt`]
                    // (64→64 at 14×14: 25 against 37 ms per backward on one thread), which reduces every output
                    // horizontally after only T/16 steps
                    for p in 0..tf.points {
                        crate::kernels::gemm::matmul(
                            s.k,
                            s.c,
                            t,
                            &sc.b[p * s.k * t..(p + 1) * s.k * t],
                            crate::kernels::gemm::Op::N,
                            &sc.a[p * s.c * t..(p + 1) * s.c * t],
                            crate::kernels::gemm::Op::T,
                            &mut du[p * s.k * s.c..(p + 1) * s.k * s.c],
                            true,
                            crate::kernels::gemm::Par::Seq,
                        );
                    }
                    if want_db {
                        for (o, d) in gc.chunks_exact(s.h * s.w).enumerate() {
                            dbp[o % s.k] += d.iter().map(|&v| v as f64).sum::<f64>();
                        }
                    }
                }
            });
            (du, dbp)
        })
        .collect();
    // each element sums the groups in index order, whichever thread handles its block
    let mut du = vec![0f32; ulen];
    du.par_chunks_mut(4096).enumerate().for_each(|(bi, d)| {
        for (pu, _) in &partials {
            for (x, y) in d.iter_mut().zip(&pu[bi * 4096..]) {
                *x += *y;
            }
        }
    });
    let mut dbs = vec![0f64; s.k];
    for (_, pb) in &partials {
        for (x, y) in dbs.iter_mut().zip(pb) {
            *x += *y;
        }
    }
    (du, dbs)
}

/// Backward: writes dx (when given; every element) and adds the weight gradient to `dw` (K, C, 3, 3) and, when
/// given, Σ dy per output channel to `db`.
pub fn backward(
    s: WinoShape,
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f64]>,
) {
    assert!(available(), "Winograd kernels need AVX-512F");
    assert_eq!(x.len(), s.n * s.in_size(), "input length");
    assert_eq!(dy.len(), s.n * s.out_size(), "dy length");
    assert_eq!(dw.len(), s.k * s.c * 9, "dweight length");
    if let Some(d) = &dx {
        assert_eq!(d.len(), x.len(), "dx length");
    }
    if let Some(d) = &db {
        assert_eq!(d.len(), s.k, "dbias length");
    }
    if s.n == 0 || s.k == 0 || s.in_size() == 0 {
        if let Some(d) = dx {
            d.fill(0.0); // no output channel feeds the input: its gradient is zero
        }
        if let (Some(db), true) = (db, s.h * s.w > 0) {
            for (o, plane) in dy.chunks_exact(s.h * s.w).enumerate() {
                db[o % s.k] += plane.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        return;
    }
    let packed_t = dx.is_some().then(|| {
        let u = weights::transform(w, s.k, s.c);
        pack_weights(&u, s.k, s.c, true)
    });
    let tf = Transforms {
        points: 16,
        tiles: s.tiles(),
        input: &|imgs, xc, v, rows| input_transform(&s, xc, imgs, (0, s.th()), v, rows),
    };
    let (du, dbs) = run_backward(
        &s,
        &tf,
        x,
        dy,
        packed_t.as_ref(),
        dx,
        db.is_some(),
        &|imgs, gc, dm, rows| dy_transform(&s, gc, imgs, dm, rows),
        &|imgs, dv, dxc, rows| input_adjoint(&s, dv, imgs, dxc, rows),
    );
    weights::adjoint_add(&du, s.k, s.c, dw); // dg = Gᵀ dU G, in f64
    if let Some(db) = db {
        for (d, v) in db.iter_mut().zip(&dbs) {
            *d += *v;
        }
    }
}

/// V[p][c][t] = (Bᵀ d B)[p] for every 4×4 tile d of the padded input of `imgs` images, in the `bt` tile rows
/// from tile row `i0` (all of them: `(0, ⌈h/2⌉)`; T = imgs·bt·tw tiles).
/// Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
fn input_transform(
    s: &WinoShape,
    x: &[f32],
    imgs: usize,
    (i0, bt): (usize, usize),
    v: &mut [f32],
    rows: &mut Vec<f32>,
) {
    let (h, w, c) = (s.h, s.w, s.c);
    let tw = s.tw();
    assert!(i0 + bt <= s.th(), "tile rows within the plane");
    let t_all = imgs * bt * tw;
    assert!(x.len() >= imgs * c * h * w && v.len() >= 16 * c * t_all);
    let nrows = 2 * bt + 2;
    let wl = tw + 1;
    rows.resize(nrows * 2 * wl, 0.0);
    for img in 0..imgs {
        for ch in 0..c {
            let plane = &x[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
            let dst = ch * t_all + img * bt * tw;
            // SAFETY: AVX-512F is available (asserted by the callers); the band's rows are split into the
            // nrows·2·wl buffer (masked to w values read, wl written per half-row); the tile loads stay within
            // wl = tw + 1 values of each row and the 16 stores per tile row are at p·C·T + dst + i·tw + j
            // < 16·C·T with i < bt, j < tw (masked).
            unsafe { x86::input_plane(plane, h, w, rows, (i0, bt), tw, v, c * t_all, dst) };
        }
    }
}

/// y = Aᵀ M A for every tile (Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]), then `ep`: bias, the eval BatchNorm's
/// affine, ReLU; with `ep.pool` (even H and W, ReLU on), each tile's maximum instead (a 2×2, stride-2 max
/// pool, planes of H/2 × W/2). `m` holds the products of the output channels `ks` only, and `y` their planes
/// (image-major).
fn output_transform(
    s: &WinoShape,
    m: &[f32],
    imgs: usize,
    ks: Range<usize>,
    ep: Epilogue,
    y: &mut [f32],
) {
    let (h, w, k) = (s.h, s.w, ks.len());
    let (th, tw) = (s.th(), s.tw());
    let t_all = imgs * th * tw;
    let psize = if ep.pool { th * tw } else { h * w };
    assert!(y.len() >= imgs * k * psize && m.len() >= 16 * k * t_all);
    for img in 0..imgs {
        for kk in 0..k {
            let plane = &mut y[(img * k + kk) * psize..(img * k + kk + 1) * psize];
            let src = kk * t_all + img * th * tw;
            output_plane(s, m, k * t_all, src, (0, th), ks.start + kk, ep, plane);
        }
    }
}

/// The output pass of one plane of output channel `ko`, tile rows `i0..i0 + bt` only, from the products at
/// `m[p·pstride + src + i·tw + j]` (tile row i of the band). `plane` holds the band's output rows: 2·bt (fewer
/// at the bottom edge) rows of W values, or bt rows of W/2 with the pool.
#[allow(clippy::too_many_arguments)]
fn output_plane(
    s: &WinoShape,
    m: &[f32],
    pstride: usize,
    src: usize,
    (i0, bt): (usize, usize),
    ko: usize,
    ep: Epilogue,
    plane: &mut [f32],
) {
    let (h, w, tw) = (s.h, s.w, s.tw());
    assert!(!ep.pool || (ep.relu && h.is_multiple_of(2) && w.is_multiple_of(2)));
    assert!(i0 + bt <= s.th(), "tile rows within the plane");
    let hb = (2 * (i0 + bt)).min(h) - 2 * i0; // output rows of the band
    let len = if ep.pool { bt * tw } else { hb * w };
    assert!(plane.len() >= len && m.len() >= 15 * pstride + src + bt * tw);
    let b = ep.bias.map_or(0.0, |b| b[ko]);
    let aff = ep.affine.map(|(a, ab)| (a[ko], ab[ko]));
    // SAFETY: AVX-512F is available (asserted by the callers); tile loads are within the 16 planes of M
    // (asserted, masked to j < tw), stores are masked to the band's hb rows and w columns of `plane`.
    unsafe {
        x86::output_tiles(
            m, pstride, src, bt, tw, hb, w, b, aff, ep.relu, ep.pool, plane,
        )
    };
}

/// dM[p][k][t] = (A dY Aᵀ)[p] for every 2×2 tile of dy (zero past the edges); A = [[1, 0], [1, 1], [1, -1], [0, -1]].
fn dy_transform(s: &WinoShape, dy: &[f32], imgs: usize, dm: &mut [f32], rows: &mut Vec<f32>) {
    let (h, w, k) = (s.h, s.w, s.k);
    let (th, tw) = (s.th(), s.tw());
    let t_all = imgs * th * tw;
    assert!(dy.len() >= imgs * k * h * w && dm.len() >= 16 * k * t_all);
    let nrows = 2 * th;
    rows.resize(nrows * 2 * tw, 0.0);
    for img in 0..imgs {
        for kk in 0..k {
            let plane = &dy[(img * k + kk) * h * w..(img * k + kk + 1) * h * w];
            let dst = kk * t_all + img * th * tw;
            // SAFETY: AVX-512F is available; the rows are split into the 2·th·2·tw buffer, tile reads stay in
            // it, and stores are within the 16 planes of dM (masked to j < tw).
            unsafe { x86::dy_plane(plane, h, w, rows, th, tw, dm, k * t_all, dst) };
        }
    }
}

/// dx = Σ_tiles B dV Bᵀ (the adjoint of [`input_transform`]), written to every element of dx.
fn input_adjoint(s: &WinoShape, dv: &[f32], imgs: usize, dx: &mut [f32], rows: &mut Vec<f32>) {
    let (h, w, c) = (s.h, s.w, s.c);
    let (th, tw) = (s.th(), s.tw());
    let t_all = imgs * th * tw;
    assert!(dx.len() >= imgs * c * h * w && dv.len() >= 16 * c * t_all);
    let nrows = 2 * th + 2;
    let wl = tw + 1;
    rows.resize(nrows * 2 * wl, 0.0);
    for img in 0..imgs {
        for ch in 0..c {
            let src = ch * t_all + img * th * tw;
            let plane = &mut dx[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
            // SAFETY: AVX-512F is available; reads within the 16 planes of dV (masked to j < tw), writes within
            // the nrows·2·wl rows buffer, then every element of the h × w plane (masked to w per row).
            unsafe { x86::adjoint_plane(dv, c * t_all, src, th, tw, rows, wl, h, w, plane) };
        }
    }
}

mod bands;
pub mod batch;
pub mod channel_last;
mod cl_x86;
mod f2_x86;
pub mod f4;
mod weights;
use f2_x86::x86;
pub use weights::Transformed;

#[cfg(test)]
pub(super) mod tests;
