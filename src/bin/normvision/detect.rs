//! `--task detect`: train and evaluate Faster R-CNN on garment scenes (drawn on the fly) or on a COCO data set,
//! and print COCO's table.

use crate::args::{DataArgs, TrainArgs};
use crate::choice::BackboneNorm;
use crate::segment::{SegTestArgs, SegTrainArgs};
use clap::Args;
use image::ImageEncoder;
use normvision::data::fashion_mnist::{self, Split};
use normvision::data::scenes::SceneGenerator;
use normvision::detect::coco_eval::{CocoEvaluation, STAT_NAMES};
use normvision::detect::{
    evaluate_detector, load_checkpoint, train_detector_distributed, DetEvent, DetSource,
    DetTrainConfig, Detector, DetectorConfig,
};
use normvision::model::faster_rcnn::{BoxHeadKind, FasterRcnnConfig};
use normvision::model::{NormKind, PlanOptions};
use normvision::state::Stateful;
use normvision::train::Distributed;
use normvision::{NvError, Result};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Detection data flags (COCO files; without them, garment scenes).
#[derive(Debug, Clone, Args)]
pub struct DetArgs {
    /// --task detect: training annotations, a COCO annotations.json [default: garment scenes drawn on the fly].
    #[arg(long, value_name = "FILE", requires = "coco_images")]
    pub coco: Option<PathBuf>,
    /// --task detect: the directory the training annotations' file names are relative to.
    #[arg(long, value_name = "DIR", requires = "coco")]
    pub coco_images: Option<PathBuf>,
    /// --task detect: test annotations (COCO) [default: generated test scenes].
    #[arg(long, value_name = "FILE", requires = "test_coco_images")]
    pub test_coco: Option<PathBuf>,
    /// --task detect: the directory of the test images.
    #[arg(long, value_name = "DIR", requires = "test_coco")]
    pub test_coco_images: Option<PathBuf>,
    /// --task detect: also write the test set's detections in COCO's result format (for `coco-eval` or
    /// pycocotools).
    #[arg(long, value_name = "FILE")]
    pub dets_out: Option<PathBuf>,
}

fn scenes(
    data: &DataArgs,
    split: Split,
    size: usize,
    seed: u64,
    count: usize,
) -> Result<DetSource> {
    let src = Arc::new(fashion_mnist::load(data.data.as_deref(), split)?);
    DetSource::scenes(SceneGenerator::new(src, size, seed)?, count)
}

fn scene_size(t: &SegTestArgs, explicit: &[String]) -> usize {
    if explicit.iter().any(|e| e == "scene_size") {
        t.scene_size
    } else {
        128
    }
}

fn test_source(
    d: &DetArgs,
    data: &DataArgs,
    t: &SegTestArgs,
    explicit: &[String],
    channels: usize,
) -> Result<DetSource> {
    match (&d.test_coco, &d.test_coco_images) {
        (Some(a), Some(i)) => DetSource::coco(a, i, channels),
        _ => {
            let count = if explicit.iter().any(|e| e == "test_scenes") {
                t.test_scenes
            } else {
                500
            };
            scenes(
                data,
                Split::Test,
                scene_size(t, explicit),
                t.scene_seed.wrapping_add(1),
                count,
            )
        }
    }
}

/// Prints what loading mended (boxes clipped to their image): the first 5, then a count.
fn show_warnings(src: &DetSource) {
    let w = src.warnings();
    for m in w.iter().take(5) {
        eprintln!("warning: {m}");
    }
    if w.len() > 5 {
        eprintln!("warning: ... and {} more boxes clipped", w.len() - 5);
    }
}

/// The COCO table, then AP per class.
pub fn print_table(ev: &CocoEvaluation, classes: &[String]) {
    print!("{}", ev.summary());
    println!("AP@[.5:.95] per class (-1: no ground truth)");
    for (k, ap) in ev.per_category_ap().iter().enumerate() {
        let name = classes.get(k).map_or("?", String::as_str);
        println!("  {:<16} {:>7.3}", name, ap);
    }
}

