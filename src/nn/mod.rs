//! Layers around the normalizations: convolution, linear, pooling, activations, dropout, loss, initialisation.
//!
//! Every layer has a hand-written backward (Caffe/Darknet style, no autograd tape) and implements [`Layer`]:
//! the model keeps each layer's input and hands it back to `backward`. Parameter gradients accumulate.
//!
//! | layer | input → output | parameters (PyTorch names) | state kept between forward and backward |
//! |---|---|---|---|
//! | [`Conv2d`] | (N, C, H, W) → (N, O, H', W') | `weight` (O, C/groups, kh, kw), `bias` (O) | workspaces only (column matrix, padded copies) |
//! | [`Linear`] | (*, in) → (*, out) | `weight` (out, in), `bias` (out) | — |
//! | [`MaxPool2d`] | (N, C, H, W) → (N, C, H', W') | — | argmax indices |
//! | [`AvgPool2d`] | (N, C, H, W) → (N, C, H', W') | — | — |
//! | [`GlobalAvgPool`] | (N, C, H, W) → (N, C) | — | — |
//! | [`ReLU`], [`Sigmoid`] | any → same | — | — |
//! | [`Flatten`] | (N, *) → (N, prod(*)) | — | — |
//! | [`Dropout`] | any → same | — | mask (train), RNG |
//!
//! [`CrossEntropyLoss`] is not a layer: it maps logits and integer targets to `(loss, dlogits)`.
//! [`init`] holds PyTorch's initialisation schemes.

pub mod activation;
pub mod conv;
pub mod conv_one_channel;
pub mod dropout;
pub mod init;
pub mod linear;
pub mod loss;
pub mod pool;
pub mod winograd;
pub mod winograd4;

pub use activation::{Flatten, ReLU, Sigmoid};
pub use conv::{Conv2d, Conv2dConfig, ConvParallel};
pub use dropout::Dropout;
pub use init::{Init, InitSpec};
pub use linear::{Linear, LinearConfig};
pub use loss::{accuracy, argmax, cross_entropy, CrossEntropyLoss};
pub use pool::{AvgPool2d, AvgPool2dConfig, GlobalAvgPool, MaxPool2d, MaxPool2dConfig};

use crate::state::Stateful;
use crate::{Mode, NvError, Real, Result};
use ndarray::ArrayD;

pub use crate::kernels::moments::PlaneMoments;

