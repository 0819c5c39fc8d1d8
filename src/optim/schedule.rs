//! Learning-rate schedules as pure functions of the optimizer step (0-based: `lr_at(s)` is the rate used by the
//! `s`-th call to `step()`), with an optional linear warm-up. Serializable, so a run's config records them.
//!
//! With `warmup_steps = W > 0`, steps `0..W` ramp linearly from `warmup_start_factor * lr0` towards `lr0`, the
//! main schedule's first rate, reaching it at step `W`; the main schedule then runs on `t = step - W`.
//! For `cosine` and `one_cycle`, `total_steps` counts the whole run **including** warm-up, so the main schedule
//! lasts `total_steps - W` steps.
//!
//! | kind | rate at main-schedule step `t` (duration `D`) |
//! |---|---|
//! | `constant` | `lr` |
//! | `step` | `lr * gamma^floor(t / step_size)` (PyTorch `StepLR`) |
//! | `cosine` | `min_lr + (lr - min_lr) * (1 + cos(pi * min(t, D) / D)) / 2` (PyTorch `CosineAnnealingLR`, `T_max = D`) |
//! | `poly` | `lr * (1 - min(t, D) / D)^power` (PyTorch `PolynomialLR`, `total_iters = D`; torchvision's segmentation recipe, power 0.9) |
//! | `one_cycle` | PyTorch `OneCycleLR` (two phases, cosine anneal): from `max_lr / div_factor` up to `max_lr` at `t = pct_start * D - 1`, then down to `max_lr / div_factor / final_div_factor` at `t = D - 1`; held there after |

use crate::{NvError, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

fn d_pct_start() -> f64 {
    0.3
}
fn d_div_factor() -> f64 {
    25.0
}
fn d_final_div_factor() -> f64 {
    1e4
}
fn d_true() -> bool {
    true
}
fn d_power() -> f64 {
    0.9
}
fn d_base_momentum() -> f64 {
    0.85
}
fn d_max_momentum() -> f64 {
    0.95
}

/// The main schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant {
        lr: f64,
    },
    Step {
        lr: f64,
        step_size: u64,
        gamma: f64,
    },
    Cosine {
        lr: f64,
        #[serde(default)]
        min_lr: f64,
        total_steps: u64,
    },
    /// PyTorch `PolynomialLR`: decays to 0 at `total_steps`.
    Poly {
        lr: f64,
        total_steps: u64,
        #[serde(default = "d_power")]
        power: f64,
    },
    /// PyTorch `OneCycleLR` defaults (`three_phase=False`, `anneal_strategy="cos"`), including momentum cycling
    /// between `max_momentum` and `base_momentum` (apply it with [`super::Optimizer::set_momentum`]).
    OneCycle {
        max_lr: f64,
        total_steps: u64,
        #[serde(default = "d_pct_start")]
        pct_start: f64,
        #[serde(default = "d_div_factor")]
        div_factor: f64,
        #[serde(default = "d_final_div_factor")]
        final_div_factor: f64,
        #[serde(default = "d_true")]
        cycle_momentum: bool,
        #[serde(default = "d_base_momentum")]
        base_momentum: f64,
        #[serde(default = "d_max_momentum")]
        max_momentum: f64,
    },
}

impl Schedule {
    /// One-cycle with PyTorch's defaults.
    pub fn one_cycle(max_lr: f64, total_steps: u64) -> Schedule {
        Schedule::OneCycle {
            max_lr,
            total_steps,
            pct_start: d_pct_start(),
            div_factor: d_div_factor(),
            final_div_factor: d_final_div_factor(),
            cycle_momentum: true,
            base_momentum: d_base_momentum(),
            max_momentum: d_max_momentum(),
        }
    }
    /// The run length for schedules that have one.
    pub fn total_steps(&self) -> Option<u64> {
        match *self {
            Schedule::Cosine { total_steps, .. }
            | Schedule::Poly { total_steps, .. }
            | Schedule::OneCycle { total_steps, .. } => Some(total_steps),
            _ => None,
        }
    }
}

/// Cosine interpolation from `start` (pct 0) to `end` (pct 1), as PyTorch's `_annealing_cos`.
pub fn anneal_cos(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0)
}

/// A main schedule with an optional linear warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Fraction of the target rate at step 0 of the warm-up (0 = start from zero).
    #[serde(default)]
    pub warmup_start_factor: f64,
}

impl LrSchedule {
    /// A validated schedule without warm-up.
    pub fn new(schedule: Schedule) -> Result<LrSchedule> {
        Self::with_warmup(schedule, 0, 0.0)
    }
    /// A validated schedule with `warmup_steps` of linear warm-up from `start_factor * lr0`.
    pub fn with_warmup(
        schedule: Schedule,
        warmup_steps: u64,
        start_factor: f64,
    ) -> Result<LrSchedule> {
        let s = LrSchedule {
            schedule,
            warmup_steps,
            warmup_start_factor: start_factor,
        };
        s.validate()?;
        Ok(s)
    }
    pub fn constant(lr: f64) -> LrSchedule {
        LrSchedule {
            schedule: Schedule::Constant { lr },
            warmup_steps: 0,
            warmup_start_factor: 0.0,
        }
    }

