//! The normalization family. One file per layer; the fused kernels they share live in `*_kernels.rs` and `lanes.rs`.
//!
//! | layer | statistics over | train | eval |
//! |---|---|---|---|
//! | [`BatchNorm`] | (N, *spatial) per channel | batch stats, running stats updated | running stats |
//! | [`FrozenBatchNorm`] | — | fixed affine | fixed affine |
//! | [`GroupNorm`] | (C/G, *spatial) per sample and group | same in both | same in both |
//! | [`LayerNorm`] | trailing `normalized_shape` per sample | same in both | same in both |
//! | [`InstanceNorm`] | (*spatial) per sample and channel | instance stats | running stats if tracked |
//! | [`BatchChannelNorm`] | BN part per channel + LN part per sample | batch stats | running stats (BN part) |

pub mod batch;
pub mod batch_kernels;
pub mod bcn;
mod buffers;
pub mod frozen;
pub mod group;
pub mod group_kernels;
pub mod instance;
pub mod layer;
pub mod rows_kernels;

pub use batch::{BatchNorm, BatchNormConfig, Convention};
pub use bcn::{BatchChannelNorm, BatchChannelNormConfig};
pub use frozen::FrozenBatchNorm;
pub use group::{GroupNorm, GroupNormConfig};
pub use instance::{InstanceNorm, InstanceNormConfig};
pub use layer::{LayerNorm, LayerNormConfig};

use crate::{NvError, Real, Result};
use ndarray::ArrayViewD;

pub(crate) use crate::kernels::shape::{
    check_channels, check_dx_len, check_same_shape, contiguous,
};

pub(crate) fn check_eps(eps: f64) -> Result<()> {
    if !(eps > 0.0) || !eps.is_finite() {
        return Err(NvError::Config(format!(
            "eps must be a finite number > 0, got {eps}"
        )));
    }
    Ok(())
}

pub(crate) fn check_momentum(m: Option<f64>) -> Result<()> {
    if let Some(m) = m {
        if !(0.0..=1.0).contains(&m) {
            return Err(NvError::Config(format!(
                "momentum must lie in [0, 1], got {m}"
            )));
        }
    }
    Ok(())
}

/// Optional parameter → optional slice.
pub(crate) fn pslice<T: Real>(p: &Option<crate::Param<T>>) -> Option<&[T]> {
    p.as_ref().map(|p| p.values())
}

/// The common interface of every normalization layer, so a model can swap one for another (`--norm`).
pub trait NormLayer<T: Real>: crate::state::Stateful<T> + Send + Sync {
    /// Forward into a caller-owned buffer with x's number of elements.
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], mode: crate::Mode) -> Result<()>;
    /// Backward into a caller-owned buffer; accumulates parameter gradients. `mode` must match the forward.
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        mode: crate::Mode,
    ) -> Result<()>;
    /// The layer's name for messages and tables.
    fn name(&self) -> &'static str;
    /// When the layer's eval-mode output is a fixed per-channel affine `y = x·a + b` (then a ReLU when the flag
    /// is set), that affine in f64: what a preceding convolution can absorb ([`crate::model::Sequential::fold_batch_norm`]).
    fn eval_affine(&self) -> Option<(Vec<f64>, Vec<f64>, bool)> {
        None
    }
    /// The per-channel `(a, b)` in `T` and the ReLU flag with which this layer's eval forward computes
    /// `y = x·a + b` (a rounded product, then a rounded sum; then max(·, 0) when the flag is set), when its eval
    /// forward is exactly that: a preceding convolution can then apply it in its own output pass with bitwise
    /// the same result ([`crate::model::Sequential::forward_inference`]).
    fn eval_affine_exact(&self) -> Option<(Vec<T>, Vec<T>, bool)> {
        None
    }
    /// The forward followed by a 2×2, stride-2 max pool in one kernel, when the layer has one for this input
    /// and mode (`Ok(None)` otherwise: nothing was done). See [`BatchNorm::forward_maxpool`].
    fn forward_maxpool(
        &mut self,
        _x: &ndarray::ArrayD<T>,
        _mode: crate::Mode,
    ) -> Result<Option<ndarray::ArrayD<T>>> {
        Ok(None)
    }
    /// Whether [`NormLayer::forward_from_plane_moments`] applies in `mode`.
    fn takes_plane_moments(&self, _mode: crate::Mode) -> bool {
        false
    }
    /// The forward from the per-plane (mean, M2) of `x` (see [`BatchNorm::forward_from_plane_moments`]).
    fn forward_from_plane_moments(
        &mut self,
        _x: &ndarray::ArrayD<T>,
        _pm: &[(f64, f64)],
        _mode: crate::Mode,
        _pool: bool,
    ) -> Result<Option<(ndarray::ArrayD<T>, bool)>> {
        Ok(None)
    }
    /// The backward without its dx pass (see [`BatchNorm::backward_deferred`]).
    fn backward_deferred<'a>(
        &mut self,
        _x: &'a ndarray::ArrayD<T>,
        _dy: &'a ndarray::ArrayD<T>,
        _mode: crate::Mode,
    ) -> Result<Option<batch_kernels::DxPlanes<'a, T>>> {
        Ok(None)
    }
    /// The backward of [`NormLayer::forward_maxpool`], from the gradient of the pooled output.
    fn backward_maxpool(
        &mut self,
        _x: &ndarray::ArrayD<T>,
        _dy: &ndarray::ArrayD<T>,
        mode: crate::Mode,
    ) -> Result<ndarray::ArrayD<T>> {
        Err(crate::NvError::NoSavedState {
            layer: self.name(),
            mode,
        })
    }
    fn forward(&mut self, x: &ndarray::ArrayD<T>, mode: crate::Mode) -> Result<ndarray::ArrayD<T>> {
        let mut y = crate::kernels::arena::output(x.shape());
        self.forward_into(x.view(), y.as_slice_mut().expect("fresh array"), mode)?;
        Ok(y)
    }
    fn backward(
        &mut self,
        x: &ndarray::ArrayD<T>,
        dy: &ndarray::ArrayD<T>,
        mode: crate::Mode,
    ) -> Result<ndarray::ArrayD<T>> {
        let mut dx = crate::kernels::arena::output(x.shape());
        self.backward_into(
            x.view(),
            dy.view(),
            dx.as_slice_mut().expect("fresh array"),
            mode,
        )?;
        Ok(dx)
    }
}

