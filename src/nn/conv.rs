//! 2-D convolution (`nn.Conv2d`) as GEMMs over column matrices, with a hand-written backward.
//!
//! | | PyTorch `nn.Conv2d` | here |
//! |---|---|---|
//! | defaults | stride 1, padding 0, dilation 1, groups 1, bias | same ([`Conv2dConfig::new`]) |
//! | weight | (O, C/groups, kh, kw) | same, `weight` |
//! | bias | (O), `bias=True` | same, `Option`, `bias` |
//! | output size | ⌊(H + 2p − d(k−1) − 1)/s⌋ + 1 | same |
//! | padding mode | zeros (default) | zeros only |
//! | init | kaiming_uniform(a=√5), bias U(±1/√fan_in) | same ([`Conv2dConfig::build`], [`Init::Default`]) |
//! | input | (N, C, H, W) or (C, H, W) | (N, C, H, W) only |
//! | errors | wrong rank / channels, kernel larger than the padded input, groups not dividing channels | same, as [`NvError`] values |
//!
//! Per sample and group: forward `y = W · col(x) + b`; backward `dW += dy · col(x)ᵀ` (columns recomputed from
//! `x`, never stored for the whole batch), `db += Σ dy`, `dx = col2im(Wᵀ · dy)`. Which code computes it:
//!
//! | path | when | column matrix | kernels |
//! |---|---|---|---|
//! | implicit | f32, AVX-512F, [`ConvParallel::Batch`], stride 1 with "same" output size (3×3 pad 1, …) | never built: rows are shifted views of a zero-padded copy of the image; dx is the full convolution of padded dy with the flipped kernel (≥ 8 channels per group) | [`simd`] with row-offset tables |
//! | explicit | f32, AVX-512F, `Batch`, any other geometry | im2col per sample into the workspace (1×1 stride-1 unpadded: the input itself) | [`simd`] |
//! | generic | f64, no AVX-512F, `simd = false`, or [`ConvParallel::Gemm`] | as explicit | the `gemm` crate |
//!
//! The implicit products run over Q = (H−1)·(W+2p) + W columns (output (oh, ow) at column oh·(W+2p) + ow); the
//! 2p columns per row that fall between image rows are computed and dropped (7 % extra work at 28×28, 13 % at
//! 14×14), which costs less than writing and reading the column matrix.
//!
//! Threads: by default ([`ConvParallel::Batch`]) the batch is split into a few contiguous chunks per rayon thread
//! (work stealing evens out a core slowed by other processes); each chunk owns its workspaces (column matrix,
//! padded copies, a private dW/db accumulator summed at the end) and runs single-threaded GEMMs.
//! [`ConvParallel::Gemm`] walks the batch sequentially and lets each GEMM use all threads (slower for the
//! shapes of small-image CNNs; kept for comparison). Workspaces live in the layer and are reused between calls.

use super::init::Init;
use super::{IntoPair, Layer};
use crate::kernels::elementwise::sum_f64;
use crate::kernels::gemm::{matmul, Op, Par};
use crate::kernels::gemm_avx512 as simd;
use crate::kernels::moments::PlaneMoments;
use crate::kernels::shape::contiguous;
use crate::kernels::shape::{check_nonempty, check_rank};
use crate::state::{join, StateDict, Stateful};
use crate::{Mode, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD};
use rayon::prelude::*;

/// Configuration with PyTorch's defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conv2dConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel_size: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
    pub bias: bool,
}

impl Conv2dConfig {
    /// PyTorch defaults: stride 1, padding 0, dilation 1, groups 1, bias.
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: impl IntoPair) -> Self {
        Conv2dConfig {
            in_channels,
            out_channels,
            kernel_size: kernel_size.pair(),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
            bias: true,
        }
    }
    pub fn stride(mut self, s: impl IntoPair) -> Self {
        self.stride = s.pair();
        self
    }
    pub fn padding(mut self, p: impl IntoPair) -> Self {
        self.padding = p.pair();
        self
    }
    pub fn dilation(mut self, d: impl IntoPair) -> Self {
        self.dilation = d.pair();
        self
    }
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
    /// Checks the configuration (PyTorch's constructor errors).
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(NvError::Config(format!("Conv2d: {m}")));
        if self.in_channels == 0 || self.out_channels == 0 {
            return err(format!(
                "in_channels and out_channels must be > 0, got {} and {}",
                self.in_channels, self.out_channels
            ));
        }
        if self.groups == 0 {
            return err("groups must be a positive integer".into());
        }
        if !self.in_channels.is_multiple_of(self.groups) {
            return err(format!(
                "in_channels ({}) must be divisible by groups ({})",
                self.in_channels, self.groups
            ));
        }
        if !self.out_channels.is_multiple_of(self.groups) {
            return err(format!(
                "out_channels ({}) must be divisible by groups ({})",
                self.out_channels, self.groups
            ));
        }
        for (what, (a, b)) in [
            ("kernel_size", self.kernel_size),
            ("stride", self.stride),
            ("dilation", self.dilation),
        ] {
            if a == 0 || b == 0 {
                return err(format!("{what} must be > 0, got ({a}, {b})"));
            }
        }
        Ok(())
    }
    /// Builds the layer with PyTorch's default initialisation drawn from `rng`.
    pub fn build<T: Real>(self, rng: &mut impl rand::Rng) -> Result<Conv2d<T>> {
        let mut c = Conv2d::new(self)?;
        c.reset_parameters(Init::Default, 1.0, rng)?;
        Ok(c)
    }
}

/// Layouts of the packed weights (see `Conv2d::pack_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pack {
    Forward,
    Transposed,
    DataGrad,
}

/// Batch chunks per rayon thread under [`ConvParallel::Batch`].
const CHUNKS_PER_THREAD: usize = 4;

/// Fewest input channels for which [`Conv2d::winograd`] applies: with fewer, the tile transforms cost more than
/// the multiplications they save (the first layer of an image network has 1 or 3).
pub const WINOGRAD_MIN_CHANNELS: usize = 8;

/// The 3×3 convolution algorithm, process-wide (the CLI's `--conv`, [`set_conv_algorithm`]):
/// - `Winograd` (the default): Winograd for the layers [`Conv2d::winograd`] marks, F(4×4, 3×3) in training on
///   planes [`WINOGRAD4_MIN_W`]..=[`super::winograd4::MAX_W`] wide and F(2×2, 3×3) otherwise;
/// - `Winograd2`: F(2×2, 3×3) only, in training too;
/// - `Direct`: the direct convolution everywhere, whatever [`Conv2d::winograd`] says.
///
/// (The variants carry no doc comments of their own: clap would print them in `--help`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvAlgorithm {
    Winograd,
    Winograd2,
    Direct,
}

