//! Trainable parameters and their gradients.

use crate::Real;
use ndarray::{ArrayD, IxDyn};

/// A trainable tensor with its gradient. Backward passes *accumulate* into `grad` (as PyTorch does);
/// call [`Param::zero_grad`] between steps.
#[derive(Debug, Clone)]
pub struct Param<T> {
    pub value: ArrayD<T>,
    pub grad: ArrayD<T>,
}

impl<T: Real> Param<T> {
    pub fn new(value: ArrayD<T>) -> Self {
        let grad = ArrayD::zeros(value.raw_dim());
        Param { value, grad }
    }
    pub fn filled(shape: &[usize], v: T) -> Self {
        Self::new(ArrayD::from_elem(IxDyn(shape), v))
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
    pub fn grads_mut(&mut self) -> &mut [T] {
        self.grad.as_slice_mut().expect("gradients are contiguous")
    }
}
