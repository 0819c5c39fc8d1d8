//! Training and evaluating a [`Detector`]: torchvision's detection reference recipe (SGD with momentum 0.9,
//! weight decay 1e-4, linear warm-up, the learning rate divided by 10 at 2/3 and 8/9 of the run, random
//! horizontal flips), COCO evaluation of the test set after every epoch, and a checkpoint written atomically
//! after every epoch.
//!
//! Data-parallel ([`train_detector_distributed`], `mpirun -np N normvision train --task detect --distributed`),
//! as torchvision's references train with DDP: every rank starts from rank 0's weights, takes its contiguous
//! slice of each global batch (a last batch too small to give every rank an image is dropped), computes its
//! own losses (means over its own sampled anchors and RoIs), and the gradients are averaged over the ranks.
//! The samplers draw from each image's position in the global batch. With `sync_bn` (`--backbone-norm
//! sync`) the backbone's BatchNorms take their statistics over the global batch (SyncBN). Each rank detects
//! its slice of the test set; the detections are gathered and evaluated on every rank.

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
use crate::train::distributed::{broadcast_state, check_agreement, check_replicas, GradReducer};
use crate::train::Distributed;
use crate::{Ctx, NvError, Result};
use rand::seq::SliceRandom;
use serde_json::json;
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
    /// The last epoch's evaluation and its detections (COCO's result format), for a table and `--dets-out`
    /// without detecting the test set again.
    #[serde(skip)]
    pub last: Option<(CocoEvaluation, Vec<CocoDetection>)>,
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
    evaluate_against(det, src, &src.ground_truth()?, norm, batch_size, None)
}