impl ConvAlgorithm {
    /// The name the CLI gives it.
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgorithm::Winograd => "winograd",
            ConvAlgorithm::Winograd2 => "winograd2",
            ConvAlgorithm::Direct => "direct",
        }
    }
}

static CONV_ALGORITHM: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the process-wide [`ConvAlgorithm`] ([`ConvAlgorithm::Winograd`] by default).
pub fn set_conv_algorithm(a: ConvAlgorithm) {
    CONV_ALGORITHM.store(a as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The process-wide [`ConvAlgorithm`].
pub fn conv_algorithm() -> ConvAlgorithm {
    match CONV_ALGORITHM.load(std::sync::atomic::Ordering::Relaxed) {
        0 => ConvAlgorithm::Winograd,
        1 => ConvAlgorithm::Winograd2,
        _ => ConvAlgorithm::Direct,
    }
}

/// Planes at least this wide (and at most [`super::winograd4::MAX_W`]) take Winograd F(4×4, 3×3) in training
/// ([`super::winograd4`]). Measured on the reference CNN's layers at batch 128, one thread
/// (`cargo run --release --example conv_algos`), F(2×2) → F(4×4): 32→32 at 28×28 forward 13.9 → 8.9 ms and
/// backward 31.2 → 20.1 ms, but 32→64 at 14×14 slower (5.7 → 7.2 and 12.9 → 14.9 ms), and 64→64 too (11.2 → 12.5
/// and 23.6 → 25.1 ms): a 14-wide plane has 4 tiles per row (4 of 16 vector lanes) and pads to 16×16.
pub const WINOGRAD4_MIN_W: usize = 21;

/// How [`Conv2d`] spreads its work over rayon's threads (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConvParallel {
    /// One batch chunk per thread, single-threaded GEMMs (the default: faster for batch ≥ threads).
    Batch,
    /// Samples one after another, each GEMM multi-threaded.
    Gemm,
}

/// Per-thread scratch: the im2col matrix and private parameter-gradient accumulators.
#[derive(Debug, Clone, Default)]
struct Workspace<T> {
    col: Vec<T>,
    dw: Vec<T>,
    db: Vec<f64>,
    /// Zero-bordered padded copies of x and dy for the implicit path, with the (planes, Hp, Wp) they were
    /// zeroed for (only the interior is rewritten per sample).
    xpad: Vec<T>,
    xpad_key: (usize, usize, usize),
    dypad: Vec<T>,
    dypad_key: (usize, usize, usize),
}

/// Makes `buf` a zeroed (planes × hp × wp) buffer unless it already is one for that key (borders stay zero:
/// only interiors are ever written).
fn ensure_padded<T: Real>(
    buf: &mut Vec<T>,
    key: &mut (usize, usize, usize),
    want: (usize, usize, usize),
) {
    if *key != want {
        buf.clear();
        buf.resize(want.0 * want.1 * want.2, T::zero());
        *key = want;
    }
}

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
    groups: usize,
}

impl Geom {
    fn p(&self) -> usize {
        self.oh * self.ow
    }
    fn in_size(&self) -> usize {
        self.c * self.h * self.w
    }
    fn out_size(&self) -> usize {
        self.o * self.p()
    }
    /// Rows of one group's column matrix: C/groups · kh · kw.
    fn kdim(&self) -> usize {
        self.c / self.groups * self.kh * self.kw
    }
    fn og(&self) -> usize {
        self.o / self.groups
    }
    /// 1×1, stride 1, no padding: the input is its own column matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }
    /// Stride 1, output the size of the input ("same" padding), not pointwise: the AVX-512 path reads the column
    /// matrix as shifted rows of a zero-padded copy of the image ([`implicit_offsets`]) instead of building it.
    fn implicit(&self) -> bool {
        self.sh == 1 && self.sw == 1 && self.oh == self.h && self.ow == self.w && !self.pointwise()
    }
    /// On the implicit path, whether dx is computed implicitly too: its product has C/groups rows, padded to
    /// 8-row panels, so with fewer channels the explicit `col2im(Wᵀ·dy)` does less work.
    fn implicit_dx(&self) -> bool {
        self.implicit() && self.c / self.groups >= simd::MR
    }
    fn hp(&self) -> usize {
        self.h + 2 * self.ph
    }
    fn wp(&self) -> usize {
        self.w + 2 * self.pw
    }
    /// Columns of the implicit products: output (oh, ow) is column oh·Wp + ow; ow ≥ W are discarded.
    fn q(&self) -> usize {
        (self.h - 1) * self.wp() + self.w
    }
    /// Stride 1 and OW = W: im2col rows are shifted copies of whole planes ([`im2col_flat`]).
    fn flat_rows(&self) -> bool {
        self.sh == 1 && self.sw == 1 && self.ow == self.w
    }
    fn col_len(&self) -> usize {
        if self.pointwise() {
            0
        } else {
            self.c * self.kh * self.kw * self.p()
        }
    }
    /// For kernel column `kj`: the input column offset `off` (iw = ow·sw + off) and the range [lo, hi) of
    /// output columns whose input column lies inside the image.
    fn col_range(&self, kj: usize) -> (isize, usize, usize) {
        let off = (kj * self.dw) as isize - self.pw as isize;
        let sw = self.sw as isize;
        let lo = if off >= 0 {
            0
        } else {
            ((-off + sw - 1) / sw) as usize
        };
        let last = self.w as isize - 1 - off;
        let hi = if last < 0 {
            0
        } else {
            (last / sw) as usize + 1
        };
        let lo = lo.min(self.ow);
        (off, lo, hi.min(self.ow).max(lo))
    }
}

