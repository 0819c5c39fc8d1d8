//! Fully connected layer (`nn.Linear`): y = x·Wᵀ + b over the last dimension.
//!
//! | | PyTorch `nn.Linear` | here |
//! |---|---|---|
//! | weight / bias | (out, in) / (out), `bias=True` | same (`weight`, `bias`) |
//! | input | (*, in) | same (rank ≥ 1; leading dimensions are flattened into rows) |
//! | init | kaiming_uniform(a=√5), bias U(±1/√in) | same ([`LinearConfig::build`]) |
//!
//! Backward: `dW += dyᵀ·x`, `db += Σ_rows dy`, `dx = dy·W`, each one GEMM (multi-threaded when large).

use super::init::Init;
use super::Layer;
use crate::kernels::gemm::{matmul, Op, Par};
use crate::kernels::shape::check_output_grad;
use crate::kernels::shape::contiguous;
use crate::param::ParamRole;
use crate::state::{join, StateDict, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

/// Configuration with PyTorch's defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinearConfig {
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

impl LinearConfig {
    pub fn new(in_features: usize, out_features: usize) -> Self {
        LinearConfig {
            in_features,
            out_features,
            bias: true,
        }
    }
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
    /// Builds the layer with PyTorch's default initialisation drawn from `rng`.
    pub fn build<T: Real>(self, rng: &mut impl rand::Rng) -> Result<Linear<T>> {
        let mut l = Linear::new(self)?;
        l.reset_parameters(Init::Default, 1.0, rng)?;
        Ok(l)
    }
}

/// A fully connected layer.
#[derive(Debug, Clone)]
pub struct Linear<T: Real = f32> {
    cfg: LinearConfig,
    weight: Param<T>,
    bias: Option<Param<T>>,
}

/// Multiply-adds above which a GEMM uses all threads.
const PAR_FLOPS: usize = 1 << 18;

/// `c (m×n) [+]= a (m×k) · op(b)` with the rows of a and c split between the threads, each part a sequential
/// product (`gemm`'s own parallel split was slower than one thread for the 128×3136 · 3136×128 products of the
/// reference CNN); sequential when the product is small.
#[allow(clippy::too_many_arguments)]
fn matmul_split_rows<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    b: &[T],
    op_b: Op,
    c: &mut [T],
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    if m == 1 && op_b == Op::T && threads > 1 && !matches!(par_for(m, n, k), Par::Seq) {
        // one row (inference at batch 1): a matrix-vector product that reads the whole weight matrix, so the
        // output columns (weight rows) are split instead, each thread reading its own part of W (which then
        // stays in that core's cache from call to call)
        let cols = n.div_ceil(threads).next_multiple_of(16).min(n);
        c[..n]
            .par_chunks_mut(cols)
            .zip(b[..n * k].par_chunks(cols * k))
            .for_each(|(cc, bc)| {
                matmul(
                    1,
                    cc.len(),
                    k,
                    a,
                    Op::N,
                    bc,
                    Op::T,
                    cc,
                    accumulate,
                    Par::Seq,
                );
            });
        return;
    }
    if matches!(par_for(m, n, k), Par::Seq) || threads < 2 || m < 2 * threads {
        return matmul(m, n, k, a, Op::N, b, op_b, c, accumulate, Par::Seq);
    }
    let rows = m.div_ceil(threads);
    c.par_chunks_mut(rows * n)
        .zip(a.par_chunks(rows * k))
        .for_each(|(cc, ac)| {
            let r = ac.len() / k;
            matmul(r, n, k, ac, Op::N, b, op_b, cc, accumulate, Par::Seq);
        });
}

fn par_for(m: usize, n: usize, k: usize) -> Par {
    if m * n * k >= PAR_FLOPS {
        Par::all()
    } else {
        Par::Seq
    }
}

impl<T: Real> Linear<T> {
    pub const NAME: &'static str = "Linear";

