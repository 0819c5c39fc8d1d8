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
//! | [`ReLU`], [`Sigmoid`], [`Clamp`] | any → same | — | — |
//! | [`Softmax`] | (*, K) → (*, K) | — | — |
//! | [`Flatten`], [`Reshape`] | (N, *) → (N, prod(*)), (N, *shape) | — | — |
//! | [`ScaleShift`] | any → same | — (buffers `scale`, `shift`) | — |
//! | [`UpsampleBilinear`] | (N, C, H, W) → (N, C, H', W') | — | — |
//! | [`Dropout`] | any → same | — | mask (train), RNG |
//!
//! [`CrossEntropyLoss`] is not a layer: it maps logits and integer targets to `(loss, dlogits)`.
//! [`init`] holds PyTorch's initialisation schemes.

pub mod activation;
pub mod conv;
pub mod dropout;
mod fold;
pub mod init;
pub mod linear;
pub mod loss;
pub mod pool;
pub mod roi_align;
pub mod scale_shift;
pub mod upsample;

pub use activation::{Clamp, Flatten, ReLU, Reshape, Sigmoid, Softmax};
pub use conv::{Conv2d, Conv2dConfig, ConvAlgo, ConvChoice, Epilogue};
pub use dropout::Dropout;
pub use init::{Init, InitSpec};
pub use linear::{Linear, LinearConfig};
pub use loss::{
    accuracy, argmax, cross_entropy, mse, CrossEntropyLoss, MseLoss, PixelCrossEntropy,
    WeightedLosses,
};
pub use pool::{AvgPool2d, AvgPool2dConfig, GlobalAvgPool, MaxPool2d, MaxPool2dConfig};
pub use roi_align::RoiAlign;
pub use scale_shift::ScaleShift;
pub use upsample::{UpsampleBilinear, UpsampleSize};

pub use crate::layer::Layer;
use crate::state::StateDict;

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

/// A [`crate::state::Stateful`] impl for layers without parameters or buffers.
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
