//! 2-D convolution (`nn.Conv2d`) with a hand-written backward.
//!
//! | | PyTorch `nn.Conv2d` | here |
//! |---|---|---|
//! | defaults | stride 1, padding 0, dilation 1, groups 1, bias | same ([`Conv2dConfig::new`]) |
//! | weight | (O, C/groups, kh, kw) | same, `weight` |
//! | bias | (O), `bias=True` | same, optional, `bias` |
//! | output size | ⌊(H + 2p − d(k−1) − 1)/s⌋ + 1 | same |
//! | padding mode | zeros (default) | zeros only |
//! | init | kaiming_uniform(a=√5), bias U(±1/√fan_in) | same ([`Conv2dConfig::build`], [`Init::Default`]) |
//! | input | (N, C, H, W) or (C, H, W) | (N, C, H, W) only |
//! | errors | wrong rank / channels, kernel larger than the padded input, groups not dividing channels | same, as [`NvError`] values |
//!
//! Which code computes a call is its [`ConvAlgo`] ([`algo`]): a model's plan picks it once per input shape and
//! mode ([`Conv2d::algorithm`]); [`Layer::forward`] on a lone layer picks the default one. Per sample and group
//! the direct paths compute `y = W · col(x) + b`; backward `dW += dy · col(x)ᵀ` (columns recomputed from `x`,
//! never stored for the whole batch), `db += Σ dy`, `dx = col2im(Wᵀ · dy)`. The implicit path never builds the
//! column matrix: its rows are shifted views of a zero-padded copy of the image, and its products run over
//! Q = (H−1)·(W+2p) + W columns (output (oh, ow) at column oh·(W+2p) + ow; the 2p columns per row between image
//! rows are computed and dropped, 7 % extra work at 28×28, 13 % at 14×14, less than writing and reading the
//! column matrix).
//!
//! Threads: the direct paths split the batch into a few contiguous chunks per rayon thread (work stealing evens
//! out a core slowed by other processes); each chunk owns its workspaces (column matrix, padded copies, a private
//! dW/db accumulator summed at the end in chunk order) and runs single-threaded GEMMs. [`ConvAlgo::GemmThreads`]
//! walks the batch sequentially and lets each GEMM use all threads (slower for the shapes of small-image CNNs;
//! kept for comparison).

pub mod algo;
mod backward;
mod config;
mod direct;
mod geom;
mod im2col;
mod implicit;
#[doc(hidden)]
pub mod one_channel;
#[doc(hidden)]
pub mod winograd;

#[cfg(test)]
mod tests;

pub use algo::{ConvAlgo, ConvChoice, WINOGRAD4_MIN_W, WINOGRAD_MIN_CHANNELS};
pub use config::Conv2dConfig;

use super::init::Init;
use crate::kernels::arena;
use crate::kernels::cast::{as_f32, as_f32_mut};
use crate::kernels::gemm::Par;
use crate::kernels::gemm_avx512 as simd;
use crate::kernels::moments::PlaneMoments;
use crate::kernels::shape::{check_channels, check_nonempty, check_rank, contiguous};
use crate::layer::Layer;
use crate::param::ParamRole;
use crate::state::{join, StateDict, Stateful};
use crate::{Ctx, Isa, Mode, NvError, Param, Real, Result};
use geom::{ensure_padded, Geom, Workspace};
use implicit::WGRAD_GROUP;
use ndarray::{ArrayD, ArrayViewD};
use rayon::prelude::*;

/// Layouts of the packed weights (see `Conv2d::pack_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pack {
    Forward,
    Transposed,
    DataGrad,
}

/// Batch chunks per rayon thread on the direct paths.
const CHUNKS_PER_THREAD: usize = 4;

/// What a forward applies to the convolution's output in the same pass (an inference plan's fusions): a
/// per-channel `y·a + b` (an eval-mode BatchNorm, rounded as its own pass rounds), then a ReLU, then a 2×2,
/// stride-2 max pool. Each is bitwise what the separate layer would compute.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a, T> {
    pub affine: Option<(&'a [T], &'a [T])>,
    pub relu: bool,
    pub pool2x2: bool,
}

