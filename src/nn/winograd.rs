//! Winograd F(2×2, 3×3) convolution for 3×3 kernels with stride 1, padding 1, dilation 1 and one group (every
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
//! that stays in L2, multiplied with [`simd::gemm_nn`] (forward, data gradient) or the `gemm` crate (weight
//! gradient) and transformed back. The tile
//! transforms are vectorised over the tiles of a tile row (16 lanes with a mask), on inputs split into even and
//! odd columns first, so that every vector load is contiguous.

#![allow(unsafe_code)]

use crate::kernels::gemm_avx512 as simd;
use crate::kernels::moments::plane_moments_into;
use rayon::prelude::*;

/// Tiles per chunk the work is split into (a chunk holds whole images): large enough for long GEMM rows, small
/// enough for the chunk's transformed tiles (16·C·T floats, two or three buffers) to stay in L2. Measured on the
/// 14×14 layers (49 tiles per image), one thread, three alternating rounds: 100 (2 images) beat 50, 200 and
/// 400 (64→64 backward: 21.3-23.3 ms against 22.9-27.8, 23.4-32.3 and 26.8-35.9). 28×28 images (196 tiles)
/// are one per chunk whatever the target.
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

/// `U[p][k][c] = (G g Gᵀ)[p]` for every (k, c), computed in f64 and rounded once.
/// G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]].
fn transform_weights(w: &[f32], k: usize, c: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * c * 9, "weights of shape (K, C, 3, 3)");
    let mut u = vec![0f32; 16 * k * c];
    for kk in 0..k {
        for cc in 0..c {
            let g = &w[(kk * c + cc) * 9..(kk * c + cc + 1) * 9];
            let mut t = [[0f64; 3]; 4];
            for s in 0..3 {
                let (a, b, e) = (g[s] as f64, g[3 + s] as f64, g[6 + s] as f64);
                t[0][s] = a;
                t[1][s] = (a + b + e) * 0.5;
                t[2][s] = (a - b + e) * 0.5;
                t[3][s] = e;
            }
            for (r, tr) in t.iter().enumerate() {
                let (a, b, e) = (tr[0], tr[1], tr[2]);
                let row = [a, (a + b + e) * 0.5, (a - b + e) * 0.5, e];
                for (q, v) in row.iter().enumerate() {
                    u[((r * 4 + q) * k + kk) * c + cc] = *v as f32;
                }
            }
        }
    }
    u
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
/// sum, as [`crate::norm::batch_kernels::eval_forward`] computes it) before the ReLU: an eval-mode BatchNorm
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
    forward_impl(s, x, w, bias, affine, relu, false, None, y)
}

/// [`forward`] (no ReLU) that also reduces every output plane to its (mean, M2) while the plane is still in
/// cache ([`crate::norm::batch_kernels::plane_moments`]; `moments` has N·K entries, n-major): the statistics a
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
    forward_impl(s, x, w, bias, None, false, false, Some(moments), y)
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
    forward_impl(s, x, w, bias, affine, true, true, None, y)
}

#[allow(clippy::too_many_arguments)]
fn forward_impl(
    s: WinoShape,
    x: &[f32],
    w: &[f32],
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
    let u = transform_weights(w, s.k, s.c);
    let tf = Transforms {
        points: 16,
        tiles: s.tiles(),
        input: &|imgs, xc, v, rows| input_transform(&s, xc, imgs, v, rows),
    };
    run_forward(
        &s,
        &tf,
        x,
        &pack_weights(&u, s.k, s.c, false),
        os,
        y,
        moments,
        &|imgs, m, yc| output_transform(&s, m, imgs, bias, affine, relu, pool, yc),
    );
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

/// `dst[p] (M×T) = A[p] · src[p] (Kd×T)` for every product p, with the A[p] packed by [`pack_weights`].
fn point_products(
    m: usize,
    kd: usize,
    t: usize,
    (packed, plen): (&[f32], usize),
    src: &[f32],
    dst: &mut [f32],
) {
    for (p, ap) in packed.chunks_exact(plen).enumerate() {
        simd::gemm_nn(
            m,
            t,
            kd,
            ap,
            &src[p * kd * t..(p + 1) * kd * t],
            t,
            &mut dst[p * m * t..(p + 1) * m * t],
            t,
            false,
        );
    }
}

/// The forward over chunks of images: input transform, the products with the packed U, then `output(imgs, M,
/// y)` (which writes the chunk's `os` values per image); with `moments`, each output plane's (mean, M2)
/// while it is in cache.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(super) fn run_forward(
    s: &WinoShape,
    tf: &Transforms,
    x: &[f32],
    (packed, plen): &(Vec<f32>, usize),
    os: usize,
    y: &mut [f32],
    moments: Option<&mut [(f64, f64)]>,
    output: &(dyn Fn(usize, &[f32], &mut [f32]) + Sync),
) {
    let nb = tf.per_chunk();
    let is = s.in_size();
    let plane = s.h * s.w;
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
                point_products(s.k, s.c, t, (packed, *plen), &sc.a, &mut sc.b);
                output(imgs, &sc.b, yc);
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
                        point_products(s.c, s.k, t, (packed, *plen), &sc.b, &mut sc.a);
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
        let u = transform_weights(w, s.k, s.c);
        pack_weights(&u, s.k, s.c, true)
    });
    let tf = Transforms {
        points: 16,
        tiles: s.tiles(),
        input: &|imgs, xc, v, rows| input_transform(&s, xc, imgs, v, rows),
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
    // dg = Gᵀ dU G, in f64
    for kk in 0..s.k {
        for cc in 0..s.c {
            let d = |r: usize, q: usize| du[((r * 4 + q) * s.k + kk) * s.c + cc] as f64;
            let mut t = [[0f64; 4]; 3];
            #[allow(clippy::needless_range_loop)] // t is filled column by column
            for q in 0..4 {
                let (a0, a1, a2, a3) = (d(0, q), d(1, q), d(2, q), d(3, q));
                t[0][q] = a0 + 0.5 * (a1 + a2);
                t[1][q] = 0.5 * (a1 - a2);
                t[2][q] = 0.5 * (a1 + a2) + a3;
            }
            let out = &mut dw[(kk * s.c + cc) * 9..(kk * s.c + cc + 1) * 9];
            for r in 0..3 {
                let (a0, a1, a2, a3) = (t[r][0], t[r][1], t[r][2], t[r][3]);
                out[r * 3] += (a0 + 0.5 * (a1 + a2)) as f32;
                out[r * 3 + 1] += (0.5 * (a1 - a2)) as f32;
                out[r * 3 + 2] += (0.5 * (a1 + a2) + a3) as f32;
            }
        }
    }
    if let Some(db) = db {
        for (d, v) in db.iter_mut().zip(&dbs) {
            *d += *v;
        }
    }
}

