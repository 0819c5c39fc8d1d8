//! `--task segment`: train, evaluate, predict and benchmark DeepLabV3 on garment scenes (drawn on the fly) or on
//! the user's images and VOC-style masks.

use crate::args::{DataArgs, TrainArgs};
use crate::choice;
use crate::progress::Bars;
use clap::{Args, ValueEnum};
use normvision::data::fashion_mnist::{self, Split};
use normvision::data::scenes::{scene_classes, SceneGenerator};
use normvision::model::deeplab::DeepLabConfig;
use normvision::model::{Graph, ModelKind, NormKind, PlanOptions};
use normvision::nn::loss::PixelCrossEntropy;
use normvision::optim::sgd::SgdConfig;
use normvision::optim::OptimConfig;
use normvision::segment::batches::{self, SegAugment};
use normvision::segment::{
    evaluate, load_backbone, load_checkpoint, train_segmentation, SegData, SegMetrics,
    SegRunOptions, SegSource, SegTrainConfig,
};
use normvision::state::Stateful;
use normvision::train::Distributed;
use normvision::{Ctx, NvError, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a command does with its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Task {
    /// Image classification (the zoo's classifiers).
    #[default]
    Classify,
    /// Semantic segmentation (DeepLabV3; mIoU, pixel accuracy, per-class IoU).
    Segment,
    /// Object detection (Faster R-CNN; COCO's AP table).
    Detect,
}

/// `--task`.
#[derive(Debug, Clone, Args)]
pub struct TaskArg {
    /// classify, segment (DeepLabV3 on garment scenes or --images/--masks) or detect (Faster R-CNN on
    /// garment scenes or a COCO data set).
    #[arg(long, value_enum, default_value_t = Task::Classify)]
    pub task: Task,
}

/// Segmentation test data: generated test scenes or the user's folders.
#[derive(Debug, Clone, Args)]
pub struct SegTestArgs {
    /// --task segment: test images (PNG/JPEG, any size) [default: generated test scenes].
    #[arg(long, value_name = "DIR", requires = "test_masks")]
    pub test_images: Option<PathBuf>,
    /// --task segment: their masks, masks/NAME.png for images/NAME.ext (palette indices or 8-bit gray class
    /// ids; 255 ignored).
    #[arg(long, value_name = "DIR", requires = "test_images")]
    pub test_masks: Option<PathBuf>,
    /// --task segment: test scenes drawn from Fashion-MNIST's test split (seed --scene-seed + 1).
    #[arg(long, default_value_t = 2000)]
    pub test_scenes: usize,
    /// --task segment: scene side in pixels.
    #[arg(long, default_value_t = 64)]
    pub scene_size: usize,
    /// --task segment: seed of the training scenes (the test scenes take the next one).
    #[arg(long, default_value_t = 1)]
    pub scene_seed: u64,
}

/// Segmentation training options.
#[derive(Debug, Clone, Args)]
pub struct SegTrainArgs {
    /// --task segment|detect: the backbone's norm [default: --norm for segment, frozen for detect]; `sync`
    /// (detect, with --distributed) is BatchNorm with SyncBN.
    #[arg(long, value_parser = choice::backbone_norm())]
    pub backbone_norm: Option<choice::BackboneNorm>,
    /// --task segment: ASPP's and the head's norm [default: --norm]; --task detect: the box head's, group
    /// (4conv1fc with GroupNorm) or none (two FC layers, the default).
    #[arg(long, value_parser = choice::norm())]
    pub head_norm: Option<NormKind>,
    /// --task segment: initialize the backbone from a classification checkpoint of `train --model resnet14`
    /// (its norm must match the backbone's; FrozenBatchNorm takes a BatchNorm's statistics).
    #[arg(long, value_name = "CKPT")]
    pub backbone_from: Option<PathBuf>,
    /// --task segment: do not train the backbone's parameters.
    #[arg(long)]
    pub freeze_backbone: bool,
    /// --task segment: training images (PNG/JPEG, any size) [default: garment scenes drawn on the fly].
    #[arg(long, value_name = "DIR", requires = "masks")]
    pub images: Option<PathBuf>,
    /// --task segment: their masks (masks/NAME.png for images/NAME.ext).
    #[arg(long, value_name = "DIR", requires = "images")]
    pub masks: Option<PathBuf>,
    /// --task segment: training scenes drawn from Fashion-MNIST's train split.
    #[arg(long, default_value_t = 10000)]
    pub scenes: usize,
    /// --task segment: square training crop [default: 128; generated scenes: the scene size].
    #[arg(long)]
    pub crop: Option<usize>,
    /// --task segment: range of the random scale before the crop.
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [0.75, 1.5])]
    pub scale: Vec<f64>,
    /// --task segment|detect: also write the initial weights (after --backbone-from) as a PyTorch state dict,
    /// with the network, the input normalization and the seed in its metadata (for tools/seg_twin.py and
    /// tools/det_twin.py train).
    #[arg(long, value_name = "PATH")]
    pub save_init: Option<PathBuf>,
    /// --task segment: channels of ASPP, the projection and the head.
    #[arg(long, default_value_t = 64)]
    pub aspp_channels: usize,
    #[command(flatten)]
    pub test: SegTestArgs,
}

