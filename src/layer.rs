//! The layer contract: forward, backward, parameters and state. Nothing else: fusions across layers are the
//! model's plan's business ([`crate::model::plan`]), not the layers'.

use crate::state::Stateful;
use crate::{Ctx, Real, Result};
use ndarray::ArrayD;

/// A layer of a model. The backward receives the same input `x` the forward saw (the model keeps it) and
/// accumulates the parameter gradients, as PyTorch's `backward` does.
///
/// A layer is `Any`, so a plan can recognise the concrete layers its fusion patterns know (a `Conv2d`, a
/// `BatchNorm`) by downcasting.
///
/// ```
/// use normvision::ndarray::{ArrayD, IxDyn};
/// use normvision::nn::ReLU;
/// use normvision::{Ctx, Layer};
/// let mut relu = ReLU::<f32>::new();
/// let x = ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![-1.0, 0.5, 2.0]).unwrap();
/// let y = relu.forward(&x, Ctx::train()).unwrap();
/// assert_eq!(y.as_slice().unwrap(), &[0.0, 0.5, 2.0]);
/// let dx = relu.backward(&x, &ArrayD::ones(IxDyn(&[1, 3])), Ctx::train()).unwrap();
/// assert_eq!(dx.as_slice().unwrap(), &[0.0, 1.0, 1.0]);
/// ```
pub trait Layer<T: Real>: Stateful<T> + std::any::Any + Send + Sync {
    /// Forward pass.
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>>;
    /// Backward pass: given the forward's input `x` and dL/dy, returns dL/dx and accumulates parameter gradients.
    /// The context's mode must be the forward's.
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>>;
    /// Backward for a layer whose input needs no gradient (the first layer of a model): accumulates the
    /// parameter gradients only. Layers that can skip the input gradient's work override it.
    fn backward_params(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<()> {
        self.backward(x, dy, ctx).map(|_| ())
    }
    /// The output shape for an input shape, or the error a forward would raise.
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>>;
    /// A description for tables and errors, as PyTorch prints the module (`Conv2d(1, 32, kernel_size=(3, 3), …)`).
    fn name(&self) -> String;
}
