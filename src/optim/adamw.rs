//! AdamW as `torch.optim.AdamW` (`_single_tensor_adam` with decoupled weight decay, the CPU path), in `f32`
//! with PyTorch's operation order; scalars (bias corrections, step size) in `f64` like Python floats:
//!
//! ```text
//! t += 1                                  (per parameter)
//! p = p * (1 - lr * wd)                   (if wd != 0 and the policy applies to p)
//! m = lerp(m, g, 1 - beta1)
//! v = v * beta2 + (1 - beta2) * g * g
//! denom = sqrt(v) / sqrt(1 - beta2^t) + eps
//! p = p + (-lr / (1 - beta1^t)) * m / denom
//! ```

use super::{check_lr, check_shape, float_tensor, key, parse_key, DecayPolicy, Optimizer};
use crate::state::{StateDict, Stateful};
use crate::{NvError, Result};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// AdamW hyper-parameters. `Default` is PyTorch's: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01. The
/// learning rate is the schedule's ([`super::LrSchedule`]), passed to every [`Optimizer::step`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Which parameters `weight_decay` applies to.
    pub decay: DecayPolicy,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            decay: DecayPolicy::All,
        }
    }
}

impl AdamWConfig {
    /// Same checks as PyTorch's constructor.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(NvError::Config(format!("AdamW: {m}")));
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(format!("Invalid epsilon value: {}", self.eps));
        }
        for (i, b) in [self.betas.0, self.betas.1].into_iter().enumerate() {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("Invalid beta parameter at index {i}: {b}"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("Invalid weight_decay value: {}", self.weight_decay));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Moments {
    exp_avg: ArrayD<f32>,
    exp_avg_sq: ArrayD<f32>,
    step: u64,
}

/// Adam with decoupled weight decay.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    state: BTreeMap<String, Moments>,
    steps: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Result<AdamW> {
        cfg.validate()?;
        Ok(AdamW {
            cfg,
            state: BTreeMap::new(),
            steps: 0,
        })
    }
    /// `(exp_avg, exp_avg_sq, step)` of a parameter, once it exists.
    pub fn moments(&self, name: &str) -> Option<(&ArrayD<f32>, &ArrayD<f32>, u64)> {
        self.state
            .get(name)
            .map(|m| (&m.exp_avg, &m.exp_avg_sq, m.step))
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, model: &mut dyn Stateful<f32>, lr: f64) -> Result<()> {
        check_lr(lr)?;
        let mut err = None;
        model.visit_params("", &mut |name, p| {
            if let (None, Some(m)) = (&err, self.state.get(name)) {
                err = check_shape(name, "exp_avg", m.exp_avg.shape(), p.value.shape())
                    .and(check_shape(
                        name,
                        "exp_avg_sq",
                        m.exp_avg_sq.shape(),
                        p.value.shape(),
                    ))
                    .err();
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        let cfg = self.cfg.clone();
        let (beta1, beta2) = cfg.betas;
        let state = &mut self.state;
        model.visit_params("", &mut |name, p| {
            let m = state.entry(name.to_string()).or_insert_with(|| Moments {
                exp_avg: ArrayD::zeros(p.value.raw_dim()),
                exp_avg_sq: ArrayD::zeros(p.value.raw_dim()),
                step: 0,
            });
            m.step += 1;
            let t = m.step as f64;
            let role = p.role();
            let v = p.value.as_slice_mut().expect("parameters are contiguous");
            if cfg.weight_decay != 0.0 && cfg.decay.applies(role) {
                let f = (1.0 - lr * cfg.weight_decay) as f32;
                v.iter_mut().for_each(|x| *x *= f);
            }
            let w1 = (1.0 - beta1) as f32;
            let (b2, w2) = (beta2 as f32, (1.0 - beta2) as f32);
            let bc1 = 1.0 - beta1.powf(t);
            let bc2 = 1.0 - beta2.powf(t);
            let neg_step = (-(lr / bc1)) as f32;
            let bc2_sqrt = bc2.sqrt() as f32;
            let eps = cfg.eps as f32;
            let ea = m.exp_avg.as_slice_mut().expect("contiguous");
            let eq = m.exp_avg_sq.as_slice_mut().expect("contiguous");
            let grad = p.grad.as_slice().expect("gradients are contiguous");
            for (((x, &g), a), s) in v.iter_mut().zip(grad).zip(ea).zip(eq) {
                // torch.lerp: weight < 0.5 ? self + w * (end - self) : end - (end - self) * (1 - w)
                *a = if w1 < 0.5 {
                    *a + w1 * (g - *a)
                } else {
                    g - (g - *a) * (1.0 - w1)
                };
                *s = *s * b2 + w2 * g * g;
                let denom = s.sqrt() / bc2_sqrt + eps;
                *x += neg_step * *a / denom;
            }
        });
        self.steps += 1;
        Ok(())
    }
    fn set_momentum(&mut self, momentum: f64) {
        self.cfg.betas.0 = momentum;
    }
    fn steps(&self) -> u64 {
        self.steps
    }
    fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        sd.insert_i64(format!("{}.step", super::PREFIX), self.steps as i64);
        for (n, m) in &self.state {
            sd.insert_float(key(n, "exp_avg"), &m.exp_avg);
            sd.insert_float(key(n, "exp_avg_sq"), &m.exp_avg_sq);
            sd.insert_i64(key(n, "step"), m.step as i64);
        }
        sd
    }
    fn load_state_dict(&mut self, sd: &StateDict) -> Result<()> {
        let steps = sd.load_i64("optim.step")?;
        if steps < 0 {
            return Err(NvError::State(format!(
                "optim.step: negative step count {steps}"
            )));
        }
        let mut names = Vec::new();
        for k in sd.keys() {
            if let Some((p, _)) = parse_key(k, &["exp_avg_sq", "exp_avg", "step"])? {
                if !names.iter().any(|n: &String| n == p) {
                    names.push(p.to_string());
                }
            }
        }
        let mut state = BTreeMap::new();
        for n in names {
            let exp_avg = float_tensor(sd, &key(&n, "exp_avg"))?.clone();
            let exp_avg_sq = float_tensor(sd, &key(&n, "exp_avg_sq"))?.clone();
            if exp_avg.shape() != exp_avg_sq.shape() {
                return Err(NvError::State(format!(
                    "{}: shape {:?} differs from exp_avg's {:?}",
                    key(&n, "exp_avg_sq"),
                    exp_avg_sq.shape(),
                    exp_avg.shape()
                )));
            }
            // Per-parameter step; older dicts without it fall back to the global count.
            let step = match sd.get(&key(&n, "step")) {
                Some(_) => sd.load_i64(&key(&n, "step"))?,
                None => steps,
            };
            if step < 0 {
                return Err(NvError::State(format!(
                    "{}: negative step {step}",
                    key(&n, "step")
                )));
            }
            state.insert(
                n,
                Moments {
                    exp_avg,
                    exp_avg_sq,
                    step: step as u64,
                },
            );
        }
        self.state = state;
        self.steps = steps as u64;
        Ok(())
    }
    fn name(&self) -> &'static str {
        "adamw"
    }
}