/// Unfolds one sample (C, H, W) into `col` (C·kh·kw, OH·OW), rows ordered (c, ki, kj), zeros for padding.
fn im2col<T: Real>(g: &Geom, x: &[T], col: &mut [T]) {
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
fn col2im<T: Real>(g: &Geom, col: &mut [T], dx: &mut [T]) {
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

/// Forward of one sample: `y (O, P) = W · col + b`.
#[allow(clippy::too_many_arguments)]
fn forward_sample<T: Real>(
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
fn backward_sample<T: Real>(
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
fn fast_forward_sample(
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
fn fast_backward_sample(
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
fn col_grad(g: &Geom, wpt: &[f32], dy: &[f32], dcol: &mut [f32]) {
    group_gemm(g, g.kdim(), g.og(), wpt, dy, dcol, false);
}

/// Row offsets of the implicit column matrices within one group's padded planes (Hp × Wp each):
/// forward / weight gradient, rows (c, ki, kj) at `c·HpWp + ki·dh·Wp + kj·dw` of the padded input; data gradient,
/// rows (o, ki, kj) at `o·HpWp + (kh−1−ki)·dh·Wp + (kw−1−kj)·dw` of the padded dy (a full convolution with the
/// flipped kernel: with "same" padding, 2·ph = dh·(kh−1)).
fn implicit_offsets(g: &Geom) -> (Vec<usize>, Vec<usize>) {
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
/// Then max(·, 0) when `relu` (a folded BatchNorm+ReLU, see [`Conv2d::relu_out`]).
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
fn implicit_forward_sample(
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
/// and are reduced once ([`simd::gemm_nt_rows_multi`]). Measured (interleaved, one thread, batch 128, weight
/// gradient only): 32→64 on 14×14 15.3 → 12.6 ms, 64→64 on 14×14 29.5 → 23.5 ms; 32→32 on 28×28 unchanged
/// (23 ms; its 840-long rows already amortise the reductions).
const WGRAD_GROUP: usize = 4;

/// Backward of a group of samples on the implicit path: `dw += Σ_s dy_s · rows(xpad_s)ᵀ` (dy read in the
/// implicit layout from its padded copy, zero at the discarded columns), `db += Σ dy`, and per sample
/// `dx = W' · rows(dypad)` when asked (or `col2im(Wᵀ·dy)` with fewer than 8 channels per group; `wdp` is
/// packed to match, see `Geom::implicit_dx`). `xpad` / `dypad` hold one padded copy per sample of the group.
#[allow(clippy::too_many_arguments)]
fn implicit_backward_group(
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

/// A 2-D convolution layer. Parameters are public under PyTorch's names.
#[derive(Debug, Clone)]
pub struct Conv2d<T: Real = f32> {
    pub cfg: Conv2dConfig,
    pub weight: Param<T>,
    pub bias: Option<Param<T>>,
    /// How the work is spread over threads; [`ConvParallel::Batch`] unless changed.
    pub parallel: ConvParallel,
    /// Use the AVX-512 kernels for f32 when the CPU has them (with [`ConvParallel::Batch`]); `true` unless changed.
    pub simd: bool,
    /// Compute 3×3, stride-1, padding-1 convolutions with at least [`WINOGRAD_MIN_CHANNELS`] input channels by
    /// Winograd F(2×2, 3×3) ([`super::winograd`]) on the AVX-512 path; `true` unless changed. `false` keeps the
    /// direct (implicit im2col) convolution, whose rounding is closest to PyTorch's.
    pub winograd: bool,
    /// Apply max(·, 0) to the output (set by [`Conv2d::fold_affine`] when it absorbs a BatchNorm with a fused
    /// ReLU). Inference only: `backward` refuses a layer with it set.
    pub relu_out: bool,
    ws: Vec<Workspace<T>>,
    /// Packed weights (forward) or transposed weights (backward) for the AVX-512 kernels.
    packed: Vec<f32>,
}

impl<T: Real> Conv2d<T> {
    pub const NAME: &'static str = "Conv2d";

    /// A layer with zero weights and bias (to be loaded from a state dict or initialised with
    /// [`Conv2d::reset_parameters`]); [`Conv2dConfig::build`] gives PyTorch's default initialisation.
    pub fn new(cfg: Conv2dConfig) -> Result<Self> {
        cfg.validate()?;
        let (kh, kw) = cfg.kernel_size;
        let weight = Param::filled(
            &[cfg.out_channels, cfg.in_channels / cfg.groups, kh, kw],
            T::zero(),
        );
        let bias = cfg
            .bias
            .then(|| Param::filled(&[cfg.out_channels], T::zero()));
        Ok(Conv2d {
            cfg,
            weight,
            bias,
            parallel: ConvParallel::Batch,
            simd: true,
            winograd: true,
            relu_out: false,
            ws: Vec::new(),
            packed: Vec::new(),
        })
    }

    /// Re-initialises weight and bias (see [`Init`]); gradients are untouched.
    pub fn reset_parameters(
        &mut self,
        init: Init,
        scale: f64,
        rng: &mut impl rand::Rng,
    ) -> Result<()> {
        init.apply(&mut self.weight, self.bias.as_mut(), scale, rng)
    }

    fn geom(&self, shape: &[usize]) -> Result<Geom> {
        check_rank(Self::NAME, shape, 4, "4-D (N, C, H, W)")?;
        crate::kernels::shape::check_channels(Self::NAME, shape, self.cfg.in_channels)?;
        check_nonempty(Self::NAME, shape)?;
        let c = &self.cfg;
        let (h, w) = (shape[2], shape[3]);
        let ekh = c.dilation.0 * (c.kernel_size.0 - 1) + 1;
        let ekw = c.dilation.1 * (c.kernel_size.1 - 1) + 1;
        let (hp, wp) = (h + 2 * c.padding.0, w + 2 * c.padding.1);
        if hp < ekh || wp < ekw {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "Calculated padded input size per channel: ({hp} x {wp}). Kernel size: ({ekh} x {ekw}). \
                     Kernel size can't be greater than actual input size"
                ),
            });
        }
        Ok(Geom {
            n: shape[0],
            c: shape[1],
            h,
            w,
            o: c.out_channels,
            oh: (hp - ekh) / c.stride.0 + 1,
            ow: (wp - ekw) / c.stride.1 + 1,
            kh: c.kernel_size.0,
            kw: c.kernel_size.1,
            sh: c.stride.0,
            sw: c.stride.1,
            ph: c.padding.0,
            pw: c.padding.1,
            dh: c.dilation.0,
            dw: c.dilation.1,
            groups: c.groups,
        })
    }

    /// The output shape for an input shape, or the error a forward would raise.
    pub fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let g = self.geom(input)?;
        Ok(vec![g.n, g.o, g.oh, g.ow])
    }

    /// (number of workspaces, samples per workspace) for a batch of `n`.
    fn split(&self, n: usize) -> (usize, usize) {
        let threads = rayon::current_num_threads().max(1);
        // A few chunks per thread, so that work stealing evens out a thread that is slowed down (other
        // processes on the core); each chunk owns a workspace.
        let chunks = match self.parallel {
            ConvParallel::Batch if threads > 1 => (threads * CHUNKS_PER_THREAD).min(n).max(1),
            _ => 1,
        };
        (chunks, n.div_ceil(chunks).max(1))
    }

    fn gemm_par(&self) -> Par {
        match self.parallel {
            ConvParallel::Batch => Par::Seq,
            ConvParallel::Gemm => Par::all(),
        }
    }

    /// Whether this call takes the AVX-512 f32 path.
    fn fast(&self) -> bool {
        self.simd
            && self.parallel == ConvParallel::Batch
            && simd::available()
            && crate::kernels::cast::as_f32(self.weight.values()).is_some()
    }

    /// Adds per-channel Σdy (f64) to the bias gradient, when the layer has a bias.
    fn add_bias_grad(&mut self, db: Option<Vec<f64>>) {
        if let (Some(b), Some(db)) = (self.bias.as_mut(), db) {
            for (d, s) in b.grads_mut().iter_mut().zip(db) {
                *d = *d + T::of_f64(s);
            }
        }
    }

    /// The Winograd shape when this call takes the Winograd path (see [`Conv2d::winograd`]).
    fn winograd_shape(&self, g: &Geom) -> Option<super::winograd::WinoShape> {
        let eligible = self.winograd
            && conv_algorithm() != ConvAlgorithm::Direct
            && self.fast()
            && super::winograd::available()
            && (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups)
                == (3, 3, 1, 1, 1, 1, 1, 1, 1)
            && g.c >= WINOGRAD_MIN_CHANNELS;
        eligible.then_some(super::winograd::WinoShape {
            n: g.n,
            c: g.c,
            k: g.o,
            h: g.h,
            w: g.w,
        })
    }

    /// The Winograd shape when a training pass takes F(4×4, 3×3) ([`WINOGRAD4_MIN_W`]).
    fn winograd4_shape(&self, g: &Geom) -> Option<super::winograd::WinoShape> {
        self.winograd_shape(g).filter(|ws| {
            conv_algorithm() == ConvAlgorithm::Winograd
                && !self.relu_out
                && ws.w >= WINOGRAD4_MIN_W
                && super::winograd4::applies(ws)
        })
    }

    /// The training forward: [`Conv2d::forward`], except that planes [`WINOGRAD4_MIN_W`] wide or more take
    /// Winograd F(4×4, 3×3) (fewer operations, a few times F(2×2)'s rounding error; see
    /// [`super::winograd4`]). [`Layer::forward`] in [`Mode::Train`] calls it.
    pub fn forward_train(&mut self, x: &ArrayD<T>) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        match self.winograd4_shape(&g) {
            Some(ws) if g.n > 0 => Ok(self.f32_forward(
                x,
                &[g.n, g.o, g.oh, g.ow],
                |xf, wf, bias, yf| super::winograd4::forward(ws, xf, wf, bias, false, None, yf),
            )),
            _ => self.forward(x),
        }
    }

    /// The shape when this call takes the single-input-channel 3×3 path ([`super::conv_one_channel`]).
    fn one_channel_shape(&self, g: &Geom) -> Option<super::conv_one_channel::OneChannelShape> {
        let eligible = self.fast()
            && super::conv_one_channel::available()
            && (g.c, g.groups) == (1, 1)
            && (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw) == (3, 3, 1, 1, 1, 1, 1, 1)
            && g.w <= super::conv_one_channel::MAX_WIDTH;
        eligible.then_some(super::conv_one_channel::OneChannelShape {
            n: g.n,
            k: g.o,
            h: g.h,
            w: g.w,
        })
    }

    /// Packs every group's weights for [`simd::gemm_nn`]: as is (og × kdim, forward), transposed (kdim × og,
    /// explicit data gradient), or as the implicit data-gradient matrix (cg × og·kh·kw, element (c, (o, t)) =
    /// W[o, c, t]).
    fn pack_weights(&mut self, g: &Geom, mode: Pack) {
        let w = crate::kernels::cast::as_f32(self.weight.values()).expect("f32 layer");
        let (og, kdim, cg, kk) = (g.og(), g.kdim(), g.c / g.groups, g.kh * g.kw);
        let mut one = Vec::new();
        self.packed.clear();
        for gi in 0..g.groups {
            let wg = &w[gi * og * kdim..(gi + 1) * og * kdim];
            match mode {
                Pack::Forward => simd::pack_a(og, kdim, wg, kdim, 1, &mut one),
                Pack::Transposed => simd::pack_a(kdim, og, wg, 1, kdim, &mut one),
                Pack::DataGrad => simd::pack_a_with(
                    cg,
                    og * kk,
                    |c, r| wg[(r / kk) * kdim + c * kk + r % kk],
                    &mut one,
                ),
            }
            self.packed.extend_from_slice(&one);
        }
    }

    fn prepare_ws(&mut self, count: usize, col: usize, dw: usize, db: usize) {
        if self.ws.len() < count {
            self.ws.resize_with(count, Workspace::default);
        }
        for ws in &mut self.ws[..count] {
            ws.col.resize(col, T::zero());
            ws.dw.clear();
            ws.dw.resize(dw, T::zero());
            ws.db.clear();
            ws.db.resize(db, 0.0);
        }
    }

    /// Absorbs a following per-channel affine `z = y·a + b` (an eval-mode BatchNorm, see
    /// [`crate::norm::NormLayer::eval_affine`]) into the weights and bias: `W'[o] = a[o]·W[o]`,
    /// `bias'[o] = a[o]·bias[o] + b[o]` (a bias is created when there was none), computed in f64 and rounded
    /// once; with `relu` the output is clamped at 0 as well ([`Conv2d::relu_out`], inference only).
    pub fn fold_affine(&mut self, a: &[f64], b: &[f64], relu: bool) -> Result<()> {
        let o = self.cfg.out_channels;
        if a.len() != o || b.len() != o {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "folding an affine of {} channels into {o} output channels",
                    a.len()
                ),
            });
        }
        let per = self.weight.len() / o;
        for (k, w) in self.weight.value.iter_mut().enumerate() {
            *w = T::of_f64(w.as_f64() * a[k / per]);
        }
        let old: Vec<f64> = match &self.bias {
            Some(p) => p.value.iter().map(|v| v.as_f64()).collect(),
            None => vec![0.0; o],
        };
        let nb =
            ndarray::Array1::from_iter((0..o).map(|i| T::of_f64(old[i] * a[i] + b[i]))).into_dyn();
        match self.bias.as_mut() {
            Some(p) => p.value = nb,
            None => self.bias = Some(Param::new(nb)),
        }
        self.cfg.bias = true;
        self.relu_out = relu;
        Ok(())
    }

    /// Forward pass, allocating the output.
    pub fn forward(&mut self, x: &ArrayD<T>) -> Result<ArrayD<T>> {
        let shape = self.output_shape(x.shape())?;
        let mut y = crate::kernels::arena::output(&shape);
        self.forward_into(x.view(), y.as_slice_mut().expect("fresh array"))?;
        Ok(y)
    }

    /// Forward pass into a caller-owned buffer of the output's size (see [`Conv2d::output_shape`]).
    pub fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T]) -> Result<()> {
        let g = self.geom(x.shape())?;
        if y.len() != g.n * g.out_size() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "output buffer has {} elements, expected {}",
                    y.len(),
                    g.n * g.out_size()
                ),
            });
        }
        if g.n == 0 {
            return Ok(());
        }
        let xs = contiguous(&x);
        if let Some(ws) = self.winograd_shape(&g) {
            let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
            super::winograd::forward(
                ws,
                f(&xs),
                f(self.weight.values()),
                self.bias.as_ref().map(|b| f(b.values())),
                self.relu_out,
                crate::kernels::cast::as_f32_mut(y).expect("f32"),
            );
            return Ok(());
        }
        if let Some(os) = self.one_channel_shape(&g) {
            let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
            super::conv_one_channel::forward(
                os,
                f(&xs),
                f(self.weight.values()),
                self.bias.as_ref().map(|b| f(b.values())),
                None,
                self.relu_out,
                crate::kernels::cast::as_f32_mut(y).expect("f32"),
            );
            return Ok(());
        }
        let (chunks, per) = self.split(g.n);
        let par = self.gemm_par();
        let fast = self.fast();
        let implicit = fast && g.implicit();
        if fast {
            self.pack_weights(&g, Pack::Forward);
        }
        let col_len = if implicit {
            g.og() * g.q()
        } else {
            g.col_len()
        };
        self.prepare_ws(chunks, col_len, 0, 0);
        let offs = if implicit {
            implicit_offsets(&g).0
        } else {
            vec![]
        };
        let w = self.weight.values();
        let bias = self.bias.as_ref().map(|b| b.values());
        let packed = &self.packed[..];
        let (is, os) = (g.in_size(), g.out_size());
        let relu_out = self.relu_out;
        let run = |xc: &[T], yc: &mut [T], ws: &mut Workspace<T>| {
            if implicit {
                // the same key as the backward (one slot per sample of a gradient group), so the zeroed
                // borders survive from one call to the next; the forward uses the first slot
                ensure_padded(
                    &mut ws.xpad,
                    &mut ws.xpad_key,
                    (g.c * WGRAD_GROUP, g.hp(), g.wp()),
                );
            }
            for (xs, ys) in xc.chunks_exact(is).zip(yc.chunks_exact_mut(os)) {
                if implicit {
                    let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
                    implicit_forward_sample(
                        &g,
                        f(xs),
                        crate::kernels::cast::as_f32_mut(ys).expect("f32"),
                        packed,
                        bias.map(f),
                        &offs,
                        crate::kernels::cast::as_f32_mut(&mut ws.xpad).expect("f32"),
                        crate::kernels::cast::as_f32_mut(&mut ws.col).expect("f32"),
                        relu_out,
                    );
                    continue;
                } else if fast {
                    let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
                    fast_forward_sample(
                        &g,
                        f(xs),
                        crate::kernels::cast::as_f32_mut(ys).expect("f32"),
                        packed,
                        bias.map(f),
                        crate::kernels::cast::as_f32_mut(&mut ws.col).expect("f32"),
                    );
                } else {
                    forward_sample(&g, xs, ys, w, bias, &mut ws.col, par);
                }
                if relu_out {
                    for v in ys.iter_mut() {
                        if !(*v > T::zero()) {
                            *v = T::zero();
                        }
                    }
                }
            }
        };
        if chunks == 1 {
            run(&xs, y, &mut self.ws[0]);
        } else {
            xs.par_chunks(per * is)
                .zip(y.par_chunks_mut(per * os))
                .zip(self.ws[..chunks].par_iter_mut())
                .for_each(|((xc, yc), ws)| run(xc, yc, ws));
        }
        Ok(())
    }

    /// A fresh output of `shape` written by `kernel(x, weight, bias, y)` on f32 slices: the set-up shared by the
    /// fused forwards, which run only on the f32 fast paths (Winograd, single channel).
    fn f32_forward(
        &self,
        x: &ArrayD<T>,
        shape: &[usize],
        kernel: impl FnOnce(&[f32], &[f32], Option<&[f32]>, &mut [f32]),
    ) -> ArrayD<T> {
        let mut y: ArrayD<T> = crate::kernels::arena::output(shape);
        let xv = x.view();
        let xs = contiguous(&xv);
        let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
        let bias = self.bias.as_ref().map(|b| f(b.values()));
        let yf =
            crate::kernels::cast::as_f32_mut(y.as_slice_mut().expect("fresh array")).expect("f32");
        kernel(f(&xs), f(self.weight.values()), bias, yf);
        y
    }

    /// Inference forward followed by a per-channel `y·a + b` (then max(·, 0) with `relu`) in the same output
    /// pass: an eval-mode BatchNorm(+ReLU) applied with bitwise the same result as running it after the
    /// convolution ([`crate::model::Sequential::forward_inference`]). `Ok(None)` when this layer takes neither
    /// the Winograd nor the single-input-channel path (the caller then runs the two layers separately).
    pub fn forward_affine(
        &mut self,
        x: &ArrayD<T>,
        a: &[T],
        b: &[T],
        relu: bool,
    ) -> Result<Option<ArrayD<T>>> {
        let g = self.geom(x.shape())?;
        let (wino, one) = (self.winograd_shape(&g), self.one_channel_shape(&g));
        if (wino.is_none() && one.is_none()) || self.relu_out || a.len() != g.o || b.len() != g.o {
            return Ok(None);
        }
        let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
        let affine = Some((f(a), f(b)));
        let y = self.f32_forward(x, &[g.n, g.o, g.oh, g.ow], |xf, wf, bias, yf| {
            match (wino, one) {
                (Some(ws), _) => {
                    super::winograd::forward_affine(ws, xf, wf, bias, affine, relu, yf)
                }
                (None, Some(os)) => {
                    super::conv_one_channel::forward(os, xf, wf, bias, affine, relu, yf)
                }
                (None, None) => unreachable!("checked above"),
            }
        });
        Ok(Some(y))
    }

    /// The forward, with each output plane also reduced to its (mean, M2) while it is in cache (N·O entries,
    /// n-major; [`crate::norm::batch_kernels::plane_moments`]): a following training BatchNorm then needs no
    /// statistics pass of its own ([`crate::norm::BatchNorm::forward_from_plane_moments`]). `Ok(None)` (nothing
    /// done) unless this call takes the Winograd or the single-channel path. The output is bitwise that of
    /// [`Conv2d::forward_train`] (training is its only caller).
    pub fn forward_with_plane_moments(
        &mut self,
        x: &ArrayD<T>,
    ) -> Result<Option<(ArrayD<T>, PlaneMoments)>> {
        let g = self.geom(x.shape())?;
        let (wino, one) = (self.winograd_shape(&g), self.one_channel_shape(&g));
        if (wino.is_none() && one.is_none()) || self.relu_out || g.n == 0 {
            return Ok(None);
        }
        let wino4 = self.winograd4_shape(&g);
        let mut pm = vec![(0.0, 0.0); g.n * g.o];
        let y = self.f32_forward(x, &[g.n, g.o, g.oh, g.ow], |xf, wf, bias, yf| {
            match (wino, one) {
                (Some(ws), _) if wino4.is_some() => {
                    super::winograd4::forward(ws, xf, wf, bias, false, Some(&mut pm), yf)
                }
                (Some(ws), _) => {
                    super::winograd::forward_with_moments(ws, xf, wf, bias, yf, &mut pm)
                }
                (None, Some(os)) => {
                    super::conv_one_channel::forward_with_moments(os, xf, wf, bias, yf, &mut pm)
                }
                (None, None) => unreachable!("checked above"),
            }
        });
        Ok(Some((y, pm)))
    }

    /// [`Conv2d::forward_affine`] with ReLU, then a 2×2, stride-2 max pool, in one pass (inference): `None`
    /// unless this call takes the Winograd path and the output's height and width are even. The result is
    /// bitwise that of the convolution, an eval BatchNorm+ReLU and [`super::MaxPool2d`] run one after another.
    pub fn forward_affine_relu_maxpool(
        &mut self,
        x: &ArrayD<T>,
        a: &[T],
        b: &[T],
    ) -> Result<Option<ArrayD<T>>> {
        let g = self.geom(x.shape())?;
        let Some(ws) = self.winograd_shape(&g) else {
            return Ok(None);
        };
        if self.relu_out
            || a.len() != g.o
            || b.len() != g.o
            || !g.oh.is_multiple_of(2)
            || !g.ow.is_multiple_of(2)
        {
            return Ok(None);
        }
        let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
        let affine = Some((f(a), f(b)));
        let y = self.f32_forward(x, &[g.n, g.o, g.oh / 2, g.ow / 2], |xf, wf, bias, yf| {
            super::winograd::forward_affine_relu_maxpool(ws, xf, wf, bias, affine, yf)
        });
        Ok(Some(y))
    }

    /// [`Conv2d::backward_params`] with dy given plane by plane (a following BatchNorm's deferred dx, see
    /// [`crate::norm::batch_kernels::DxPlanes`]): `Ok(false)` (nothing done) unless this call takes the
    /// single-channel path, whose weight gradient consumes dy image by image from a buffer in cache.
    pub fn backward_params_from_planes(
        &mut self,
        x: &ArrayD<T>,
        dy: &crate::norm::batch_kernels::DxPlanes<'_, T>,
    ) -> Result<bool> {
        if self.relu_out {
            return Ok(false);
        }
        let g = self.geom(x.shape())?;
        let d = dy.dims();
        let Some(os) = self.one_channel_shape(&g) else {
            return Ok(false);
        };
        if (d.n, d.c, d.s) != (g.n, g.o, g.oh * g.ow) {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "dy has (N, C, H·W) = ({}, {}, {}), the output ({}, {}, {})",
                    d.n,
                    d.c,
                    d.s,
                    g.n,
                    g.o,
                    g.oh * g.ow
                ),
            });
        }
        let xv = x.view();
        let xs = contiguous(&xv);
        let mut db = self.bias.as_ref().map(|_| vec![0f64; g.o]);
        let grad = crate::kernels::cast::as_f32_mut(
            self.weight
                .grad
                .as_slice_mut()
                .expect("contiguous gradients"),
        )
        .expect("f32");
        super::conv_one_channel::backward_params_from_planes(
            os,
            crate::kernels::cast::as_f32(&xs).expect("f32"),
            |p, out: &mut [f32]| dy.fill(p, crate::kernels::cast::f32_as_mut(out).expect("f32")),
            grad,
            db.as_deref_mut(),
        );
        self.add_bias_grad(db);
        Ok(true)
    }

    /// Backward pass: returns dx and accumulates dweight, dbias.
    pub fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>) -> Result<ArrayD<T>> {
        let mut dx = crate::kernels::arena::output(x.shape());
        self.backward_into(
            x.view(),
            dy.view(),
            Some(dx.as_slice_mut().expect("fresh array")),
        )?;
        Ok(dx)
    }

    /// Accumulates dweight and dbias only (for a first layer, whose input needs no gradient).
    pub fn backward_params(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>) -> Result<()> {
        self.backward_into(x.view(), dy.view(), None)
    }

    /// Backward into a caller-owned dx buffer of x's size (`None`: parameter gradients only).
    pub fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: Option<&mut [T]>,
    ) -> Result<()> {
        if self.relu_out {
            return Err(NvError::Config(
                "this Conv2d absorbed a BatchNorm+ReLU for inference (fold_batch_norm); it has no backward"
                    .into(),
            ));
        }
        let g = self.geom(x.shape())?;
        let want = [g.n, g.o, g.oh, g.ow];
        if dy.shape() != want {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "dy has shape {:?}, the output has shape {want:?}",
                    dy.shape()
                ),
            });
        }
        if let Some(d) = &dx {
            if d.len() != x.len() {
                return Err(NvError::Shape {
                    layer: Self::NAME,
                    msg: format!("dx buffer has {} elements, input {}", d.len(), x.len()),
                });
            }
        }
        if g.n == 0 {
            return Ok(());
        }
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        if let Some(ws) = self.winograd_shape(&g) {
            // F(4×4) where it applies in training, else F(2×2): the same signature
            let backward = if self.winograd4_shape(&g).is_some() {
                super::winograd4::backward
            } else {
                super::winograd::backward
            };
            let mut db = self.bias.as_ref().map(|_| vec![0f64; g.o]);
            let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
            let Param { value, grad } = &mut self.weight;
            backward(
                ws,
                f(&xs),
                f(&gs),
                f(value.as_slice().expect("contiguous weights")),
                dx.map(|d| crate::kernels::cast::as_f32_mut(d).expect("f32")),
                crate::kernels::cast::as_f32_mut(
                    grad.as_slice_mut().expect("contiguous gradients"),
                )
                .expect("f32"),
                db.as_deref_mut(),
            );
            self.add_bias_grad(db);
            return Ok(());
        }
        if let Some(os) = self.one_channel_shape(&g) {
            let mut db = self.bias.as_ref().map(|_| vec![0f64; g.o]);
            let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
            let Param { value, grad } = &mut self.weight;
            if let Some(d) = dx {
                let w = f(value.as_slice().expect("contiguous weights"));
                super::conv_one_channel::backward_data(
                    os,
                    f(&gs),
                    w,
                    crate::kernels::cast::as_f32_mut(d).expect("f32"),
                );
            }
            let grad = crate::kernels::cast::as_f32_mut(
                grad.as_slice_mut().expect("contiguous gradients"),
            )
            .expect("f32");
            super::conv_one_channel::backward_params(os, f(&xs), f(&gs), grad, db.as_deref_mut());
            self.add_bias_grad(db);
            return Ok(());
        }
        let (chunks, per) = self.split(g.n);
        let par = self.gemm_par();
        let want_db = self.bias.is_some();
        let wlen = self.weight.len();
        let fast = self.fast();
        let implicit = fast && g.implicit();
        if fast && dx.is_some() {
            let mode = if g.implicit_dx() {
                Pack::DataGrad
            } else {
                Pack::Transposed
            };
            self.pack_weights(&g, mode);
        }
        let col_len = match (implicit, dx.is_some()) {
            (true, false) => 0,
            (true, true) if g.implicit_dx() => (g.c / g.groups) * g.q(),
            _ => g.col_len(),
        };
        self.prepare_ws(chunks, col_len, wlen, if want_db { g.o } else { 0 });
        let (offs_f, offs_b) = if implicit {
            implicit_offsets(&g)
        } else {
            (vec![], vec![])
        };
        let w = self.weight.values();
        let packed = &self.packed[..];
        let (is, os) = (g.in_size(), g.out_size());
        let run = |xc: &[T], gc: &[T], mut dxc: Option<&mut [T]>, ws: &mut Workspace<T>| {
            if implicit {
                let (hp, wp) = (g.hp(), g.wp());
                ensure_padded(&mut ws.xpad, &mut ws.xpad_key, (g.c * WGRAD_GROUP, hp, wp));
                ensure_padded(
                    &mut ws.dypad,
                    &mut ws.dypad_key,
                    (g.o * WGRAD_GROUP, hp, wp),
                );
                let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
                let samples = xc.len() / is;
                let mut s0 = 0;
                while s0 < samples {
                    let s1 = (s0 + WGRAD_GROUP).min(samples);
                    let xg: Vec<&[f32]> = (s0..s1).map(|s| f(&xc[s * is..(s + 1) * is])).collect();
                    let yg: Vec<&[f32]> = (s0..s1).map(|s| f(&gc[s * os..(s + 1) * os])).collect();
                    let dxg: Vec<Option<&mut [f32]>> = match dxc.as_deref_mut() {
                        Some(d) => d[s0 * is..s1 * is]
                            .chunks_exact_mut(is)
                            .map(|c| Some(crate::kernels::cast::as_f32_mut(c).expect("f32")))
                            .collect(),
                        None => (s0..s1).map(|_| None).collect(),
                    };
                    implicit_backward_group(
                        &g,
                        &xg,
                        &yg,
                        dxg,
                        packed,
                        (&offs_f, &offs_b),
                        crate::kernels::cast::as_f32_mut(&mut ws.xpad).expect("f32"),
                        crate::kernels::cast::as_f32_mut(&mut ws.dypad).expect("f32"),
                        crate::kernels::cast::as_f32_mut(&mut ws.col).expect("f32"),
                        crate::kernels::cast::as_f32_mut(&mut ws.dw).expect("f32"),
                        &mut ws.db,
                    );
                    s0 = s1;
                }
                return;
            }
            for (s, (xs, gs)) in xc.chunks_exact(is).zip(gc.chunks_exact(os)).enumerate() {
                let dxs = dxc.as_deref_mut().map(|d| &mut d[s * is..(s + 1) * is]);
                if fast {
                    let f = |s| crate::kernels::cast::as_f32(s).expect("f32");
                    fast_backward_sample(
                        &g,
                        f(xs),
                        f(gs),
                        dxs.map(|d| crate::kernels::cast::as_f32_mut(d).expect("f32")),
                        packed,
                        crate::kernels::cast::as_f32_mut(&mut ws.col).expect("f32"),
                        crate::kernels::cast::as_f32_mut(&mut ws.dw).expect("f32"),
                        &mut ws.db,
                    );
                } else {
                    backward_sample(&g, xs, gs, dxs, w, ws, want_db, par);
                }
            }
        };
        if chunks == 1 {
            run(&xs, &gs, dx, &mut self.ws[0]);
        } else {
            let mut dx_chunks: Vec<Option<&mut [T]>> = match dx {
                Some(d) => d.chunks_mut(per * is).map(Some).collect(),
                None => (0..chunks).map(|_| None).collect(),
            };
            xs.par_chunks(per * is)
                .zip(gs.par_chunks(per * os))
                .zip(dx_chunks.par_iter_mut())
                .zip(self.ws[..chunks].par_iter_mut())
                .for_each(|(((xc, gc), dxc), ws)| run(xc, gc, dxc.as_deref_mut(), ws));
        }
        let used = chunks.min(g.n.div_ceil(per));
        let dw = self.weight.grads_mut();
        for ws in &self.ws[..used] {
            for (d, s) in dw.iter_mut().zip(&ws.dw) {
                *d = *d + *s;
            }
        }
        if let Some(b) = self.bias.as_mut() {
            let db = b.grads_mut();
            for (o, d) in db.iter_mut().enumerate() {
                let s: f64 = self.ws[..used].iter().map(|ws| ws.db[o]).sum();
                *d = *d + T::of_f64(s);
            }
        }
        Ok(())
    }
}

