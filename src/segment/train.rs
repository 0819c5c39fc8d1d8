//! Training and evaluating a segmentation network: torchvision's segmentation recipe (SGD with momentum 0.9
//! and weight decay 1e-4, polynomial decay of the rate with power 0.9, per-pixel cross-entropy ignoring 255,
//! random scale + crop + flip), evaluation on whole images (mIoU, pixel accuracy, per-class IoU), JSON-lines
//! logs, and an atomic checkpoint after every epoch.
//!
//! ```text
//! epoch e: order = epoch_order(seed, e) ─► batches of augmented crops ─► graph.forward(Train) ─► (N, K, H, W)
//!   ─► PixelCrossEntropy ─► graph.backward ─► optimizer.step(lr = poly(step))
//! end of epoch: whole test images ─► inference plan ─► confusion matrix ─► mIoU ─► log, checkpoint
//! ```
//!
//! Data-parallel ([`SegRunOptions::distributed`], as the classification trainer's `train::distributed`): the
//! global batch and its augmentation do not depend on the ranks; rank r takes its contiguous slice, the ranks
//! all-reduce Σ loss·weight and Σ weight (the per-pixel mean over the global batch) before the backward, scale
//! their gradient by their share, and sum the parameter gradients. With `sync_bn` every BatchNorm's statistics
//! span the global batch (SyncBN), so 2 ranks of B/2 images compute what one process computes at B. Each rank
//! evaluates its slice of the test set; the confusion matrices are summed.

use super::batches::{epoch_order, eval_batch, train_batch};
use super::checkpoint::{save_checkpoint, SegPosition};
pub use super::config::{SegData, SegTrainConfig};
use super::data::SegSource;
use super::metrics::{ConfusionMatrix, SegMetrics};
use crate::data::Normalization;
use crate::model::Graph;
use crate::nn::loss::PixelCrossEntropy;
use crate::state::Stateful;
use crate::train::distributed::{broadcast_state, check_agreement, check_replicas, GradReducer};
use crate::train::log::JsonLog;
use crate::train::{Distributed, Progress};
use crate::{Ctx, NvError, Result};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// One evaluation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegEval {
    pub epoch: usize,
    pub step: u64,
    pub metrics: SegMetrics,
    pub test_loss: f64,
    pub train_loss: f64,
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegReport {
    pub evals: Vec<SegEval>,
    pub losses: Vec<f64>,
    pub steps: u64,
    pub train_img_s: f64,
    pub diverged: Option<String>,
    /// What the run noticed about its settings.
    pub notes: Vec<String>,
}

impl SegReport {
    /// The last evaluation's metrics.
    pub fn last(&self) -> Option<&SegMetrics> {
        self.evals.last().map(|e| &e.metrics)
    }
}

/// Options that do not change what is computed.
#[derive(Default)]
pub struct SegRunOptions {
    pub checkpoint: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub progress: Option<Box<dyn Progress>>,
    /// Continue from this position (the graph and optimizer state restored by the caller).
    pub resume: Option<(SegPosition, crate::state::StateDict)>,
    /// Data-parallel over these ranks (see the module documentation); rank 0 alone writes the log, the
    /// progress and the checkpoints.
    pub distributed: Option<Distributed>,
}

/// Mean loss and the metrics of `graph` on every image of `src` (inference plan, whole images; consecutive
/// images of one size share a batch).
pub fn evaluate(
    graph: &mut Graph,
    src: &SegSource,
    norm: &Normalization,
    classes: usize,
    batch: usize,
    loss: &PixelCrossEntropy,
) -> Result<(SegMetrics, f64)> {
    let (cm, loss_sum, weight) =
        evaluate_range(graph, src, 0..src.len(), norm, classes, batch, loss)?;
    Ok((cm.metrics(), loss_sum / weight.max(f64::MIN_POSITIVE)))
}