fn stats_json(stats: &[f64; 12]) -> serde_json::Value {
    STAT_NAMES
        .iter()
        .zip(stats)
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `train --task detect`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    t: &TrainArgs,
    data: &DataArgs,
    s: &SegTrainArgs,
    d: &DetArgs,
    out: Option<PathBuf>,
    log: Option<PathBuf>,
    explicit: &[String],
    json_out: bool,
    quiet: bool,
    plan: &PlanOptions,
    dist: Option<Distributed>,
) -> Result<()> {
    let given = |id: &str| explicit.iter().any(|e| e == id);
    // COCO images are read as RGB unless --channels 1 is given; scenes are grayscale
    let channels = if given("channels") {
        data.channels
    } else if d.coco.is_some() {
        3
    } else {
        1
    };
    let train_src = match (&d.coco, &d.coco_images) {
        (Some(a), Some(i)) => DetSource::coco(a, i, channels)?,
        _ => {
            let count = if given("scenes") { s.scenes } else { 2000 };
            scenes(
                data,
                Split::Train,
                scene_size(&s.test, explicit),
                s.test.scene_seed,
                count,
            )?
        }
    };
    let test_src = test_source(d, data, &s.test, explicit, train_src.channels())?;
    show_warnings(&train_src);
    show_warnings(&test_src);
    let classes = train_src.class_names();
    if test_src.class_names() != classes {
        return Err(NvError::Config(format!(
            "--task detect: the training categories {:?} and the test categories {:?} differ",
            classes,
            test_src.class_names()
        )));
    }
    let (backbone_norm, sync) = match s.backbone_norm {
        Some(BackboneNorm::Norm(n)) => (n, false),
        Some(BackboneNorm::Sync) => (NormKind::Batch, true),
        None if given("norm") => (t.norm, false),
        None => (NormKind::Frozen, false),
    };
    let rank = dist.as_ref().map_or(0, |d| d.rank());
    // only rank 0 talks, logs and writes
    let quiet = quiet || rank != 0;
    if sync && dist.as_ref().is_none_or(|d| d.size() < 2) && !quiet {
        eprintln!(
            "note: --backbone-norm sync in a single process is BatchNorm over the batch; SyncBN spans the ranks \
             of `mpirun -np N normvision train --task detect --distributed`"
        );
    }
    let head = match s.head_norm {
        None | Some(NormKind::None) => BoxHeadKind::TwoFc,
        Some(NormKind::Group) => BoxHeadKind::FourConvGn,
        Some(other) => {
            return Err(NvError::Config(format!(
                "--task detect: --head-norm is group (Detectron's 4conv1fc GN head) or none (two FC layers), \
                 not {}",
                other.as_str()
            )))
        }
    };
    let mut net =
        FasterRcnnConfig::new(train_src.channels(), classes.len() + 1, backbone_norm, head);
    net.groups = t.groups;
    net.seed = t.seed;
    let mut cfg = DetTrainConfig::new(DetectorConfig::new(net));
    if given("lr") {
        cfg.lr = t.lr;
    }
    if given("batch_size") {
        cfg.batch_size = t.batch_size;
    }
    if given("epochs") {
        cfg.epochs = t.epochs;
    }
    if given("weight_decay") {
        cfg.weight_decay = t.weight_decay;
    }
    if given("warmup_steps") {
        cfg.warmup_steps = t.warmup_steps;
    }
    cfg.momentum = t.momentum;
    cfg.seed = t.seed;
    cfg.freeze_backbone = s.freeze_backbone;
    cfg.sync_bn = sync;
    cfg.validate()?;
    let mut det = Detector::new(cfg.detector.clone())?;
    det.trunk.set_plan_options(plan.clone())?;
    det.head.set_plan_options(plan.clone())?;
    if let Some(p) = &s.backbone_from {
        let n = normvision::segment::load_backbone(&mut det.trunk, p)?;
        if !quiet {
            eprintln!("backbone: {n} tensors from {}", p.display());
        }
    }
    // the statistics of the first 256 training images, as train_detector would take them
    let norm = normvision::detect::data::normalization(&train_src, 256)?;
    if let Some(p) = s.save_init.as_ref().filter(|_| rank == 0) {
        let mut md = std::collections::HashMap::new();
        md.insert(
            "config".to_string(),
            serde_json::to_string(&cfg).expect("serialises"),
        );
        md.insert(
            "normalization".to_string(),
            serde_json::to_string(&norm).expect("serialises"),
        );
        md.insert(
            "classes".to_string(),
            serde_json::to_string(&classes).expect("serialises"),
        );
        md.insert("seed".to_string(), cfg.seed.to_string());
        normvision::io::save_state_dict(
            p,
            &normvision::detect::checkpoint::detector_state(&det),
            &md,
        )?;
    }
    let out = out.unwrap_or_else(|| {
        PathBuf::from(format!(
            "runs/faster-rcnn-{}-{}/model.safetensors",
            backbone_norm.as_str(),
            match head {
                BoxHeadKind::TwoFc => "2fc",
                BoxHeadKind::FourConvGn => "4conv1fc-gn",
            }
        ))
    });
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| NvError::io(dir, "create directory", e))?;
    }
    let log_path = log.unwrap_or_else(|| out.with_extension("jsonl"));
    let mut log_file = if rank == 0 {
        Some(std::fs::File::create(&log_path).map_err(|e| NvError::io(&log_path, "create", e))?)
    } else {
        None
    };
    if !quiet {
        eprintln!(
            "faster-rcnn: backbone {} · head {} · {} training and {} test images · {} epochs of batch {} · lr {}",
            backbone_norm.as_str(),
            if head == BoxHeadKind::TwoFc { "2fc" } else { "4conv1fc GN" },
            train_src.len(),
            test_src.len(),
            cfg.epochs,
            cfg.batch_size,
            cfg.lr
        );
        println!(
            "{:>5} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7}",
            "epoch", "obj", "rpn_box", "cls", "box", "AP", "AP50", "AP75"
        );
    }
    let bar = if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:28}] {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut io_err: Option<NvError> = None;
    let mut on_event = |e: DetEvent<'_>| match e {
        DetEvent::Step {
            epoch,
            step,
            total,
            losses,
            lr,
        } => {
            bar.set_length(total);
            bar.set_position(step);
            bar.set_prefix(format!("detect e{}", epoch + 1));
            bar.set_message(format!("loss {:.3}", losses.total()));
            let line = json!({"event": "step", "epoch": epoch + 1, "step": step, "lr": lr, "losses": losses});
            if let Some(f) = log_file.as_mut() {
                if let Err(err) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                    io_err.get_or_insert(NvError::io(&log_path, "write", err));
                }
            }
        }
        DetEvent::Epoch {
            epoch,
            losses,
            eval,
        } => {
            if !quiet {
                bar.suspend(|| {
                    println!(
                        "{:>5} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>7.3} {:>7.3} {:>7.3}",
                        epoch,
                        losses.objectness,
                        losses.rpn_box,
                        losses.classifier,
                        losses.box_reg,
                        eval.stats[0],
                        eval.stats[1],
                        eval.stats[2]
                    )
                });
            }
            let line = json!({"event": "epoch", "epoch": epoch, "losses": losses, "stats": stats_json(&eval.stats),
                "per_class_ap": eval.per_class_ap});
            if let Some(f) = log_file.as_mut() {
                if let Err(err) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                    io_err.get_or_insert(NvError::io(&log_path, "write", err));
                }
            }
        }
    };
    let (mut report, norm) = train_detector_distributed(
        &mut det,
        &cfg,
        &train_src,
        &test_src,
        Some(norm),
        Some(&out),
        dist.as_ref(),
        &mut on_event,
    )?;
    bar.finish_and_clear();
    if let Some(e) = io_err {
        return Err(e);
    }
    if rank != 0 {
        return Ok(());
    }
    let (ev, dets) = match report.last.take() {
        Some(last) => last,
        None => evaluate_detector(&mut det, &test_src, &norm, 8)?,
    };
    if let Some(p) = &d.dets_out {
        write_dets(p, &dets)?;
    }
    if json_out {
        println!(
            "{}",
            json!({"task": "detect", "checkpoint": out.display().to_string(), "config": cfg,
                "stats": stats_json(&ev.stats), "per_class_ap": ev.per_category_ap(), "classes": classes,
                "evals": report.evals, "losses": report.losses, "train_img_s": report.train_img_s,
                "seconds": report.seconds})
        );
    } else if !quiet {
        println!();
        print_table(&ev, &classes);
        println!(
            "\n{:.1} training img/s; checkpoint {}; log {}",
            report.train_img_s,
            out.display(),
            log_path.display()
        );
    }
    Ok(())
}