impl<T> Default for Epilogue<'_, T> {
    fn default() -> Self {
        Epilogue {
            affine: None,
            relu: false,
            pool2x2: false,
        }
    }
}

/// A 2-D convolution layer.
///
/// ```
/// use normvision::nn::Conv2dConfig;
/// use normvision::ndarray::{ArrayD, IxDyn};
/// use normvision::{Ctx, Layer};
/// let mut rng = rand::thread_rng();
/// let mut conv = Conv2dConfig::new(3, 8, 3).padding(1).build::<f32>(&mut rng).unwrap();
/// let x = ArrayD::zeros(IxDyn(&[2, 3, 16, 16]));
/// let y = conv.forward(&x, Ctx::train()).unwrap();
/// assert_eq!(y.shape(), &[2, 8, 16, 16]);
/// assert_eq!(conv.weight().value.shape(), &[8, 3, 3, 3]);
/// ```
#[derive(Debug, Clone)]
pub struct Conv2d<T: Real = f32> {
    cfg: Conv2dConfig,
    weight: Param<T>,
    bias: Option<Param<T>>,
    ws: Vec<Workspace<T>>,
    /// Packed weights (forward) or transposed weights (backward) for the AVX-512 kernels.
    packed: Vec<f32>,
    /// Winograd-transformed weights of [`ConvAlgo::Winograd2Batch`], reused from forward to backward, and the
    /// packed ones of [`ConvAlgo::Winograd2`]'s forward, reused from call to call while the weights are unchanged.
    /// Tracked: every method that can change the weights ([`Conv2d::weight_mut`], `reset_parameters`,
    /// `fold_affine`, `load_state`, `visit_params`) invalidates it, so calls in between do not compare them.
    wino: winograd::Transformed,
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
            .then(|| Param::filled(&[cfg.out_channels], T::zero()).with_role(ParamRole::Bias));
        Ok(Conv2d {
            cfg,
            weight,
            bias,
            ws: Vec::new(),
            packed: Vec::new(),
            wino: winograd::Transformed::tracked(),
        })
    }

    pub fn config(&self) -> &Conv2dConfig {
        &self.cfg
    }
    pub fn weight(&self) -> &Param<T> {
        &self.weight
    }
    pub fn weight_mut(&mut self) -> &mut Param<T> {
        self.wino.invalidate();
        &mut self.weight
    }
    pub fn bias(&self) -> Option<&Param<T>> {
        self.bias.as_ref()
    }
    pub fn bias_mut(&mut self) -> Option<&mut Param<T>> {
        self.bias.as_mut()
    }

    /// Re-initialises weight and bias (see [`Init`]); gradients are untouched.
    pub fn reset_parameters(
        &mut self,
        init: Init,
        scale: f64,
        rng: &mut impl rand::Rng,
    ) -> Result<()> {
        self.wino.invalidate();
        init.apply(&mut self.weight, self.bias.as_mut(), scale, rng)
    }

    fn geom(&self, shape: &[usize]) -> Result<Geom> {
        check_rank(Self::NAME, shape, 4, "4-D (N, C, H, W)")?;
        check_channels(Self::NAME, shape, self.cfg.in_channels)?;
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

    /// The algorithm for inputs of `shape` in `mode` under `choice`, with the kernels `isa` allows (see
    /// [`algo`]). A model's plan calls it once per shape.
    pub fn algorithm(
        &self,
        shape: &[usize],
        mode: Mode,
        choice: ConvChoice,
        isa: Isa,
    ) -> Result<ConvAlgo> {
        let g = self.geom(shape)?;
        Ok(algo::choose(
            &g,
            mode,
            choice,
            isa,
            as_f32(self.weight.values()).is_some(),
        ))
    }

    /// Errors unless this layer can run `algo` on geometry `g` (an algorithm forced by a caller).
    fn check_algo(&self, g: &Geom, algo: ConvAlgo) -> Result<()> {
        let fast = as_f32(self.weight.values()).is_some() && simd::available();
        let ok = match algo {
            ConvAlgo::Gemm | ConvAlgo::GemmThreads => true,
            ConvAlgo::Explicit => fast,
            ConvAlgo::Implicit => fast && g.implicit(),
            ConvAlgo::Winograd2 => fast && algo::winograd_shape(g).is_some(),
            ConvAlgo::Winograd2Batch => fast && algo::batch_shape(g).is_some(),
            ConvAlgo::Winograd4 => {
                fast && algo::winograd_shape(g).is_some_and(|ws| winograd::f4::applies(&ws))
            }
            ConvAlgo::OneChannel => fast && algo::one_channel_shape(g).is_some(),
        };
        if !ok {
            return Err(NvError::Config(format!(
                "{}: algorithm {} does not apply to input {:?} on this CPU",
                self.name(),
                algo.name(),
                [g.n, g.c, g.h, g.w]
            )));
        }
        Ok(())
    }

    /// (number of workspaces, samples per workspace) for a batch of `n` on the direct paths.
    fn split(n: usize, algo: ConvAlgo) -> (usize, usize) {
        let threads = rayon::current_num_threads().max(1);
        // A few chunks per thread, so that work stealing evens out a thread that is slowed down (other
        // processes on the core); each chunk owns a workspace.
        let chunks = if algo != ConvAlgo::GemmThreads && threads > 1 {
            (threads * CHUNKS_PER_THREAD).min(n).max(1)
        } else {
            1
        };
        (chunks, n.div_ceil(chunks).max(1))
    }

    fn gemm_par(algo: ConvAlgo) -> Par {
        match algo {
            ConvAlgo::GemmThreads => Par::all(),
            _ => Par::Seq,
        }
    }

    /// Packs every group's weights for [`simd::gemm_nn`]: as is (og × kdim, forward), transposed (kdim × og,
    /// explicit data gradient), or as the implicit data-gradient matrix (cg × og·kh·kw, element (c, (o, t)) =
    /// W[o, c, t]).
    fn pack_weights(&mut self, g: &Geom, mode: Pack) {
        let w = as_f32(self.weight.values()).expect("f32 layer");
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
    /// [`crate::norm::BatchNorm::eval_affine`]) into the weights and bias: `W'[o] = a[o]·W[o]`,
    /// `bias'[o] = a[o]·bias[o] + b[o]` (a bias is created when there was none), computed in f64 and rounded
    /// once.
    pub fn fold_affine(&mut self, a: &[f64], b: &[f64]) -> Result<()> {
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
        self.wino.invalidate();
        super::fold::fold_affine(&mut self.weight, &mut self.bias, a, b);
        self.cfg.bias = true;
        Ok(())
    }

    /// The (N, O, H', W') output of an output-pass epilogue `epi` with `algo` on geometry `g`, pooled with the
    /// fused 2×2 max pool: errors unless `algo` can apply the epilogue. A ReLU runs with every algorithm; an
    /// affine needs one that [`ConvAlgo::fuses_affine`], a pool (after affine and ReLU)
    /// [`ConvAlgo::fuses_affine_relu_pool`], a ReLU and even output sides.
    fn epilogue_output(
        &self,
        g: &Geom,
        algo: ConvAlgo,
        epi: &Epilogue<'_, T>,
    ) -> Result<[usize; 4]> {
        if let Some((a, b)) = epi.affine {
            if a.len() != g.o || b.len() != g.o || !algo.fuses_affine() {
                return Err(NvError::Config(format!(
                    "{}: {} cannot apply a {}-channel affine in its output pass",
                    self.name(),
                    algo.name(),
                    a.len()
                )));
            }
        }
        if epi.pool2x2
            && !(algo.fuses_affine_relu_pool()
                && epi.relu
                && g.oh.is_multiple_of(2)
                && g.ow.is_multiple_of(2))
        {
            return Err(NvError::Config(format!(
                "{}: {} cannot apply a 2x2 max pool in its output pass to a {}x{} output",
                self.name(),
                algo.name(),
                g.oh,
                g.ow
            )));
        }
        // with the fused pool (Winograd F(2×2) only) the output is the pooled one
        Ok(if epi.pool2x2 {
            [g.n, g.o, g.oh / 2, g.ow / 2]
        } else {
            [g.n, g.o, g.oh, g.ow]
        })
    }

    /// The forward with algorithm `algo` and an output-pass `epi`logue. A ReLU epilogue runs with every
    /// algorithm; an affine needs one that [`ConvAlgo::fuses_affine`], a 2×2 max pool (after affine and ReLU)
    /// [`ConvAlgo::fuses_affine_relu_pool`] and even output sides.
    pub fn forward_with(
        &mut self,
        x: &ArrayD<T>,
        algo: ConvAlgo,
        epi: Epilogue<'_, T>,
    ) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        self.check_algo(&g, algo)?;
        let shape = self.epilogue_output(&g, algo, &epi)?;
        match algo {
            ConvAlgo::Winograd4 if epi.affine.is_none() => {
                let ws = algo::winograd_shape(&g).expect("checked");
                Ok(self.f32_forward(x, &shape, |xf, wf, bias, yf| {
                    winograd::f4::forward(ws, xf, wf, bias, epi.relu, None, yf)
                }))
            }
            ConvAlgo::Winograd2 => {
                let ws = algo::winograd_shape(&g).expect("checked");
                let mut kept = std::mem::take(&mut self.wino);
                let y = self.f32_forward(x, &shape, |xf, wf, bias, yf| {
                    let affine = epi.affine.map(|(a, b)| (f32s(a), f32s(b)));
                    let (relu, pool) = (epi.relu, epi.pool2x2);
                    winograd::forward_kept(ws, xf, wf, &mut kept, bias, affine, relu, pool, yf)
                });
                self.wino = kept;
                Ok(y)
            }
            ConvAlgo::Winograd2Batch => {
                let bs = algo::batch_shape(&g).expect("checked");
                let mut wino = std::mem::take(&mut self.wino);
                let y = self.f32_forward(x, &shape, |xf, wf, bias, yf| {
                    let u = wino.get(wf, bs.k, bs.c);
                    let affine = epi.affine.map(|(a, b)| (f32s(a), f32s(b)));
                    winograd::batch::forward(bs, xf, u, bias, affine, epi.relu, yf)
                });
                self.wino = wino;
                Ok(y)
            }
            ConvAlgo::OneChannel => {
                let os = algo::one_channel_shape(&g).expect("checked");
                Ok(self.f32_forward(x, &shape, |xf, wf, bias, yf| {
                    let affine = epi.affine.map(|(a, b)| (f32s(a), f32s(b)));
                    one_channel::forward(os, xf, wf, bias, affine, epi.relu, yf)
                }))
            }
            _ if epi.affine.is_some() => unreachable!("checked above"),
            _ => {
                // SAFETY: the direct paths write every element of the output.
                let mut y = unsafe { arena::output_uninit(&shape) };
                let ys = y.as_slice_mut().expect("fresh array");
                self.forward_direct(&g, x.view(), ys, algo, epi.relu);
                Ok(y)
            }
        }
    }

    /// Whether [`Conv2d::forward_channel_last`] runs `algo` on an (N, C, H, W) input of this `shape` here: f32
    /// weights and AVX-512F; Winograd F(2×2) with input and output channels in multiples of 16, or the
    /// one-channel path with output channels in multiples of 16 (whose output alone can be channel-last).
    pub fn can_run_channel_last(&self, shape: &[usize], algo: ConvAlgo) -> bool {
        self.geom(shape).is_ok_and(|g| {
            self.check_algo(&g, algo).is_ok()
                && match algo {
                    ConvAlgo::Winograd2 => winograd::channel_last::supports(g.c, g.o),
                    ConvAlgo::OneChannel => {
                        g.o.is_multiple_of(16) && crate::kernels::transpose::available()
                    }
                    _ => false,
                }
        })
    }

    /// [`Conv2d::forward_with`] for an activation kept channel-last between convolutions: `x` is (N, H, W, C)
    /// when `layouts.input`, else (N, C, H, W); the output is (N, H', W', O) when `layouts.output`, else
    /// (N, O, H', W'). Winograd F(2×2) runs on channel-last tiles ([`winograd::channel_last`]); the
    /// one-channel path transposes its output rows (its input cannot be channel-last). The values are bitwise
    /// those of `forward_with(x, algo, epi)`, transposed where a layout is channel-last. Errors unless
    /// [`Conv2d::can_run_channel_last`].
    pub fn forward_channel_last(
        &mut self,
        x: &ArrayD<T>,
        algo: ConvAlgo,
        epi: Epilogue<'_, T>,
        layouts: winograd::channel_last::Layouts,
    ) -> Result<ArrayD<T>> {
        let sh = x.shape();
        let planar = if layouts.input && sh.len() == 4 {
            vec![sh[0], sh[3], sh[1], sh[2]]
        } else {
            sh.to_vec()
        };
        let one = algo == ConvAlgo::OneChannel;
        if !self.can_run_channel_last(&planar, algo) || (one && layouts.input) {
            return Err(NvError::Config(format!(
                "{}: {} cannot run with channel-last layouts {layouts:?} on input {sh:?} on this CPU",
                self.name(),
                algo.name()
            )));
        }
        let g = self.geom(&planar)?;
        let [n, o, oh, ow] = self.epilogue_output(&g, algo, &epi)?;
        let shape = if layouts.output {
            [n, oh, ow, o]
        } else {
            [n, o, oh, ow]
        };
        if one {
            let os = algo::one_channel_shape(&g).expect("checked");
            return Ok(self.f32_forward(x, &shape, |xf, wf, bias, yf| {
                let affine = epi.affine.map(|(a, b)| (f32s(a), f32s(b)));
                if layouts.output {
                    one_channel::forward_channel_last(os, xf, wf, bias, affine, epi.relu, yf)
                } else {
                    one_channel::forward(os, xf, wf, bias, affine, epi.relu, yf)
                }
            }));
        }
        let ws = algo::winograd_shape(&g).expect("checked");
        let mut kept = std::mem::take(&mut self.wino);
        let y = self.f32_forward(x, &shape, |xf, wf, bias, yf| {
            let u = kept.channel_last(wf, ws.k, ws.c);
            let affine = epi.affine.map(|(a, b)| (f32s(a), f32s(b)));
            let ep = winograd::Epilogue {
                bias,
                affine,
                relu: epi.relu,
                pool: epi.pool2x2,
            };
            winograd::channel_last::forward(ws, xf, u, ep, layouts, yf)
        });
        self.wino = kept;
        Ok(y)
    }

    /// The forward, with each output plane also reduced to its (mean, M2) while it is in cache (N·O entries,
    /// n-major; [`crate::kernels::moments::plane_moments`]): a following training BatchNorm then needs no
    /// statistics pass of its own. Needs an algorithm that [`ConvAlgo::emits_moments`]; the output is bitwise
    /// that of [`Conv2d::forward_with`] with the same algorithm.
    pub fn forward_with_moments(
        &mut self,
        x: &ArrayD<T>,
        algo: ConvAlgo,
    ) -> Result<(ArrayD<T>, PlaneMoments)> {
        let g = self.geom(x.shape())?;
        self.check_algo(&g, algo)?;
        if !algo.emits_moments() {
            return Err(NvError::Config(format!(
                "{}: {} does not compute plane moments",
                self.name(),
                algo.name()
            )));
        }
        let mut pm = vec![(0.0, 0.0); g.n * g.o];
        let y = self.f32_forward(x, &[g.n, g.o, g.oh, g.ow], |xf, wf, bias, yf| match algo {
            ConvAlgo::Winograd4 => {
                let ws = algo::winograd_shape(&g).expect("checked");
                winograd::f4::forward(ws, xf, wf, bias, false, Some(&mut pm), yf)
            }
            ConvAlgo::Winograd2 => {
                let ws = algo::winograd_shape(&g).expect("checked");
                winograd::forward_with_moments(ws, xf, wf, bias, yf, &mut pm)
            }
            _ => {
                let os = algo::one_channel_shape(&g).expect("checked");
                one_channel::forward_with_moments(os, xf, wf, bias, yf, &mut pm)
            }
        });
        Ok((y, pm))
    }

    /// A fresh output of `shape` written by `kernel(x, weight, bias, y)` on f32 slices: the set-up shared by the
    /// AVX-512 f32 paths (Winograd, single channel), which write every element.
    fn f32_forward(
        &self,
        x: &ArrayD<T>,
        shape: &[usize],
        kernel: impl FnOnce(&[f32], &[f32], Option<&[f32]>, &mut [f32]),
    ) -> ArrayD<T> {
        // SAFETY: every f32 kernel passed here writes each element of its output.
        let mut y: ArrayD<T> = unsafe { arena::output_uninit(shape) };
        let xs = contiguous(x);
        let bias = self.bias.as_ref().map(|b| f32s(b.values()));
        let yf = as_f32_mut(y.as_slice_mut().expect("fresh array")).expect("f32");
        kernel(f32s(&xs), f32s(self.weight.values()), bias, yf);
        y
    }

    /// The direct paths' forward (implicit, explicit, `gemm` crate) into `y`, chunked over the batch.
    fn forward_direct(
        &mut self,
        g: &Geom,
        x: ArrayViewD<T>,
        y: &mut [T],
        algo: ConvAlgo,
        relu: bool,
    ) {
        let g = *g;
        if g.n == 0 {
            return;
        }
        let xs = contiguous(&x);
        let (chunks, per) = Self::split(g.n, algo);
        let par = Self::gemm_par(algo);
        let implicit = algo == ConvAlgo::Implicit;
        let fast = implicit || algo == ConvAlgo::Explicit;
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
            implicit::implicit_offsets(&g).0
        } else {
            vec![]
        };
        let w = self.weight.values();
        let bias = self.bias.as_ref().map(|b| b.values());
        let packed = &self.packed[..];
        let (is, os) = (g.in_size(), g.out_size());
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
                    implicit::implicit_forward_sample(
                        &g,
                        f32s(xs),
                        f32s_mut(ys),
                        packed,
                        bias.map(f32s),
                        &offs,
                        f32s_mut(&mut ws.xpad),
                        f32s_mut(&mut ws.col),
                        relu,
                    );
                    continue;
                } else if fast {
                    direct::fast_forward_sample(
                        &g,
                        f32s(xs),
                        f32s_mut(ys),
                        packed,
                        bias.map(f32s),
                        f32s_mut(&mut ws.col),
                    );
                } else {
                    direct::forward_sample(&g, xs, ys, w, bias, &mut ws.col, par);
                }
                if relu {
                    // a select, not a branch: a data-dependent branch mispredicted on half the outputs and made
                    // a fused conv+ReLU 7x slower than the conv alone (ReLU maps NaN to 0, as the fused steps do)
                    for v in ys.iter_mut() {
                        let x = *v;
                        *v = if x > T::zero() { x } else { T::zero() };
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
    }

    /// The algorithm [`Layer::forward`] and [`Layer::backward`] use on a lone layer.
    fn default_algo(&self, shape: &[usize], ctx: Ctx) -> Result<ConvAlgo> {
        self.algorithm(shape, ctx.mode(), ConvChoice::default(), ctx.isa())
    }
}

