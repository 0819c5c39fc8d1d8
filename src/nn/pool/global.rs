//! Global average pooling: (N, C, H, W) → (N, C), as `adaptive_avg_pool2d(x, 1).flatten(1)`.

use crate::kernels::elementwise::{sum_f64, PAR_MIN};
use crate::kernels::shape::check_output_grad;
use crate::kernels::shape::contiguous as cont;
use crate::kernels::shape::{check_nonempty, check_rank};
use crate::layer::Layer;
use crate::nn::stateless;
use crate::{Ctx, Real, Result};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

/// Mean over the spatial dimensions: (N, C, H, W) → (N, C).
#[derive(Debug, Clone, Default)]
pub struct GlobalAvgPool<T: Real = f32> {
    _t: std::marker::PhantomData<T>,
}

impl<T: Real> GlobalAvgPool<T> {
    pub const NAME: &'static str = "GlobalAvgPool";

    pub fn new() -> Self {
        GlobalAvgPool {
            _t: std::marker::PhantomData,
        }
    }

    fn check(shape: &[usize]) -> Result<(usize, usize)> {
        check_rank(Self::NAME, shape, 4, "4-D (N, C, H, W)")?;
        check_nonempty(Self::NAME, shape)?;
        Ok((shape[0] * shape[1], shape[2] * shape[3]))
    }

    fn forward_impl(&mut self, x: &ArrayD<T>) -> Result<ArrayD<T>> {
        let (planes, hw) = Self::check(x.shape())?;
        let xs = cont(x);
        let mut y = ArrayD::zeros(IxDyn(&x.shape()[..2]));
        let ys = y.as_slice_mut().expect("fresh");
        let mean = |(yv, xp): (&mut T, &[T])| {
            *yv = T::of_f64(sum_f64(xp) / hw as f64);
        };
        if planes * hw >= PAR_MIN {
            ys.par_iter_mut().zip(xs.par_chunks(hw)).for_each(mean);
        } else {
            ys.iter_mut().zip(xs.chunks(hw)).for_each(mean);
        }
        Ok(y)
    }

    fn backward_impl(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>) -> Result<ArrayD<T>> {
        let (planes, hw) = Self::check(x.shape())?;
        check_output_grad(Self::NAME, dy.shape(), &x.shape()[..2])?;
        let gs = cont(dy);
        let mut dx = ArrayD::zeros(x.raw_dim());
        let dxs = dx.as_slice_mut().expect("fresh");
        let spread = |(dp, &g): (&mut [T], &T)| dp.fill(T::of_f64(g.as_f64() / hw as f64));
        if planes * hw >= PAR_MIN {
            dxs.par_chunks_mut(hw).zip(gs.par_iter()).for_each(spread);
        } else {
            dxs.chunks_mut(hw).zip(gs.iter()).for_each(spread);
        }
        Ok(dx)
    }
}

impl<T: Real> Layer<T> for GlobalAvgPool<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        self.forward_impl(x)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        self.backward_impl(x, dy)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Self::check(input)?;
        Ok(input[..2].to_vec())
    }
    fn name(&self) -> String {
        "GlobalAvgPool".into()
    }
}

stateless!(GlobalAvgPool);
