//! The float types the layers are generic over: `f32` for real work, `f64` for gradient checks of the same code.

use num_traits::Float;

/// A floating-point element type. Reductions inside kernels always accumulate in `f64`.
pub trait Real:
    Float + Default + Send + Sync + std::fmt::Debug + std::fmt::Display + std::iter::Sum + 'static
{
    const NAME: &'static str;
    fn as_f64(self) -> f64;
    fn of_f64(v: f64) -> Self;
    fn from_usize(v: usize) -> Self {
        Self::of_f64(v as f64)
    }
}

impl Real for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn of_f64(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    const NAME: &'static str = "f64";
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn of_f64(v: f64) -> Self {
        v
    }
}