/// A layer of a model: forward, and a backward that receives the same input `x` the forward saw.
pub trait Layer<T: Real>: Stateful<T> + Send + Sync {
    /// Forward pass.
    fn forward(&mut self, x: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>>;
    /// Backward pass: given the forward's input `x` and dL/dy, returns dL/dx and accumulates parameter gradients.
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, mode: Mode) -> Result<ArrayD<T>>;
    /// Backward for a layer whose input needs no gradient (the first layer of a model): accumulates the
    /// parameter gradients only. Layers that can skip the input gradient's work override it.
    fn backward_params(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, mode: Mode) -> Result<()> {
        self.backward(x, dy, mode).map(|_| ())
    }
    /// A short name for tables and errors.
    fn name(&self) -> String;
    /// The layer as a mutable `Conv2d` (for inference-time transformations such as
    /// [`crate::model::Sequential::fold_batch_norm`]); `None` for every other layer.
    fn as_conv_mut(&mut self) -> Option<&mut Conv2d<T>> {
        None
    }
    /// See [`crate::norm::NormLayer::eval_affine`]; `None` unless the layer is such a normalization.
    fn eval_affine(&self) -> Option<(Vec<f64>, Vec<f64>, bool)> {
        None
    }
    /// See [`crate::norm::NormLayer::eval_affine_exact`]; `None` unless the layer is such a normalization.
    fn eval_affine_exact(&self) -> Option<(Vec<T>, Vec<T>, bool)> {
        None
    }
    /// `Some(output shape)` when the layer's forward only reshapes its input (a flatten), so a container
    /// that owns the input can move it into the output without a copy (and the backward reshapes dy back).
    fn reshapes_to(&self, _input_shape: &[usize]) -> Option<Vec<usize>> {
        None
    }
    /// Whether the layer is a 2×2, stride-2 max pool without padding, dilation or ceil mode (which fused
    /// inference can apply inside a convolution's output pass).
    fn is_max_pool_2x2(&self) -> bool {
        false
    }
    /// The layer's forward followed by a 2×2, stride-2 max pool ([`Layer::is_max_pool_2x2`]) in one kernel,
    /// when it has one for this input and mode; `Ok(None)` (nothing done) otherwise. See
    /// [`crate::norm::BatchNorm::forward_maxpool`].
    fn forward_maxpool(&mut self, _x: &ArrayD<T>, _mode: Mode) -> Result<Option<ArrayD<T>>> {
        Ok(None)
    }
    /// The forward, with every output plane also reduced to (mean, M2) in the same pass, when the layer can
    /// ([`Conv2d::forward_with_plane_moments`]); `Ok(None)` (nothing done) otherwise.
    fn forward_with_plane_moments(
        &mut self,
        _x: &ArrayD<T>,
        _mode: Mode,
    ) -> Result<Option<(ArrayD<T>, PlaneMoments)>> {
        Ok(None)
    }
    /// Whether [`Layer::forward_from_plane_moments`] applies in `mode`.
    fn takes_plane_moments(&self, _mode: Mode) -> bool {
        false
    }
    /// The forward from per-plane (mean, M2) of `x` computed by the layer before
    /// ([`crate::norm::BatchNorm::forward_from_plane_moments`]); with `pool`, a following 2×2 max pool applied
    /// too where the layer can. Returns the output and whether it is pooled; `Ok(None)` when nothing was done.
    fn forward_from_plane_moments(
        &mut self,
        _x: &ArrayD<T>,
        _pm: &[(f64, f64)],
        _mode: Mode,
        _pool: bool,
    ) -> Result<Option<(ArrayD<T>, bool)>> {
        Ok(None)
    }
    /// The backward without the dx pass, dx returned as a function of the plane for a first layer that only
    /// needs it for its parameter gradients ([`crate::norm::BatchNorm::backward_deferred`]); `Ok(None)` (nothing
    /// done) where the layer has no such backward.
    fn backward_deferred<'a>(
        &mut self,
        _x: &'a ArrayD<T>,
        _dy: &'a ArrayD<T>,
        _mode: Mode,
    ) -> Result<Option<crate::norm::batch_kernels::DxPlanes<'a, T>>> {
        Ok(None)
    }
    /// [`Layer::backward_params`] from a dy given plane by plane; `Ok(false)` (nothing done) where the layer
    /// cannot take it that way.
    fn backward_params_from_planes(
        &mut self,
        _x: &ArrayD<T>,
        _dy: &crate::norm::batch_kernels::DxPlanes<'_, T>,
        _mode: Mode,
    ) -> Result<bool> {
        Ok(false)
    }
    /// The backward of [`Layer::forward_maxpool`]: `dy` is the gradient of the pooled output.
    fn backward_maxpool(
        &mut self,
        _x: &ArrayD<T>,
        _dy: &ArrayD<T>,
        mode: Mode,
    ) -> Result<ArrayD<T>> {
        Err(NvError::NoSavedState {
            layer: "Layer",
            mode,
        })
    }
}

/// A size given either once for both spatial dimensions (`3`) or per dimension (`(3, 5)`), as in PyTorch.
pub trait IntoPair {
    fn pair(self) -> (usize, usize);
}
impl IntoPair for usize {
    fn pair(self) -> (usize, usize) {
        (self, self)
    }
}
impl IntoPair for (usize, usize) {
    fn pair(self) -> (usize, usize) {
        self
    }
}

/// A [`Stateful`] impl for layers without parameters or buffers.
macro_rules! stateless {
    ($($t:ident),*) => {$(
        impl<T: $crate::Real> $crate::state::Stateful<T> for $t<T> {
            fn save_state(&self, _prefix: &str, _sd: &mut $crate::state::StateDict) {}
            fn load_state(&mut self, _prefix: &str, _sd: &$crate::state::StateDict) -> $crate::Result<()> {
                Ok(())
            }
            fn visit_params(&mut self, _prefix: &str, _f: &mut dyn FnMut(&str, &mut $crate::Param<T>)) {}
        }
    )*};
}
pub(crate) use stateless;
