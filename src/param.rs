//! Trainable parameters, their gradients and their roles.

use crate::Real;
use ndarray::{ArrayD, IxDyn};

/// What a parameter is to its layer, declared by the layer: optimizers decide by it whether weight decay
/// applies ([`crate::optim::DecayPolicy`]), not by the parameter's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ParamRole {
    /// A convolution or linear weight (and any parameter without a more specific role).
    #[default]
    Weight,
    /// A convolution or linear bias.
    Bias,
    /// A normalization's scale (`weight`), or another parameter of a normalization (BCN's mixing weight).
    NormWeight,
    /// A normalization's shift (`bias`).
    NormBias,
}

impl ParamRole {
    /// Whether the parameter is a bias or belongs to a normalization: what "no weight decay on norms and
    /// biases" exempts.
    pub fn is_norm_or_bias(self) -> bool {
        !matches!(self, ParamRole::Weight)
    }
}

/// A trainable tensor with its gradient and role. Backward passes *accumulate* into `grad` (as PyTorch does);
/// call [`Param::zero_grad`] between steps.
#[derive(Debug, Clone)]
pub struct Param<T> {
    pub value: ArrayD<T>,
    pub grad: ArrayD<T>,
    role: ParamRole,
}

impl<T: Real> Param<T> {
    /// A [`ParamRole::Weight`] parameter with zero gradient.
    pub fn new(value: ArrayD<T>) -> Self {
        let grad = ArrayD::zeros(value.raw_dim());
        Param {
            value,
            grad,
            role: ParamRole::Weight,
        }
    }
    pub fn filled(shape: &[usize], v: T) -> Self {
        Self::new(ArrayD::from_elem(IxDyn(shape), v))
    }
    /// The same parameter with another role.
    pub fn with_role(mut self, role: ParamRole) -> Self {
        self.role = role;
        self
    }
    pub fn role(&self) -> ParamRole {
        self.role
    }
    pub fn zero_grad(&mut self) {
        self.grad.fill(T::zero());
    }
    pub fn len(&self) -> usize {
        self.value.len()
    }
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
    /// The values as a contiguous slice (parameters are always standard layout).
    pub fn values(&self) -> &[T] {
        self.value.as_slice().expect("parameters are contiguous")
    }
    pub fn values_mut(&mut self) -> &mut [T] {
        self.value
            .as_slice_mut()
            .expect("parameters are contiguous")
    }
    pub fn grads(&self) -> &[T] {
        self.grad.as_slice().expect("gradients are contiguous")
    }
    pub fn grads_mut(&mut self) -> &mut [T] {
        self.grad.as_slice_mut().expect("gradients are contiguous")
    }
}
