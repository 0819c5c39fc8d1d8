//! Folding a per-output affine `z = y·a + b` that follows a layer (an eval-mode BatchNorm) into the layer's
//! weights and bias: `W'[o] = a[o]·W[o]`, `bias'[o] = a[o]·bias[o] + b[o]` (a bias is created when there was
//! none), computed in f64 and rounded once. Shared by [`super::Conv2d`] and [`super::Linear`], whose weights
//! are both output-major.

use crate::param::ParamRole;
use crate::{Param, Real};

/// Folds `(a, b)` (one entry per output, lengths checked by the caller) into `weight` (output-major) and `bias`.
pub(crate) fn fold_affine<T: Real>(
    weight: &mut Param<T>,
    bias: &mut Option<Param<T>>,
    a: &[f64],
    b: &[f64],
) {
    let o = a.len();
    let per = weight.len() / o;
    for (k, w) in weight.value.iter_mut().enumerate() {
        *w = T::of_f64(w.as_f64() * a[k / per]);
    }
    let old: Vec<f64> = match bias {
        Some(p) => p.value.iter().map(|v| v.as_f64()).collect(),
        None => vec![0.0; o],
    };
    let nb = ndarray::Array1::from_iter((0..o).map(|i| T::of_f64(old[i] * a[i] + b[i]))).into_dyn();
    match bias.as_mut() {
        Some(p) => p.value = nb,
        None => *bias = Some(Param::new(nb).with_role(ParamRole::Bias)),
    }
}
