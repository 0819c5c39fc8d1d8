//! Element-wise activations and reshaping: `nn.ReLU`, `nn.Sigmoid`, `nn.Hardtanh` (ONNX `Clip`), `nn.Softmax`,
//! `nn.Flatten`, and a per-sample reshape (`x.reshape(N, *shape)`).
//!
//! | layer | forward | backward | PyTorch detail kept |
//! |---|---|---|---|
//! | [`ReLU`] | max(x, 0) | dy·\[x > 0\] | NaN propagates (relu(NaN) = NaN, its gradient passes dy); gradient 0 at x = 0 |
//! | [`Sigmoid`] | 1/(1+e^(−x)) (overflow-free form) | dy·σ(x)(1−σ(x)), σ recomputed from x | — |
//! | [`Clamp`] | min(max(x, lo), hi) | dy·\[lo < x < hi\] | `nn.Hardtanh`/`ReLU6`'s gradient (0 at the bounds); NaN propagates |
//! | [`Softmax`] | e^(x−max)/Σe^(x−max) over the last dimension, the sum in f64 | y·(dy − Σdy·y) | `nn.Softmax(dim=-1)` |
//! | [`Flatten`] | (N, *) → (N, prod(*)) (`start_dim=1`) | dy reshaped to x's shape | rank ≥ 2 |
//! | [`Reshape`] | (N, *) → (N, *shape) | dy reshaped to x's shape | element count checked |

use super::{stateless, Layer};
use crate::kernels::arena;
use crate::kernels::elementwise::{map_into, zip_map_into};
use crate::kernels::shape::check_output_grad;
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
        check_output_grad(Self::NAME, dy.shape(), &self.output_shape(x.shape())?)?;
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

/// `min(max(x, lo), hi)`, as `nn.Hardtanh(lo, hi)` (and ONNX `Clip`): the gradient passes strictly inside the
/// bounds; NaN propagates.
#[derive(Debug, Clone)]
pub struct Clamp<T: Real = f32> {
    lo: f64,
    hi: f64,
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> Clamp<T> {
    /// Bounds may be infinite; `lo <= hi`.
    pub fn new(lo: f64, hi: f64) -> Result<Self> {
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return Err(NvError::Config(format!(
                "Clamp: need lo <= hi, got lo = {lo}, hi = {hi}"
            )));
        }
        Ok(Clamp {
            lo,
            hi,
            _t: Default::default(),
        })
    }
    pub fn lo(&self) -> f64 {
        self.lo
    }
    pub fn hi(&self) -> f64 {
        self.hi
    }
}

impl<T: Real> Layer<T> for Clamp<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let (lo, hi) = (T::of_f64(self.lo), T::of_f64(self.hi));
        let xs = cont(x);
        // SAFETY: map_into writes every element.
        let mut y = unsafe { arena::output_uninit(x.shape()) };
        map_into(&xs, y.as_slice_mut().expect("fresh"), |v| {
            if v < lo {
                lo
            } else if v > hi {
                hi
            } else {
                v
            }
        });
        Ok(y)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        check_dy("Clamp", x, dy)?;
        let (lo, hi) = (T::of_f64(self.lo), T::of_f64(self.hi));
        let (xs, gs) = (cont(x), cont(dy));
        // SAFETY: zip_map_into writes every element.
        let mut dx = unsafe { arena::output_uninit(x.shape()) };
        zip_map_into(&xs, &gs, dx.as_slice_mut().expect("fresh"), |v, g| {
            // hardtanh_backward: (x <= lo || x >= hi) ? 0 : dy (a NaN lets dy through)
            if v <= lo || v >= hi {
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
        format!("Hardtanh(min_val={}, max_val={})", self.lo, self.hi)
    }
}

/// Softmax over the last dimension, as `nn.Softmax(dim=-1)`: the maximum is subtracted first and the sum of
/// exponentials is accumulated in f64.
#[derive(Debug, Clone, Default)]
pub struct Softmax<T: Real = f32> {
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> Softmax<T> {
    pub fn new() -> Self {
        Self::default()
    }
}

fn softmax_rows<T: Real>(x: &[T], y: &mut [T], k: usize) {
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(k)) {
        let m = xr.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.as_f64()));
        let s: f64 = xr.iter().map(|v| (v.as_f64() - m).exp()).sum();
        for (o, v) in yr.iter_mut().zip(xr) {
            *o = T::of_f64((v.as_f64() - m).exp() / s);
        }
    }
}

impl<T: Real> Layer<T> for Softmax<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let k = *self.output_shape(x.shape())?.last().expect("rank >= 1");
        let xs = cont(x);
        // SAFETY: softmax_rows writes every element (k > 0 rows cover the buffer; k = 0 means no elements).
        let mut y = unsafe { arena::output_uninit(x.shape()) };
        if k > 0 {
            softmax_rows(&xs, y.as_slice_mut().expect("fresh"), k);
        }
        Ok(y)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        check_dy("Softmax", x, dy)?;
        let k = *x.shape().last().unwrap_or(&0);
        let (xs, gs) = (cont(x), cont(dy));
        let mut y = vec![T::zero(); xs.len()];
        // SAFETY: the loop writes every element.
        let mut dx = unsafe { arena::output_uninit(x.shape()) };
        if k > 0 {
            softmax_rows(&xs, &mut y, k);
            let out = dx.as_slice_mut().expect("fresh");
            for ((yr, gr), o) in y
                .chunks_exact(k)
                .zip(gs.chunks_exact(k))
                .zip(out.chunks_exact_mut(k))
            {
                let dot: f64 = yr
                    .iter()
                    .zip(gr)
                    .map(|(a, b)| a.as_f64() * b.as_f64())
                    .sum();
                for ((o, a), g) in o.iter_mut().zip(yr).zip(gr) {
                    *o = T::of_f64(a.as_f64() * (g.as_f64() - dot));
                }
            }
        }
        Ok(dx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if input.is_empty() {
            return Err(NvError::Rank {
                layer: "Softmax",
                expected: "rank >= 1".into(),
                got: vec![],
            });
        }
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        "Softmax(dim=-1)".into()
    }
}

/// (N, *) → (N, *shape): `x.reshape(N, *shape)`, the batch dimension kept.
#[derive(Debug, Clone)]
pub struct Reshape<T: Real = f32> {
    shape: Vec<usize>,
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> Reshape<T> {
    /// `shape`: the per-sample shape of the output.
    pub fn new(shape: Vec<usize>) -> Self {
        Reshape {
            shape,
            _t: Default::default(),
        }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
}

impl<T: Real> Layer<T> for Reshape<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let s = self.output_shape(x.shape())?;
        Ok(reshaped(x, &s))
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        check_output_grad("Reshape", dy.shape(), &self.output_shape(x.shape())?)?;
        Ok(reshaped(dy, x.shape()))
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let per: usize = input.iter().skip(1).product();
        let want = self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if input.is_empty() || want != Some(per) {
            return Err(NvError::Shape {
                layer: "Reshape",
                msg: format!(
                    "cannot reshape an input of shape {input:?} to (N, {:?})",
                    self.shape
                ),
            });
        }
        let mut s = vec![input[0]];
        s.extend_from_slice(&self.shape);
        Ok(s)
    }
    fn name(&self) -> String {
        format!("Reshape(-1, {:?})", self.shape)
    }
}

stateless!(ReLU, Sigmoid, Flatten, Clamp, Softmax, Reshape);