/// The test data these flags name (`fm_dir`: Fashion-MNIST's directory, for scenes).
fn test_source(
    t: &SegTestArgs,
    fm_dir: Option<&Path>,
    channels: Option<usize>,
) -> Result<(SegSource, Option<Vec<String>>)> {
    match (&t.test_images, &t.test_masks) {
        (Some(i), Some(m)) => Ok((SegSource::folder(i, m, channels, None)?, None)),
        _ => {
            let src = Arc::new(fashion_mnist::load(fm_dir, Split::Test)?);
            let names = scene_classes(&src.classes);
            let gen = SceneGenerator::new(src, t.scene_size, t.scene_seed.wrapping_add(1))?;
            Ok((SegSource::scenes(gen, 0, t.test_scenes)?, Some(names)))
        }
    }
}

/// `train --task segment`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    t: &TrainArgs,
    data: &DataArgs,
    s: &SegTrainArgs,
    out: Option<PathBuf>,
    log: Option<PathBuf>,
    explicit: &[String],
    json_out: bool,
    quiet: bool,
    plan: &PlanOptions,
    dist: Option<Distributed>,
) -> Result<()> {
    // under mpirun, rank 0 alone speaks and writes
    let rank = dist.as_ref().map_or(0, |d| d.rank());
    let quiet = quiet || rank != 0;
    let json_out = json_out && rank == 0;
    if !matches!(t.model, ModelKind::Deeplabv3 | ModelKind::Cnn) {
        return Err(NvError::Config(format!(
            "--task segment trains deeplabv3, not --model {}",
            t.model.as_str()
        )));
    }
    let given = |id: &str| explicit.iter().any(|e| e == id);
    let (train_src, names) = match (&s.images, &s.masks) {
        (Some(i), Some(m)) => (SegSource::folder(i, m, None, None)?, None),
        _ => {
            let src = Arc::new(fashion_mnist::load(data.data.as_deref(), Split::Train)?);
            let names = scene_classes(&src.classes);
            let gen = SceneGenerator::new(src, s.test.scene_size, s.test.scene_seed)?;
            (SegSource::scenes(gen, 0, s.scenes)?, Some(names))
        }
    };
    let (test_src, _) = test_source(&s.test, data.data.as_deref(), Some(train_src.channels()))?;
    let classes = match names {
        Some(n) => n,
        None => {
            let k = train_src.max_label().max(test_src.max_label()) as usize + 1;
            (0..k).map(|i| format!("class {i}")).collect()
        }
    };
    let norm = batches::normalization(&train_src, 512)?;
    let backbone_norm = match s.backbone_norm {
        None => t.norm,
        Some(choice::BackboneNorm::Norm(k)) => k,
        Some(choice::BackboneNorm::Sync) => {
            return Err(NvError::Config(
                "--task segment: --backbone-norm sync is for detection; segmentation synchronizes every \
                 BatchNorm with --sync-bn (and --distributed)"
                    .into(),
            ))
        }
    };
    let mut model = DeepLabConfig::new(train_src.channels(), classes.len(), backbone_norm);
    model.head_norm = s.head_norm.unwrap_or(t.norm);
    model.groups = t.groups;
    model.ghost_batch = t.ghost_batch;
    model.aspp_channels = s.aspp_channels;
    model.dropout = t.dropout;
    model.init = normvision::nn::init::InitSpec {
        init: t.init.into(),
        scale: t.init_scale,
    };
    model.seed = t.seed;
    let mut cfg = SegTrainConfig::reference(model);
    // torchvision's recipe where the flag was not given (the classification defaults do not carry over)
    if given("lr") {
        cfg.lr = t.lr;
    }
    if given("batch_size") {
        cfg.batch_size = t.batch_size;
    }
    if given("epochs") {
        cfg.epochs = t.epochs;
    }
    cfg.max_steps = t.max_steps;
    cfg.optim = OptimConfig::Sgd(SgdConfig {
        momentum: t.momentum,
        nesterov: t.nesterov,
        weight_decay: if given("weight_decay") {
            t.weight_decay
        } else {
            1e-4
        },
        ..SgdConfig::default()
    });
    cfg.seed = t.seed;
    cfg.augment = SegAugment {
        crop: s.crop.unwrap_or(if s.images.is_some() {
            128
        } else {
            s.test.scene_size
        }),
        scale: (s.scale[0], s.scale[1]),
        flip: true,
    };
    cfg.freeze_backbone = s.freeze_backbone;
    cfg.sync_bn = t.sync_bn;
    cfg.backbone_from = s.backbone_from.as_ref().map(|p| p.display().to_string());
    cfg.validate()?;
    let mut graph = cfg.model.build_graph()?;
    graph.set_plan_options(plan.clone())?;
    if let Some(p) = &s.backbone_from {
        let n = load_backbone(&mut graph, p)?;
        if !quiet {
            println!("backbone: {n} tensors from {}", p.display());
        }
    }
    if let Some(p) = s.save_init.as_ref().filter(|_| rank == 0) {
        let mut md = std::collections::HashMap::new();
        md.insert(
            "model".to_string(),
            serde_json::to_string(&cfg.model).expect("serialises"),
        );
        md.insert(
            "normalization".to_string(),
            serde_json::to_string(&norm).expect("serialises"),
        );
        md.insert("seed".to_string(), cfg.seed.to_string());
        normvision::io::save_state_dict(p, &graph.state_dict(), &md)?;
    }
    let out = out.unwrap_or_else(|| {
        PathBuf::from(format!(
            "runs/deeplabv3-{}-{}/model.safetensors",
            cfg.model.backbone_norm.as_str(),
            cfg.model.head_norm.as_str()
        ))
    });
    let log = log.unwrap_or_else(|| out.with_extension("jsonl"));
    let data = SegData {
        train: train_src,
        test: test_src,
        norm,
        classes,
    };
    if !quiet && !json_out {
        println!(
            "deeplabv3 (backbone {}, head {}) on {} training / {} test images, batch {}{}, lr {} (poly 0.9), {} epochs, crop {} ({} threads{})",
            cfg.model.backbone_norm,
            cfg.model.head_norm,
            data.train.len(),
            data.test.len(),
            cfg.batch_size,
            if cfg.sync_bn && dist.is_some() { ", SyncBN" } else { "" },
            cfg.lr,
            cfg.epochs,
            cfg.augment.crop,
            rayon::current_num_threads(),
            dist.as_ref().map_or(String::new(), |d| format!(" x {} ranks", d.size()))
        );
    }
    let opts = SegRunOptions {
        checkpoint: Some(out.clone()),
        log: Some(log.clone()),
        progress: Bars::boxed("deeplabv3", quiet || json_out),
        resume: None,
        distributed: dist,
    };
    let report = train_segmentation(&cfg, &mut graph, &data, opts)?;
    if rank != 0 {
        return Ok(());
    }
    if json_out {
        println!(
            "{}",
            json!({"task": "segment", "steps": report.steps, "train_img_s": report.train_img_s,
            "diverged": report.diverged, "evals": report.evals, "checkpoint": out, "log": log})
        );
        return Ok(());
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    if let Some(d) = &report.diverged {
        println!("diverged: {d}");
    }
    if let Some(m) = report.last() {
        print_metrics(m, &data.classes);
    }
    println!(
        "{} steps, {:.0} img/s in training; checkpoint {}, log {}",
        report.steps,
        report.train_img_s,
        out.display(),
        log.display()
    );
    Ok(())
}

/// The metrics as a table for people.
pub fn print_metrics(m: &SegMetrics, classes: &[String]) {
    println!(
        "mIoU {:.2}%   pixel accuracy {:.2}%   ({} pixels)",
        m.miou * 100.0,
        m.pixel_acc * 100.0,
        m.pixels
    );
    println!("{:<14} {:>8}", "class", "IoU");
    for (name, iou) in classes.iter().zip(&m.iou) {
        println!(
            "{:<14} {:>8}",
            name,
            iou.map_or("-".to_string(), |v| format!("{:.2}%", v * 100.0))
        );
    }
}

/// `eval --task segment`.
pub fn eval(
    checkpoint: &Path,
    data: &DataArgs,
    t: &SegTestArgs,
    batch_size: usize,
    json_out: bool,
    plan: &PlanOptions,
) -> Result<()> {
    let mut ck = load_checkpoint(checkpoint)?;
    ck.graph.set_plan_options(plan.clone())?;
    let (src, _) = test_source(t, data.data.as_deref(), Some(ck.config.model.in_channels))?;
    if src.channels() != ck.config.model.in_channels {
        return Err(NvError::Config(format!(
            "the test images have {} channels, the network {}",
            src.channels(),
            ck.config.model.in_channels
        )));
    }
    src.check_labels(ck.classes.len(), t.test_masks.as_deref())?;
    let (m, loss) = evaluate(
        &mut ck.graph,
        &src,
        &ck.norm,
        ck.classes.len(),
        batch_size.clamp(1, 512),
        &ck.config.loss,
    )?;
    if json_out {
        println!(
            "{}",
            json!({"task": "segment", "images": src.len(), "miou": m.miou, "pixel_acc": m.pixel_acc,
                "iou": m.iou, "classes": ck.classes, "loss": loss})
        );
    } else {
        println!("{} test images, loss {loss:.4}", src.len());
        print_metrics(&m, &ck.classes);
    }
    Ok(())
}

/// `predict --task segment`: a colour mask and an overlay beside each image.
pub fn predict(
    checkpoint: &Path,
    images: &[PathBuf],
    json_out: bool,
    plan: &PlanOptions,
) -> Result<()> {
    let mut ck = load_checkpoint(checkpoint)?;
    ck.graph.set_plan_options(plan.clone())?;
    for img in images {
        let p = normvision::segment::render::predict_file(
            &mut ck.graph,
            &ck.norm,
            ck.classes.len(),
            img,
        )?;
        if json_out {
            println!("{}", serde_json::to_string(&p).expect("serialisable"));
        } else {
            let top: Vec<String> = p
                .pixels
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(k, n)| format!("{} {n}", ck.classes[k]))
                .collect();
            println!(
                "{}: {} ; {} (pixels: {})",
                p.image.display(),
                p.mask.display(),
                p.overlay.display(),
                top.join(", ")
            );
        }
    }
    Ok(())
}