/// V[p][c][t] = (Bᵀ d B)[p] for every 4×4 tile d of the padded input of `imgs` images.
/// Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
fn input_transform(s: &WinoShape, x: &[f32], imgs: usize, v: &mut [f32], rows: &mut Vec<f32>) {
    let (h, w, c) = (s.h, s.w, s.c);
    let (th, tw) = (s.th(), s.tw());
    let t_all = imgs * th * tw;
    assert!(x.len() >= imgs * c * h * w && v.len() >= 16 * c * t_all);
    let nrows = 2 * th + 2;
    let wl = tw + 1;
    rows.resize(nrows * 2 * wl, 0.0);
    for img in 0..imgs {
        for ch in 0..c {
            let plane = &x[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
            let dst = ch * t_all + img * th * tw;
            // SAFETY: AVX-512F is available (asserted by the callers); the plane's rows are split into the
            // nrows·2·wl buffer (masked to w values read, wl written per half-row); the tile loads stay within
            // wl = tw + 1 values of each row and the 16 stores per tile row are at p·C·T + dst + i·tw + j
            // < 16·C·T with j < tw (masked).
            unsafe { x86::input_plane(plane, h, w, rows, th, tw, v, c * t_all, dst) };
        }
    }
}

/// y = Aᵀ M A for every tile (Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]), plus bias, then ReLU when `relu`; with
/// `pool` (even H and W, ReLU on), each tile's maximum instead (a 2×2, stride-2 max pool, planes of H/2 × W/2).
#[allow(clippy::too_many_arguments)]
fn output_transform(
    s: &WinoShape,
    m: &[f32],
    imgs: usize,
    bias: Option<&[f32]>,
    affine: Option<(&[f32], &[f32])>,
    relu: bool,
    pool: bool,
    y: &mut [f32],
) {
    let (h, w, k) = (s.h, s.w, s.k);
    let (th, tw) = (s.th(), s.tw());
    let t_all = imgs * th * tw;
    let psize = if pool { th * tw } else { h * w };
    assert!(!pool || (relu && h.is_multiple_of(2) && w.is_multiple_of(2)));
    assert!(y.len() >= imgs * k * psize && m.len() >= 16 * k * t_all);
    for img in 0..imgs {
        for kk in 0..k {
            let plane = &mut y[(img * k + kk) * psize..(img * k + kk + 1) * psize];
            let b = bias.map_or(0.0, |b| b[kk]);
            let aff = affine.map(|(a, bb)| (a[kk], bb[kk]));
            let src = kk * t_all + img * th * tw;
            // SAFETY: AVX-512F is available; tile loads are within the 16 planes of M (masked to j < tw),
            // stores are masked to the plane's h rows and w columns.
            unsafe {
                x86::output_tiles(m, k * t_all, src, th, tw, h, w, b, aff, relu, pool, plane)
            };
        }
    }
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

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // the tile algebra reads best with explicit row/column indices
mod x86 {
    use std::arch::x86_64::*;

    /// Even and odd lanes of the 32-lane pair (a, b).
    const EVEN: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
    const ODD: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];

    #[inline(always)]
    unsafe fn idx(v: &[i32; 16]) -> __m512i {
        _mm512_loadu_si512(v.as_ptr() as *const _)
    }

    /// Distance, in floats, at which the plane transforms prefetch their (cold) input.
    const AHEAD: usize = 2048;

    /// Prefetches into L2 a plane's worth of lines [`AHEAD`] floats past the start of `plane`: called for each
    /// plane of a contiguous run of planes, it keeps the input 8 KB ahead of the transform. Without it the
    /// split of every row waited on memory (perf: the loads of the input were the transform's hottest spots).
    /// Prefetches never fault, and the address is computed with wrapping arithmetic.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn prefetch_ahead(plane: &[f32]) {
        let p = plane.as_ptr().wrapping_add(AHEAD);
        let mut l = 0;
        while l < plane.len() {
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(l) as *const i8);
            l += 16;
        }
    }

    /// Input tiles of one plane: its rows split into even/odd padded half-rows, then [`input_tiles`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_plane(
        plane: &[f32],
        h: usize,
        w: usize,
        rows: &mut [f32],
        th: usize,
        tw: usize,
        v: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let wl = tw + 1;
        prefetch_ahead(plane);
        for r in 0..2 * th + 2 {
            let (e, o) = rows[r * 2 * wl..(r + 1) * 2 * wl].split_at_mut(wl);
            if r == 0 || r > h {
                e.fill(0.0);
                o.fill(0.0);
            } else {
                split(&plane[(r - 1) * w..r * w], 1, e, o);
            }
        }
        input_tiles(rows, wl, th, tw, v, pstride, dst);
    }

    /// dM tiles of one dy plane: its rows split into even/odd half-rows, then [`dy_tiles`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dy_plane(
        plane: &[f32],
        h: usize,
        w: usize,
        rows: &mut [f32],
        th: usize,
        tw: usize,
        dm: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        prefetch_ahead(plane);
        for r in 0..2 * th {
            let (e, o) = rows[r * 2 * tw..(r + 1) * 2 * tw].split_at_mut(tw);
            if r >= h {
                e.fill(0.0);
                o.fill(0.0);
            } else {
                split(&plane[r * w..(r + 1) * w], 0, e, o);
            }
        }
        dy_tiles(rows, th, tw, dm, pstride, dst);
    }

    /// dx of one plane: the tiles' B dV Bᵀ summed into even/odd padded half-rows, then interleaved into the
    /// plane's h rows (padded column col + 1: even ones in e, odd ones in o, so a row is o[0], e[1], o[1], ...).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn adjoint_plane(
        dv: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        rows: &mut [f32],
        wl: usize,
        h: usize,
        w: usize,
        plane: &mut [f32],
    ) {
        if wl <= 16 {
            adjoint_tiles_narrow(dv, pstride, src, th, tw, rows, wl);
        } else {
            rows.fill(0.0);
            adjoint_tiles(dv, pstride, src, th, tw, rows, wl);
        }
        for r in 0..h {
            let (e, o) = rows[(r + 1) * 2 * wl..(r + 2) * 2 * wl].split_at(wl);
            merge(o, &e[1..], &mut plane[r * w..(r + 1) * w]);
        }
    }

    /// Splits `src` into its even and odd columns. `shift = 0`: `e[m] = src[2m]`, `o[m] = src[2m+1]`.
    /// `shift = 1` (a zero column in front, as in the padded row): `e[0] = 0`, `o[m] = src[2m]`,
    /// `e[m+1] = src[2m+1]`. Entries past the row are zero. `e` and `o` have the same length.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn split(src: &[f32], shift: usize, e: &mut [f32], o: &mut [f32]) {
        let w = src.len();
        let len = e.len();
        let (ie, io) = (idx(&EVEN), idx(&ODD));
        let sp = src.as_ptr();
        if shift == 1 {
            *e.get_unchecked_mut(0) = 0.0;
        }
        // destinations: the even lanes of src go to `first`, the odd lanes to `second` at offset `shift`
        let (first, second): (*mut f32, *mut f32) = if shift == 1 {
            (o.as_mut_ptr(), e.as_mut_ptr().add(1))
        } else {
            (e.as_mut_ptr(), o.as_mut_ptr())
        };
        let n_first = len;
        let n_second = len - shift;
        let mut m0 = 0;
        while m0 < n_first {
            let s0 = 2 * m0;
            let a = _mm512_maskz_loadu_ps(mask(w.saturating_sub(s0)), sp.add(s0.min(w)));
            let b =
                _mm512_maskz_loadu_ps(mask(w.saturating_sub(s0 + 16)), sp.add((s0 + 16).min(w)));
            _mm512_mask_storeu_ps(
                first.add(m0),
                mask(n_first - m0),
                _mm512_permutex2var_ps(a, ie, b),
            );
            if m0 < n_second {
                _mm512_mask_storeu_ps(
                    second.add(m0),
                    mask(n_second - m0),
                    _mm512_permutex2var_ps(a, io, b),
                );
            }
            m0 += 16;
        }
    }

    /// `out = a[0], b[0], a[1], b[1], ...` (out.len() values; a and b hold at least ⌈len/2⌉ and ⌊len/2⌋).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn merge(a: &[f32], b: &[f32], out: &mut [f32]) {
        let w = out.len();
        let op = out.as_mut_ptr();
        let mut m0 = 0;
        while 2 * m0 < w {
            let va = _mm512_maskz_loadu_ps(
                mask(a.len().saturating_sub(m0)),
                a.as_ptr().add(m0.min(a.len())),
            );
            let vb = _mm512_maskz_loadu_ps(
                mask(b.len().saturating_sub(m0)),
                b.as_ptr().add(m0.min(b.len())),
            );
            let s0 = 2 * m0;
            store_interleaved(op.add(s0), va, vb, (w - s0).min(32));
            m0 += 16;
        }
    }

    use crate::kernels::gemm_avx512::{lane_mask as mask, store_interleaved};

    /// Input tiles of one plane from its even/odd padded rows (`wl` values each, row r at `rows[r·2·wl..]`,
    /// odd half after the even one); output p goes to `v[p·pstride + dst + i·tw + j]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_tiles(
        rows: &[f32],
        wl: usize,
        th: usize,
        tw: usize,
        v: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let rp = rows.as_ptr();
        let vp = v.as_mut_ptr();
        if 2 * tw <= 16 {
            return input_tiles_paired(rows, wl, th, tw, v, pstride, dst);
        }
        // One transform column q at a time, over the whole plane: only its 4 output planes (rr·4 + q) are
        // written in the inner loop. With all 16 at once the 16 store pointers did not fit the registers and
        // were kept on the stack, each advanced with a read-modify-write per tile row.
        for (q, &(oa, ob, add)) in input_columns(wl).iter().enumerate() {
            let outs: [*mut f32; 4] =
                std::array::from_fn(|rr| vp.add((rr * 4 + q) * pstride + dst));
            for i in 0..th {
                let mut j0 = 0;
                while j0 < tw {
                    let mk = mask(tw - j0);
                    let mut ca = [_mm512_setzero_ps(); 4];
                    for (a, c) in ca.iter_mut().enumerate() {
                        let e = rp.add((2 * i + a) * 2 * wl + j0);
                        let (x, y) = (
                            _mm512_maskz_loadu_ps(mk, e.add(oa)),
                            _mm512_maskz_loadu_ps(mk, e.add(ob)),
                        );
                        *c = if add {
                            _mm512_add_ps(x, y)
                        } else {
                            _mm512_sub_ps(x, y)
                        };
                    }
                    let at = i * tw + j0;
                    _mm512_mask_storeu_ps(outs[0].add(at), mk, _mm512_sub_ps(ca[0], ca[2]));
                    _mm512_mask_storeu_ps(outs[1].add(at), mk, _mm512_add_ps(ca[1], ca[2]));
                    _mm512_mask_storeu_ps(outs[2].add(at), mk, _mm512_sub_ps(ca[2], ca[1]));
                    _mm512_mask_storeu_ps(outs[3].add(at), mk, _mm512_sub_ps(ca[1], ca[3]));
                    j0 += 16;
                }
            }
        }
    }

    /// Column q of Bᵀ d B in terms of a padded row's even (e) and odd (o) half-rows: `(offset of x, offset of
    /// y, add)`, the column value being x + y or x - y with x, y read at those offsets from e's start:
    /// q = 0: e[j] - e[j+1]; 1: o[j] + e[j+1]; 2: e[j+1] - o[j]; 3: o[j] - o[j+1] (o starts at wl).
    #[inline(always)]
    fn input_columns(wl: usize) -> [(usize, usize, bool); 4] {
        [
            (0, 1, false),
            (wl, 1, true),
            (1, wl, false),
            (wl, wl + 1, false),
        ]
    }

    /// [`input_tiles`] for planes whose tile rows fit two to a vector (2·tw ≤ 16, as the 14×14 layers' 7):
    /// tile rows i and i + 1 share one vector (lanes 0..tw and tw..2·tw), which halves the transform's
    /// iterations and stores. Their outputs are contiguous in V (index i·tw + j), so one store covers both.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn input_tiles_paired(
        rows: &[f32],
        wl: usize,
        th: usize,
        tw: usize,
        v: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let rp = rows.as_ptr();
        let vp = v.as_mut_ptr();
        let lo = mask(tw);
        for (q, &(oa, ob, add)) in input_columns(wl).iter().enumerate() {
            let outs: [*mut f32; 4] =
                std::array::from_fn(|rr| vp.add((rr * 4 + q) * pstride + dst));
            let mut i = 0;
            while i < th {
                let pair = (th - i).min(2);
                let mk = mask(pair * tw);
                let hi = mk & !lo;
                let mut ca = [_mm512_setzero_ps(); 4];
                for (a, c) in ca.iter_mut().enumerate() {
                    let e = rp.add((2 * i + a) * 2 * wl);
                    // the same row of tile row i + 1 is two padded rows further down; offset so that its
                    // first value lands in lane tw (lanes below tw are masked off, so nothing before it is read)
                    let e2 = e.wrapping_add(2 * 2 * wl).wrapping_sub(tw);
                    let ld = |off: usize| {
                        _mm512_mask_loadu_ps(
                            _mm512_maskz_loadu_ps(lo, e.add(off)),
                            hi,
                            e2.wrapping_add(off),
                        )
                    };
                    let (x, y) = (ld(oa), ld(ob));
                    *c = if add {
                        _mm512_add_ps(x, y)
                    } else {
                        _mm512_sub_ps(x, y)
                    };
                }
                let at = i * tw;
                _mm512_mask_storeu_ps(outs[0].add(at), mk, _mm512_sub_ps(ca[0], ca[2]));
                _mm512_mask_storeu_ps(outs[1].add(at), mk, _mm512_add_ps(ca[1], ca[2]));
                _mm512_mask_storeu_ps(outs[2].add(at), mk, _mm512_sub_ps(ca[2], ca[1]));
                _mm512_mask_storeu_ps(outs[3].add(at), mk, _mm512_sub_ps(ca[1], ca[3]));
                i += 2;
            }
        }
    }

    /// [`output_tiles`] for planes whose tile rows fit two to a vector (2·tw ≤ 16): tile rows i and i + 1
    /// are loaded from M with one load per transform plane and transformed together; their output rows
    /// (2i, 2i + 1 and 2i + 2, 2i + 3) are written from the low and the shifted-down high lanes.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn output_tiles_paired(
        m: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        h: usize,
        w: usize,
        b: f32,
        affine: Option<(f32, f32)>,
        relu: bool,
        pool: bool,
        plane: &mut [f32],
    ) {
        let (va, vab) = match affine {
            Some((a, ab)) => (_mm512_set1_ps(a), _mm512_set1_ps(ab)),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        let mp = m.as_ptr();
        let yp = plane.as_mut_ptr();
        let vb = _mm512_set1_ps(b);
        let zero = _mm512_setzero_ps();
        // lane j ← lane j + tw: tile row i + 1 moved down to lanes 0..tw
        let down = _mm512_add_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(tw as i32),
        );
        let mut i = 0;
        while i < th {
            let pair = (th - i).min(2);
            let mk = mask(pair * tw);
            let base = src + i * tw;
            let ld = |p: usize| _mm512_maskz_loadu_ps(mk, mp.add(p * pstride + base));
            let mut s0 = [zero; 4];
            let mut s1 = [zero; 4];
            for q in 0..4 {
                let (m0, m1, m2, m3) = (ld(q), ld(4 + q), ld(8 + q), ld(12 + q));
                s0[q] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                s1[q] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
            }
            let cols = |s: &[__m512; 4]| {
                (
                    _mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]),
                    _mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]),
                )
            };
            let mut pooled = zero;
            for (a, s) in [s0, s1].iter().enumerate() {
                let (mut y0, mut y1) = cols(s);
                y0 = _mm512_add_ps(y0, vb);
                y1 = _mm512_add_ps(y1, vb);
                if affine.is_some() {
                    // separate multiply and add, as the eval BatchNorm computes x·a + b
                    y0 = _mm512_add_ps(_mm512_mul_ps(y0, va), vab);
                    y1 = _mm512_add_ps(_mm512_mul_ps(y1, va), vab);
                }
                if relu {
                    y0 = _mm512_max_ps(y0, zero);
                    y1 = _mm512_max_ps(y1, zero);
                }
                if pool {
                    // after the ReLU every value is +0 or positive, so the maximum is exact in any order
                    pooled = _mm512_max_ps(pooled, _mm512_max_ps(y0, y1));
                    continue;
                }
                let row = 2 * i + a;
                if row < h {
                    store_interleaved(yp.add(row * w), y0, y1, w);
                }
                if pair == 2 && row + 2 < h {
                    let (d0, d1) = (
                        _mm512_permutexvar_ps(down, y0),
                        _mm512_permutexvar_ps(down, y1),
                    );
                    store_interleaved(yp.add((row + 2) * w), d0, d1, w);
                }
            }
            if pool {
                // pooled rows i and i + 1 (tw values each) are contiguous in the (H/2) × (W/2) plane
                _mm512_mask_storeu_ps(yp.add(i * tw), mk, pooled);
            }
            i += 2;
        }
    }

    /// Output tiles of one plane: y = Aᵀ M A (+ b, ReLU), interleaved back into rows of `w` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn output_tiles(
        m: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        h: usize,
        w: usize,
        b: f32,
        affine: Option<(f32, f32)>,
        relu: bool,
        pool: bool,
        plane: &mut [f32],
    ) {
        let (va, vab) = match affine {
            Some((a, ab)) => (_mm512_set1_ps(a), _mm512_set1_ps(ab)),
            None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
        };
        if 2 * tw <= 16 {
            return output_tiles_paired(
                m, pstride, src, th, tw, h, w, b, affine, relu, pool, plane,
            );
        }
        let mp = m.as_ptr();
        let yp = plane.as_mut_ptr();
        let vb = _mm512_set1_ps(b);
        let zero = _mm512_setzero_ps();
        for i in 0..th {
            let mut j0 = 0;
            while j0 < tw {
                let cnt = (tw - j0).min(16);
                let mk = mask(cnt);
                let base = src + i * tw + j0;
                let ld = |p: usize| _mm512_maskz_loadu_ps(mk, mp.add(p * pstride + base));
                // rows: s0 = m0 + m1 + m2, s1 = m1 - m2 - m3 (per column q)
                let mut s0 = [zero; 4];
                let mut s1 = [zero; 4];
                for q in 0..4 {
                    let (m0, m1, m2, m3) = (ld(q), ld(4 + q), ld(8 + q), ld(12 + q));
                    s0[q] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                    s1[q] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
                }
                let cols = |s: &[__m512; 4]| {
                    (
                        _mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]),
                        _mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]),
                    )
                };
                let ncols = (w - 2 * j0).min(2 * cnt);
                let mut pooled = zero;
                for (a, s) in [s0, s1].iter().enumerate() {
                    let row = 2 * i + a;
                    if row >= h {
                        break;
                    }
                    let (mut y0, mut y1) = cols(s);
                    y0 = _mm512_add_ps(y0, vb);
                    y1 = _mm512_add_ps(y1, vb);
                    if affine.is_some() {
                        // separate multiply and add, as the eval BatchNorm computes x·a + b
                        y0 = _mm512_add_ps(_mm512_mul_ps(y0, va), vab);
                        y1 = _mm512_add_ps(_mm512_mul_ps(y1, va), vab);
                    }
                    if relu {
                        y0 = _mm512_max_ps(y0, zero);
                        y1 = _mm512_max_ps(y1, zero);
                    }
                    if pool {
                        // after the ReLU every value is +0 or positive, so the maximum is exact in any order
                        pooled = _mm512_max_ps(pooled, _mm512_max_ps(y0, y1));
                    } else {
                        store_interleaved(yp.add(row * w + 2 * j0), y0, y1, ncols);
                    }
                }
                if pool {
                    _mm512_mask_storeu_ps(yp.add(i * tw + j0), mk, pooled);
                }
                j0 += 16;
            }
        }
    }

    /// dM tiles of one dy plane from its even/odd rows (`tw` values each, no padding).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dy_tiles(
        rows: &[f32],
        th: usize,
        tw: usize,
        dm: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let rp = rows.as_ptr();
        let dp = dm.as_mut_ptr();
        if 2 * tw <= 16 {
            return dy_tiles_paired(rows, th, tw, dm, pstride, dst);
        }
        for i in 0..th {
            let mut j0 = 0;
            while j0 < tw {
                let mk = mask(tw - j0);
                let r0 = rp.add(2 * i * 2 * tw + j0);
                let r1 = rp.add((2 * i + 1) * 2 * tw + j0);
                let (e0, o0) = (
                    _mm512_maskz_loadu_ps(mk, r0),
                    _mm512_maskz_loadu_ps(mk, r0.add(tw)),
                );
                let (e1, o1) = (
                    _mm512_maskz_loadu_ps(mk, r1),
                    _mm512_maskz_loadu_ps(mk, r1.add(tw)),
                );
                let zero = _mm512_setzero_ps();
                // rows of A g: (e0, o0), (e0+e1, o0+o1), (e0-e1, o0-o1), (-e1, -o1)
                let rws = [
                    (e0, o0),
                    (_mm512_add_ps(e0, e1), _mm512_add_ps(o0, o1)),
                    (_mm512_sub_ps(e0, e1), _mm512_sub_ps(o0, o1)),
                    (_mm512_sub_ps(zero, e1), _mm512_sub_ps(zero, o1)),
                ];
                let base = dst + i * tw + j0;
                for (r, (a, b)) in rws.iter().enumerate() {
                    let vals = [
                        *a,
                        _mm512_add_ps(*a, *b),
                        _mm512_sub_ps(*a, *b),
                        _mm512_sub_ps(zero, *b),
                    ];
                    for (q, val) in vals.iter().enumerate() {
                        _mm512_mask_storeu_ps(dp.add((r * 4 + q) * pstride + base), mk, *val);
                    }
                }
                j0 += 16;
            }
        }
    }

    /// [`dy_tiles`] with two tile rows per vector when they fit (2·tw ≤ 16), as [`input_tiles_paired`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dy_tiles_paired(
        rows: &[f32],
        th: usize,
        tw: usize,
        dm: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let rp = rows.as_ptr();
        let dp = dm.as_mut_ptr();
        let lo = mask(tw);
        let zero = _mm512_setzero_ps();
        let mut i = 0;
        while i < th {
            let pair = (th - i).min(2);
            let mk = mask(pair * tw);
            let hi = mk & !lo;
            // half-row p of tile row i in lanes 0..tw, the same half-row of tile row i + 1 (two rows of 2·tw
            // values further on) in lanes tw..2·tw
            let ld = |p: *const f32| {
                let q = p.wrapping_add(2 * 2 * tw).wrapping_sub(tw);
                _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(lo, p), hi, q)
            };
            let r0 = rp.add(2 * i * 2 * tw);
            let r1 = rp.add((2 * i + 1) * 2 * tw);
            let (e0, o0) = (ld(r0), ld(r0.add(tw)));
            let (e1, o1) = (ld(r1), ld(r1.add(tw)));
            // rows of A g: (e0, o0), (e0+e1, o0+o1), (e0-e1, o0-o1), (-e1, -o1)
            let rws = [
                (e0, o0),
                (_mm512_add_ps(e0, e1), _mm512_add_ps(o0, o1)),
                (_mm512_sub_ps(e0, e1), _mm512_sub_ps(o0, o1)),
                (_mm512_sub_ps(zero, e1), _mm512_sub_ps(zero, o1)),
            ];
            let base = dst + i * tw;
            for (r, (a, b)) in rws.iter().enumerate() {
                let vals = [
                    *a,
                    _mm512_add_ps(*a, *b),
                    _mm512_sub_ps(*a, *b),
                    _mm512_sub_ps(zero, *b),
                ];
                for (q, val) in vals.iter().enumerate() {
                    _mm512_mask_storeu_ps(dp.add((r * 4 + q) * pstride + base), mk, *val);
                }
            }
            i += 2;
        }
    }

    /// [`adjoint_tiles`] for planes whose padded half-rows fit one vector (`wl = tw + 1 <= 16`, W <= 30): the
    /// overlapping contributions are summed in registers (the shift by one column with a lane rotation, the
    /// two rows shared with the next tile row carried to it) and every row is stored once. Read-modify-writes
    /// of overlapping, misaligned masked stores would wait on failed store forwarding instead.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn adjoint_tiles_narrow(
        dv: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        rows: &mut [f32],
        wl: usize,
    ) {
        let vp = dv.as_ptr();
        let rp = rows.as_mut_ptr();
        let mk = mask(tw);
        let mw = mask(wl);
        let zero = _mm512_setzero_ps();
        // lane j -> lane j + 1 (lane 0 gets 0); lane tw - 1 lands in lane tw < wl <= 16
        let shift1 = |v: __m512| {
            _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(
                _mm512_castps_si512(v),
                _mm512_castps_si512(zero),
            ))
        };
        let mut carry = [(zero, zero); 2];
        for i in 0..th {
            let base = src + i * tw;
            let mut dr = [[zero; 4]; 4];
            for q in 0..4 {
                let ld = |p: usize| _mm512_maskz_loadu_ps(mk, vp.add(p * pstride + base));
                let (v0, v1, v2, v3) = (ld(q), ld(4 + q), ld(8 + q), ld(12 + q));
                dr[0][q] = v0;
                dr[1][q] = _mm512_add_ps(_mm512_sub_ps(v1, v2), v3);
                dr[2][q] = _mm512_sub_ps(_mm512_add_ps(v1, v2), v0);
                dr[3][q] = _mm512_sub_ps(zero, v3);
            }
            for (a, c) in dr.iter().enumerate() {
                let x0 = c[0];
                let x1 = _mm512_add_ps(_mm512_sub_ps(c[1], c[2]), c[3]);
                let x2 = _mm512_sub_ps(_mm512_add_ps(c[1], c[2]), c[0]);
                // e[j] += x0[j], e[j+1] += x2[j]; o[j] += x1[j], o[j+1] -= c3[j]
                let e = _mm512_add_ps(x0, shift1(x2));
                let o = _mm512_sub_ps(x1, shift1(c[3]));
                if a < 2 {
                    let r = rp.add((2 * i + a) * 2 * wl);
                    _mm512_mask_storeu_ps(r, mw, _mm512_add_ps(carry[a].0, e));
                    _mm512_mask_storeu_ps(r.add(wl), mw, _mm512_add_ps(carry[a].1, o));
                } else {
                    carry[a - 2] = (e, o);
                }
            }
        }
        for (a, (e, o)) in carry.iter().enumerate() {
            let r = rp.add((2 * th + a) * 2 * wl);
            _mm512_mask_storeu_ps(r, mw, *e);
            _mm512_mask_storeu_ps(r.add(wl), mw, *o);
        }
    }

    /// Adds B dV Bᵀ of every tile of one plane into its even/odd padded rows (`wl` values each).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn adjoint_tiles(
        dv: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        rows: &mut [f32],
        wl: usize,
    ) {
        let vp = dv.as_ptr();
        let rp = rows.as_mut_ptr();
        for i in 0..th {
            let mut j0 = 0;
            while j0 < tw {
                let mk = mask(tw - j0);
                let base = src + i * tw + j0;
                let ld = |p: usize| _mm512_maskz_loadu_ps(mk, vp.add(p * pstride + base));
                // row adjoint per column q: dR0 = dV0, dR1 = dV1 - dV2 + dV3, dR2 = dV1 + dV2 - dV0, dR3 = -dV3
                let mut dr = [[_mm512_setzero_ps(); 4]; 4]; // dr[a][q]
                for q in 0..4 {
                    let (v0, v1, v2, v3) = (ld(q), ld(4 + q), ld(8 + q), ld(12 + q));
                    dr[0][q] = v0;
                    dr[1][q] = _mm512_add_ps(_mm512_sub_ps(v1, v2), v3);
                    dr[2][q] = _mm512_sub_ps(_mm512_add_ps(v1, v2), v0);
                    dr[3][q] = _mm512_sub_ps(_mm512_setzero_ps(), v3);
                }
                for (a, c) in dr.iter().enumerate() {
                    // column adjoint: dX0 = c0, dX1 = c1 - c2 + c3, dX2 = c1 + c2 - c0, dX3 = -c3
                    let x0 = c[0];
                    let x1 = _mm512_add_ps(_mm512_sub_ps(c[1], c[2]), c[3]);
                    let x2 = _mm512_sub_ps(_mm512_add_ps(c[1], c[2]), c[0]);
                    let x3 = c[3];
                    let e = rp.add((2 * i + a) * 2 * wl + j0);
                    let o = e.add(wl);
                    _mm512_mask_storeu_ps(e, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, e), x0));
                    _mm512_mask_storeu_ps(o, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, o), x1));
                    let e1 = e.add(1);
                    let o1 = o.add(1);
                    _mm512_mask_storeu_ps(e1, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, e1), x2));
                    _mm512_mask_storeu_ps(o1, mk, _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, o1), x3));
                }
                j0 += 16;
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    // The public entry points assert `available()`, which is false off x86-64, so these are never reached.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn input_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dy_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn adjoint_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn output_tiles(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: f32,
        _: Option<(f32, f32)>,
        _: bool,
        _: bool,
        _: &mut [f32],
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// f64 direct 3×3 convolution, stride 1, padding 1: y, and for a given dy: dx, dw, db.
    #[allow(clippy::needless_range_loop)]
    /// f64 direct convolution (padding 1, no bias): y, dx, dw and db (Σ dy per output channel) for upstream
    /// gradient dy (also [`super::super::winograd4`]'s reference).
    pub(in crate::nn) fn reference(
        s: WinoShape,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, c, k, h, wd) = (s.n, s.c, s.k, s.h, s.w);
        let mut y = vec![0f64; n * k * h * wd];
        let mut dx = vec![0f64; n * c * h * wd];
        let mut dw = vec![0f64; k * c * 9];
        let mut db = vec![0f64; k];
        for b in 0..n {
            for o in 0..k {
                for i in 0..h {
                    for j in 0..wd {
                        let yi = ((b * k + o) * h + i) * wd + j;
                        let g = dy[yi] as f64;
                        db[o] += g;
                        for ch in 0..c {
                            for r in 0..3 {
                                for q in 0..3 {
                                    let (ii, jj) =
                                        (i as isize + r as isize - 1, j as isize + q as isize - 1);
                                    if ii < 0 || jj < 0 || ii >= h as isize || jj >= wd as isize {
                                        continue;
                                    }
                                    let xi = ((b * c + ch) * h + ii as usize) * wd + jj as usize;
                                    let wi = ((o * c + ch) * 3 + r) * 3 + q;
                                    y[yi] += x[xi] as f64 * w[wi] as f64;
                                    dx[xi] += g * w[wi] as f64;
                                    dw[wi] += g * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw, db)
    }

    /// Random input in [-1, 1), weights in [-0.3, 0.3) and bias in [-0.5, 0.5) for `s`, drawn in that order.
    pub(in crate::nn) fn conv_case(
        rng: &mut impl Rng,
        s: WinoShape,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let x = (0..s.n * s.c * s.h * s.w)
            .map(|_| rng.gen::<f32>() * 2.0 - 1.0)
            .collect();
        let wt = (0..s.k * s.c * 9)
            .map(|_| rng.gen::<f32>() * 0.6 - 0.3)
            .collect();
        let bias = (0..s.k).map(|_| rng.gen::<f32>() - 0.5).collect();
        (x, wt, bias)
    }

    fn close(got: &[f32], want: &[f64], scale: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let tol = 2e-5 * scale.max(1e-12);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                ((*g as f64) - w).abs() <= tol,
                "{what}[{i}]: got {g}, want {w} (tolerance {tol})"
            );
        }
    }

    fn max_abs(v: &[f64]) -> f64 {
        v.iter().fold(0.0, |m, x| m.max(x.abs()))
    }

    #[test]
    fn fused_max_pool_is_bitwise_the_pool_of_the_unpooled_output() {
        if !available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(9);
        // even sizes only; tile rows of 1, 3, 14, 17 and 20 lanes (partial and full vectors), partial chunks
        for &(n, c, k, h, w) in &[
            (3, 8, 16, 28, 28),
            (5, 9, 3, 6, 2),
            (2, 16, 8, 4, 34),
            (4, 8, 24, 14, 14),
            (1, 8, 8, 2, 40),
            (3, 8, 4, 2, 6),
        ] {
            let s = WinoShape { n, c, k, h, w };
            let (x, wt, bias) = conv_case(&mut rng, s);
            // some channels scaled to zero or negated, so whole windows are clamped by the ReLU
            let a: Vec<f32> = (0..k).map(|i| [1.5, 0.0, -0.7, 0.3][i % 4]).collect();
            let b: Vec<f32> = (0..k).map(|_| rng.gen::<f32>() - 0.5).collect();
            for threads in [1, 2] {
                let tp = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                tp.install(|| {
                    let mut full = vec![f32::NAN; n * k * h * w];
                    forward_affine(s, &x, &wt, Some(&bias), Some((&a, &b)), true, &mut full);
                    let (oh, ow) = (h / 2, w / 2);
                    let mut want = vec![0f32; n * k * oh * ow];
                    for p in 0..n * k {
                        for i in 0..oh {
                            for j in 0..ow {
                                let at = |r: usize, q: usize| full[p * h * w + r * w + q];
                                let m = [
                                    at(2 * i, 2 * j + 1),
                                    at(2 * i + 1, 2 * j),
                                    at(2 * i + 1, 2 * j + 1),
                                ]
                                .iter()
                                .fold(at(2 * i, 2 * j), |m, &v| if v > m { v } else { m });
                                want[(p * oh + i) * ow + j] = m;
                            }
                        }
                    }
                    let mut got = vec![f32::NAN; want.len()];
                    forward_affine_relu_maxpool(s, &x, &wt, Some(&bias), Some((&a, &b)), &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(g.to_bits(), w.to_bits(), "{s:?} [{i}]: {g} vs {w}");
                    }
                });
            }
        }
    }

    #[test]
    fn matches_an_f64_direct_convolution_forward_and_backward() {
        if !available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(5);
        // even and odd sizes, tile rows wider than 16 lanes, partial chunks, one thread and two
        for &(n, c, k, h, w) in &[
            (3, 8, 16, 28, 28),
            (5, 9, 3, 7, 7),
            (2, 16, 8, 5, 6),
            (1, 8, 8, 2, 40),
            (4, 8, 24, 14, 14),
            (2, 8, 8, 1, 3),
        ] {
            let s = WinoShape { n, c, k, h, w };
            let (x, wt, bias) = conv_case(&mut rng, s);
            let dy: Vec<f32> = (0..n * k * h * w)
                .map(|_| rng.gen::<f32>() * 2.0 - 1.0)
                .collect();
            let (y_ref, dx_ref, dw_ref, db_ref) = reference(s, &x, &wt, &dy);
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut y = vec![f32::NAN; n * k * h * w];
                    forward(s, &x, &wt, Some(&bias), false, &mut y);
                    let yb: Vec<f64> = y_ref
                        .iter()
                        .enumerate()
                        .map(|(i, v)| v + bias[(i / (h * w)) % k] as f64)
                        .collect();
                    close(&y, &yb, max_abs(&yb), &format!("y {s:?}"));
                    let mut yr = vec![f32::NAN; n * k * h * w];
                    forward(s, &x, &wt, Some(&bias), true, &mut yr);
                    let ybr: Vec<f64> = yb.iter().map(|v| v.max(0.0)).collect();
                    close(&yr, &ybr, max_abs(&yb), &format!("relu y {s:?}"));

                    let mut dx = vec![f32::NAN; x.len()];
                    let mut dw = vec![0.5f32; wt.len()]; // accumulates onto what is there
                    let mut db = vec![0.25f64; k];
                    backward(s, &x, &dy, &wt, Some(&mut dx), &mut dw, Some(&mut db));
                    close(&dx, &dx_ref, max_abs(&dx_ref), &format!("dx {s:?}"));
                    let dw_want: Vec<f64> = dw_ref.iter().map(|v| v + 0.5).collect();
                    close(&dw, &dw_want, max_abs(&dw_ref), &format!("dw {s:?}"));
                    for (g, r) in db.iter().zip(&db_ref) {
                        assert!(
                            (g - 0.25 - r).abs() < 1e-9 * r.abs().max(1.0),
                            "db {g} vs {r}"
                        );
                    }
                    // parameter gradients only
                    let mut dw2 = vec![0f32; wt.len()];
                    backward(s, &x, &dy, &wt, None, &mut dw2, None);
                    close(
                        &dw2,
                        &dw_ref,
                        max_abs(&dw_ref),
                        &format!("dw (no dx) {s:?}"),
                    );
                });
            }
        }
    }

    /// The signature of F(2×2)'s and F(4×4)'s backward.
    pub(in crate::nn) type Backward =
        fn(WinoShape, &[f32], &[f32], &[f32], Option<&mut [f32]>, &mut [f32], Option<&mut [f64]>);

    #[test]
    fn gradients_are_bitwise_reproducible_for_any_thread_count() {
        if !available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        assert_reproducible(
            backward,
            WinoShape {
                n: 37,
                c: 8,
                k: 16,
                h: 14,
                w: 14,
            },
        );
    }

    /// Asserts that `backward`'s dweight, dbias and dx are bitwise the same on 1, 2 and 3 threads, with and
    /// without dx (shared by the F(2×2) and F(4×4) tests).
    pub(in crate::nn) fn assert_reproducible(backward: Backward, s: WinoShape) {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(11);
        let x: Vec<f32> = (0..s.n * s.in_size())
            .map(|_| rng.gen::<f32>() - 0.5)
            .collect();
        let wt: Vec<f32> = (0..s.k * s.c * 9).map(|_| rng.gen::<f32>() - 0.5).collect();
        let dy: Vec<f32> = (0..s.n * s.out_size())
            .map(|_| rng.gen::<f32>() - 0.5)
            .collect();
        let run = |threads: usize, with_dx: bool| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut dx = vec![0f32; x.len()];
                let mut dw = vec![0f32; wt.len()];
                let mut db = vec![0f64; s.k];
                backward(
                    s,
                    &x,
                    &dy,
                    &wt,
                    with_dx.then_some(&mut dx[..]),
                    &mut dw,
                    Some(&mut db),
                );
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                (
                    bits(&dw),
                    db.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                    bits(&dx),
                )
            })
        };
        let want = run(1, true);
        for threads in [2, 3, 2] {
            for with_dx in [true, false] {
                let got = run(threads, with_dx);
                assert_eq!(got.0, want.0, "dweight, {threads} threads, dx {with_dx}");
                assert_eq!(got.1, want.1, "dbias, {threads} threads, dx {with_dx}");
                if with_dx {
                    assert_eq!(got.2, want.2, "dx, {threads} threads");
                }
            }
        }
    }
}
