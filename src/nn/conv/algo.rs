//! Which code computes a convolution: the user's choice for 3×3 layers ([`ConvChoice`], an option of a model's
//! plan, the CLI's `--conv`) and the algorithm it resolves to for one input shape and mode ([`ConvAlgo`]).
//!
//! | algorithm | when (under [`ConvChoice::Winograd`]) | kernels |
//! |---|---|---|
//! | [`ConvAlgo::Winograd2Batch`] | 3×3 "same" layers (padding = dilation) with ≥ 8 input channels on planes of at most [`SMALL_PLANE`] pixels, where the tiles save enough ([`BATCH_MIN_SAVING`]) | F(2×2, 3×3) on polyphase tiles over the whole batch |
//! | [`ConvAlgo::Gemm`] | the other layers on such small planes in training (and the other dilated ones in inference) | im2col + the `gemm` crate over a chunk of samples |
//! | [`ConvAlgo::Winograd4`] | training, 3×3 stride 1 padding 1, ≥ 8 input channels, planes [`WINOGRAD4_MIN_W`]–28 wide | F(4×4, 3×3), AVX-512 |
//! | [`ConvAlgo::Winograd2`] | the other 3×3 stride-1 padding-1 layers with ≥ 8 input channels | F(2×2, 3×3), AVX-512 |
//! | [`ConvAlgo::OneChannel`] | 3×3 stride 1 padding 1 on one input channel, planes ≤ 32 wide | direct, AVX-512 |
//! | [`ConvAlgo::Implicit`] | other stride-1 "same" convolutions | implicit im2col GEMM, AVX-512 |
//! | [`ConvAlgo::Explicit`] | every other f32 convolution | im2col + AVX-512 GEMM |
//! | [`ConvAlgo::Gemm`] | no AVX-512, or f64 | im2col + the `gemm` crate, batch split over threads |
//! | [`ConvAlgo::GemmThreads`] | no AVX-512, or f64, with fewer samples than threads (batch-1 inference) | im2col + the `gemm` crate, samples in turn, each GEMM threaded |

use super::geom::Geom;
use super::one_channel;
use super::winograd::{self, batch::BatchShape, f4, WinoShape};
use crate::kernels::gemm_avx512 as simd;
use crate::{Isa, Mode};
use serde::{Deserialize, Serialize};

/// Fewest input channels for which Winograd applies: with fewer, the tile transforms cost more than the
/// multiplications they save (the first layer of an image network has 1 or 3).
pub const WINOGRAD_MIN_CHANNELS: usize = 8;

/// Output planes of at most this many pixels take [`ConvAlgo::Gemm`] in training (and when dilated, in
/// inference too).
pub const SMALL_PLANE: usize = 64;

/// Planes at least this wide (and at most [`f4::MAX_W`]) take Winograd F(4×4, 3×3) in training: faster at
/// 28×28, slower at 14×14, where a plane has 4 tiles per row (4 of 16 vector lanes) and pads to 16×16
/// (`cargo run --release --example conv_algos`; see docs/PERFORMANCE.md, "Tuning constants").
pub const WINOGRAD4_MIN_W: usize = 21;

/// [`ConvAlgo::Winograd2Batch`] takes a small-plane layer when its tiles need at most 1/this of the direct
/// convolution's multiplications: 16 per tile against 9 per output pixel. On 8×8 maps the tiles save 2.25× at
/// dilations 1, 2 and 4, and 1.44× at dilation 3.
pub const BATCH_MIN_SAVING: f64 = 1.4;

/// The user's choice for 3×3, stride-1, padding-1 convolutions (every other convolution is unaffected).
///
/// (The variants carry no doc comments of their own: they would be printed by `--help`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvChoice {
    /// F(4×4, 3×3) in training on planes 21–28 wide, F(2×2, 3×3) otherwise.
    #[default]
    Winograd,
    /// F(2×2, 3×3) only, in training too (its rounding is closer to PyTorch's).
    Winograd2,
    /// The direct convolution (implicit im2col), the closest to PyTorch's rounding.
    Direct,
}