    /// Checks every field (call after deserializing).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(NvError::Config(format!("lr schedule: {m}")));
        let pos = |name: &str, v: f64| -> Result<()> {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(NvError::Config(format!(
                    "lr schedule: {name} must be finite and >= 0, got {v}"
                )))
            }
        };
        if !(0.0..=1.0).contains(&self.warmup_start_factor) {
            return bad(format!(
                "warmup_start_factor must be in [0, 1], got {}",
                self.warmup_start_factor
            ));
        }
        let w = self.warmup_steps;
        let check_total = |total: u64| -> Result<()> {
            if total <= w {
                return Err(NvError::Config(format!(
                    "lr schedule: total_steps ({total}) must exceed warmup_steps ({w})"
                )));
            }
            Ok(())
        };
        match self.schedule {
            Schedule::Constant { lr } => pos("lr", lr),
            Schedule::Step {
                lr,
                step_size,
                gamma,
            } => {
                pos("lr", lr)?;
                pos("gamma", gamma)?;
                if step_size == 0 {
                    return bad("step_size must be positive".into());
                }
                Ok(())
            }
            Schedule::Cosine {
                lr,
                min_lr,
                total_steps,
            } => {
                pos("lr", lr)?;
                pos("min_lr", min_lr)?;
                if min_lr > lr {
                    return bad(format!("min_lr {min_lr} exceeds lr {lr}"));
                }
                check_total(total_steps)
            }
            Schedule::Poly {
                lr,
                total_steps,
                power,
            } => {
                pos("lr", lr)?;
                pos("power", power)?;
                check_total(total_steps)
            }
            Schedule::OneCycle {
                max_lr,
                total_steps,
                pct_start,
                div_factor,
                final_div_factor,
                base_momentum,
                max_momentum,
                ..
            } => {
                pos("max_lr", max_lr)?;
                check_total(total_steps)?;
                if !(pct_start > 0.0 && pct_start < 1.0) {
                    return bad(format!("pct_start must be in (0, 1), got {pct_start}"));
                }
                let positive = |v: f64| v.is_finite() && v > 0.0;
                if !positive(div_factor) || !positive(final_div_factor) {
                    return bad(format!(
                        "div_factor ({div_factor}) and final_div_factor ({final_div_factor}) must be positive"
                    ));
                }
                pos("base_momentum", base_momentum)?;
                pos("max_momentum", max_momentum)
            }
        }
    }

    /// Main-schedule duration `D` (schedules with a total) after warm-up.
    fn duration(&self) -> f64 {
        self.schedule
            .total_steps()
            .map(|t| t.saturating_sub(self.warmup_steps).max(1) as f64)
            .unwrap_or(f64::INFINITY)
    }

    /// One-cycle phase boundaries and the phase/pct of main step `t`: `(phase, pct)` with phase 0 rising.
    fn one_cycle_phase(&self, t: f64, pct_start: f64) -> (usize, f64) {
        let d = self.duration();
        let end1 = pct_start * d - 1.0;
        let end2 = d - 1.0;
        if t <= end1 {
            let pct = if end1 > 0.0 { t / end1 } else { 1.0 };
            (0, pct)
        } else {
            let span = end2 - end1;
            let pct = if span > 0.0 { (t - end1) / span } else { 1.0 };
            (1, pct.min(1.0))
        }
    }

    fn main_lr(&self, t: u64) -> f64 {
        let tf = t as f64;
        match self.schedule {
            Schedule::Constant { lr } => lr,
            Schedule::Step {
                lr,
                step_size,
                gamma,
            } => lr * gamma.powi((t / step_size).min(i32::MAX as u64) as i32),
            Schedule::Cosine { lr, min_lr, .. } => {
                let d = self.duration();
                min_lr + (lr - min_lr) * (1.0 + (PI * tf.min(d) / d).cos()) / 2.0
            }
            Schedule::Poly { lr, power, .. } => {
                let d = self.duration();
                lr * (1.0 - tf.min(d) / d).powf(power)
            }
            Schedule::OneCycle {
                max_lr,
                pct_start,
                div_factor,
                final_div_factor,
                ..
            } => {
                let initial = max_lr / div_factor;
                let min_lr = initial / final_div_factor;
                match self.one_cycle_phase(tf, pct_start) {
                    (0, pct) => anneal_cos(initial, max_lr, pct),
                    (_, pct) => anneal_cos(max_lr, min_lr, pct),
                }
            }
        }
    }

    /// The learning rate for optimizer step `step` (0-based). Pure; assumes [`LrSchedule::validate`] passed.
    pub fn lr_at(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        if step < w {
            let f = self.warmup_start_factor
                + (1.0 - self.warmup_start_factor) * step as f64 / w as f64;
            self.main_lr(0) * f
        } else {
            self.main_lr(step - w)
        }
    }

    /// The momentum (SGD) / beta1 (AdamW) for step `step` when the schedule cycles it (one-cycle with
    /// `cycle_momentum`), else `None`. During warm-up it is held at the main schedule's first value.
    pub fn momentum_at(&self, step: u64) -> Option<f64> {
        match self.schedule {
            Schedule::OneCycle {
                cycle_momentum: true,
                pct_start,
                base_momentum,
                max_momentum,
                ..
            } => {
                let t = step.saturating_sub(self.warmup_steps) as f64;
                Some(match self.one_cycle_phase(t, pct_start) {
                    (0, pct) => anneal_cos(max_momentum, base_momentum, pct),
                    (_, pct) => anneal_cos(base_momentum, max_momentum, pct),
                })
            }
            _ => None,
        }
    }
}