/// A `T` slice as f32 on the f32-only paths (the algorithm checks guarantee `T` is f32 there).
pub(super) fn f32s<T: 'static>(s: &[T]) -> &[f32] {
    as_f32(s).expect("f32 kernels run on f32 layers only")
}

pub(super) fn f32s_mut<T: 'static>(s: &mut [T]) -> &mut [f32] {
    as_f32_mut(s).expect("f32 kernels run on f32 layers only")
}

impl<T: Real> Layer<T> for Conv2d<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        let algo = self.default_algo(x.shape(), ctx)?;
        self.forward_with(x, algo, Epilogue::default())
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        let algo = self.default_algo(x.shape(), ctx)?;
        // SAFETY: every backward path writes each element of dx.
        let mut dx = unsafe { arena::output_uninit(x.shape()) };
        self.backward_with(x, dy, Some(dx.as_slice_mut().expect("fresh array")), algo)?;
        Ok(dx)
    }
    fn backward_params(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<()> {
        let algo = self.default_algo(x.shape(), ctx)?;
        self.backward_with(x, dy, None, algo)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let g = self.geom(input)?;
        Ok(vec![g.n, g.o, g.oh, g.ow])
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
        self.wino.invalidate();
        sd.load_float(&join(prefix, "weight"), &mut self.weight.value)?;
        if let Some(b) = self.bias.as_mut() {
            sd.load_float(&join(prefix, "bias"), &mut b.value)?;
        }
        Ok(())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        self.wino.invalidate();
        f(&join(prefix, "weight"), &mut self.weight);
        if let Some(b) = self.bias.as_mut() {
            f(&join(prefix, "bias"), b);
        }
    }
}
