//! Training and evaluating a [`Detector`]: torchvision's detection reference recipe (SGD with momentum 0.9,
//! weight decay 1e-4, linear warm-up, the learning rate divided by 10 at 2/3 and 8/9 of the run, random
//! horizontal flips), COCO evaluation of the test set after every epoch, and a checkpoint written atomically
//! after every epoch.

use super::checkpoint::save_checkpoint;
use super::coco::{CocoDataset, CocoDetection};
use super::coco_eval::{self, CocoEvaluation};
use super::config::DetTrainConfig;
use super::data::{batch, normalization, to_xywh, DetSource};
use super::detector::{DetLosses, Detector};
use crate::data::Normalization;
use crate::optim::sgd::SgdConfig;
use crate::optim::{Optimizer, Sgd};
use crate::rng::derive_rng;
use crate::state::Stateful;
use crate::{Ctx, NvError, Result};
use rand::seq::SliceRandom;
use std::path::Path;

/// One evaluation: COCO's twelve numbers and AP per class.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DetEval {
    pub epoch: usize,
    pub stats: [f64; 12],
    pub per_class_ap: Vec<f64>,
}

/// What a run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DetReport {
    pub steps: u64,
    /// Mean losses per epoch.
    pub losses: Vec<DetLosses>,
    pub evals: Vec<DetEval>,
    /// Training images per second (data, forward, backward and update).
    pub train_img_s: f64,
    pub seconds: f64,
}

/// Progress of a run, for bars and logs.
pub enum DetEvent<'a> {
    Step {
        epoch: usize,
        step: u64,
        total: u64,
        losses: &'a DetLosses,
        lr: f64,
    },
    Epoch {
        epoch: usize,
        losses: &'a DetLosses,
        eval: &'a DetEval,
    },
}

/// Detects every image of `src` (batches of `batch_size`) and evaluates the detections against its ground
/// truth as COCO does. Returns the evaluation and the detections in COCO's result format.
pub fn evaluate(
    det: &mut Detector,
    src: &DetSource,
    norm: &Normalization,
    batch_size: usize,
) -> Result<(CocoEvaluation, Vec<CocoDetection>)> {
    evaluate_against(det, src, &src.ground_truth()?, norm, batch_size)
}

/// [`evaluate`] against `gt`, `src`'s ground truth already built (a run evaluates every epoch).
fn evaluate_against(
    det: &mut Detector,
    src: &DetSource,
    gt: &CocoDataset,
    norm: &Normalization,
    batch_size: usize,
) -> Result<(CocoEvaluation, Vec<CocoDetection>)> {
    let cats = src.category_ids();
    let mut out = vec![];
    let idx: Vec<usize> = (0..src.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let samples = chunk
            .iter()
            .map(|&i| Ok((i, src.sample(i)?)))
            .collect::<Result<Vec<_>>>()?;
        let (x, _) = batch(&samples, norm, det.cfg.stride, None);
        for (dets, (_, s)) in det.detect(&x)?.into_iter().zip(&samples) {
            for d in dets {
                out.push(CocoDetection {
                    image_id: s.image_id,
                    category_id: cats[d.label - 1],
                    bbox: to_xywh(&d.bbox),
                    score: d.score as f64,
                });
            }
        }
    }
    Ok((coco_eval::evaluate(gt, &out), out))
}

fn sgd(cfg: &DetTrainConfig) -> Result<Sgd> {
    Sgd::new(SgdConfig {
        momentum: cfg.momentum,
        weight_decay: cfg.weight_decay,
        ..SgdConfig::default()
    })
}

