//! Ghost Batch Normalization (Hoffer et al. 2017, arXiv:1705.08741): in training, a batch of N samples is split
//! into virtual ("ghost") batches of `ghost_batch` consecutive samples (the last one holds the remainder), and each
//! is batch-normalized with its own statistics and the shared γ and β. The running statistics are updated once per
//! virtual batch, in order. In eval mode the layer is a BatchNorm. With one virtual batch it is BatchNorm exactly.
//!
//! A ghost size larger than the batch is an error, as is a virtual batch of one value per channel. Kernels:
//! BatchNorm's fused training forward and backward ([`planes::train_forward`], [`planes::train_backward`]) on each
//! virtual batch, a contiguous slice of the (N, C, *) tensor.

use super::batch::planes;
use super::batch::stats::{BatchStats, Ncs};
use super::batch::{BatchNorm, BatchNormConfig};
use super::NormLayer;
use crate::kernels::shape::contiguous;
use crate::layer::Layer;
use crate::state::{StateDict, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::{ArrayD, ArrayViewD};

/// Ghost BN's configuration: a BatchNorm's (PyTorch's defaults) and the virtual batch size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GhostBatchNormConfig {
    pub bn: BatchNormConfig,
    /// Samples per virtual batch.
    pub ghost_batch: usize,
}

impl GhostBatchNormConfig {
    /// Virtual batches of `ghost_batch` samples over any (N, C, *) input.
    pub fn new(num_features: usize, ghost_batch: usize) -> Self {
        GhostBatchNormConfig {
            bn: BatchNormConfig::new(num_features),
            ghost_batch,
        }
    }
    /// For (N, C, H, W).
    pub fn d2(num_features: usize, ghost_batch: usize) -> Self {
        GhostBatchNormConfig {
            bn: BatchNormConfig::d2(num_features),
            ghost_batch,
        }
    }
    /// For (N, C) and (N, C, L).
    pub fn d1(num_features: usize, ghost_batch: usize) -> Self {
        GhostBatchNormConfig {
            bn: BatchNormConfig::d1(num_features),
            ghost_batch,
        }
    }
    pub fn build<T: Real>(self) -> Result<GhostBatchNorm<T>> {
        GhostBatchNorm::new(self)
    }
}

#[derive(Debug, Clone)]
struct Saved<T> {
    /// Each virtual batch's statistics, in order.
    stats: Vec<BatchStats<T>>,
    shape: Vec<usize>,
}

/// A Ghost Batch Normalization layer (see the module docs), under BatchNorm's state-dict names.
///
/// ```
/// use normvision::ndarray::{ArrayD, IxDyn};
/// use normvision::norm::GhostBatchNormConfig;
/// use normvision::{Ctx, Layer};
/// let mut gbn = GhostBatchNormConfig::d1(3, 4).build::<f32>().unwrap();
/// let x = ArrayD::from_shape_fn(IxDyn(&[8, 3]), |i| (i[0] * 3 + i[1]) as f32);
/// gbn.forward(&x, Ctx::train()).unwrap();
/// assert_eq!(gbn.batch_norm().num_batches_tracked(), 2); // one update per virtual batch
/// assert!(gbn.forward(&ArrayD::zeros(IxDyn(&[2, 3])), Ctx::train()).is_err()); // ghost size > batch
/// ```
#[derive(Debug, Clone)]
pub struct GhostBatchNorm<T: Real = f32> {
    cfg: GhostBatchNormConfig,
    bn: BatchNorm<T>,
    saved: Option<Saved<T>>,
}

impl<T: Real> GhostBatchNorm<T> {
    pub const NAME: &'static str = "GhostBatchNorm";

    pub fn new(cfg: GhostBatchNormConfig) -> Result<Self> {
        if cfg.ghost_batch == 0 {
            return Err(NvError::Config(
                "Ghost BN: the virtual batch size (--ghost-batch) must be at least 1".into(),
            ));
        }
        Ok(GhostBatchNorm {
            bn: cfg.bn.clone().build()?,
            cfg,
            saved: None,
        })
    }
    pub fn config(&self) -> &GhostBatchNormConfig {
        &self.cfg
    }
    pub fn ghost_batch(&self) -> usize {
        self.cfg.ghost_batch
    }
    /// The BatchNorm holding the parameters and running statistics (and computing the eval pass).
    pub fn batch_norm(&self) -> &BatchNorm<T> {
        &self.bn
    }
    pub fn batch_norm_mut(&mut self) -> &mut BatchNorm<T> {
        &mut self.bn
    }