/// The confusion matrix, Σ loss·weight and Σ weight of `graph` on the images `range` of `src`.
fn evaluate_range(
    graph: &mut Graph,
    src: &SegSource,
    range: std::ops::Range<usize>,
    norm: &Normalization,
    classes: usize,
    batch: usize,
    loss: &PixelCrossEntropy,
) -> Result<(ConfusionMatrix, f64, f64)> {
    let mut cm = ConfusionMatrix::new(classes);
    let (mut loss_sum, mut weight) = (0.0, 0.0);
    let mut i = range.start;
    while i < range.end {
        let size = src.size(i);
        let mut idx = vec![i];
        while idx.len() < batch && i + idx.len() < range.end && src.size(i + idx.len()) == size {
            idx.push(i + idx.len());
        }
        i += idx.len();
        let b = eval_batch(src, &idx, norm)?;
        let logits = graph.infer(&[&b.x])?.remove(0);
        let w = loss.total_weight(&b.targets);
        if w > 0.0 {
            let (l, _) = loss.forward(&logits, &b.targets)?;
            loss_sum += l * w;
            weight += w;
        }
        cm.add_logits(
            logits.as_slice().expect("standard layout"),
            logits.shape(),
            &b.targets,
        )?;
    }
    Ok((cm, loss_sum, weight))
}

/// [`evaluate`] over the ranks: each evaluates its slice of `src` with rank 0's buffers (BN's running
/// statistics, as DDP broadcasts them), after checking that the replicas agree; the sums are all-reduced.
fn evaluate_distributed(
    graph: &mut Graph,
    src: &SegSource,
    norm: &Normalization,
    cfg: &SegTrainConfig,
    d: &Distributed,
) -> Result<(SegMetrics, f64)> {
    check_replicas(d.comm.as_ref(), graph)?;
    broadcast_state(d.comm.as_ref(), graph, None)?;
    let k = cfg.model.num_classes;
    let range = crate::data::Shard::even(d.rank(), d.size()).range(src.len());
    let (cm, loss_sum, weight) =
        evaluate_range(graph, src, range, norm, k, cfg.eval_batch_size, &cfg.loss)?;
    let mut sums: Vec<f64> = cm.counts().iter().map(|&c| c as f64).collect();
    sums.extend([loss_sum, weight]);
    d.comm.all_reduce_sum_f64(&mut sums)?;
    let mut all = ConfusionMatrix::new(k);
    for (j, &c) in sums[..k * k].iter().enumerate() {
        all.add(j / k, j % k, c as u64);
    }
    Ok((
        all.metrics(),
        sums[k * k] / sums[k * k + 1].max(f64::MIN_POSITIVE),
    ))
}

/// Trains `graph` (built from `cfg.model`, possibly with a pre-trained backbone) per `cfg` on `data`.
/// A non-finite loss stops the run and is reported in [`SegReport::diverged`]; the last checkpoint stays.
pub fn train_segmentation(
    cfg: &SegTrainConfig,
    graph: &mut Graph,
    data: &SegData,
    mut opts: SegRunOptions,
) -> Result<SegReport> {
    cfg.validate()?;
    let classes = cfg.model.num_classes;
    data.train.check_labels(classes, None)?;
    data.test.check_labels(classes, None)?;
    let n = data.train.len();
    let nb = cfg.steps_per_epoch(n);
    if nb == 0 {
        return Err(NvError::Config(format!(
            "segmentation: {n} training images make no batch of --batch-size {}",
            cfg.batch_size
        )));
    }
    if cfg.freeze_backbone {
        let names: Vec<String> = graph
            .nodes()
            .iter()
            .filter(|n| n.name().starts_with("backbone."))
            .map(|n| n.name().to_string())
            .collect();
        for name in names {
            graph.set_frozen(&name, true)?;
        }
    }
    let schedule = cfg.schedule(n)?;
    let mut opt = cfg.optim.build()?;
    let mut pos = SegPosition::default();
    if let Some((p, optim_state)) = &opts.resume {
        opt.load_state_dict(optim_state)?;
        pos = *p;
    }
    let dist = opts.distributed.take().filter(|d| d.size() > 1);
    let mut notes: Vec<String> = vec![];
    if let Some(d) = &dist {
        let shard = d.shard();
        shard.validate(cfg.batch_size)?;
        if (0..d.size()).any(|r| shard.range_of(r, cfg.batch_size).is_empty()) {
            return Err(NvError::Config(format!(
                "segmentation: a global --batch-size of {} leaves a rank of {} without images; give every \
                 rank at least one",
                cfg.batch_size,
                d.size()
            )));
        }
        if d.rank() != 0 {
            opts.checkpoint = None;
            opts.log = None;
            opts.progress = None;
        }
        // every rank runs what rank 0 runs, from rank 0's weights, or none does
        let description = json!({
            "version": env!("CARGO_PKG_VERSION"), "task": "segment", "config": cfg, "position": pos,
            "normalization": data.norm, "classes": data.classes, "train": data.train.describe(),
            "test": data.test.describe(), "ranks": d.size(), "shard_sizes": d.shard_sizes,
            "model": graph.spec()?,
        });
        check_agreement(d.comm.as_ref(), &description)?;
        broadcast_state(d.comm.as_ref(), graph, Some(opt.as_mut()))?;
        if cfg.sync_bn {
            graph.set_batch_norm_sync(Some(d.comm.clone()));
        }
    } else if cfg.sync_bn {
        notes.push(
            "sync_bn has no effect in a single process: BatchNorm already sees the whole batch"
                .into(),
        );
    }
    let result = run_epochs(
        cfg,
        graph,
        data,
        &mut opts,
        dist.as_ref(),
        opt.as_mut(),
        pos,
        &schedule,
        notes,
    );
    if dist.is_some() && cfg.sync_bn {
        graph.set_batch_norm_sync(None);
    }
    result
}

