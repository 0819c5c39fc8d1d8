//! `experiment seg-norm`: BatchNorm's small-batch problem in segmentation, and its three cures (the seed's
//! DeepLabV3 example; `experiments.md` §9). DeepLabV3 (ResNet-14 backbone at output stride 8, ASPP) on garment
//! scenes at batch 2, 4 and 16 with:
//!
//! - `batch`: BatchNorm everywhere, batch statistics of the batch;
//! - `group`: GroupNorm (8 groups) everywhere (Wu & He 2018);
//! - `frozen`: the backbone pre-trained on Fashion-MNIST classification (`train --model resnet14`), frozen
//!   with its BN statistics fixed (FrozenBatchNorm, BN* in Wu & He; `--backbone-norm frozen --freeze-backbone
//!   --backbone-from`), and BatchNorm in the head;
//! - `sync`: BatchNorm with SyncBN over 2 ranks of B/2 images each (Peng et al. 2018): the statistics of the
//!   global batch B, while each rank holds half of it. The ranks are threads of this process (the trainer's
//!   code path under `mpirun --features mpi`).
//!
//! Every run sees the same scenes in the same order for the same number of epochs, at lr 0.02·B/8 (torchvision's
//! recipe otherwise: SGD momentum 0.9, weight decay 1e-4, poly 0.9; crops 64, scales 0.75-1.5, flips). Test mIoU
//! on whole test scenes after the last epoch, over 3 seeds (the seed draws the weights, the data order and the
//! augmentation; the scenes are fixed).
//!
//! Budget (full): 36 runs of 2000 scenes x 6 epochs and one pre-training of 2 epochs, about 50 minutes on this
//! machine's 2 cores (1.7 CPU-hours of the 3).

use super::report::{Plot, Report, Series, Status, Table, Verdict};
use super::runs::RunCache;
use super::{fashion, mean_std, pretrain_resnet14, ExperimentOptions};
use crate::model::deeplab::DeepLabConfig;
use crate::model::NormKind;
use crate::segment::{
    load_backbone_state, train_segmentation, SegData, SegReport, SegRunOptions, SegTrainConfig,
};
use crate::state::StateDict;
use crate::train::Distributed;
use crate::Result;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// The variants, by report name.
const VARIANTS: [&str; 4] = ["batch", "group", "frozen", "sync"];

/// The sizes of one suite.
struct Scale {
    train_scenes: usize,
    test_scenes: usize,
    epochs: usize,
    batches: Vec<usize>,
    seeds: usize,
    pre_epochs: usize,
    pre_limit: usize,
}

fn scale(opts: &ExperimentOptions) -> Scale {
    let mut s = if opts.quick {
        Scale {
            train_scenes: 48,
            test_scenes: 16,
            epochs: 1,
            batches: vec![2, 4],
            seeds: 1,
            pre_epochs: 1,
            pre_limit: 1024,
        }
    } else {
        Scale {
            train_scenes: 2000,
            test_scenes: 500,
            epochs: 6,
            batches: vec![2, 4, 16],
            seeds: 3,
            pre_epochs: 2,
            pre_limit: 0,
        }
    };
    if opts.seeds > 0 {
        s.seeds = opts.seeds;
    }
    s
}

/// The network of `variant` for `seed`.
fn model(variant: &str, seed: u64) -> DeepLabConfig {
    let norm = if variant == "group" {
        NormKind::Group
    } else {
        NormKind::Batch
    };
    let mut m = DeepLabConfig::new(1, 11, norm);
    if variant == "frozen" {
        m.backbone_norm = NormKind::Frozen;
    }
    m.seed = seed;
    m
}