    /// The virtual batches (start sample, samples) of a training batch of shape `shape`, or the error a training
    /// forward would raise: a batch smaller than the ghost size, or a virtual batch with one value per channel.
    pub fn virtual_batches(&self, shape: &[usize]) -> Result<Vec<(usize, usize)>> {
        let d = self.bn.dims(shape)?;
        let g = self.cfg.ghost_batch;
        if d.n < g {
            return Err(NvError::Config(format!(
                "Ghost BN: the virtual batch size {g} (--ghost-batch) is larger than the batch ({} samples, input {shape:?})",
                d.n
            )));
        }
        let chunks: Vec<(usize, usize)> =
            (0..d.n).step_by(g).map(|s| (s, g.min(d.n - s))).collect();
        if chunks.iter().any(|&(_, k)| k * d.s <= 1) {
            return Err(NvError::OneValuePerChannel {
                layer: Self::NAME,
                shape: shape.to_vec(),
            });
        }
        Ok(chunks)
    }
}

impl<T: Real> NormLayer<T> for GhostBatchNorm<T> {
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()> {
        if !ctx.mode().is_train() {
            self.saved = None;
            return self.bn.forward_into(x, y, ctx);
        }
        let shape = x.shape().to_vec();
        let chunks = self.virtual_batches(&shape)?;
        let d = self.bn.check_forward(Self::NAME, &shape, y.len())?;
        let xs = contiguous(&x);
        let per = d.c * d.s;
        let eps = self.cfg.bn.eps;
        let mut stats = Vec::with_capacity(chunks.len());
        for &(s, k) in &chunks {
            let dk = Ncs { n: k, ..d };
            let st = planes::train_forward(
                &xs[s * per..(s + k) * per],
                &mut y[s * per..(s + k) * per],
                dk,
                self.bn.weight().map(|p| p.values()),
                self.bn.bias().map(|p| p.values()),
                eps,
                false,
                ctx.kernels(),
            );
            if self.cfg.bn.track_running_stats {
                self.bn.update_running(&st.mean, &st.var, dk.m());
            }
            stats.push(st);
        }
        self.saved = Some(Saved { stats, shape });
        Ok(())
    }
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        ctx: Ctx,
    ) -> Result<()> {
        if !ctx.mode().is_train() {
            return self.bn.backward_into(x, dy, dx, ctx);
        }
        let d = self
            .bn
            .check_backward(Self::NAME, x.shape(), dy.shape(), dx.len())?;
        let Some(saved) = self.saved.as_ref().filter(|s| s.shape == x.shape()) else {
            return Err(NvError::NoSavedState {
                layer: Self::NAME,
                mode: ctx.mode(),
            });
        };
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        let per = d.c * d.s;
        let (mut dw, mut db) = (vec![0.0f64; d.c], vec![0.0f64; d.c]);
        let g = self.cfg.ghost_batch;
        for (i, st) in saved.stats.iter().enumerate() {
            let s = i * g;
            let k = st.count as usize / d.s;
            let r = s * per..(s + k) * per;
            let sums = planes::train_backward(
                &xs[r.clone()],
                &gs[r.clone()],
                &mut dx[r],
                Ncs { n: k, ..d },
                st,
                self.bn.weight().map(|p| p.values()),
                self.bn.bias().map(|p| p.values()),
                false,
                ctx.kernels(),
            );
            for c in 0..d.c {
                dw[c] += sums.dot[c] * st.invstd[c];
                db[c] += sums.sum_dy[c];
            }
        }
        self.bn.add_affine_grads(|c| dw[c], &db);
        Ok(())
    }
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)> {
        self.bn.running_stats()
    }
}

impl<T: Real> Layer<T> for GhostBatchNorm<T> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        super::forward_new(self, x, ctx)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, ctx: Ctx) -> Result<ArrayD<T>> {
        super::backward_new(self, x, dy, ctx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.bn.dims(input)?;
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        let c = &self.cfg.bn;
        format!(
            "GhostBatchNorm({}, ghost_batch={}, eps={}, momentum={})",
            c.num_features,
            self.cfg.ghost_batch,
            c.eps,
            c.momentum.map_or("None".to_string(), |m| m.to_string())
        )
    }
}

impl<T: Real> Stateful<T> for GhostBatchNorm<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.bn.save_state(prefix, sd)
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        self.saved = None;
        self.bn.load_state(prefix, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>)) {
        self.bn.visit_params(prefix, f)
    }
}
