//! What the experiments share: the cache of finished runs (one small JSON per setting, keyed by its
//! configuration, so that a suite resumes where it stopped and `normvision report` needs no re-run), the
//! outcome of a training run ("trained", "never trains", "diverged"), progress reports, and a plain training
//! loop with a hook per step for the experiments that look inside training (`mlp-sigmoid`, `landscape`).

use super::ExperimentOptions;
use crate::data::{DataLoader, Dataset, LoaderConfig, Normalization};
use crate::model::Model;
use crate::nn::loss::cross_entropy;
use crate::optim::Optimizer;
use crate::state::Stateful;
use crate::train::{TrainConfig, TrainReport};
use crate::{Ctx, NvError, Result};
use ndarray::ArrayD;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A progress callback: (runs done, runs in all, what is running).
pub type ProgressFn = dyn Fn(usize, usize, &str) + Send + Sync;

/// A step hook of [`train_with_hook`]: (step, model, images, labels).
pub type StepHook<'a> = dyn FnMut(u64, &mut Model, &ArrayD<f32>, &[usize]) -> Result<()> + 'a;

/// Reports the progress of an experiment.
#[derive(Clone)]
pub struct RunProgress(pub Arc<ProgressFn>);

impl std::fmt::Debug for RunProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunProgress")
    }
}

/// The finished runs of one experiment, under `OUT/runs/NAME/`, one JSON file per setting: `{"key": …,
/// "result": …}`, named by a hash of the key (the key is checked on reading, so a collision re-runs).
pub struct RunCache {
    dir: PathBuf,
    total: usize,
    done: usize,
    progress: Option<RunProgress>,
    verbose: bool,
    name: String,
}

impl RunCache {
    /// The cache of experiment `name` for a suite of `total` runs.
    pub fn new(opts: &ExperimentOptions, name: &str, total: usize) -> Result<RunCache> {
        let dir = opts.out.join("runs").join(if opts.quick {
            format!("{name}-quick")
        } else {
            name.to_string()
        });
        std::fs::create_dir_all(&dir).map_err(crate::error::io_at(&dir, "create directory"))?;
        Ok(RunCache {
            dir,
            total,
            done: 0,
            progress: opts.progress.clone(),
            verbose: opts.verbose,
            name: name.to_string(),
        })
    }

    fn path(&self, key: &Value) -> PathBuf {
        // FNV-1a of the key's canonical text
        let h = crate::rng::fnv1a(key.to_string().bytes());
        self.dir.join(format!("{h:016x}.json"))
    }

    /// The cached result of the run `key`, or `run()`'s, which is then stored (atomically).
    pub fn get_or_run(&mut self, key: Value, run: impl FnOnce() -> Result<Value>) -> Result<Value> {
        let path = self.path(&key);
        let label = key.to_string();
        if let Some(p) = &self.progress {
            (p.0)(self.done, self.total, &label);
        }
        let cached = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter(|v| v.get("key") == Some(&key))
            .and_then(|v| v.get("result").cloned());
        let result = match cached {
            Some(r) => {
                if self.verbose {
                    eprintln!("{}: {label}: cached in {}", self.name, path.display());
                }
                r
            }
            None => {
                let t0 = std::time::Instant::now();
                let mut r = run()?;
                if let Some(o) = r.as_object_mut() {
                    o.insert("seconds".into(), json!(t0.elapsed().as_secs_f64()));
                }
                let text = serde_json::to_vec_pretty(&json!({"key": key, "result": r}))
                    .expect("a run serialises");
                crate::io::write_atomic(&path, &text)?;
                if self.verbose {
                    eprintln!("{}: {label}: {}", self.name, summary(&r));
                }
                r
            }
        };
        self.done += 1;
        if let Some(p) = &self.progress {
            (p.0)(self.done, self.total, &label);
        }
        Ok(result)
    }

    /// The directory of the cached runs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn summary(r: &Value) -> String {
    let mut s = r.to_string();
    if s.len() > 160 {
        s.truncate(160);
        s += "…";
    }
    s
}

/// How a training run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It learned (test accuracy above chance).
    Trained,
    /// The loss stayed at ln(classes) and the accuracy at chance, with every value finite: the dead network of a
    /// too-large learning rate, which a NaN check alone misses.
    NeverTrains,
    /// Non-finite values appeared.
    Diverged,
}

