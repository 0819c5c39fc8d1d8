//! The training loop.

use super::checkpoint::{self, Position};
use super::distributed::{self, Distributed, GradReducer, TimedComm};
use super::evaluate::{evaluate_checked, non_finite_param};
use super::log::JsonLog;
use super::preflight::{self, check_data, limit};
use super::TrainConfig;
use crate::data::{DataLoader, Dataset, LoaderConfig, Normalization};
use crate::model::Model;
use crate::nn::loss::{count_correct, cross_entropy};
use crate::optim::Optimizer;
use crate::state::Stateful;
use crate::{Ctx, NvError, Result};
use serde_json::json;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// What a long run reports as it goes (the CLI draws progress bars from it).
pub trait Progress {
    /// An epoch (1-based) of `batches` batches starts, `done` of them already done (a resumed run).
    fn epoch_start(&mut self, epoch: usize, batches: usize, done: usize);
    /// A step finished; `status` sums up the epoch so far (loss, accuracy, img/s, last test accuracy).
    fn step(&mut self, status: &str);
    /// The epoch's steps are done (its evaluation follows).
    fn epoch_end(&mut self);
}

/// Options that do not change what is computed.
#[derive(Default)]
pub struct RunOptions {
    /// Where to write checkpoints (after every epoch and at the end; never after a divergence).
    pub checkpoint: Option<PathBuf>,
    /// JSON-lines log.
    pub log: Option<PathBuf>,
    /// Progress reports.
    pub progress: Option<Box<dyn Progress>>,
    /// Continue this checkpoint's run (model, optimizer, position); its config is used, with `epochs`,
    /// `max_steps`, `eval_every_steps`, `target_acc` and `divergence_window` taken from the config passed to
    /// [`train`].
    pub resume: Option<checkpoint::Checkpoint>,
    /// Plan options for the model (convolution algorithm, instruction set).
    pub plan: crate::model::PlanOptions,
    /// The input normalization of a new run (fine-tuning keeps its source model's); `None`: the training
    /// set's mean and std. A resumed run keeps its checkpoint's.
    pub normalization: Option<Normalization>,
    /// Data-parallel training over a group of ranks ([`super::distributed`]): every rank calls [`train`] with
    /// the same configuration, data and options; only rank 0's `checkpoint`, `log` and `progress` are used.
    pub distributed: Option<Distributed>,
}

/// One evaluation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalPoint {
    pub step: u64,
    pub epoch: usize,
    pub test_acc: f64,
    pub test_loss: f64,
    /// Mean training loss since the previous evaluation.
    pub train_loss: f64,
    pub end_of_epoch: bool,
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub evals: Vec<EvalPoint>,
    /// Loss of every step of this invocation, in order.
    pub losses: Vec<f64>,
    pub steps: u64,
    /// Why the run was declared diverged, if it was.
    pub diverged: Option<String>,
    /// What the run decided on its own and the user should know (a last batch dropped, stale temporary files
    /// removed); each is also a `note` event in the log.
    pub notes: Vec<String>,
    /// The step of the first evaluation at or above `target_acc`.
    pub reached_target_at: Option<u64>,
    /// Training throughput (images per second of training steps, evaluation excluded; the global batch's
    /// images in data-parallel training).
    pub train_img_s: f64,
    /// Data-parallel training: the seconds this rank spent in collectives over the run (waiting for the
    /// slowest rank included), and in the gradient all-reduces alone; zero in a single process.
    pub comm_secs: f64,
    pub grad_all_reduce_secs: f64,
    /// Data-parallel training: the gradient values each step sums over the ranks (f32).
    pub grad_values_per_step: u64,
    pub final_test_acc: Option<f64>,
}

impl TrainReport {
    /// Test accuracy at the end of each epoch.
    pub fn epoch_accs(&self) -> Vec<f64> {
        self.evals
            .iter()
            .filter(|e| e.end_of_epoch)
            .map(|e| e.test_acc)
            .collect()
    }
}

/// Trains per `cfg` (or continues `opts.resume`), evaluating on `test`. A divergence is reported in the
/// returned [`TrainReport`] (not as an error): the loop stops, says so, and leaves the last good checkpoint.
pub fn train(
    cfg: &TrainConfig,
    train_ds: Arc<Dataset>,
    test_ds: Arc<Dataset>,
    opts: RunOptions,
) -> Result<TrainReport> {
    run(cfg, None, train_ds, test_ds, opts).map(|(r, _)| r)
}

