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

use super::batches::{epoch_order, eval_batch, train_batch};
use super::checkpoint::{save_checkpoint, SegPosition};
pub use super::config::{SegData, SegTrainConfig};
use super::data::SegSource;
use super::metrics::{ConfusionMatrix, SegMetrics};
use crate::data::scenes::IGNORE;
use crate::data::Normalization;
use crate::model::Graph;
use crate::nn::loss::PixelCrossEntropy;
use crate::state::Stateful;
use crate::train::log::JsonLog;
use crate::train::Progress;
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
}

/// Mean loss and the confusion matrix of `graph` on every image of `src` (inference plan, whole images;
/// consecutive images of one size share a batch).
pub fn evaluate(
    graph: &mut Graph,
    src: &SegSource,
    norm: &Normalization,
    classes: usize,
    batch: usize,
    loss: &PixelCrossEntropy,
) -> Result<(SegMetrics, f64)> {
    let mut cm = ConfusionMatrix::new(classes);
    let (mut loss_sum, mut weight) = (0.0, 0usize);
    let mut i = 0;
    while i < src.len() {
        let size = src.size(i);
        let mut idx = vec![i];
        while idx.len() < batch && i + idx.len() < src.len() && src.size(i + idx.len()) == size {
            idx.push(i + idx.len());
        }
        i += idx.len();
        let b = eval_batch(src, &idx, norm)?;
        let logits = graph.infer(&[&b.x])?.remove(0);
        let valid = b.targets.iter().filter(|&&t| t != IGNORE as usize).count();
        if valid > 0 {
            let (l, _) = loss.forward(&logits, &b.targets)?;
            loss_sum += l * valid as f64;
            weight += valid;
        }
        cm.add_logits(
            logits.as_slice().expect("standard layout"),
            logits.shape(),
            &b.targets,
        )?;
    }
    Ok((cm.metrics(), loss_sum / weight.max(1) as f64))
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
    let mut log = match (&opts.log, &opts.resume) {
        (Some(p), None) => JsonLog::create(p)?,
        (Some(p), Some((r, _))) => JsonLog::resume(p, r.step)?,
        (None, _) => JsonLog::disabled(),
    };
    if let Some((p, optim_state)) = opts.resume.take() {
        opt.load_state_dict(&optim_state)?;
        pos = p;
    }
    log.write(
        &json!({"event": "start", "task": "segment", "config": cfg, "resume_from": pos,
        "train_samples": n, "test_samples": data.test.len(), "classes": data.classes,
        "normalization": data.norm, "threads": rayon::current_num_threads()}),
    )?;
    let mut report = SegReport {
        evals: vec![],
        losses: vec![],
        steps: pos.step,
        train_img_s: 0.0,
        diverged: None,
    };
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
            let idx = &order[b * cfg.batch_size..(b + 1) * cfg.batch_size];
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
            let (loss, dlogits) = cfg.loss.forward(&logits, &batch.targets)?;
            if !loss.is_finite() {
                report.diverged = Some(format!("loss {loss} at step {}", pos.step + 1));
                log.write(&json!({"event": "diverged", "step": pos.step + 1, "loss": loss}))?;
                return Ok(finish(report, train_secs, train_imgs));
            }
            graph.backward(&[&batch.x], &[&dlogits], ctx, false)?;
            opt.step(graph, lr)?;
            let dt = t0.elapsed().as_secs_f64();
            train_secs += dt;
            train_imgs += idx.len();
            pos.step += 1;
            report.losses.push(loss);
            ep_loss += loss;
            ep_steps += 1;
            log.write(
                &json!({"event": "step", "step": pos.step, "epoch": pos.epoch + 1, "loss": loss,
                "lr": lr, "img_s": idx.len() as f64 / dt}),
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
        let (metrics, test_loss) = evaluate(
            graph,
            &data.test,
            &data.norm,
            classes,
            cfg.eval_batch_size,
            &cfg.loss,
        )?;
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
            save_checkpoint(path, cfg, data, graph, opt.as_ref(), pos)?;
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