fn write_dets(path: &Path, dets: &[normvision::detect::CocoDetection]) -> Result<()> {
    let bytes = serde_json::to_vec(dets).expect("serialises");
    normvision::io::write_atomic(path, &bytes)
}

/// `eval --task detect`.
#[allow(clippy::too_many_arguments)]
pub fn eval(
    ckpt: &Path,
    data: &DataArgs,
    t: &SegTestArgs,
    d: &DetArgs,
    explicit: &[String],
    batch: usize,
    json_out: bool,
    plan: &PlanOptions,
) -> Result<()> {
    let mut ck = load_checkpoint(ckpt)?;
    ck.detector.trunk.set_plan_options(plan.clone())?;
    ck.detector.head.set_plan_options(plan.clone())?;
    let src = test_source(d, data, t, explicit, ck.config.detector.net.in_channels)?;
    show_warnings(&src);
    if src.class_names().len() != ck.classes.len() {
        return Err(NvError::Config(format!(
            "eval --task detect: the checkpoint has {} classes, the test data {}",
            ck.classes.len(),
            src.class_names().len()
        )));
    }
    let (ev, dets) = evaluate_detector(&mut ck.detector, &src, &ck.norm, batch)?;
    if let Some(p) = &d.dets_out {
        write_dets(p, &dets)?;
    }
    if json_out {
        println!(
            "{}",
            json!({"task": "detect", "checkpoint": ckpt.display().to_string(), "images": src.len(),
                "detections": dets.len(), "stats": stats_json(&ev.stats), "per_class_ap": ev.per_category_ap(),
                "classes": ck.classes})
        );
    } else {
        println!(
            "{}: {} test images, {} detections",
            ckpt.display(),
            src.len(),
            dets.len()
        );
        print_table(&ev, &ck.classes);
    }
    Ok(())
}