/// Trains `cfg` on `data`, over 2 ranks with SyncBN when `ranks` is 2 (rank 0's report).
fn train_run(
    cfg: &SegTrainConfig,
    data: &SegData,
    ranks: usize,
    backbone: Option<&StateDict>,
) -> Result<SegReport> {
    let build = || -> Result<crate::model::Graph> {
        let mut g = cfg.model.build_graph()?;
        if let Some(sd) = backbone {
            load_backbone_state(&mut g, sd, "the pre-trained resnet14")?;
        }
        Ok(g)
    };
    if ranks <= 1 {
        let mut g = build()?;
        return train_segmentation(cfg, &mut g, data, SegRunOptions::default());
    }
    let group = crate::comm::LocalGroup::new(ranks)?;
    let mut results: Vec<Result<SegReport>> = std::thread::scope(|sc| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|comm| {
                sc.spawn(move || {
                    let mut g = build()?;
                    let opts = SegRunOptions {
                        distributed: Some(Distributed::new(Arc::new(comm))),
                        ..Default::default()
                    };
                    train_segmentation(cfg, &mut g, data, opts)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("a rank thread panicked"))
            .collect()
    });
    results.swap_remove(0)
}

pub fn run(opts: &ExperimentOptions) -> Result<Report> {
    let t0 = Instant::now();
    let s = scale(opts);
    let (fm_train, fm_test) = fashion(opts)?;
    let data = SegData::garment_scenes(
        fm_train.clone(),
        fm_test.clone(),
        64,
        0,
        s.train_scenes,
        s.test_scenes,
    )?;
    let mut cache = RunCache::new(opts, "seg-norm", VARIANTS.len() * s.batches.len() * s.seeds)?;
    // the pre-trained backbone, made only when a frozen run is not cached yet
    let mut backbone: Option<(StateDict, f64)> = None;
    // miou[variant][batch] over seeds
    let mut miou = vec![vec![vec![]; s.batches.len()]; VARIANTS.len()];
    let mut pix = vec![vec![vec![]; s.batches.len()]; VARIANTS.len()];
    let mut speed = vec![vec![vec![]; s.batches.len()]; VARIANTS.len()];
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = vec![];
    let mut pre_acc = None;
    let mut records = vec![];
    for seed in 0..s.seeds as u64 {
        for (bi, &b) in s.batches.iter().enumerate() {
            for (vi, &variant) in VARIANTS.iter().enumerate() {
                let mut cfg = SegTrainConfig::reference(model(variant, seed));
                cfg.batch_size = b;
                cfg.lr = 0.02 * b as f64 / 8.0;
                cfg.epochs = s.epochs;
                cfg.seed = seed;
                cfg.freeze_backbone = variant == "frozen";
                cfg.sync_bn = variant == "sync";
                let ranks = if variant == "sync" { 2 } else { 1 };
                let key = json!({"experiment": "seg-norm", "variant": variant, "batch": b, "seed": seed,
                    "ranks": ranks, "config": cfg, "train_scenes": s.train_scenes,
                    "test_scenes": s.test_scenes, "pretrain_epochs": s.pre_epochs,
                    "pretrain_limit": s.pre_limit});
                let r = cache.get_or_run(key.clone(), || {
                    let bb = if variant == "frozen" {
                        if backbone.is_none() {
                            backbone = Some(pretrain_resnet14(
                                NormKind::Batch,
                                s.pre_epochs,
                                s.pre_limit,
                                &fm_train,
                                &fm_test,
                                opts.verbose,
                                "seg-norm",
                            )?);
                        }
                        backbone.as_ref().map(|(sd, _)| sd)
                    } else {
                        None
                    };
                    let t = Instant::now();
                    let rep = train_run(&cfg, &data, ranks, bb)?;
                    let last = rep.last().cloned();
                    Ok(json!({
                        "miou": last.as_ref().map_or(0.0, |m| m.miou),
                        "pixel_acc": last.as_ref().map_or(0.0, |m| m.pixel_acc),
                        "iou": last.as_ref().map(|m| m.iou.clone()),
                        "miou_per_epoch": rep.evals.iter().map(|e| e.metrics.miou).collect::<Vec<_>>(),
                        "final_train_loss": rep.evals.last().map(|e| e.train_loss),
                        "steps": rep.steps,
                        "diverged": rep.diverged,
                        "train_img_s": rep.train_img_s,
                        "pretrained_test_accuracy": backbone.as_ref().filter(|_| variant == "frozen").map(|b| b.1),
                        "seconds": t.elapsed().as_secs_f64(),
                    }))
                })?;
                miou[vi][bi].push(r["miou"].as_f64().unwrap_or(0.0));
                pix[vi][bi].push(r["pixel_acc"].as_f64().unwrap_or(0.0));
                speed[vi][bi].push(r["train_img_s"].as_f64().unwrap_or(0.0));
                if let Some(a) = r["pretrained_test_accuracy"].as_f64() {
                    pre_acc = Some(a);
                }
                if seed == 0 && bi == 0 {
                    let pts = r["miou_per_epoch"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .enumerate()
                                .map(|(e, v)| ((e + 1) as f64, v.as_f64().unwrap_or(0.0)))
                                .collect()
                        })
                        .unwrap_or_default();
                    curves.push((variant.to_string(), pts));
                }
                records.push(json!({"key": key, "result": r}));
            }
        }
    }
    let cell = |v: &[f64]| {
        let (m, sd) = mean_std(v);
        format!("{:.2} ± {:.2}", m * 100.0, sd * 100.0)
    };
    let headers: Vec<String> = s.batches.iter().map(|b| format!("B = {b}")).collect();
    let label = |v: &str| match v {
        "batch" => "BN".to_string(),
        "group" => "GroupNorm (8 groups)".to_string(),
        "frozen" => "BN head, frozen pre-trained backbone (FrozenBN)".to_string(),
        _ => "SyncBN, 2 ranks x B/2".to_string(),
    };
    let columns: Vec<&str> = std::iter::once("normalization")
        .chain(headers.iter().map(String::as_str))
        .collect();
    // one row per variant, one cell per batch
    let table = |title: &str, cell: &dyn Fn(usize, usize) -> String| {
        let mut t = Table::new(title, &columns);
        for (vi, v) in VARIANTS.iter().enumerate() {
            let row = std::iter::once(label(v))
                .chain((0..s.batches.len()).map(|bi| cell(vi, bi)))
                .collect();
            t.row(row);
        }
        t
    };
    let t_miou = table(
        &format!(
            "Test mIoU (%) after {} epochs at lr 0.02·B/8, mean ± std over {} seed(s)",
            s.epochs, s.seeds
        ),
        &|vi, bi| cell(&miou[vi][bi]),
    );
    let t_pix = table(
        "Test pixel accuracy (%), mean ± std over the seeds",
        &|vi, bi| cell(&pix[vi][bi]),
    );
    let t_speed = table(
        "Training throughput (img/s, 2 threads; SyncBN's 2 ranks share them), mean over the seeds",
        &|vi, bi| format!("{:.0}", mean_std(&speed[vi][bi]).0),
    );
    let at = |v: &str, bi: usize| {
        let vi = VARIANTS.iter().position(|x| *x == v).expect("a variant");
        mean_std(&miou[vi][bi])
    };
    let (small, large) = (0, s.batches.len() - 1);
    let (bs, bl) = (s.batches[small], s.batches[large]);
    let drop = |v: &str| at(v, large).0 - at(v, small).0;
    let pts = |x: f64| x * 100.0;
    let v1 = Verdict::graded(
        &format!("BN falls below GroupNorm at batch {bs} in segmentation"),
        "Wu & He 2018: BN's error grows as the batch shrinks, GN's does not (ResNet-50 ImageNet, 32 → 2 images per GPU: BN +11.1 points of error, GN +0.0); detection and segmentation train at 1-2 images per GPU",
        format!(
            "mIoU at B = {bs}: BN {:.2} ± {:.2}%, GN {:.2} ± {:.2}%; at B = {bl}: BN {:.2}%, GN {:.2}%; from B = {bl} to {bs}: BN {:+.2} points, GN {:+.2}",
            pts(at("batch", small).0),
            pts(at("batch", small).1),
            pts(at("group", small).0),
            pts(at("group", small).1),
            pts(at("batch", large).0),
            pts(at("group", large).0),
            -pts(drop("batch")),
            -pts(drop("group"))
        ),
        {
            let spread = at("batch", small).1.max(at("group", small).1);
            if at("batch", small).0 + spread < at("group", small).0 && drop("batch") > drop("group") {
                Status::Confirmed
            } else if drop("batch") > drop("group") {
                Status::Partly
            } else {
                Status::NotReproduced
            }
        },
        &format!(
            "confirmed needs BN below GN at B = {bs} by more than the seeds' spread, partly that the gap closes as the batch shrinks. Every run sees the same images ({} epochs), so B = {bs} takes {}× the steps of B = {bl}: GN gains from the extra steps, BN loses from its noisy statistics. A 0.07-GMAC DeepLabV3 on 64×64 garment scenes, not ResNet-50 on ImageNet or COCO",
            s.epochs,
            bl / bs
        ),
    );
    // SyncBN at global batch B computes BN's statistics at B: within the seeds' spread of BN at B
    let sync_gap: Vec<(usize, f64, f64)> = (0..s.batches.len())
        .map(|bi| {
            let (a, sa) = at("sync", bi);
            let (b, sb) = at("batch", bi);
            (s.batches[bi], a - b, (sa.max(sb)).max(0.005))
        })
        .collect();
    let within = sync_gap.iter().all(|(_, d, tol)| d.abs() <= 2.0 * tol);
    let v2 = Verdict::graded(
        "SyncBN over ranks gives BN the global batch's statistics",
        "Peng et al. 2018 (MegDet): statistics over all workers' samples restore BN at small per-device batches",
        format!(
            "SyncBN (2 ranks x B/2) minus BN (1 process x B), mIoU points: {}",
            sync_gap
                .iter()
                .map(|(b, d, _)| format!("B = {b}: {:+.2}", pts(*d)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        if within {
            Status::Confirmed
        } else {
            Status::NotReproduced
        },
        "the same global batch in both: SyncBN's statistics are BN's up to the order of float sums, so the mIoU should agree within the seeds' spread (2 std, at least 1 point); each rank holds B/2 images, at B = 2 a single one",
    );
    let v3 = Verdict::graded(
        &format!("A frozen pre-trained BN backbone (BN*) does not suffer BN's loss at batch {bs}"),
        "Wu & He 2018 §6: detection frameworks freeze BN (BN*) because fine-tuning BN at 2 images per GPU lost about 6 AP; DeepLabV3 freezes BN for its output-stride-8 stage",
        format!(
            "from B = {bl} to {bs}: frozen backbone {:+.2} points ({:.2}% → {:.2}%), BN {:+.2}",
            -pts(drop("frozen")),
            pts(at("frozen", large).0),
            pts(at("frozen", small).0),
            -pts(drop("batch"))
        ),
        if drop("frozen") < drop("batch") {
            Status::Confirmed
        } else {
            Status::NotReproduced
        },
        &format!(
            "the claim is the batch insensitivity; the level is another matter: at every batch the frozen backbone ends far below BN trained end to end ({:.2}% against {:.2}% at B = {bl}), because it was pre-trained on 28×28 single garments on black, not on textured scenes, and stays frozen (only the head, with BN, trains)",
            pts(at("frozen", large).0),
            pts(at("batch", large).0)
        ),
    );
    let plot = Plot {
        title: format!("Test mIoU after {} epochs against batch size", s.epochs),
        x: "log2(batch)".into(),
        y: "test mIoU".into(),
        series: VARIANTS
            .iter()
            .enumerate()
            .map(|(vi, v)| Series {
                label: label(v),
                points: s
                    .batches
                    .iter()
                    .enumerate()
                    .map(|(bi, b)| ((*b as f64).log2(), mean_std(&miou[vi][bi]).0))
                    .collect(),
            })
            .collect(),
    };
    let curve = Plot {
        title: format!("Test mIoU per epoch at batch {bs}, seed 0"),
        x: "epoch".into(),
        y: "test mIoU".into(),
        series: curves
            .into_iter()
            .map(|(v, points)| Series {
                label: label(&v),
                points,
            })
            .collect(),
    };
    Ok(Report {
        name: "seg-norm".into(),
        command: super::command("seg-norm", opts),
        quick: opts.quick,
        setup: format!(
            "DeepLabV3 (ResNet-14 backbone 32-64-128 at output stride 8, ASPP rates 2/3/4 with 64 channels) on \
             {} garment scenes of 64×64 (generator seed 0; Fashion-MNIST's train split), tested on {} whole \
             scenes of the test split (seed 1). {} epochs at batch B and lr 0.02·B/8, SGD momentum 0.9, weight \
             decay 1e-4, poly(0.9); crops of 64 at scales 0.75-1.5 with flips. The frozen backbone: a resnet14 \
             classifier trained with BN for {} epoch(s) on {} Fashion-MNIST images{}. SyncBN: 2 ranks (threads \
             of one process, the mpirun code path) of B/2 images. {} seed(s) (weights, order and augmentation).",
            s.train_scenes,
            s.test_scenes,
            s.epochs,
            s.pre_epochs,
            if s.pre_limit > 0 { s.pre_limit } else { fm_train.len() },
            pre_acc.map_or(String::new(), |a| format!(
                " (test accuracy {:.2}%)",
                a * 100.0
            )),
            s.seeds
        ),
        tables: vec![t_miou, t_pix, t_speed],
        verdicts: vec![v1, v2, v3],
        plot: Some(plot),
        extra_plots: vec![curve],
        date: super::now_utc(),
        records,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variants_build_the_networks_they_name() {
        assert_eq!(model("group", 0).backbone_norm, NormKind::Group);
        assert_eq!(model("group", 0).head_norm, NormKind::Group);
        let f = model("frozen", 3);
        assert_eq!(
            (f.backbone_norm, f.head_norm, f.seed),
            (NormKind::Frozen, NormKind::Batch, 3)
        );
        assert_eq!(model("sync", 0).backbone_norm, NormKind::Batch);
    }
}