impl ConvChoice {
    /// Every choice, as the CLI lists them.
    pub const ALL: [ConvChoice; 3] = [
        ConvChoice::Winograd,
        ConvChoice::Winograd2,
        ConvChoice::Direct,
    ];
    /// The name the CLI gives it.
    pub fn name(self) -> &'static str {
        match self {
            ConvChoice::Winograd => "winograd",
            ConvChoice::Winograd2 => "winograd2",
            ConvChoice::Direct => "direct",
        }
    }
    /// What the CLI's `--help` says of it.
    pub fn help(self) -> &'static str {
        match self {
            ConvChoice::Winograd => "F(4x4,3x3) in training on planes 21-28 wide, F(2x2,3x3) otherwise (stride-1, padding-1 3x3 layers with 8+ input channels)",
            ConvChoice::Winograd2 => "F(2x2,3x3) only, whose rounding is closer to PyTorch's",
            ConvChoice::Direct => "the direct convolution (implicit im2col), closest to PyTorch's rounding",
        }
    }
}

impl std::str::FromStr for ConvChoice {
    type Err = crate::NvError;
    fn from_str(s: &str) -> crate::Result<Self> {
        ConvChoice::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                crate::NvError::Config(format!(
                    "unknown convolution algorithm {s:?} (expected winograd, winograd2 or direct)"
                ))
            })
    }
}

/// How one convolution is computed, for one input shape and mode: chosen once by a model's plan
/// ([`super::Conv2d::algorithm`]) and used for the forward and the backward alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvAlgo {
    Winograd4,
    Winograd2,
    Winograd2Batch,
    OneChannel,
    Implicit,
    Explicit,
    Gemm,
    GemmThreads,
}

impl ConvAlgo {
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgo::Winograd4 => "winograd4",
            ConvAlgo::Winograd2 => "winograd2",
            ConvAlgo::Winograd2Batch => "winograd2-batch",
            ConvAlgo::OneChannel => "one-channel",
            ConvAlgo::Implicit => "implicit",
            ConvAlgo::Explicit => "explicit",
            ConvAlgo::Gemm => "gemm",
            ConvAlgo::GemmThreads => "gemm-threads",
        }
    }
    /// Whether the forward can reduce each output plane to (mean, M2) while writing it, for a following
    /// training BatchNorm ([`super::Conv2d::forward_with_moments`]).
    pub fn emits_moments(self) -> bool {
        matches!(
            self,
            ConvAlgo::Winograd4 | ConvAlgo::Winograd2 | ConvAlgo::OneChannel
        )
    }
    /// Whether the forward can apply a following per-channel affine (an eval BatchNorm) in its output pass.
    pub fn fuses_affine(self) -> bool {
        matches!(
            self,
            ConvAlgo::Winograd2 | ConvAlgo::OneChannel | ConvAlgo::Winograd2Batch
        )
    }
    /// Whether the forward can apply affine + ReLU + a 2×2 max pool in its output pass (even H and W).
    pub fn fuses_affine_relu_pool(self) -> bool {
        self == ConvAlgo::Winograd2
    }
    /// Whether the weight gradient can take dy plane by plane from a following BatchNorm's deferred dx.
    pub fn takes_dy_planes(self) -> bool {
        self == ConvAlgo::OneChannel
    }
    /// Whether it runs the project's AVX-512 kernels.
    pub fn needs_avx512(self) -> bool {
        !matches!(self, ConvAlgo::Gemm | ConvAlgo::GemmThreads)
    }
}