    /// Zero weight and bias; see [`LinearConfig::build`] for PyTorch's initialisation.
    pub fn new(cfg: LinearConfig) -> Result<Self> {
        if cfg.in_features == 0 || cfg.out_features == 0 {
            return Err(NvError::Config(format!(
                "Linear: in_features and out_features must be > 0, got {} and {}",
                cfg.in_features, cfg.out_features
            )));
        }
        Ok(Linear {
            weight: Param::filled(&[cfg.out_features, cfg.in_features], T::zero()),
            bias: cfg
                .bias
                .then(|| Param::filled(&[cfg.out_features], T::zero()).with_role(ParamRole::Bias)),
            cfg,
        })
    }

    pub fn config(&self) -> &LinearConfig {
        &self.cfg
    }
    pub fn weight(&self) -> &Param<T> {
        &self.weight
    }
    pub fn weight_mut(&mut self) -> &mut Param<T> {
        &mut self.weight
    }
    pub fn bias(&self) -> Option<&Param<T>> {
        self.bias.as_ref()
    }
    pub fn bias_mut(&mut self) -> Option<&mut Param<T>> {
        self.bias.as_mut()
    }

    /// Absorbs a following per-feature affine `z = y·a + b` (an eval-mode BatchNorm1d) into the weights and
    /// bias, as [`crate::nn::Conv2d::fold_affine`] does.
    pub fn fold_affine(&mut self, a: &[f64], b: &[f64]) -> Result<()> {
        let o = self.cfg.out_features;
        if a.len() != o || b.len() != o {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!("folding an affine of {} features into {o} outputs", a.len()),
            });
        }
        super::fold::fold_affine(&mut self.weight, &mut self.bias, a, b);
        self.cfg.bias = true;
        Ok(())
    }

    pub fn reset_parameters(
        &mut self,
        init: Init,
        scale: f64,
        rng: &mut impl rand::Rng,
    ) -> Result<()> {
        init.apply(&mut self.weight, self.bias.as_mut(), scale, rng)
    }

    /// Rows of the flattened input (product of the leading dimensions).
    fn rows(&self, shape: &[usize]) -> Result<usize> {
        let Some((&last, lead)) = shape.split_last() else {
            return Err(NvError::Rank {
                layer: Self::NAME,
                expected: "(*, in_features) (rank >= 1)".into(),
                got: shape.to_vec(),
            });
        };
        if last != self.cfg.in_features {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!(
                    "mat1 and mat2 shapes cannot be multiplied: input {shape:?} has {last} features in its last \
                     dimension, the layer expects in_features = {}",
                    self.cfg.in_features
                ),
            });
        }
        Ok(lead.iter().product())
    }

    pub fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T]) -> Result<()> {
        let m = self.rows(x.shape())?;
        let (k, n) = (self.cfg.in_features, self.cfg.out_features);
        if y.len() != m * n {
            return Err(NvError::Shape {
                layer: Self::NAME,
                msg: format!("output buffer has {} elements, expected {}", y.len(), m * n),
            });
        }
        let xs = contiguous(&x);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(n) {
                row.copy_from_slice(b.values());
            }
        }
        // y (m×n) = x (m×k) · Wᵀ, W stored (n×k). With several threads the rows are split between them,
        // each a sequential product: `gemm`'s own parallel split was slower than one thread here.
        let acc = self.bias.is_some();
        matmul_split_rows(m, n, k, &xs, self.weight.values(), Op::T, y, acc);
        Ok(())
    }

    /// Accumulates dweight, dbias; writes dx into `dx` when given.
    pub fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: Option<&mut [T]>,
    ) -> Result<()> {
        check_output_grad(Self::NAME, dy.shape(), &self.output_shape(x.shape())?)?;
        let m = self.rows(x.shape())?;
        let (k, n) = (self.cfg.in_features, self.cfg.out_features);
        if let Some(d) = &dx {
            if d.len() != m * k {
                return Err(NvError::Shape {
                    layer: Self::NAME,
                    msg: format!("dx buffer has {} elements, input {}", d.len(), m * k),
                });
            }
        }
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        if let Some(b) = self.bias.as_mut() {
            let mut acc = vec![0f64; n];
            for row in gs.chunks_exact(n) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v.as_f64();
                }
            }
            for (g, a) in b.grads_mut().iter_mut().zip(acc) {
                *g = *g + T::of_f64(a);
            }
        }
        // dW (n×k) += dyᵀ (n×m) · x (m×k); dy stored (m×n).
        matmul(
            n,
            k,
            m,
            &gs,
            Op::T,
            &xs,
            Op::N,
            self.weight.grads_mut(),
            true,
            par_for(m, n, k),
        );
        if let Some(dx) = dx {
            // dx (m×k) = dy (m×n) · W (n×k), rows split between threads as in the forward.
            matmul_split_rows(m, k, n, &gs, self.weight.values(), Op::N, dx, false);
        }
        Ok(())
    }
}

