//! The context every forward and backward receives: the mode, the training step, and the kernel options.
//!
//! Nothing that changes a result is global: a layer computes from its input, its own state and this context.
//! A model's plan fills the kernel options from its [`PlanOptions`](crate::model::PlanOptions); a layer used
//! on its own gets the defaults ([`Ctx::train`], [`Ctx::eval`]).

use crate::Mode;
use serde::{Deserialize, Serialize};

/// The instruction set the hand-written kernels may use, from most to least capable. A kernel without a version
/// for the chosen set runs the next one down that it has (every kernel has a portable version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isa {
    /// Plain Rust, whatever the compiler makes of it: no explicit intrinsics.
    Portable,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512F (with AVX2 and FMA).
    Avx512,
}

impl Isa {
    /// The most capable set this CPU supports (checked once).
    pub fn detect() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(nv_x86)]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// `self`, or an error naming what this CPU lacks when it cannot run it.
    pub fn checked(self) -> crate::Result<Isa> {
        if self > Isa::detect() {
            return Err(crate::NvError::Config(format!(
                "instruction set {} is not available on this CPU (best: {})",
                self.as_str(),
                Isa::detect().as_str()
            )));
        }
        Ok(self)
    }

    /// `self`, lowered to what this CPU has: the set a kernel actually runs (so that no request, whatever its
    /// origin, reaches an instruction the CPU lacks).
    #[inline]
    pub fn usable(self) -> Isa {
        self.min(Isa::detect())
    }

    /// Whether kernels may use AVX-512F.
    pub fn avx512(self) -> bool {
        self >= Isa::Avx512
    }

    /// Whether kernels may use AVX2 and FMA.
    pub fn avx2(self) -> bool {
        self >= Isa::Avx2
    }

    /// The name the CLI's `--isa` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = crate::NvError;
    fn from_str(s: &str) -> crate::Result<Isa> {
        match s {
            "portable" => Ok(Isa::Portable),
            "avx2" => Ok(Isa::Avx2),
            "avx512" => Ok(Isa::Avx512),
            _ => Err(crate::NvError::Config(format!(
                "unknown instruction set {s:?} (expected avx512, avx2 or portable)"
            ))),
        }
    }
}

/// Working set (bytes of all the arrays an elementwise pass touches) from which a normalization pass writes its
/// output with streaming stores, by default: below it, the output still fits the cache the next pass reads it
/// from. The reference CNN's passes (≤ 38 MB at batch 128) keep normal stores (see docs/PERFORMANCE.md, "Tuning constants").
pub const STREAM_BYTES: usize = 40 << 20;

/// How the kernels may run: the instruction set and the streaming-store threshold. Neither changes a value,
/// only how fast it is computed (the instruction set may change the last bits of a result: its reductions run
/// in another order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelOptions {
    /// The instruction set; [`Isa::detect`] by default.
    pub isa: Isa,
    /// Passes whose arrays total at least this many bytes write their output with streaming stores
    /// ([`STREAM_BYTES`] by default; `usize::MAX` never streams).
    pub stream_bytes: usize,
}

impl Default for KernelOptions {
    fn default() -> Self {
        KernelOptions {
            isa: Isa::detect(),
            stream_bytes: STREAM_BYTES,
        }
    }
}

impl KernelOptions {
    /// Whether a pass over `arrays` arrays of `bytes` bytes each writes its output with streaming stores
    /// (forward passes touch 2 arrays, x and y; backward passes 3, x, dy and dx). Streaming stores exist for
    /// AVX-512 only.
    pub fn streams(&self, bytes: usize, arrays: usize) -> bool {
        cfg!(nv_x86)
            && self.isa.usable().avx512()
            && bytes.saturating_mul(arrays) >= self.stream_bytes
    }
}

/// What a forward or backward pass runs under.
///
/// ```
/// use normvision::{Ctx, Mode};
/// let ctx = Ctx::train().with_step(41);
/// assert_eq!(ctx.mode(), Mode::Train);
/// assert_eq!(ctx.step(), Some(41));
/// assert_eq!(Ctx::from(Mode::Eval).mode(), Mode::Eval);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx {
    mode: Mode,
    step: Option<u64>,
    kernels: KernelOptions,
}

impl Ctx {
    /// `mode`, no step, default kernel options.
    pub fn new(mode: Mode) -> Ctx {
        Ctx {
            mode,
            step: None,
            kernels: KernelOptions::default(),
        }
    }
    /// Training mode: batch statistics, running statistics updated, dropout active.
    pub fn train() -> Ctx {
        Ctx::new(Mode::Train)
    }
    /// Evaluation mode: running statistics, nothing updated.
    pub fn eval() -> Ctx {
        Ctx::new(Mode::Eval)
    }
    /// The pass belongs to optimizer step `step` (0-based): layers with randomness (dropout) draw from an RNG
    /// derived from their seed and the step, so a resumed run repeats the uninterrupted one exactly.
    pub fn with_step(mut self, step: u64) -> Ctx {
        self.step = Some(step);
        self
    }
    /// The same context with other kernel options.
    pub fn with_kernels(mut self, kernels: KernelOptions) -> Ctx {
        self.kernels = kernels;
        self
    }
    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn is_train(&self) -> bool {
        self.mode.is_train()
    }
    pub fn step(&self) -> Option<u64> {
        self.step
    }
    pub fn kernels(&self) -> KernelOptions {
        self.kernels
    }
    pub fn isa(&self) -> Isa {
        self.kernels.isa
    }
}

impl From<Mode> for Ctx {
    fn from(mode: Mode) -> Ctx {
        Ctx::new(mode)
    }
}