/// The learning rate of `bench --task segment`'s updates (tools/seg_twin.py bench uses the same).
pub const BENCH_LR: f64 = 1e-3;

/// `bench --task segment`: a training step (zero_grad, forward, loss, backward and the recipe's SGD update:
/// momentum 0.9, weight decay 1e-4, at [`BENCH_LR`]) and inference of the default deeplabv3 at `batch` × 1 ×
/// `side`², median of `steps` after `warmup`. The update changes the weights every step, so that no step
/// reuses work that depends on them (the Winograd weight transforms), as in real training.
#[allow(clippy::too_many_arguments)]
pub fn bench(
    norm: NormKind,
    batch: usize,
    side: usize,
    steps: usize,
    warmup: usize,
    json_out: bool,
    plan: &PlanOptions,
    profile: bool,
) -> Result<()> {
    let cfg = DeepLabConfig::new(1, 11, norm);
    let mut g: Graph = cfg.build_graph()?;
    g.set_plan_options(plan.clone())?;
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[batch, 1, side, side]), |i| {
        ((i[0] * 13 + i[2] * 7 + i[3] * 3) % 17) as f32 / 8.0 - 1.0
    });
    let targets: Vec<usize> = (0..batch * side * side).map(|i| (i / 61) % 11).collect();
    let loss = PixelCrossEntropy::ignoring(255);
    let mut opt = SegTrainConfig::reference(cfg.clone()).optim.build()?;
    // the wall clock of the step's parts outside the layers (zero_grad, loss, optimizer)
    let mut time = |g: &mut Graph, train: bool, k: u64, outside: &mut [f64; 3]| -> Result<f64> {
        let t0 = std::time::Instant::now();
        if train {
            g.zero_grad();
            outside[0] += t0.elapsed().as_secs_f64();
            let ctx = Ctx::train().with_step(k);
            let y = g.forward(&[&x], ctx)?.remove(0);
            let t1 = std::time::Instant::now();
            let (_, d) = loss.forward(&y, &targets)?;
            outside[1] += t1.elapsed().as_secs_f64();
            g.backward(&[&x], &[&d], ctx, false)?;
            let t2 = std::time::Instant::now();
            opt.step(g, BENCH_LR)?;
            outside[2] += t2.elapsed().as_secs_f64();
        } else {
            g.infer(&[&x])?;
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    for (mode, train) in [("train", true), ("inference", false)] {
        let mut outside = [0.0f64; 3];
        for k in 0..warmup {
            time(&mut g, train, k as u64, &mut outside)?;
        }
        if profile {
            g.enable_timing();
        }
        outside = [0.0; 3];
        let mut ts: Vec<f64> = (0..steps.max(1))
            .map(|k| time(&mut g, train, k as u64, &mut outside))
            .collect::<Result<_>>()?;
        ts.sort_by(f64::total_cmp);
        let med = ts[ts.len() / 2];
        let line = json!({"model": "deeplabv3", "mode": mode, "batch": batch, "threads": rayon::current_num_threads(),
            "side": side, "norm": norm.as_str(), "median_ms": med * 1e3, "min_ms": ts[0] * 1e3,
            "img_s": batch as f64 / med});
        if json_out {
            println!("{line}");
        } else {
            println!(
                "deeplabv3 {mode:<9} batch {batch} {side}x{side}: median {:.2} ms (min {:.2}) = {:.0} img/s",
                med * 1e3,
                ts[0] * 1e3,
                batch as f64 / med
            );
        }
        if profile {
            crate::commands::print_layer_profile(&g, mode, steps.max(1), med, &outside, json_out);
        }
    }
    Ok(())
}
