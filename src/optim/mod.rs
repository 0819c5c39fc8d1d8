//! Optimizers (SGD with momentum/Nesterov, AdamW) reproducing `torch.optim`'s update arithmetic in `f32`,
//! and learning-rate schedules.
//!
//! An optimizer reaches the parameters by visiting the model ([`Stateful::visit_params`]) and keeps its state
//! keyed by parameter name, so it can be saved next to the model's state dict and resumed:
//!
//! | key | tensor |
//! |---|---|
//! | `optim.step` | int64 scalar: number of `step()` calls |
//! | `optim.<param>.momentum_buffer` | SGD momentum buffer (absent until the first step, as in PyTorch) |
//! | `optim.<param>.exp_avg`, `optim.<param>.exp_avg_sq` | AdamW moments |
//! | `optim.<param>.step` | AdamW per-parameter step count (PyTorch's `state[p]["step"]`) |

pub mod adamw;
pub mod schedule;
pub mod sgd;

pub use adamw::AdamW;
pub use schedule::{LrSchedule, Schedule};
pub use sgd::Sgd;

use crate::state::{StateDict, StateTensor, Stateful};
use crate::{NvError, Param, ParamRole, Result};
use serde::{Deserialize, Serialize};

/// The prefix of every optimizer key in a state dict.
pub const PREFIX: &str = "optim";

/// A first-order optimizer over the parameters of a [`Stateful`] model.
pub trait Optimizer: Send {
    /// One update of every parameter from its accumulated gradient with learning rate `lr` (the schedule's,
    /// [`LrSchedule::lr_at`]). Does not zero the gradients. A saved state whose shape does not match the
    /// parameter is an [`NvError::State`].
    fn step(&mut self, model: &mut dyn Stateful<f32>, lr: f64) -> Result<()>;
    /// Sets the momentum (SGD) or beta1 (AdamW), for one-cycle momentum cycling.
    fn set_momentum(&mut self, momentum: f64);
    /// Number of completed `step()` calls.
    fn steps(&self) -> u64;
    /// The optimizer state under `optim.*` keys.
    fn state_dict(&self) -> StateDict;
    /// Replaces the state with the one in `sd` (other keys are ignored). Unknown `optim.*` keys or wrong
    /// tensor types are an error; shapes are checked against the parameters at the next `step`.
    fn load_state_dict(&mut self, sd: &StateDict) -> Result<()>;
    /// `"sgd"` or `"adamw"`.
    fn name(&self) -> &'static str;
}

/// Which parameters weight decay applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecayPolicy {
    /// Every parameter (PyTorch's default single param group).
    #[default]
    All,
    /// Skip biases and normalization parameters, by the role their layer declares ([`ParamRole`]).
    ExcludeNormAndBias,
}

impl DecayPolicy {
    /// Whether weight decay applies to a parameter of this role.
    pub fn applies(self, role: ParamRole) -> bool {
        match self {
            DecayPolicy::All => true,
            DecayPolicy::ExcludeNormAndBias => !role.is_norm_or_bias(),
        }
    }
}

/// Errors unless the learning rate is finite and non-negative (PyTorch's check).
pub(crate) fn check_lr(lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(NvError::Config(format!("Invalid learning rate: {lr}")));
    }
    Ok(())
}

/// Serializable optimizer choice; [`OptimConfig::build`] makes the optimizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimConfig {
    Sgd(sgd::SgdConfig),
    Adamw(adamw::AdamWConfig),
}

impl OptimConfig {
    pub fn build(&self) -> Result<Box<dyn Optimizer>> {
        Ok(match self {
            OptimConfig::Sgd(c) => Box::new(Sgd::new(c.clone())?),
            OptimConfig::Adamw(c) => Box::new(AdamW::new(c.clone())?),
        })
    }
}

pub(crate) fn key(param: &str, what: &str) -> String {
    format!("{PREFIX}.{param}.{what}")
}

/// Splits `optim.<param>.<what>` into `(param, what)` for `what` in `known`; `optim.step` gives `None`.
pub(crate) fn parse_key<'a>(k: &'a str, known: &[&'a str]) -> Result<Option<(&'a str, &'a str)>> {
    let rest = match k.strip_prefix("optim.") {
        Some(r) => r,
        None => return Ok(None),
    };
    if rest == "step" {
        return Ok(None);
    }
    for w in known {
        if let Some(p) = rest.strip_suffix(w).and_then(|p| p.strip_suffix('.')) {
            if !p.is_empty() {
                return Ok(Some((p, w)));
            }
        }
    }
    Err(NvError::State(format!(
        "unexpected optimizer key {k} (expected optim.step or optim.<param>.{{{}}})",
        known.join(",")
    )))
}

pub(crate) fn float_tensor<'a>(sd: &'a StateDict, k: &str) -> Result<&'a ndarray::ArrayD<f32>> {
    match sd.get(k) {
        Some(StateTensor::F32(a)) => Ok(a),
        Some(StateTensor::I64(_)) => Err(NvError::State(format!(
            "{k}: expected a float tensor, found int64"
        ))),
        None => Err(NvError::State(format!("missing key {k}"))),
    }
}

pub(crate) fn check_shape(name: &str, what: &str, state: &[usize], param: &[usize]) -> Result<()> {
    if state != param {
        return Err(NvError::State(format!(
            "{}: optimizer state has shape {state:?} but the parameter has shape {param:?}",
            key(name, what)
        )));
    }
    Ok(())
}

/// A plain list of named parameters that implements [`Stateful`]: handy for tests and for optimizing
/// free-standing tensors.
#[derive(Debug, Clone, Default)]
pub struct NamedParams(pub Vec<(String, Param<f32>)>);

impl Stateful<f32> for NamedParams {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        for (n, p) in &self.0 {
            sd.insert_float(crate::state::join(prefix, n), &p.value);
        }
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        for (n, p) in &mut self.0 {
            sd.load_float(&crate::state::join(prefix, n), &mut p.value)?;
        }
        Ok(())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<f32>)) {
        for (n, p) in &mut self.0 {
            f(&crate::state::join(prefix, n), p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_policy_goes_by_role() {
        use ParamRole::*;
        assert!(DecayPolicy::All.applies(NormWeight));
        for r in [Bias, NormWeight, NormBias] {
            assert!(!DecayPolicy::ExcludeNormAndBias.applies(r), "{r:?}");
        }
        assert!(DecayPolicy::ExcludeNormAndBias.applies(Weight));
    }

    #[test]
    fn key_parsing() {
        let known = ["exp_avg_sq", "exp_avg", "step"];
        assert_eq!(parse_key("optim.step", &known).unwrap(), None);
        assert_eq!(
            parse_key("optim.a.b.exp_avg_sq", &known).unwrap(),
            Some(("a.b", "exp_avg_sq"))
        );
        assert_eq!(
            parse_key("optim.fc.weight.exp_avg", &known).unwrap(),
            Some(("fc.weight", "exp_avg"))
        );
        assert_eq!(parse_key("fc.weight", &known).unwrap(), None);
        assert!(parse_key("optim.fc.weight.momentum_buffer", &known).is_err());
    }
}