/// Trains a model built through the API (any [`Model::from_graph`]) with `cfg`'s optimizer, schedule, data
/// and run settings; `cfg.model` does not build it. Its checkpoints store its architecture, so
/// [`checkpoint::restore_model`] and `normvision eval` rebuild it, and [`train`] resumes it.
pub fn train_model(
    model: Model,
    cfg: &TrainConfig,
    train_ds: Arc<Dataset>,
    test_ds: Arc<Dataset>,
    opts: RunOptions,
) -> Result<TrainReport> {
    train_model_keep(model, cfg, train_ds, test_ds, opts).map(|(r, _)| r)
}

/// [`train_model`], handing the trained model back (experiments that go on with it).
pub fn train_model_keep(
    model: Model,
    cfg: &TrainConfig,
    train_ds: Arc<Dataset>,
    test_ds: Arc<Dataset>,
    opts: RunOptions,
) -> Result<(TrainReport, Model)> {
    if opts.resume.is_some() {
        return Err(NvError::Config(
            "train_model starts a run; continue a checkpoint with train and RunOptions::resume"
                .into(),
        ));
    }
    let [c, h, w] = train_ds.shape;
    if model.input_shape() != [c, h, w] || model.num_classes() < train_ds.num_classes() {
        return Err(NvError::Config(format!(
            "the model takes {:?} images into {} classes; the dataset has {c}x{h}x{w} images in {} classes",
            model.input_shape(),
            model.num_classes(),
            train_ds.num_classes()
        )));
    }
    run(cfg, Some(model), train_ds, test_ds, opts)
}