macro_rules! impl_norm_layer {
    ($($t:ident $(: $fold:ident $(+ $exact:ident)?)?),*) => {$(
        impl<T: Real> NormLayer<T> for $t<T> {
            fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], mode: crate::Mode) -> Result<()> {
                $t::forward_into(self, x, y, mode)
            }
            fn backward_into(&mut self, x: ArrayViewD<T>, dy: ArrayViewD<T>, dx: &mut [T], mode: crate::Mode) -> Result<()> {
                $t::backward_into(self, x, dy, dx, mode)
            }
            fn name(&self) -> &'static str {
                $t::<T>::NAME
            }
            $(fn eval_affine(&self) -> Option<(Vec<f64>, Vec<f64>, bool)> {
                $t::$fold(self)
            }
            $(fn eval_affine_exact(&self) -> Option<(Vec<T>, Vec<T>, bool)> {
                $t::$exact(self)
            })?)?
        }
    )*};
}
// Only layers whose eval output is a fixed per-channel affine can be folded into a preceding convolution.
// (InstanceNorm with running statistics would be one too, but no model puts it after a foldable layer.)
impl_norm_layer!(
    FrozenBatchNorm: eval_affine_of,
    GroupNorm,
    LayerNorm,
    InstanceNorm,
    BatchChannelNorm
);

// BatchNorm is foldable too, and it also fuses a following 2×2 max pool in training.
impl<T: Real> NormLayer<T> for BatchNorm<T> {
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], mode: crate::Mode) -> Result<()> {
        BatchNorm::forward_into(self, x, y, mode)
    }
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        mode: crate::Mode,
    ) -> Result<()> {
        BatchNorm::backward_into(self, x, dy, dx, mode)
    }
    fn name(&self) -> &'static str {
        BatchNorm::<T>::NAME
    }
    fn eval_affine(&self) -> Option<(Vec<f64>, Vec<f64>, bool)> {
        self.eval_affine_of()
    }
    fn eval_affine_exact(&self) -> Option<(Vec<T>, Vec<T>, bool)> {
        self.eval_affine_exact_of()
    }
    fn forward_maxpool(
        &mut self,
        x: &ndarray::ArrayD<T>,
        mode: crate::Mode,
    ) -> Result<Option<ndarray::ArrayD<T>>> {
        BatchNorm::forward_maxpool(self, x, mode)
    }
    fn takes_plane_moments(&self, mode: crate::Mode) -> bool {
        BatchNorm::takes_plane_moments(self, mode)
    }
    fn backward_deferred<'a>(
        &mut self,
        x: &'a ndarray::ArrayD<T>,
        dy: &'a ndarray::ArrayD<T>,
        mode: crate::Mode,
    ) -> Result<Option<batch_kernels::DxPlanes<'a, T>>> {
        BatchNorm::backward_deferred(self, x, dy, mode)
    }
    fn forward_from_plane_moments(
        &mut self,
        x: &ndarray::ArrayD<T>,
        pm: &[(f64, f64)],
        mode: crate::Mode,
        pool: bool,
    ) -> Result<Option<(ndarray::ArrayD<T>, bool)>> {
        BatchNorm::forward_from_plane_moments(self, x, pm, mode, pool)
    }
    fn backward_maxpool(
        &mut self,
        x: &ndarray::ArrayD<T>,
        dy: &ndarray::ArrayD<T>,
        mode: crate::Mode,
    ) -> Result<ndarray::ArrayD<T>> {
        BatchNorm::backward_maxpool(self, x, dy, mode)
    }
}
