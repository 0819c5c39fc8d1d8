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
use crate::{NvError, Param, Result};
use serde::{Deserialize, Serialize};

/// The prefix of every optimizer key in a state dict.
pub const PREFIX: &str = "optim";

/// A first-order optimizer over the parameters of a [`Stateful`] model.
pub trait Optimizer: Send {
    /// One update of every parameter from its accumulated gradient. Does not zero the gradients.
    /// A saved state whose shape does not match the parameter is an [`NvError::State`].
    fn step(&mut self, model: &mut dyn Stateful<f32>) -> Result<()>;
    /// The learning rate the next step uses.
    fn lr(&self) -> f64;
    /// Sets the learning rate (from a schedule, before each step).
    fn set_lr(&mut self, lr: f64);
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

/// Whether a parameter is exempt from weight decay when norm/bias exclusion is on.
///
/// The rule, by name (dotted PyTorch path) and number of dimensions:
/// * any parameter with `ndim <= 1` (biases, norm scales/shifts, BCN's `l`);
/// * any name whose last component is `bias`;
/// * any parameter of a normalization layer, recognised by a path component that contains `norm`
///   (`norm1`, `layernorm`, `group_norm`) or is `bn`/`gn`/`ln`/`bcn` optionally followed by digits
///   (`bn1`, `layer1.0.bn2`) — this catches multi-dimensional LayerNorm affine parameters.
///
/// Convolution and linear weights (`conv1.weight`, `fc.weight`, 2-D or more) decay.
pub fn is_no_decay(name: &str, ndim: usize) -> bool {
    if ndim <= 1 {
        return true;
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.last() == Some(&"bias") {
        return true;
    }
    parts[..parts.len().saturating_sub(1)].iter().any(|c| {
        let c = c.to_ascii_lowercase();
        if c.contains("norm") {
            return true;
        }
        ["bcn", "bn", "gn", "ln"].iter().any(|p| {
            c.strip_prefix(p)
                .is_some_and(|rest| rest.chars().all(|ch| ch.is_ascii_digit()))
        })
    })
}

/// Which parameters weight decay applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecayPolicy {
    /// Every parameter (PyTorch's default single param group).
    #[default]
    All,
    /// Skip parameters for which [`is_no_decay`] is true.
    ExcludeNormAndBias,
}

impl DecayPolicy {
    pub fn applies(self, name: &str, ndim: usize) -> bool {
        match self {
            DecayPolicy::All => true,
            DecayPolicy::ExcludeNormAndBias => !is_no_decay(name, ndim),
        }
    }
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
    fn no_decay_rule() {
        assert!(is_no_decay("conv1.bias", 1));
        assert!(is_no_decay("fc.bias", 2)); // by name even if oddly shaped
        assert!(is_no_decay("bn1.weight", 1));
        assert!(is_no_decay("layer1.0.bn2.weight", 1));
        assert!(is_no_decay("blocks.3.norm.weight", 2)); // LayerNorm over (C, H)
        assert!(is_no_decay("ln.weight", 3));
        assert!(is_no_decay("stem.bcn.l", 1));
        assert!(is_no_decay("scale", 0));
        assert!(!is_no_decay("conv1.weight", 4));
        assert!(!is_no_decay("fc.weight", 2));
        assert!(!is_no_decay("bnx.weight", 2)); // `bnx` is not a norm name
        assert!(!is_no_decay("features.0.weight", 4));
        assert!(DecayPolicy::All.applies("bn1.weight", 1));
        assert!(!DecayPolicy::ExcludeNormAndBias.applies("bn1.weight", 1));
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