/// [`evaluate`] against `gt`, `src`'s ground truth already built (a run evaluates every epoch); with `dist`,
/// each rank detects its slice of `src` and every rank evaluates the gathered detections.
fn evaluate_against(
    det: &mut Detector,
    src: &DetSource,
    gt: &CocoDataset,
    norm: &Normalization,
    batch_size: usize,
    dist: Option<&Distributed>,
) -> Result<(CocoEvaluation, Vec<CocoDetection>)> {
    let cats = src.category_ids();
    let mut out = vec![];
    let range = match dist {
        Some(d) => {
            let (n, r) = (src.len(), d.size());
            (n * d.rank() / r)..(n * (d.rank() + 1) / r)
        }
        None => 0..src.len(),
    };
    let idx: Vec<usize> = range.collect();
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
    if let Some(d) = dist {
        let flat: Vec<f64> = out
            .iter()
            .flat_map(|c| {
                let [x, y, w, h] = c.bbox;
                [c.image_id as f64, c.category_id as f64, x, y, w, h, c.score]
            })
            .collect();
        out = d
            .comm
            .all_gather_f64(&flat)?
            .iter()
            .flat_map(|v| {
                v.chunks_exact(7).map(|c| CocoDetection {
                    image_id: c[0] as i64,
                    category_id: c[1] as i64,
                    bbox: [c[2], c[3], c[4], c[5]],
                    score: c[6],
                })
            })
            .collect::<Vec<_>>();
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
    run(det, cfg, train, test, norm, checkpoint, None, on_event)
}

/// [`train_detector`] as one rank of `dist` (see the module documentation), or in one process when `dist` is
/// `None` or a group of one. Every rank must call it with the same configuration and data (checked at
/// start-up); only rank 0 writes the checkpoint and sees events.
#[allow(clippy::too_many_arguments)]
pub fn train_detector_distributed(
    det: &mut Detector,
    cfg: &DetTrainConfig,
    train: &DetSource,
    test: &DetSource,
    norm: Option<Normalization>,
    checkpoint: Option<&Path>,
    dist: Option<&Distributed>,
    on_event: &mut dyn FnMut(DetEvent<'_>),
) -> Result<(DetReport, Normalization)> {
    let dist = dist.filter(|d| d.size() > 1);
    let sync = dist.filter(|_| cfg.sync_bn);
    if let Some(d) = sync {
        det.trunk.set_batch_norm_sync(Some(d.comm.clone()));
    }
    let r = run(det, cfg, train, test, norm, checkpoint, dist, on_event);
    if sync.is_some() {
        det.trunk.set_batch_norm_sync(None);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn run(
    det: &mut Detector,
    cfg: &DetTrainConfig,
    train: &DetSource,
    test: &DetSource,
    norm: Option<Normalization>,
    checkpoint: Option<&Path>,
    dist: Option<&Distributed>,
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
    let (rank0, ranks) = dist.map_or((true, 1), |d| (d.rank() == 0, d.size()));
    let checkpoint = checkpoint.filter(|_| rank0);
    if let Some(d) = dist {
        if cfg.batch_size < ranks {
            return Err(NvError::Config(format!(
                "detection: a global --batch-size of {} leaves some of the {ranks} ranks without images",
                cfg.batch_size
            )));
        }
        let describe = |s: &DetSource| {
            json!({"images": s.len(), "classes": s.class_names(),
            "categories": s.category_ids(), "channels": s.channels()})
        };
        let description = json!({"version": env!("CARGO_PKG_VERSION"), "task": "detect", "config": cfg,
            "normalization": norm, "train": describe(train), "test": describe(test), "ranks": ranks});
        check_agreement(d.comm.as_ref(), &description)?;
        broadcast_state(d.comm.as_ref(), &mut det.trunk, None)?;
        broadcast_state(d.comm.as_ref(), &mut det.head, None)?;
    }
    let mut reducer = GradReducer::default();
    let test_gt = test.ground_truth()?;
    let per_epoch = if dist.is_some() {
        // a last batch smaller than the ranks would leave a rank without an image
        let full = train.len() / cfg.batch_size;
        let rest = train.len() % cfg.batch_size;
        (full + usize::from(rest >= ranks)) as u64
    } else {
        train.len().div_ceil(cfg.batch_size) as u64
    };
    let total = per_epoch * cfg.epochs as u64;
    let mut step = 0u64;
    let mut report = DetReport {
        steps: 0,
        losses: vec![],
        evals: vec![],
        train_img_s: 0.0,
        seconds: 0.0,
        last: None,
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
        for chunk in order.chunks(cfg.batch_size).take(per_epoch as usize) {
            // this rank's slice of the global batch (all of it in one process)
            let part = match dist {
                Some(d) => {
                    let (n, r) = (chunk.len(), d.size());
                    (n * d.rank() / r)..(n * (d.rank() + 1) / r)
                }
                None => 0..chunk.len(),
            };
            let first = part.start;
            let samples = chunk[part]
                .iter()
                .map(|&i| Ok((i, train.sample(i)?)))
                .collect::<Result<Vec<_>>>()?;
            let flip = cfg.flip.then_some((cfg.seed, epoch as u64));
            let (x, targets) = batch(&samples, &norm, cfg.detector.stride, flip);
            det.trunk.zero_grad();
            det.head.zero_grad();
            let ctx = Ctx::train().with_step(step);
            let result = det.train_step_at(&x, &targets, ctx, cfg.seed, step, first);
            let l = match dist {
                None => result.map_err(|e| match e {
                    NvError::NonFinite(m) => NvError::Diverged(format!("step {step}: {m}")),
                    e => e,
                })?,
                Some(d) => {
                    // every rank learns of any rank's non-finite loss, and sees the mean losses
                    let (mut v, why) = match result {
                        Ok(l) => (
                            [0.0, l.objectness, l.rpn_box, l.classifier, l.box_reg],
                            None,
                        ),
                        Err(NvError::NonFinite(m)) => ([1.0, 0.0, 0.0, 0.0, 0.0], Some(m)),
                        Err(e) => return Err(e),
                    };
                    d.comm.all_reduce_sum_f64(&mut v)?;
                    if v[0] > 0.0 {
                        return Err(NvError::Diverged(format!(
                            "step {step}: {}",
                            why.unwrap_or_else(|| "a non-finite loss on another rank".into())
                        )));
                    }
                    let r = ranks as f64;
                    for g in [&mut det.trunk, &mut det.head] {
                        reducer.all_reduce_scaled(
                            d.comm.as_ref(),
                            g,
                            d.bucket_len,
                            1.0 / r as f32,
                        )?;
                    }
                    DetLosses {
                        objectness: v[1] / r,
                        rpn_box: v[2] / r,
                        classifier: v[3] / r,
                        box_reg: v[4] / r,
                    }
                }
            };
            let lr = cfg.lr_at(step, total);
            opt_trunk.step(&mut det.trunk, lr)?;
            opt_head.step(&mut det.head, lr)?;
            sum.objectness += l.objectness;
            sum.rpn_box += l.rpn_box;
            sum.classifier += l.classifier;
            sum.box_reg += l.box_reg;
            nb += 1;
            images += chunk.len();
            step += 1;
            if rank0 {
                on_event(DetEvent::Step {
                    epoch,
                    step,
                    total,
                    losses: &l,
                    lr,
                });
            }
        }
        train_secs += t0.elapsed().as_secs_f64();
        let k = nb.max(1) as f64;
        let mean = DetLosses {
            objectness: sum.objectness / k,
            rpn_box: sum.rpn_box / k,
            classifier: sum.classifier / k,
            box_reg: sum.box_reg / k,
        };
        if let Some(d) = dist {
            check_replicas(d.comm.as_ref(), &mut det.trunk)?;
            check_replicas(d.comm.as_ref(), &mut det.head)?;
        }
        let (ev, dets) = evaluate_against(det, test, &test_gt, &norm, 8, dist)?;
        let e = DetEval {
            epoch: epoch + 1,
            stats: ev.stats,
            per_class_ap: ev.per_category_ap(),
        };
        if rank0 {
            on_event(DetEvent::Epoch {
                epoch: epoch + 1,
                losses: &mean,
                eval: &e,
            });
        }
        report.losses.push(mean);
        report.evals.push(e);
        report.last = Some((ev, dets));
        if let Some(p) = checkpoint {
            save_checkpoint(p, cfg, &norm, &train.class_names(), det, epoch + 1)?;
        }
    }
    report.steps = step;
    report.train_img_s = images as f64 / train_secs.max(1e-9);
    report.seconds = start.elapsed().as_secs_f64();
    Ok((report, norm))
}