fn run(
    cfg: &TrainConfig,
    model: Option<Model>,
    train_ds: Arc<Dataset>,
    test_ds: Arc<Dataset>,
    mut opts: RunOptions,
) -> Result<(TrainReport, Model)> {
    let (mut model, mut opt, norm, mut pos, run_cfg): (
        Model,
        Box<dyn Optimizer>,
        Option<Normalization>,
        Position,
        TrainConfig,
    ) = match (&opts.resume, model) {
        (Some(ck), _) => {
            // What the caller may change on a resume: how long the run goes and how it is watched; nothing
            // that changes what a step computes.
            let mut rc = ck.config.clone();
            rc.epochs = cfg.epochs;
            rc.max_steps = cfg.max_steps;
            rc.eval_every_steps = cfg.eval_every_steps;
            rc.target_acc = cfg.target_acc;
            rc.divergence_window = cfg.divergence_window;
            let m = checkpoint::restore_model(ck)?;
            let mut o = rc.optim.build()?;
            o.load_state_dict(&ck.optim_state)?;
            (m, o, Some(ck.norm.clone()), ck.position, rc)
        }
        (None, m) => (
            match m {
                Some(m) => m,
                None => Model::new(cfg.model.clone())?,
            },
            cfg.optim.build()?,
            None,
            Position::default(),
            cfg.clone(),
        ),
    };
    let cfg = &run_cfg;
    cfg.validate()?;
    model.set_plan_options(opts.plan.clone())?;
    // A group of one rank is a single process.
    // its collectives timed for the report
    let timer = (opts.distributed.as_ref())
        .filter(|d| d.size() > 1)
        .map(|d| Arc::new(TimedComm::new(d.comm.clone())));
    let dist = match (&timer, opts.distributed.take()) {
        (Some(t), Some(d)) => Some(Distributed {
            comm: t.clone(),
            ..d
        }),
        _ => None,
    };
    if dist.as_ref().is_some_and(|d| d.rank() != 0) {
        opts.checkpoint = None;
        opts.log = None;
        opts.progress = None;
    }
    check_data(&model, &train_ds, &test_ds, opts.resume.is_some())?;
    // The run's own limits (a resumed run keeps its checkpoint's, whatever the caller's config says), so it
    // sees the same samples as the run that wrote the checkpoint.
    let train_ds = limit(train_ds, cfg.train_limit)?;
    let test_ds = limit(test_ds, cfg.test_limit)?;
    let norm = match norm.or_else(|| opts.normalization.clone()) {
        Some(n) => n,
        None => train_ds.mean_std()?,
    };
    let mut notes = vec![];
    match &dist {
        Some(d) if cfg.sync_bn => {
            model.graph_mut().set_batch_norm_sync(Some(d.comm.clone()));
        }
        None if cfg.sync_bn => notes.push(
            "--sync-bn has no effect in a single process: BatchNorm already sees the whole batch"
                .into(),
        ),
        _ => {}
    }
    let shard = dist.as_ref().map(|d| d.shard());
    let drop_last =
        preflight::batch_checks(&model, cfg, train_ds.len(), shard.as_ref(), &mut notes)?;
    let loader = DataLoader::new(
        train_ds.clone(),
        norm.clone(),
        LoaderConfig {
            augment: cfg.augment.clone(),
            drop_last,
            shard: shard.clone(),
            ..LoaderConfig::train(cfg.batch_size, cfg.seed)
        },
    )?;
    if let Some(d) = &dist {
        // every rank runs what rank 0 runs, from rank 0's weights, or none does
        let description = json!({
            "version": env!("CARGO_PKG_VERSION"), "config": cfg, "normalization": norm, "position": pos,
            "resume": opts.resume.is_some(), "train": distributed::fingerprint(&train_ds),
            "test": distributed::fingerprint(&test_ds),
            "ranks": d.size(), "shard_sizes": d.shard_sizes, "model": model.graph().spec()?,
        });
        distributed::check_agreement(d.comm.as_ref(), &description)?;
        distributed::broadcast_state(d.comm.as_ref(), &mut model, Some(opt.as_mut()))?;
    }
    {
        let per_epoch = loader.num_batches() as u64;
        let total = per_epoch * cfg.epochs as u64;
        model.set_run_length(cfg.max_steps.map_or(total, |m| m.min(total)));
    }
    if loader.num_batches() == 0 {
        return Err(NvError::Config(format!(
            "no training batch: {} images at batch size {} with the last partial batch dropped",
            train_ds.len(),
            cfg.batch_size
        )));
    }
    // The output is locked for the whole run (a second run writing it is refused), which also proves it
    // writable before any training; then the temporary files of a killed run's interrupted writes go.
    let _lock = match &opts.checkpoint {
        Some(path) => {
            let lock = crate::io::RunLock::acquire(path)?;
            let removed = crate::io::remove_stale_temps(path)?;
            if removed > 0 {
                notes.push(format!(
                    "removed {removed} temporary file(s) left beside {} by an interrupted write",
                    path.display()
                ));
            }
            Some(lock)
        }
        None => None,
    };
    // each rank evaluates its slice of the test set
    let test_ds = match &dist {
        Some(d) => {
            let r = crate::data::Shard::even(d.rank(), d.size()).range(test_ds.len());
            Arc::new(test_ds.slice(r.start, r.end)?)
        }
        None => test_ds,
    };
    let test_loader = DataLoader::new(
        test_ds,
        norm.clone(),
        LoaderConfig::eval(cfg.eval_batch_size.max(1)),
    )?;
    let mut log = match (&opts.log, opts.resume.is_some()) {
        (Some(p), false) => JsonLog::create(p)?,
        (Some(p), true) => JsonLog::resume(p, pos.step)?,
        (None, _) => JsonLog::disabled(),
    };
    log.write(&json!({"event": "start", "config": cfg, "resume_from": pos, "train_samples": train_ds.len(),
        "threads": rayon::current_num_threads(), "ranks": dist.as_ref().map_or(1, |d| d.size())}))?;
    for n in &notes {
        log.write(&json!({"event": "note", "message": n}))?;
    }

    let classes = model.num_classes() as f64;
    let chance_loss = classes.ln();
    let mut report = TrainReport {
        evals: vec![],
        losses: vec![],
        steps: pos.step,
        diverged: None,
        reached_target_at: None,
        train_img_s: 0.0,
        comm_secs: 0.0,
        grad_all_reduce_secs: 0.0,
        grad_values_per_step: 0,
        final_test_acc: None,
        notes,
    };
    let mut reducer = GradReducer::default();
    let mut window: VecDeque<f64> = VecDeque::new();
    let (mut train_secs, mut train_imgs) = (0.0f64, 0usize);
    let (mut since_eval_loss, mut since_eval_n) = (0.0f64, 0usize);
    let nb = loader.num_batches();
    let mut last_acc = None;
    let mut stop = false;

    'epochs: while pos.epoch < cfg.epochs {
        if let Some(p) = opts.progress.as_mut() {
            p.epoch_start(pos.epoch + 1, nb, pos.batch);
        }
        let (mut ep_correct, mut ep_seen) = (0usize, 0usize);
        let epoch_start = Instant::now();
        let mut ep_imgs = 0usize;
        let mut batches = loader.epoch_from(pos.epoch, pos.batch)?;
        for (x, y) in &mut batches {
            if cfg.max_steps.is_some_and(|m| pos.step >= m) {
                stop = true;
                break;
            }
            let t0 = Instant::now();
            let lr = cfg.schedule.lr_at(pos.step);
            if let Some(m) = cfg.schedule.momentum_at(pos.step) {
                opt.set_momentum(m);
            }
            model.zero_grad();
            let ctx = Ctx::train().with_step(pos.step);
            let xd = x.into_dyn();
            let step_result = match &dist {
                None => (|| -> Result<(f64, usize, usize)> {
                    let logits = model.forward(&xd, ctx)?;
                    let (loss, dlogits) = cross_entropy(&logits, &y, cfg.label_smoothing)?;
                    if !loss.is_finite() {
                        return Err(NvError::NonFinite(format!("loss {loss}")));
                    }
                    let correct = count_correct(&logits, &y)?;
                    model.backward_params(&xd, &dlogits, ctx)?;
                    Ok((loss, correct, y.len()))
                })(),
                Some(d) => distributed::step(&mut model, &xd, &y, cfg, ctx, d, &mut reducer),
            };
            let (loss, correct, global_n) = match step_result {
                Ok(v) => v,
                Err(NvError::NonFinite(msg)) => {
                    report.diverged = Some(format!(
                        "non-finite values at step {} ({msg})",
                        pos.step + 1
                    ));
                    break 'epochs;
                }
                Err(e) => return Err(e),
            };
            opt.step(&mut model, lr)?;
            let dt = t0.elapsed().as_secs_f64();
            train_secs += dt;
            train_imgs += global_n;
            ep_imgs += global_n;
            pos.step += 1;
            pos.batch += 1;
            report.losses.push(loss);
            ep_correct += correct;
            ep_seen += global_n;
            since_eval_loss += loss;
            since_eval_n += 1;
            log.write(&json!({"event": "step", "step": pos.step, "epoch": pos.epoch + 1, "loss": loss, "lr": lr,
                "batch_acc": correct as f64 / global_n as f64, "img_s": global_n as f64 / dt}))?;
            if let Some(p) = opts.progress.as_mut() {
                p.step(&format!(
                    "loss {loss:.4} acc {:.3} {:.0} img/s{}",
                    ep_correct as f64 / ep_seen as f64,
                    ep_imgs as f64 / epoch_start.elapsed().as_secs_f64(),
                    last_acc
                        .map(|a: f64| format!(" test {:.2}%", a * 100.0))
                        .unwrap_or_default()
                ));
            }
            // A net that "trains" at chance has diverged even without a NaN.
            if cfg.divergence_window > 0 {
                window.push_back(loss);
                if window.len() as u64 > cfg.divergence_window {
                    window.pop_front();
                }
                if pos.step >= 2 * cfg.divergence_window
                    && window.len() as u64 == cfg.divergence_window
                {
                    let mean = window.iter().sum::<f64>() / window.len() as f64;
                    if (mean - chance_loss).abs() < 0.01 * chance_loss {
                        report.diverged = Some(format!(
                            "loss stuck at ln({classes}) = {chance_loss:.4} (chance level) for the last {} steps (mean {mean:.4})",
                            cfg.divergence_window
                        ));
                        break 'epochs;
                    }
                }
            }
            if cfg.eval_every_steps.is_some_and(|k| pos.step % k == 0) {
                let (acc, tl) =
                    match evaluate_checked(&mut model, &test_loader, pos.step, dist.as_ref())? {
                        Ok(v) => v,
                        Err(why) => {
                            report.diverged = Some(why);
                            break 'epochs;
                        }
                    };
                last_acc = Some(acc);
                let p = EvalPoint {
                    step: pos.step,
                    epoch: pos.epoch + 1,
                    test_acc: acc,
                    test_loss: tl,
                    train_loss: since_eval_loss / since_eval_n.max(1) as f64,
                    end_of_epoch: false,
                };
                (since_eval_loss, since_eval_n) = (0.0, 0);
                log.write(&json!({"event": "eval", "eval": p}))?;
                report.evals.push(p);
                if cfg.target_acc.is_some_and(|t| acc >= t) {
                    report.reached_target_at = Some(pos.step);
                    stop = true;
                    break;
                }
            }
        }
        batches.error()?;
        if let Some(p) = opts.progress.as_mut() {
            p.epoch_end();
        }
        if stop && report.reached_target_at.is_some() {
            break;
        }
        let epoch_done = pos.batch >= nb;
        if epoch_done {
            pos.epoch += 1;
            pos.batch = 0;
            let (acc, tl) =
                match evaluate_checked(&mut model, &test_loader, pos.step, dist.as_ref())? {
                    Ok(v) => v,
                    Err(why) => {
                        report.diverged = Some(why);
                        break 'epochs;
                    }
                };
            last_acc = Some(acc);
            let p = EvalPoint {
                step: pos.step,
                epoch: pos.epoch,
                test_acc: acc,
                test_loss: tl,
                train_loss: since_eval_loss / since_eval_n.max(1) as f64,
                end_of_epoch: true,
            };
            (since_eval_loss, since_eval_n) = (0.0, 0);
            log.write(&json!({"event": "eval", "eval": p, "train_acc": ep_correct as f64 / ep_seen.max(1) as f64}))?;
            report.evals.push(p);
            // Evaluation at chance after a full epoch is divergence too (checked before saving, so the last good
            // checkpoint is kept).
            if cfg.divergence_window > 0
                && acc <= 1.0 / classes + 0.005
                && pos.step >= 2 * cfg.divergence_window
            {
                report.diverged = Some(format!(
                    "test accuracy {:.2}% is chance level after epoch {}",
                    acc * 100.0,
                    pos.epoch
                ));
                break;
            }
            if let Some(path) = &opts.checkpoint {
                checkpoint::save(path, cfg, &norm, pos, &model, opt.as_ref(), Some(acc))?;
            }
            if cfg.target_acc.is_some_and(|t| acc >= t) {
                report.reached_target_at = Some(pos.step);
                break;
            }
        }
        if stop {
            break;
        }
    }
    report.steps = pos.step;
    report.train_img_s = if train_secs > 0.0 {
        train_imgs as f64 / train_secs
    } else {
        0.0
    };
    report.final_test_acc = report.evals.last().map(|e| e.test_acc);
    report.comm_secs = timer.as_ref().map_or(0.0, |t| t.secs());
    report.grad_all_reduce_secs = reducer.secs;
    report.grad_values_per_step = reducer.values / reducer.steps.max(1);
    // The last update can leave NaN/inf weights behind a finite loss: never save those as a checkpoint.
    if report.diverged.is_none() {
        if let Some(p) = non_finite_param(&mut model) {
            report.diverged = Some(format!(
                "non-finite values in parameter {p} after step {}",
                pos.step
            ));
        }
    }
    match &report.diverged {
        Some(why) => {
            log.write(&json!({"event": "diverged", "step": pos.step, "reason": why}))?;
        }
        None => {
            // Save where the run stopped (mid-epoch after --max-steps), so --resume continues from here.
            if let Some(path) = &opts.checkpoint {
                if pos.batch != 0 || report.evals.last().is_none_or(|e| e.step != pos.step) {
                    checkpoint::save(path, cfg, &norm, pos, &model, opt.as_ref(), last_acc)?;
                }
            }
        }
    }
    log.write(&json!({"event": "end", "steps": pos.step, "train_img_s": report.train_img_s,
        "comm_secs": report.comm_secs, "grad_all_reduce_secs": report.grad_all_reduce_secs,
        "grad_values_per_step": report.grad_values_per_step,
        "final_test_acc": report.final_test_acc, "diverged": report.diverged, "reached_target_at": report.reached_target_at}))?;
    log.flush()?;
    if dist.is_some() && cfg.sync_bn {
        // the model handed back is a single-process one again: its BatchNorms no longer wait for the group
        model.graph_mut().set_batch_norm_sync(None);
    }
    Ok((report, model))
}
