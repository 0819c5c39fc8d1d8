//! `nn.AvgPool2d`, with `count_include_pad` and `divisor_override`.

use super::{check_cfg, for_planes, geom, Geom};
use crate::kernels::elementwise::PAR_MIN;
use crate::kernels::shape::check_output_grad;
use crate::kernels::shape::contiguous as cont;
use crate::layer::Layer;
use crate::nn::{stateless, IntoPair};
use crate::{Ctx, NvError, Real, Result};
use ndarray::{ArrayD, IxDyn};

/// `nn.AvgPool2d` configuration (stride defaults to the kernel size, `count_include_pad` to true).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AvgPool2dConfig {
    pub kernel_size: (usize, usize),
    pub stride: Option<(usize, usize)>,
    pub padding: (usize, usize),
    pub ceil_mode: bool,
    pub count_include_pad: bool,
    pub divisor_override: Option<usize>,
}

impl AvgPool2dConfig {
    pub fn new(kernel_size: impl IntoPair) -> Self {
        AvgPool2dConfig {
            kernel_size: kernel_size.pair(),
            stride: None,
            padding: (0, 0),
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        }
    }
    pub fn stride(mut self, s: impl IntoPair) -> Self {
        self.stride = Some(s.pair());
        self
    }
    pub fn padding(mut self, p: impl IntoPair) -> Self {
        self.padding = p.pair();
        self
    }
    pub fn ceil_mode(mut self, c: bool) -> Self {
        self.ceil_mode = c;
        self
    }
    pub fn count_include_pad(mut self, c: bool) -> Self {
        self.count_include_pad = c;
        self
    }
    pub fn divisor_override(mut self, d: Option<usize>) -> Self {
        self.divisor_override = d;
        self
    }
    pub fn build<T: Real>(self) -> Result<AvgPool2d<T>> {
        AvgPool2d::new(self)
    }
}

/// Average pooling (stateless).
#[derive(Debug, Clone)]
pub struct AvgPool2d<T: Real = f32> {
    cfg: AvgPool2dConfig,
    _t: std::marker::PhantomData<T>,
}

/// A window clipped to the image, and its divisor.
struct Window {
    h0: usize,
    h1: usize,
    w0: usize,
    w1: usize,
    div: f64,
}

impl<T: Real> AvgPool2d<T> {
    pub const NAME: &'static str = "AvgPool2d";

    pub fn new(cfg: AvgPool2dConfig) -> Result<Self> {
        let s = cfg.stride.unwrap_or(cfg.kernel_size);
        check_cfg(Self::NAME, cfg.kernel_size, s, cfg.padding, (1, 1))?;
        if cfg.divisor_override == Some(0) {
            return Err(NvError::Config(
                "AvgPool2d: divisor must be not zero".into(),
            ));
        }
        Ok(AvgPool2d {
            cfg,
            _t: std::marker::PhantomData,
        })
    }

    fn geom(&self, shape: &[usize]) -> Result<Geom> {
        let c = &self.cfg;
        geom(
            Self::NAME,
            shape,
            c.kernel_size,
            c.stride.unwrap_or(c.kernel_size),
            c.padding,
            (1, 1),
            c.ceil_mode,
        )
    }

    pub fn config(&self) -> &AvgPool2dConfig {
        &self.cfg
    }

    /// PyTorch's window and divisor for output (oh, ow); `None` if the clipped window is empty.
    fn window(&self, g: &Geom, oh: usize, ow: usize) -> Option<Window> {
        let h0 = (oh * g.sh) as isize - g.ph as isize;
        let w0 = (ow * g.sw) as isize - g.pw as isize;
        let h1 = (h0 + g.kh as isize).min((g.h + g.ph) as isize);
        let w1 = (w0 + g.kw as isize).min((g.w + g.pw) as isize);
        let pool = ((h1 - h0) * (w1 - w0)) as f64;
        let (h0, w0) = (h0.max(0) as usize, w0.max(0) as usize);
        let (h1, w1) = (h1.min(g.h as isize) as usize, w1.min(g.w as isize) as usize);
        if h0 >= h1 || w0 >= w1 {
            return None;
        }
        let div = match self.cfg.divisor_override {
            Some(d) => d as f64,
            None if self.cfg.count_include_pad => pool,
            None => ((h1 - h0) * (w1 - w0)) as f64,
        };
        Some(Window {
            h0,
            h1,
            w0,
            w1,
            div,
        })
    }

    fn forward_impl(&mut self, x: &ArrayD<T>) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        let s = x.shape();
        let mut y = ArrayD::zeros(IxDyn(&[s[0], s[1], g.oh, g.ow]));
        let xs = cont(x);
        let big = g.planes * g.hw() >= PAR_MIN;
        let plane = |xp: &[T], yp: &mut [T], _: &mut [()]| {
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    yp[oh * g.ow + ow] = match self.window(&g, oh, ow) {
                        None => T::zero(),
                        Some(wd) => {
                            let mut acc = 0.0;
                            for ih in wd.h0..wd.h1 {
                                for &v in &xp[ih * g.w + wd.w0..ih * g.w + wd.w1] {
                                    acc += v.as_f64();
                                }
                            }
                            T::of_f64(acc / wd.div)
                        }
                    };
                }
            }
        };
        for_planes(
            big,
            &xs,
            g.hw(),
            y.as_slice_mut().expect("fresh"),
            g.ohw(),
            &mut [],
            0,
            plane,
        );
        Ok(y)
    }

    fn backward_impl(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>) -> Result<ArrayD<T>> {
        let g = self.geom(x.shape())?;
        let s = x.shape();
        check_output_grad(Self::NAME, dy.shape(), &[s[0], s[1], g.oh, g.ow])?;
        let gs = cont(dy);
        let mut dx = ArrayD::zeros(x.raw_dim());
        let big = g.planes * g.hw() >= PAR_MIN;
        let plane = |gp: &[T], dxp: &mut [T], _: &mut [()]| {
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    if let Some(wd) = self.window(&g, oh, ow) {
                        let v = T::of_f64(gp[oh * g.ow + ow].as_f64() / wd.div);
                        for ih in wd.h0..wd.h1 {
                            for d in &mut dxp[ih * g.w + wd.w0..ih * g.w + wd.w1] {
                                *d = *d + v;
                            }
                        }
                    }
                }
            }
        };
        for_planes(
            big,
            &gs,
            g.ohw(),
            dx.as_slice_mut().expect("fresh"),
            g.hw(),
            &mut [],
            0,
            plane,
        );
        Ok(dx)
    }
}

impl<T: Real> Layer<T> for AvgPool2d<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        self.forward_impl(x)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        self.backward_impl(x, dy)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let g = self.geom(input)?;
        Ok(vec![input[0], input[1], g.oh, g.ow])
    }
    fn name(&self) -> String {
        let c = &self.cfg;
        format!(
            "AvgPool2d(kernel_size={:?}, stride={:?}, padding={:?}, ceil_mode={}, count_include_pad={})",
            c.kernel_size,
            c.stride.unwrap_or(c.kernel_size),
            c.padding,
            c.ceil_mode,
            c.count_include_pad
        )
    }
}

stateless!(AvgPool2d);