/// The algorithm for geometry `g` in `mode` under `choice`, for element type f32 (`is_f32`) with instruction set
/// `isa`: the table in the module docs.
pub(super) fn choose(g: &Geom, mode: Mode, choice: ConvChoice, isa: Isa, is_f32: bool) -> ConvAlgo {
    let fast = is_f32 && isa.avx512() && simd::available();
    if !fast {
        // fewer samples than threads (batch-1 inference): thread each sample's GEMM instead of the batch
        return if g.n < rayon::current_num_threads() {
            ConvAlgo::GemmThreads
        } else {
            ConvAlgo::Gemm
        };
    }
    // Small planes (a DeepLab backbone's dilated stage and ASPP at output stride 8 on 64x64 images): Winograd
    // over the whole batch where its tiles save enough, 1.5-2x faster than im2col + GEMM per layer, forward and
    // backward, and about 2x faster than the per-image Winograd F(2x2) in inference; else im2col + GEMM, which
    // beats the per-sample kernels there (`cargo run --release --example conv_algos -- 2 all seg`).
    let small = g.oh * g.ow <= SMALL_PLANE && g.groups == 1;
    let saves = batch_shape(g).is_some_and(|bs| 9.0 / bs.products_per_pixel() >= BATCH_MIN_SAVING);
    if saves && choice != ConvChoice::Direct {
        return ConvAlgo::Winograd2Batch;
    }
    // (1×1 layers too in training: DeepLab's 320→64 projection trains in 0.65 ms against 0.99 on the AVX-512
    // direct path, whose weight gradient runs one K = 64 product per image)
    if small && (mode.is_train() || g.dh > 1 || g.dw > 1) {
        return ConvAlgo::Gemm;
    }
    if let Some(ws) = winograd_shape(g).filter(|_| choice != ConvChoice::Direct) {
        let wide = ws.w >= WINOGRAD4_MIN_W && f4::applies(&ws);
        if mode.is_train() && choice == ConvChoice::Winograd && wide {
            return ConvAlgo::Winograd4;
        }
        return ConvAlgo::Winograd2;
    }
    if one_channel_shape(g).is_some() {
        return ConvAlgo::OneChannel;
    }
    if g.implicit() {
        ConvAlgo::Implicit
    } else {
        ConvAlgo::Explicit
    }
}

/// The Winograd shape of `g` when it is a 3×3, stride-1, padding-1 convolution with enough input channels.
pub(super) fn winograd_shape(g: &Geom) -> Option<WinoShape> {
    let eligible = winograd::available()
        && (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.groups)
            == (3, 3, 1, 1, 1, 1, 1, 1, 1)
        && g.c >= WINOGRAD_MIN_CHANNELS;
    eligible.then_some(WinoShape {
        n: g.n,
        c: g.c,
        k: g.o,
        h: g.h,
        w: g.w,
    })
}

/// The whole-batch Winograd shape of `g` when it is a 3×3, stride-1 convolution with padding equal to its
/// dilation (the same in both axes), enough input channels and a plane of at most [`SMALL_PLANE`] pixels.
pub(super) fn batch_shape(g: &Geom) -> Option<BatchShape> {
    let eligible = winograd::available()
        && (g.kh, g.kw, g.sh, g.sw, g.groups) == (3, 3, 1, 1, 1)
        && g.dh == g.dw
        && (g.ph, g.pw) == (g.dh, g.dw)
        && g.c >= WINOGRAD_MIN_CHANNELS
        && g.oh * g.ow <= SMALL_PLANE;
    eligible.then_some(BatchShape {
        n: g.n,
        c: g.c,
        k: g.o,
        h: g.h,
        w: g.w,
        d: g.dh,
    })
}

/// The single-input-channel shape of `g` when the direct 3×3 kernels take it.
pub(super) fn one_channel_shape(g: &Geom) -> Option<one_channel::OneChannelShape> {
    let eligible = one_channel::available()
        && (g.c, g.groups) == (1, 1)
        && (g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw) == (3, 3, 1, 1, 1, 1, 1, 1)
        && g.w <= one_channel::MAX_WIDTH;
    eligible.then_some(one_channel::OneChannelShape {
        n: g.n,
        k: g.o,
        h: g.h,
        w: g.w,
    })
}
