//! `train --resume`: where a resumed run writes, and which flags it applies or refuses.

use normvision::train::TrainConfig;
use normvision::{NvError, Result};
use std::path::{Path, PathBuf};

/// Where a `train` run writes, and what it resumes.
pub struct RunPaths {
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub log: Option<PathBuf>,
}

/// Flags a resumed run applies: they extend or watch the run without changing what its steps compute.
const RESUME_APPLIES: &[&str] = &[
    "epochs",
    "max_steps",
    "eval_every",
    "target_acc",
    "divergence_window",
];

/// The part of a training configuration that flag `id` sets (`None`: not a training-configuration flag).
fn flag_value(id: &str, c: &TrainConfig) -> Option<serde_json::Value> {
    fn v<T: serde::Serialize>(x: &T) -> serde_json::Value {
        serde_json::to_value(x).expect("serialisable")
    }
    Some(match id {
        "model" => v(&c.model.kind.as_str()),
        "norm" => v(&c.model.norm.as_str()),
        "groups" => v(&c.model.groups),
        "init" | "init_scale" => v(&c.model.init),
        "dropout" => v(&c.model.dropout),
        "seed" => v(&c.seed),
        "batch_size" => v(&c.batch_size),
        "lr" | "schedule" | "warmup_steps" | "step_size" | "gamma" => {
            // the total step count follows --epochs, which a resume may change
            let mut s = v(&c.schedule);
            strip_key(&mut s, "total_steps");
            s
        }
        "optimizer" | "momentum" | "nesterov" | "weight_decay" | "no_decay_norm_bias" => {
            v(&c.optim)
        }
        "label_smoothing" => v(&c.label_smoothing),
        "augment" => v(&c.augment.is_some()),
        "train_limit" => v(&c.train_limit),
        "test_limit" => v(&c.test_limit),
        "drop_last" => v(&c.drop_last),
        "sync_bn" => v(&c.sync_bn),
        _ => return None,
    })
}

fn strip_key(v: &mut serde_json::Value, key: &str) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove(key);
            m.values_mut().for_each(|x| strip_key(x, key));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| strip_key(x, key)),
        _ => {}
    }
}

/// A resumed run keeps its checkpoint's configuration. The flags typed with `--resume` either apply
/// ([`RESUME_APPLIES`], listed back to the user) or must agree with the checkpoint: a flag that contradicts it
/// is an error naming both values, never silently ignored.
pub fn check_resume_flags(
    explicit: &[String],
    given: &TrainConfig,
    saved: &TrainConfig,
    ckpt: &Path,
) -> Result<Vec<String>> {
    let flag = |id: &str| format!("--{}", id.replace('_', "-"));
    let mut conflicts = vec![];
    let mut applied = vec![];
    for id in explicit {
        if RESUME_APPLIES.contains(&id.as_str()) {
            applied.push(flag(id));
            continue;
        }
        if let (Some(a), Some(b)) = (flag_value(id, given), flag_value(id, saved)) {
            if a != b {
                conflicts.push(format!("{} gives {a}, the checkpoint has {b}", flag(id)));
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(NvError::Config(format!(
            "--resume {}: a resumed run keeps its checkpoint's configuration, and these flags contradict it: {}. \
             Drop them to resume, or start a new run (with --out elsewhere) to train with them. With --resume, \
             only {} apply.",
            ckpt.display(),
            conflicts.join("; "),
            RESUME_APPLIES.iter().map(|f| flag(f)).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(applied)
}
