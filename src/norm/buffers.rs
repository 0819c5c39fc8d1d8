//! The state-dict plumbing every normalization layer shares: the optional affine parameters (`weight`, `bias`)
//! and the running-statistics buffers (`running_mean`, `running_var`, `num_batches_tracked`), under PyTorch's names.

use crate::param::ParamRole;
use crate::state::{join, StateDict};
use crate::{Param, Real, Result};
use ndarray::{ArrayD, IxDyn};

/// PyTorch's initial affine parameters of `c` channels, when the layer has them: weight 1, bias 0.
pub(crate) fn new_affine<T: Real>(c: usize, affine: bool) -> (Option<Param<T>>, Option<Param<T>>) {
    if !affine {
        return (None, None);
    }
    (
        Some(Param::filled(&[c], T::one()).with_role(ParamRole::NormWeight)),
        Some(Param::filled(&[c], T::zero()).with_role(ParamRole::NormBias)),
    )
}

/// PyTorch's initial running statistics of `c` channels, when the layer tracks them: mean 0, variance 1.
pub(crate) fn new_running<T: Real>(
    c: usize,
    track: bool,
) -> (Option<ArrayD<T>>, Option<ArrayD<T>>) {
    if !track {
        return (None, None);
    }
    (
        Some(ArrayD::zeros(IxDyn(&[c]))),
        Some(ArrayD::from_elem(IxDyn(&[c]), T::one())),
    )
}

/// Writes whichever of `weight` and `bias` exist.
pub(crate) fn save_affine<T: Real>(
    prefix: &str,
    w: &Option<Param<T>>,
    b: &Option<Param<T>>,
    sd: &mut StateDict,
) {
    if let Some(w) = w {
        sd.insert_float(join(prefix, "weight"), &w.value);
    }
    if let Some(b) = b {
        sd.insert_float(join(prefix, "bias"), &b.value);
    }
}

/// Reads whichever of `weight` and `bias` the layer has; a missing key or a wrong shape is an error.
pub(crate) fn load_affine<T: Real>(
    prefix: &str,
    w: &mut Option<Param<T>>,
    b: &mut Option<Param<T>>,
    sd: &StateDict,
) -> Result<()> {
    if let Some(w) = w {
        sd.load_float(&join(prefix, "weight"), &mut w.value)?;
    }
    if let Some(b) = b {
        sd.load_float(&join(prefix, "bias"), &mut b.value)?;
    }
    Ok(())
}

/// Visits whichever of `weight` and `bias` exist.
pub(crate) fn visit_affine<T: Real>(
    prefix: &str,
    w: &mut Option<Param<T>>,
    b: &mut Option<Param<T>>,
    f: &mut dyn FnMut(&str, &mut Param<T>),
) {
    if let Some(w) = w {
        f(&join(prefix, "weight"), w);
    }
    if let Some(b) = b {
        f(&join(prefix, "bias"), b);
    }
}

/// Writes the running statistics when the layer tracks them.
pub(crate) fn save_running<T: Real>(
    prefix: &str,
    rm: &Option<ArrayD<T>>,
    rv: &Option<ArrayD<T>>,
    tracked: i64,
    sd: &mut StateDict,
) {
    if let (Some(rm), Some(rv)) = (rm, rv) {
        sd.insert_float(join(prefix, "running_mean"), rm);
        sd.insert_float(join(prefix, "running_var"), rv);
        sd.insert_i64(join(prefix, "num_batches_tracked"), tracked);
    }
}

/// Reads the running statistics when the layer tracks them, returning `num_batches_tracked` (0 when the
/// state dict predates that buffer, as PyTorch does for old checkpoints).
pub(crate) fn load_running<T: Real>(
    prefix: &str,
    rm: &mut Option<ArrayD<T>>,
    rv: &mut Option<ArrayD<T>>,
    tracked: &mut i64,
    sd: &StateDict,
) -> Result<()> {
    if let (Some(rm), Some(rv)) = (rm, rv) {
        sd.load_float(&join(prefix, "running_mean"), rm)?;
        sd.load_float(&join(prefix, "running_var"), rv)?;
        *tracked = sd
            .load_i64(&join(prefix, "num_batches_tracked"))
            .unwrap_or(0);
    }
    Ok(())
}