/// Trains `det` on `train` and evaluates it on `test` after every epoch; with `checkpoint`, saves the run
/// there after every epoch. `norm` defaults to the statistics of the first 256 training images.
pub fn train_detector(
    det: &mut Detector,
    cfg: &DetTrainConfig,
    train: &DetSource,
    test: &DetSource,
    norm: Option<Normalization>,
    checkpoint: Option<&Path>,
    on_event: &mut dyn FnMut(DetEvent<'_>),
) -> Result<(DetReport, Normalization)> {
    cfg.validate()?;
    if train.channels() != cfg.detector.net.in_channels || test.channels() != train.channels() {
        return Err(NvError::Config(format!(
            "detection: the network takes {} channels, the training images have {} and the test images {}",
            cfg.detector.net.in_channels,
            train.channels(),
            test.channels()
        )));
    }
    let norm = match norm {
        Some(n) => n,
        None => normalization(train, 256)?,
    };
    if cfg.freeze_backbone {
        let names: Vec<String> = det
            .trunk
            .nodes()
            .iter()
            .filter(|n| n.name().starts_with("backbone."))
            .map(|n| n.name().to_string())
            .collect();
        for n in names {
            det.trunk.set_frozen(&n, true)?;
        }
    }
    let (mut opt_trunk, mut opt_head) = (sgd(cfg)?, sgd(cfg)?);
    let test_gt = test.ground_truth()?;
    let per_epoch = train.len().div_ceil(cfg.batch_size) as u64;
    let total = per_epoch * cfg.epochs as u64;
    let mut step = 0u64;
    let mut report = DetReport {
        steps: 0,
        losses: vec![],
        evals: vec![],
        train_img_s: 0.0,
        seconds: 0.0,
    };
    let start = std::time::Instant::now();
    let mut train_secs = 0.0;
    let mut images = 0usize;
    for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut derive_rng(cfg.seed, epoch as u64, 11));
        let mut sum = DetLosses::default();
        let mut nb = 0usize;
        let t0 = std::time::Instant::now();
        for chunk in order.chunks(cfg.batch_size) {
            let samples = chunk
                .iter()
                .map(|&i| Ok((i, train.sample(i)?)))
                .collect::<Result<Vec<_>>>()?;
            let flip = cfg.flip.then_some((cfg.seed, epoch as u64));
            let (x, targets) = batch(&samples, &norm, cfg.detector.stride, flip);
            det.trunk.zero_grad();
            det.head.zero_grad();
            let ctx = Ctx::train().with_step(step);
            let l = det
                .train_step(&x, &targets, ctx, cfg.seed, step)
                .map_err(|e| match e {
                    NvError::NonFinite(m) => NvError::Diverged(format!("step {step}: {m}")),
                    e => e,
                })?;
            let lr = cfg.lr_at(step, total);
            opt_trunk.step(&mut det.trunk, lr)?;
            opt_head.step(&mut det.head, lr)?;
            sum.objectness += l.objectness;
            sum.rpn_box += l.rpn_box;
            sum.classifier += l.classifier;
            sum.box_reg += l.box_reg;
            nb += 1;
            images += samples.len();
            step += 1;
            on_event(DetEvent::Step {
                epoch,
                step,
                total,
                losses: &l,
                lr,
            });
        }
        train_secs += t0.elapsed().as_secs_f64();
        let k = nb.max(1) as f64;
        let mean = DetLosses {
            objectness: sum.objectness / k,
            rpn_box: sum.rpn_box / k,
            classifier: sum.classifier / k,
            box_reg: sum.box_reg / k,
        };
        let (ev, _) = evaluate_against(det, test, &test_gt, &norm, 8)?;
        let e = DetEval {
            epoch: epoch + 1,
            stats: ev.stats,
            per_class_ap: ev.per_category_ap(),
        };
        on_event(DetEvent::Epoch {
            epoch: epoch + 1,
            losses: &mean,
            eval: &e,
        });
        report.losses.push(mean);
        report.evals.push(e);
        if let Some(p) = checkpoint {
            save_checkpoint(p, cfg, &norm, &train.class_names(), det, epoch + 1)?;
        }
    }
    report.steps = step;
    report.train_img_s = images as f64 / train_secs.max(1e-9);
    report.seconds = start.elapsed().as_secs_f64();
    Ok((report, norm))
}