impl Outcome {
    /// From a run's report: a NaN or infinity is `Diverged`; a loss stuck at ln(classes) (the trainer's check) or
    /// a final test accuracy within 1.5 points of chance is `NeverTrains`.
    pub fn of(rep: &TrainReport, classes: usize) -> Outcome {
        match &rep.diverged {
            Some(why) if why.contains("non-finite") => Outcome::Diverged,
            Some(_) => Outcome::NeverTrains,
            None => match rep.final_test_acc {
                Some(a) if a.is_finite() && a > 1.0 / classes as f64 + 0.015 => Outcome::Trained,
                Some(a) if !a.is_finite() => Outcome::Diverged,
                _ => Outcome::NeverTrains,
            },
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Trained => "trained",
            Outcome::NeverTrains => "never trains",
            Outcome::Diverged => "diverged",
        }
    }
}

/// A minimal training loop for experiments that look inside training: for each step, `hook(step, model, x, y)`
/// runs before the step's forward (it may run its own passes, and must leave the model as it found it), then
/// forward, cross-entropy, backward and the optimizer step. Returns every step's loss; stops at a non-finite
/// loss (the remaining steps are not run).
pub fn train_with_hook(
    model: &mut Model,
    cfg: &TrainConfig,
    train: Arc<Dataset>,
    norm: &Normalization,
    steps: u64,
    hook: &mut StepHook<'_>,
) -> Result<Vec<f64>> {
    let mut opt: Box<dyn Optimizer> = cfg.optim.build()?;
    let loader = DataLoader::new(
        train,
        norm.clone(),
        LoaderConfig {
            drop_last: true,
            ..LoaderConfig::train(cfg.batch_size, cfg.seed)
        },
    )?;
    if loader.num_batches() == 0 {
        return Err(NvError::Config("no full training batch".into()));
    }
    model.set_run_length(steps);
    let mut losses = vec![];
    let mut step = 0u64;
    let mut epoch = 0usize;
    'outer: loop {
        let mut it = loader.epoch(epoch);
        for (x, y) in &mut it {
            if step >= steps {
                break 'outer;
            }
            let x = x.into_dyn();
            hook(step, model, &x, &y)?;
            model.zero_grad();
            let ctx = Ctx::train().with_step(step);
            let (loss, dl) = match model
                .forward(&x, ctx)
                .and_then(|logits| cross_entropy(&logits, &y, 0.0))
            {
                Ok(v) => v,
                Err(NvError::NonFinite(_)) => {
                    losses.push(f64::NAN);
                    break 'outer;
                }
                Err(e) => return Err(e),
            };
            losses.push(loss);
            if !loss.is_finite() {
                break 'outer;
            }
            model.backward_params(&x, &dl, ctx)?;
            opt.step(model, cfg.schedule.lr_at(step))?;
            step += 1;
        }
        it.error()?;
        epoch += 1;
    }
    Ok(losses)
}

/// The loss and the flattened parameter gradient of `model` on batch (x, y) in training mode; afterwards the
/// model is reset to `restore` (its state before the pass, or any state the caller wants back: the pass updates
/// the running statistics). `None` when the pass meets non-finite values. With dropout, each call draws a new
/// mask (the probes of `landscape` run on nets without dropout).
pub fn loss_and_grad(
    model: &mut Model,
    x: &ArrayD<f32>,
    y: &[usize],
    step: u64,
    restore: &crate::state::StateDict,
) -> Result<Option<(f64, Vec<f32>)>> {
    model.zero_grad();
    let ctx = Ctx::train().with_step(step);
    let pass = model.forward(x, ctx).and_then(|logits| {
        let (loss, dl) = cross_entropy(&logits, y, 0.0)?;
        model.backward_params(x, &dl, ctx)?;
        Ok(loss)
    });
    let out = match pass {
        Ok(loss) if loss.is_finite() => {
            let mut g = vec![];
            model.visit_params("", &mut |_, p| g.extend_from_slice(p.grads()));
            Some((loss, g))
        }
        Ok(_) | Err(NvError::NonFinite(_)) => None,
        Err(e) => return Err(e),
    };
    model.zero_grad();
    model.load_strict(restore)?;
    Ok(out)
}