impl<T: Real> Layer<T> for Linear<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let shape = self.output_shape(x.shape())?;
        let mut y = ArrayD::zeros(IxDyn(&shape));
        self.forward_into(x.view(), y.as_slice_mut().expect("fresh array"))?;
        Ok(y)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let mut dx = ArrayD::zeros(x.raw_dim());
        self.backward_into(
            x.view(),
            dy.view(),
            Some(dx.as_slice_mut().expect("fresh array")),
        )?;
        Ok(dx)
    }
    fn backward_params(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<()> {
        self.backward_into(x.view(), dy.view(), None)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.rows(input)?;
        let mut s = input.to_vec();
        *s.last_mut().expect("rank >= 1") = self.cfg.out_features;
        Ok(s)
    }
    fn name(&self) -> String {
        format!(
            "Linear(in_features={}, out_features={}, bias={})",
            self.cfg.in_features,
            self.cfg.out_features,
            if self.cfg.bias { "True" } else { "False" }
        )
    }
}

impl<T: Real> Stateful<T> for Linear<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        sd.insert_float(join(prefix, "weight"), &self.weight.value);
        if let Some(b) = &self.bias {
            sd.insert_float(join(prefix, "bias"), &b.value);
        }
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        sd.load_float(&join(prefix, "weight"), &mut self.weight.value)?;
        if let Some(b) = self.bias.as_mut() {
            sd.load_float(&join(prefix, "bias"), &mut b.value)?;
        }
        Ok(())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        f(&join(prefix, "weight"), &mut self.weight);
        if let Some(b) = self.bias.as_mut() {
            f(&join(prefix, "bias"), b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// One row (inference at batch 1) splits the output columns over the threads: the products match an f64
    /// reference, with and without bias, for column counts that split evenly, unevenly, and below one part.
    #[test]
    fn one_row_split_by_columns_matches_the_f64_product() {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(3);
        for &(k, n, bias) in &[
            (3136, 128, true),
            (3136, 128, false),
            (2048, 130, true),
            (4096, 70, false),
        ] {
            let lin: Linear<f32> = LinearConfig::new(k, n).bias(bias).build(&mut rng).unwrap();
            let x = ArrayD::from_shape_fn(IxDyn(&[1, k]), |_| rng.gen::<f32>() * 2.0 - 1.0);
            let w = lin.weight.values();
            let want: Vec<f64> = (0..n)
                .map(|o| {
                    let b = lin.bias.as_ref().map_or(0.0, |b| b.values()[o] as f64);
                    b + (0..k)
                        .map(|i| w[o * k + i] as f64 * x[[0, i]] as f64)
                        .sum::<f64>()
                })
                .collect();
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let y = pool.install(|| lin.clone().forward(&x, Ctx::eval()).unwrap());
                for (o, (g, w)) in y.iter().zip(&want).enumerate() {
                    // f32 accumulation over k terms of size up to ~1/sqrt(k)
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * (k as f64).sqrt(),
                        "k {k} n {n} bias {bias}, {threads} threads, column {o}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
