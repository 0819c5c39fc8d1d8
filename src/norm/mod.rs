//! The normalization family. One file (or folder) per layer; every layer implements [`crate::Layer`], with
//! explicit train/eval modes ([`crate::Ctx`]), PyTorch's state-dict names and configs with PyTorch's defaults.
//!
//! | layer | statistics over | train | eval |
//! |---|---|---|---|
//! | [`BatchNorm`] | (N, *spatial) per channel | batch stats, running stats updated | running stats |
//! | [`FrozenBatchNorm`] | — | fixed affine | fixed affine |
//! | [`GroupNorm`] | (C/G, *spatial) per sample and group | same in both | same in both |
//! | [`LayerNorm`] | trailing `normalized_shape` per sample | same in both | same in both |
//! | [`InstanceNorm`] | (*spatial) per sample and channel | instance stats | running stats if tracked |
//! | [`BatchChannelNorm`] | BN part per channel + LN part per sample | batch stats | running stats (BN part) |
//! | [`BatchRenorm`] | (N, *spatial) per channel, corrected by r and d toward the running stats | batch stats · r + d | running stats |
//! | [`GhostBatchNorm`] | (virtual batch, *spatial) per channel | per virtual batch | running stats |
//! | [`SyncBatchNorm`] | (N, *spatial) per channel over every rank's batch | global batch stats | running stats |

pub mod batch;
pub mod bcn;
mod buffers;
pub mod frozen;
pub mod ghost;
pub mod group;
pub(crate) mod group_kernels;
pub mod instance;
pub mod layer;
pub mod renorm;
pub mod sync;

pub use batch::{BatchNorm, BatchNormConfig, BnFusion, Convention};
pub use bcn::{BatchChannelNorm, BatchChannelNormConfig};
pub use frozen::{FrozenBatchNorm, FrozenBatchNormConfig};
pub use ghost::{GhostBatchNorm, GhostBatchNormConfig};
pub use group::{GroupNorm, GroupNormConfig};
pub use instance::{InstanceNorm, InstanceNormConfig};
pub use layer::{LayerNorm, LayerNormConfig};
pub use renorm::{BatchRenorm, BatchRenormConfig, RenormSchedule};
pub use sync::SyncBatchNorm;

use crate::{Ctx, NvError, Real, Result};
use ndarray::{ArrayD, ArrayViewD};

pub(crate) fn check_eps(eps: f64) -> Result<()> {
    if !(eps > 0.0) || !eps.is_finite() {
        return Err(NvError::Config(format!(
            "eps must be a finite number > 0, got {eps}"
        )));
    }
    Ok(())
}

pub(crate) fn check_momentum(m: Option<f64>) -> Result<()> {
    if let Some(m) = m {
        if !(0.0..=1.0).contains(&m) {
            return Err(NvError::Config(format!(
                "momentum must lie in [0, 1], got {m}"
            )));
        }
    }
    Ok(())
}

/// Optional parameter → optional slice.
pub(crate) fn pslice<T: Real>(p: &Option<crate::Param<T>>) -> Option<&[T]> {
    p.as_ref().map(|p| p.values())
}

/// What every normalization layer offers beyond [`crate::Layer`]: its passes into caller-owned buffers (as
/// PyTorch's `out=` kernels) and its running statistics, so that code can handle any norm alike (`--norm`).
///
/// ```
/// use normvision::norm::{BatchNormConfig, GroupNormConfig, NormLayer};
/// let norms: Vec<Box<dyn NormLayer<f32>>> = vec![
///     Box::new(BatchNormConfig::d2(8).build().unwrap()),
///     Box::new(GroupNormConfig::new(2, 8).build().unwrap()),
/// ];
/// assert!(norms[0].running_stats().is_some());
/// assert!(norms[1].running_stats().is_none());
/// ```
pub trait NormLayer<T: Real>: crate::Layer<T> {
    /// The forward into a caller-owned buffer of x's number of elements.
    fn forward_into(&mut self, x: ArrayViewD<T>, y: &mut [T], ctx: Ctx) -> Result<()>;
    /// The backward into a caller-owned buffer of x's number of elements; accumulates the parameter gradients.
    /// `ctx`'s mode must be the forward's.
    fn backward_into(
        &mut self,
        x: ArrayViewD<T>,
        dy: ArrayViewD<T>,
        dx: &mut [T],
        ctx: Ctx,
    ) -> Result<()>;
    /// (running_mean, running_var), for a norm that keeps them (BatchNorm, InstanceNorm with
    /// `track_running_stats`, Batch-Channel Norm's BN part, FrozenBatchNorm's fixed ones).
    fn running_stats(&self) -> Option<(&ArrayD<T>, &ArrayD<T>)>;
}