/// `predict --task detect`: for each image, IMAGE.detections.png (boxes, class names and scores drawn) and
/// IMAGE.detections.json (COCO's result format, `image_id` 0, with `category_name`).
pub fn predict(
    checkpoint: &Path,
    images: &[PathBuf],
    json_out: bool,
    plan: &PlanOptions,
) -> Result<()> {
    let mut ck = load_checkpoint(checkpoint)?;
    ck.detector.trunk.set_plan_options(plan.clone())?;
    ck.detector.head.set_plan_options(plan.clone())?;
    let c = ck.config.detector.net.in_channels;
    let palette = normvision::io::scene_files::voc_palette();
    for path in images {
        let img = normvision::data::decode::decode_file(path)?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let rgb = img.to_rgb8().into_raw();
        let pixels = normvision::data::decode::to_chw(&img, c, h, w)?;
        let sample = normvision::detect::DetSample {
            pixels,
            channels: c,
            height: h,
            width: w,
            target: Default::default(),
            image_id: 0,
        };
        let (x, _) = normvision::detect::data::batch(
            &[(0, sample)],
            &ck.norm,
            ck.config.detector.stride,
            None,
        );
        let dets = ck.detector.detect(&x)?.remove(0);
        let mut canvas = rgb;
        normvision::detect::render::draw_detections(
            &mut canvas,
            w,
            h,
            &dets,
            &ck.classes,
            &palette,
        );
        let stem = path
            .file_stem()
            .map_or("image".into(), |s| s.to_string_lossy().to_string());
        let dir = path.parent().unwrap_or(Path::new("."));
        let png = dir.join(format!("{stem}.detections.png"));
        let js = dir.join(format!("{stem}.detections.json"));
        let mut enc_bytes = vec![];
        image::codecs::png::PngEncoder::new(&mut enc_bytes)
            .write_image(&canvas, w as u32, h as u32, image::ExtendedColorType::Rgb8)
            .map_err(|e| NvError::Format {
                path: png.display().to_string(),
                msg: format!("cannot encode PNG: {e}"),
            })?;
        normvision::io::write_atomic(&png, &enc_bytes)?;
        let cats: Vec<i64> = (1..=ck.classes.len() as i64).collect();
        let list: Vec<serde_json::Value> = dets
            .iter()
            .map(|d| {
                json!({"image_id": 0, "category_id": cats[d.label - 1], "category_name": ck.classes[d.label - 1],
                    "bbox": normvision::detect::data::to_xywh(&d.bbox), "score": d.score})
            })
            .collect();
        normvision::io::write_atomic(&js, &serde_json::to_vec_pretty(&list).expect("serialises"))?;
        if json_out {
            println!(
                "{}",
                json!({"image": path.display().to_string(), "png": png.display().to_string(),
                "json": js.display().to_string(), "detections": list})
            );
        } else {
            let top: Vec<String> = dets
                .iter()
                .take(5)
                .map(|d| format!("{} {:.2}", ck.classes[d.label - 1], d.score))
                .collect();
            println!(
                "{}: {} detections ({}); {} ; {}",
                path.display(),
                dets.len(),
                top.join(", "),
                png.display(),
                js.display()
            );
        }
    }
    Ok(())
}