/// The epochs of [`train_segmentation`] from `pos`.
#[allow(clippy::too_many_arguments)]
fn run_epochs(
    cfg: &SegTrainConfig,
    graph: &mut Graph,
    data: &SegData,
    opts: &mut SegRunOptions,
    dist: Option<&Distributed>,
    opt: &mut dyn crate::optim::Optimizer,
    mut pos: SegPosition,
    schedule: &crate::optim::LrSchedule,
    notes: Vec<String>,
) -> Result<SegReport> {
    let classes = cfg.model.num_classes;
    let n = data.train.len();
    let nb = cfg.steps_per_epoch(n);
    let mut log = match (&opts.log, &opts.resume) {
        (Some(p), None) => JsonLog::create(p)?,
        (Some(p), Some((r, _))) => JsonLog::resume(p, r.step)?,
        (None, _) => JsonLog::disabled(),
    };
    log.write(
        &json!({"event": "start", "task": "segment", "config": cfg, "resume_from": pos,
        "train_samples": n, "test_samples": data.test.len(), "classes": data.classes,
        "normalization": data.norm, "threads": rayon::current_num_threads(),
        "ranks": dist.map_or(1, |d| d.size()), "notes": notes}),
    )?;
    let mut report = SegReport {
        evals: vec![],
        losses: vec![],
        steps: pos.step,
        train_img_s: 0.0,
        diverged: None,
        notes,
    };
    let mut reducer = GradReducer::default();
    let (mut train_secs, mut train_imgs) = (0.0f64, 0usize);
    while pos.epoch < cfg.epochs {
        if cfg.max_steps.is_some_and(|m| pos.step >= m) {
            break;
        }
        if let Some(p) = opts.progress.as_mut() {
            p.epoch_start(pos.epoch + 1, nb, 0);
        }
        let order = epoch_order(cfg.seed, pos.epoch as u64, n);
        let (mut ep_loss, mut ep_steps) = (0.0, 0usize);
        let ep_start = Instant::now();
        for b in 0..nb {
            if cfg.max_steps.is_some_and(|m| pos.step >= m) {
                break;
            }
            let t0 = Instant::now();
            let global = &order[b * cfg.batch_size..(b + 1) * cfg.batch_size];
            let idx = match dist {
                Some(d) => &global[d.shard().range(global.len())],
                None => global,
            };
            let batch = train_batch(
                &data.train,
                idx,
                &cfg.augment,
                &data.norm,
                cfg.seed,
                pos.epoch as u64,
            )?;
            let lr = schedule.lr_at(pos.step);
            graph.zero_grad();
            let ctx = Ctx::train().with_step(pos.step);
            let logits = graph.forward(&[&batch.x], ctx)?.remove(0);
            let w = cfg.loss.total_weight(&batch.targets);
            let (mut sums, mut dlogits, why) = match cfg.loss.forward(&logits, &batch.targets) {
                Ok((l, g)) if l.is_finite() => ([l * w, w, 0.0], g, None),
                Ok((l, g)) => ([0.0, w, 1.0], g, Some(format!("loss {l}"))),
                Err(NvError::NonFinite(m)) => (
                    [0.0, w, 1.0],
                    ndarray::ArrayD::zeros(logits.raw_dim()),
                    Some(m),
                ),
                Err(e) => return Err(e),
            };
            if let Some(d) = dist {
                // every rank sees the global loss (and any rank's non-finite one) before the backward
                d.comm.all_reduce_sum_f64(&mut sums)?;
            }
            let [loss_w, total_w, bad] = sums;
            let loss = if total_w > 0.0 { loss_w / total_w } else { 0.0 };
            if bad > 0.0 {
                let why = why.unwrap_or_else(|| "a non-finite loss on another rank".into());
                graph.clear_saved();
                report.diverged = Some(format!("{why} at step {}", pos.step + 1));
                log.write(&json!({"event": "diverged", "step": pos.step + 1, "why": why}))?;
                return Ok(finish(report, train_secs, train_imgs));
            }
            if let Some(d) = dist {
                // the local mean's gradient, scaled to this rank's share of the global mean
                if total_w > 0.0 {
                    dlogits *= (w / total_w) as f32;
                }
                graph.backward(&[&batch.x], &[&dlogits], ctx, false)?;
                reducer.all_reduce(d.comm.as_ref(), graph, d.bucket_len)?;
            } else {
                graph.backward(&[&batch.x], &[&dlogits], ctx, false)?;
            }
            opt.step(graph, lr)?;
            let dt = t0.elapsed().as_secs_f64();
            train_secs += dt;
            train_imgs += global.len();
            pos.step += 1;
            report.losses.push(loss);
            ep_loss += loss;
            ep_steps += 1;
            log.write(
                &json!({"event": "step", "step": pos.step, "epoch": pos.epoch + 1, "loss": loss,
                "lr": lr, "img_s": global.len() as f64 / dt}),
            )?;
            if let Some(p) = opts.progress.as_mut() {
                p.step(&format!(
                    "loss {:.4} {:.0} img/s{}",
                    ep_loss / ep_steps as f64,
                    (ep_steps * cfg.batch_size) as f64 / ep_start.elapsed().as_secs_f64(),
                    report
                        .evals
                        .last()
                        .map(|e| format!(" test mIoU {:.2}%", e.metrics.miou * 100.0))
                        .unwrap_or_default()
                ));
            }
        }
        if let Some(p) = opts.progress.as_mut() {
            p.epoch_end();
        }
        let done_epoch = ep_steps == nb;
        let (metrics, test_loss) = match dist {
            Some(d) => evaluate_distributed(graph, &data.test, &data.norm, cfg, d)?,
            None => evaluate(
                graph,
                &data.test,
                &data.norm,
                classes,
                cfg.eval_batch_size,
                &cfg.loss,
            )?,
        };
        if done_epoch {
            pos.epoch += 1;
        }
        let e = SegEval {
            epoch: pos.epoch,
            step: pos.step,
            metrics,
            test_loss,
            train_loss: ep_loss / ep_steps.max(1) as f64,
        };
        log.write(&json!({"event": "eval", "eval": e}))?;
        report.evals.push(e);
        if let Some(path) = &opts.checkpoint {
            save_checkpoint(path, cfg, data, graph, opt, pos)?;
        }
        if !done_epoch {
            break;
        }
    }
    let report = finish(report, train_secs, train_imgs);
    log.write(
        &json!({"event": "end", "steps": report.steps, "train_img_s": report.train_img_s,
        "final": report.last()}),
    )?;
    Ok(report)
}

fn finish(mut r: SegReport, secs: f64, imgs: usize) -> SegReport {
    r.steps += r.losses.len() as u64;
    r.train_img_s = if secs > 0.0 { imgs as f64 / secs } else { 0.0 };
    r
}