/// [`Layer::forward`](crate::Layer::forward) of this crate's norms: [`NormLayer::forward_into`] a fresh output.
/// Crate-private: it relies on the crate's own norms writing every element of the output.
pub(crate) fn forward_new<T: Real>(
    l: &mut impl NormLayer<T>,
    x: &ArrayD<T>,
    ctx: Ctx,
) -> Result<ArrayD<T>> {
    // SAFETY: every norm of this crate writes each element of y in forward_into (or fails).
    let mut y = unsafe { crate::kernels::arena::output_uninit(x.shape()) };
    l.forward_into(x.view(), y.as_slice_mut().expect("fresh array"), ctx)?;
    Ok(y)
}

/// [`Layer::backward`](crate::Layer::backward) of this crate's norms: [`NormLayer::backward_into`] a fresh dx.
pub(crate) fn backward_new<T: Real>(
    l: &mut impl NormLayer<T>,
    x: &ArrayD<T>,
    dy: &ArrayD<T>,
    ctx: Ctx,
) -> Result<ArrayD<T>> {
    // SAFETY: every norm of this crate writes each element of dx in backward_into (or fails).
    let mut dx = unsafe { crate::kernels::arena::output_uninit(x.shape()) };
    l.backward_into(
        x.view(),
        dy.view(),
        dx.as_slice_mut().expect("fresh array"),
        ctx,
    )?;
    Ok(dx)
}

/// What a norm's eval pass computes with, y = (x - m)·a + b per channel (in `T`): m = running mean, a =
/// weight·(1/sqrt(running_var + eps)) rounded once (PyTorch's and torchvision's scale), b = bias; with the exact
/// invstd in f64 (for dweight). Subtracting the mean first keeps the output exact to f32 rounding when
/// |mean| ≫ std, where PyTorch's x·a + (bias − mean·a) loses the low bits of x·a.
pub(crate) fn running_affine<T: Real>(
    rm: &[T],
    rv: &[T],
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>, Vec<f64>) {
    let inv: Vec<f64> = rv.iter().map(|v| 1.0 / (v.as_f64() + eps).sqrt()).collect();
    let a = inv
        .iter()
        .enumerate()
        .map(|(c, i)| T::of_f64(weight.map_or(1.0, |w| w[c].as_f64()) * i))
        .collect();
    let b = match bias {
        Some(b) => b.to_vec(),
        None => vec![T::zero(); inv.len()],
    };
    (rm.to_vec(), a, b, inv)
}

/// A normalization's eval-mode output as a per-channel affine, y = x·scale + shift, in f64: what an inference plan
/// applies in a preceding convolution's output pass (rounded to the layer's element type) and what BN folding
/// absorbs into the convolution's weights. The layer's own eval pass computes (x − mean)·scale + bias instead
/// (`running_affine`), which stays exact when |mean| ≫ std; see `model::graph::plan::fusions::fold` for the
/// bound of this form.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalAffine {
    pub scale: Vec<f64>,
    pub shift: Vec<f64>,
}

impl EvalAffine {
    /// scale = weight·(1/sqrt(var + eps)), shift = bias − mean·scale (weight 1 and bias 0 when absent): PyTorch's
    /// and torchvision's `w·rsqrt(v + eps)`, rounded once.
    pub(crate) fn from_stats<T: Real>(
        mean: impl Iterator<Item = f64>,
        var: impl Iterator<Item = f64>,
        weight: Option<&[T]>,
        bias: Option<&[T]>,
        eps: f64,
    ) -> EvalAffine {
        let (mut scale, mut shift) = (vec![], vec![]);
        for (c, (m, v)) in mean.zip(var).enumerate() {
            let invstd = 1.0 / (v + eps).sqrt();
            let a = weight.map_or(1.0, |w| w[c].as_f64()) * invstd;
            scale.push(a);
            shift.push(bias.map_or(0.0, |b| b[c].as_f64()) - m * a);
        }
        EvalAffine { scale, shift }
    }

    /// (scale, shift) rounded to `T`: what the layer's eval forward computes with.
    pub fn to_real<T: Real>(&self) -> (Vec<T>, Vec<T>) {
        (
            self.scale.iter().map(|&v| T::of_f64(v)).collect(),
            self.shift.iter().map(|&v| T::of_f64(v)).collect(),
        )
    }

    pub fn channels(&self) -> usize {
        self.scale.len()
    }
}