/// `bench --task detect`: a training step (forward, losses, backward; no optimizer) and inference of the
/// default Faster R-CNN (frozen-BN backbone, two-FC head) on `batch` × 1 × `side`² images with three boxes
/// each; median of `steps` after `warmup`, in images per second.
pub fn bench(
    batch: usize,
    side: usize,
    steps: usize,
    warmup: usize,
    json_out: bool,
    plan: &PlanOptions,
) -> Result<()> {
    if steps == 0 || batch == 0 || !(32..=1024).contains(&side) {
        return Err(NvError::Config(format!(
            "--steps and --batch-size must be at least 1 and --side in 32..=1024, got {steps}, {batch} and {side}"
        )));
    }
    let net = FasterRcnnConfig::new(1, 11, NormKind::Frozen, BoxHeadKind::TwoFc);
    let mut det = Detector::new(DetectorConfig::new(net))?;
    det.trunk.set_plan_options(plan.clone())?;
    det.head.set_plan_options(plan.clone())?;
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[batch, 1, side, side]), |i| {
        ((i[0] * 13 + i[2] * 7 + i[3] * 3) % 17) as f32 / 8.0 - 1.0
    });
    let s = side as f32;
    let targets: Vec<normvision::detect::Target> = (0..batch)
        .map(|n| normvision::detect::Target {
            boxes: vec![
                [0.1 * s, 0.1 * s, 0.35 * s, 0.4 * s],
                [0.5 * s, 0.2 * s, 0.8 * s, 0.45 * s],
                [0.3 * s + n as f32, 0.6 * s, 0.55 * s, 0.9 * s],
            ],
            labels: vec![1 + n % 10, 3, 7],
        })
        .collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut train = vec![];
    for k in 0..warmup + steps {
        let t0 = std::time::Instant::now();
        det.trunk.zero_grad();
        det.head.zero_grad();
        det.train_step(
            &x,
            &targets,
            normvision::Ctx::train().with_step(k as u64),
            0,
            k as u64,
        )?;
        if k >= warmup {
            train.push(t0.elapsed().as_secs_f64());
        }
    }
    let mut infer = vec![];
    for k in 0..warmup + steps {
        let t0 = std::time::Instant::now();
        det.detect(&x)?;
        if k >= warmup {
            infer.push(t0.elapsed().as_secs_f64());
        }
    }
    let (tr, inf) = (batch as f64 / median(train), batch as f64 / median(infer));
    if json_out {
        println!(
            "{}",
            json!({"task": "detect", "model": "faster-rcnn", "batch": batch, "side": side,
            "train_img_s": tr, "infer_img_s": inf, "steps": steps})
        );
    } else {
        println!("faster-rcnn (frozen BN, 2fc) batch {batch} x 1 x {side}x{side}: train {tr:.1} img/s, inference {inf:.1} img/s (median of {steps})");
    }
    Ok(())
}