impl<T: Real> Layer<T> for Conv2d<T> {
    fn forward(&mut self, x: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>> {
        if mode.is_train() {
            Conv2d::forward_train(self, x)
        } else {
            Conv2d::forward(self, x)
        }
    }
    fn as_conv_mut(&mut self) -> Option<&mut Conv2d<T>> {
        Some(self)
    }
    fn forward_with_plane_moments(
        &mut self,
        x: &ArrayD<T>,
        _mode: Mode,
    ) -> Result<Option<(ArrayD<T>, PlaneMoments)>> {
        Conv2d::forward_with_plane_moments(self, x)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _mode: Mode) -> Result<ArrayD<T>> {
        Conv2d::backward(self, x, dy)
    }
    fn backward_params(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _mode: Mode) -> Result<()> {
        Conv2d::backward_params(self, x, dy)
    }
    fn backward_params_from_planes(
        &mut self,
        x: &ArrayD<T>,
        dy: &crate::norm::batch_kernels::DxPlanes<'_, T>,
        _mode: Mode,
    ) -> Result<bool> {
        Conv2d::backward_params_from_planes(self, x, dy)
    }
    fn name(&self) -> String {
        let c = &self.cfg;
        let mut s = format!(
            "Conv2d({}, {}, kernel_size={:?}, stride={:?}",
            c.in_channels, c.out_channels, c.kernel_size, c.stride
        );
        if c.padding != (0, 0) {
            s += &format!(", padding={:?}", c.padding);
        }
        if c.dilation != (1, 1) {
            s += &format!(", dilation={:?}", c.dilation);
        }
        if c.groups != 1 {
            s += &format!(", groups={}", c.groups);
        }
        if !c.bias {
            s += ", bias=False";
        }
        s + ")"
    }
}

impl<T: Real> Stateful<T> for Conv2d<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        sd.insert_float(join(prefix, "weight"), &self.weight.value);
        if let Some(b) = &self.bias {
            sd.insert_float(join(prefix, "bias"), &b.value);
        }
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        sd.load_float(&join(prefix, "weight"), &mut self.weight.value)?;
        if let Some(b) = self.bias.as_mut() {
            sd.load_float(&join(prefix, "bias"), &mut b.value)?;
        }
        Ok(())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        f(&join(prefix, "weight"), &mut self.weight);
        if let Some(b) = self.bias.as_mut() {
            f(&join(prefix, "bias"), b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    /// Direct (seven nested loops) convolution for cross-checking im2col.
    fn direct(
        cfg: &Conv2dConfig,
        x: &ArrayD<f64>,
        w: &ArrayD<f64>,
        b: Option<&ArrayD<f64>>,
    ) -> ArrayD<f64> {
        let s = x.shape();
        let (n, c, h, wd) = (s[0], s[1], s[2], s[3]);
        let (kh, kw) = cfg.kernel_size;
        let o = cfg.out_channels;
        let (cg, og) = (c / cfg.groups, o / cfg.groups);
        let oh = (h + 2 * cfg.padding.0 - cfg.dilation.0 * (kh - 1) - 1) / cfg.stride.0 + 1;
        let ow = (wd + 2 * cfg.padding.1 - cfg.dilation.1 * (kw - 1) - 1) / cfg.stride.1 + 1;
        let mut y = ArrayD::zeros(IxDyn(&[n, o, oh, ow]));
        for ni in 0..n {
            for oc in 0..o {
                let gi = oc / og;
                for i in 0..oh {
                    for j in 0..ow {
                        let mut acc = b.map_or(0.0, |b| b[[oc]]);
                        for ci in 0..cg {
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let ih = (i * cfg.stride.0 + ki * cfg.dilation.0) as isize
                                        - cfg.padding.0 as isize;
                                    let iw = (j * cfg.stride.1 + kj * cfg.dilation.1) as isize
                                        - cfg.padding.1 as isize;
                                    if ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < wd
                                    {
                                        acc += w[[oc, ci, ki, kj]]
                                            * x[[ni, gi * cg + ci, ih as usize, iw as usize]];
                                    }
                                }
                            }
                        }
                        y[[ni, oc, i, j]] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn matches_direct_convolution() {
        use rand::SeedableRng;
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
        let cfgs = [
            Conv2dConfig::new(3, 4, 3),
            Conv2dConfig::new(4, 6, (3, 2))
                .stride((2, 1))
                .padding((1, 2)),
            Conv2dConfig::new(4, 6, 3).dilation(2).padding(2).groups(2),
            Conv2dConfig::new(4, 4, 1).bias(false),
            Conv2dConfig::new(4, 2, 1).stride(2),
            Conv2dConfig::new(2, 3, 5).stride(3).padding(1),
        ];
        for cfg in cfgs {
            for par in [ConvParallel::Batch, ConvParallel::Gemm] {
                let mut conv = cfg.clone().build::<f64>(&mut rng).unwrap();
                conv.parallel = par;
                let mut x = ArrayD::zeros(IxDyn(&[3, cfg.in_channels, 7, 9]));
                super::super::init::normal(&mut x, 0.0, 1.0, &mut rng);
                let y = conv.forward(&x).unwrap();
                let want = direct(
                    &cfg,
                    &x,
                    &conv.weight.value,
                    conv.bias.as_ref().map(|b| &b.value),
                );
                assert_eq!(y.shape(), want.shape(), "{cfg:?}");
                for (a, b) in y.iter().zip(want.iter()) {
                    assert!((a - b).abs() < 1e-12, "{cfg:?}: {a} vs {b}");
                }
            }
        }
    }

    /// The f32 AVX-512 paths (implicit im2col for stride-1 "same" convolutions, with weight gradients summed
    /// over groups of samples; explicit im2col otherwise) against the generic f64 path: y, dx, dw and db, for
    /// batch sizes that leave partial sample groups, on 1 and 2 threads.
    #[test]
    fn simd_backward_matches_the_f64_path() {
        use rand::SeedableRng;
        if !simd::available() {
            return;
        }
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(11);
        let cfgs = [
            Conv2dConfig::new(16, 8, 3).padding(1),
            Conv2dConfig::new(16, 16, 3)
                .padding(1)
                .groups(2)
                .bias(false),
            Conv2dConfig::new(1, 8, 3).padding(1),
            Conv2dConfig::new(8, 8, 3).stride(2).padding(1),
        ];
        for cfg in cfgs {
            for n in [1usize, 3, 5, 9] {
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut c64 = cfg.clone().build::<f64>(&mut rng).unwrap();
                    let mut c32 = cfg.clone().build::<f32>(&mut rng).unwrap();
                    c32.weight.value = c64.weight.value.mapv(|v| v as f32);
                    if let (Some(b32), Some(b64)) = (c32.bias.as_mut(), c64.bias.as_ref()) {
                        b32.value = b64.value.mapv(|v| v as f32);
                    }
                    let mut x = ArrayD::zeros(IxDyn(&[n, cfg.in_channels, 10, 12]));
                    super::super::init::normal(&mut x, 0.0, 1.0, &mut rng);
                    let x32 = x.mapv(|v: f64| v as f32);
                    let x = x32.mapv(|v| v as f64);
                    let y64 = c64.forward(&x).unwrap();
                    let mut dy = ArrayD::zeros(y64.raw_dim());
                    super::super::init::normal(&mut dy, 0.0, 1.0, &mut rng);
                    let dy32 = dy.mapv(|v: f64| v as f32);
                    let dy = dy32.mapv(|v| v as f64);
                    let dx64 = c64.backward(&x, &dy).unwrap();
                    let (y32, dx32) = pool.install(|| {
                        let y = c32.forward(&x32).unwrap();
                        (y, c32.backward(&x32, &dy32).unwrap())
                    });
                    let close = |what: &str, a: &ArrayD<f32>, b: &ArrayD<f64>| {
                        let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                        for (p, q) in a.iter().zip(b.iter()) {
                            assert!(
                                (*p as f64 - q).abs() <= 1e-5 * scale,
                                "{cfg:?} n={n} T={threads} {what}: {p} vs {q}"
                            );
                        }
                    };
                    close("y", &y32, &y64);
                    close("dx", &dx32, &dx64);
                    close("dw", &c32.weight.grad, &c64.weight.grad);
                    if let (Some(b32), Some(b64)) = (c32.bias.as_ref(), c64.bias.as_ref()) {
                        close("db", &b32.grad, &b64.grad);
                    }
                }
            }
        }
    }
}
