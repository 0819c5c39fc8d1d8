//! Element-wise activations and reshaping: `nn.ReLU`, `nn.Sigmoid`, `nn.Flatten`.
//!
//! | layer | forward | backward | PyTorch detail kept |
//! |---|---|---|---|
//! | [`ReLU`] | max(x, 0) | dy·\[x > 0\] | NaN propagates (relu(NaN) = NaN, its gradient passes dy); gradient 0 at x = 0 |
//! | [`Sigmoid`] | 1/(1+e^(−x)) (overflow-free form) | dy·σ(x)(1−σ(x)), σ recomputed from x | — |
//! | [`Flatten`] | (N, *) → (N, prod(*)) (`start_dim=1`) | dy reshaped to x's shape | rank ≥ 2 |

use super::{stateless, Layer};
use crate::kernels::arena;
use crate::kernels::elementwise::{map_into, zip_map_into};
use crate::kernels::shape::contiguous as cont;
use crate::{Ctx, NvError, Real, Result};
use ndarray::ArrayD;

fn check_dy<T: Real>(layer: &'static str, x: &ArrayD<T>, dy: &ArrayD<T>) -> Result<()> {
    crate::kernels::shape::check_same_shape(layer, x.shape(), dy.shape())
}

/// `max(x, 0)`; NaN stays NaN.
#[derive(Debug, Clone, Default)]
pub struct ReLU<T: Real = f32> {
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> ReLU<T> {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<T: Real> Layer<T> for ReLU<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let xs = cont(x);
        // SAFETY: map_into writes every element.
        let mut y = unsafe { arena::output_uninit(x.shape()) };
        map_into(&xs, y.as_slice_mut().expect("fresh"), |v| {
            if v <= T::zero() {
                T::zero()
            } else {
                v
            }
        });
        Ok(y)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        check_dy("ReLU", x, dy)?;
        let (xs, gs) = (cont(x), cont(dy));
        // SAFETY: zip_map_into writes every element.
        let mut dx = unsafe { arena::output_uninit(x.shape()) };
        zip_map_into(&xs, &gs, dx.as_slice_mut().expect("fresh"), |v, g| {
            // PyTorch's threshold_backward on the output: `y <= 0 ? 0 : dy` (a NaN lets dy through).
            if v <= T::zero() {
                T::zero()
            } else {
                g
            }
        });
        Ok(dx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        "ReLU()".into()
    }
}

#[inline]
fn sigmoid<T: Real>(v: T) -> T {
    if v >= T::zero() {
        T::one() / (T::one() + (-v).exp())
    } else {
        let e = v.exp();
        e / (T::one() + e)
    }
}

/// The logistic function.
#[derive(Debug, Clone, Default)]
pub struct Sigmoid<T: Real = f32> {
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> Sigmoid<T> {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<T: Real> Layer<T> for Sigmoid<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let xs = cont(x);
        // SAFETY: map_into writes every element.
        let mut y = unsafe { arena::output_uninit(x.shape()) };
        map_into(&xs, y.as_slice_mut().expect("fresh"), sigmoid);
        Ok(y)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        check_dy("Sigmoid", x, dy)?;
        let (xs, gs) = (cont(x), cont(dy));
        // SAFETY: zip_map_into writes every element.
        let mut dx = unsafe { arena::output_uninit(x.shape()) };
        zip_map_into(&xs, &gs, dx.as_slice_mut().expect("fresh"), |v, g| {
            let s = sigmoid(v);
            g * s * (T::one() - s)
        });
        Ok(dx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        "Sigmoid()".into()
    }
}

/// (N, *) → (N, prod(*)).
#[derive(Debug, Clone, Default)]
pub struct Flatten<T: Real = f32> {
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> Flatten<T> {
    pub const NAME: &'static str = "Flatten";
    pub fn new() -> Self {
        Self::default()
    }
}

fn reshaped<T: Real>(a: &ArrayD<T>, shape: &[usize]) -> ArrayD<T> {
    // into a buffer from the pool: a fresh allocation here page-faulted in eval (perf: clear_page_erms)
    // SAFETY: the copy writes every element.
    let mut y = unsafe { arena::output_uninit(shape) };
    y.as_slice_mut()
        .expect("fresh array")
        .copy_from_slice(&cont(a));
    y
}

impl<T: Real> Layer<T> for Flatten<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let s = self.output_shape(x.shape())?;
        Ok(reshaped(x, &s))
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let s = self.output_shape(x.shape())?;
        if dy.shape() != s.as_slice() {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!("dy has shape {:?}, the output has shape {s:?}", dy.shape()),
            });
        }
        Ok(reshaped(dy, x.shape()))
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.len() < 2 {
            return Err(NvError::Rank {
                layer: Self::NAME,
                expected: "(N, *) (rank >= 2)".into(),
                got: input.to_vec(),
            });
        }
        Ok(vec![input[0], input[1..].iter().product()])
    }
    fn name(&self) -> String {
        "Flatten(start_dim=1, end_dim=-1)".into()
    }
}

stateless!(ReLU, Sigmoid, Flatten);
