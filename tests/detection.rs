//! Detection end to end: Faster R-CNN trained on a few hundred garment scenes must beat a trivial baseline's
//! AP50 by a stated margin; the CLI trains, evaluates (COCO's table), predicts (PNG + JSON) and bench-marks,
//! and refuses bad flags and files with errors that name them.
//!
//! The baseline (issue #11): one box per test image, of the training set's mean box size, at the image centre,
//! labelled with the training set's most frequent class.

use crate::common::cli::{assert_fails, assert_ok, nv, s, stdout};
use normvision::data::fashion_mnist::{self, Split};
use normvision::data::scenes::SceneGenerator;
use normvision::detect::coco_eval;
use normvision::detect::{
    train_detector, CocoDetection, DetSource, DetTrainConfig, Detector, DetectorConfig,
};
use normvision::model::faster_rcnn::{BoxHeadKind, FasterRcnnConfig};
use normvision::model::NormKind;
use std::sync::Arc;

fn sources(train: usize, test: usize, size: usize) -> (DetSource, DetSource) {
    let tr = Arc::new(
        fashion_mnist::load(None, Split::Train).expect("Fashion-MNIST (scripts/setup.sh)"),
    );
    let te = Arc::new(fashion_mnist::load(None, Split::Test).expect("Fashion-MNIST"));
    (
        DetSource::scenes(SceneGenerator::new(tr, size, 1).unwrap(), train).unwrap(),
        DetSource::scenes(SceneGenerator::new(te, size, 2).unwrap(), test).unwrap(),
    )
}

/// AP50 of the trivial baseline on `test`, from the statistics of `train`.
fn baseline_ap50(train: &DetSource, test: &DetSource) -> f64 {
    let (mut w, mut h, mut n) = (0.0, 0.0, 0.0);
    let mut counts = [0usize; 16];
    for i in 0..train.len() {
        let t = train.sample(i).unwrap().target;
        for (b, &l) in t.boxes.iter().zip(&t.labels) {
            w += (b[2] - b[0]) as f64;
            h += (b[3] - b[1]) as f64;
            n += 1.0;
            counts[l] += 1;
        }
    }
    let (w, h) = (w / n, h / n);
    let label = (0..counts.len()).max_by_key(|&k| counts[k]).unwrap();
    let dets: Vec<CocoDetection> = (0..test.len())
        .map(|i| {
            let s = test.sample(i).unwrap();
            let (cx, cy) = (s.width as f64 / 2.0, s.height as f64 / 2.0);
            CocoDetection {
                image_id: s.image_id,
                category_id: label as i64,
                bbox: [cx - w / 2.0, cy - h / 2.0, w, h],
                score: 1.0,
            }
        })
        .collect();
    coco_eval::evaluate(&test.ground_truth().unwrap(), &dets).stats[1]
}

#[test]
fn faster_rcnn_beats_the_trivial_baseline() {
    // the CLI's default detector (frozen-BN backbone, two-FC head) on 300 scenes of 128 pixels for 5 epochs
    // at lr 0.02: `normvision train --task detect --scenes 300 --test-scenes 64 --epochs 5 --lr 0.02
    // --warmup-steps 100` reaches AP50 0.170 (2026-12-05; 68 s on 2 threads)
    let (train, test) = sources(300, 64, 128);
    let base = baseline_ap50(&train, &test);
    let net = FasterRcnnConfig::new(1, 11, NormKind::Frozen, BoxHeadKind::TwoFc);
    let mut cfg = DetTrainConfig::new(DetectorConfig::new(net));
    cfg.epochs = 5;
    cfg.lr = 0.02;
    cfg.warmup_steps = 100;
    let mut det = Detector::new(cfg.detector.clone()).unwrap();
    let (report, _) =
        train_detector(&mut det, &cfg, &train, &test, None, None, &mut |_| {}).unwrap();
    let ap50 = report.evals.last().unwrap().stats[1];
    // the RPN's objectness loss is over a fixed sample of anchors, so it must fall (the box head's losses
    // are over proposals that change as the RPN learns, and need not)
    let first = report.losses.first().unwrap().objectness;
    let last = report.losses.last().unwrap().objectness;
    eprintln!("AP50 {ap50:.4} (baseline {base:.4}); objectness loss {first:.3} -> {last:.3}");
    assert!(
        last < 0.5 * first,
        "the objectness loss fell from {first} only to {last}"
    );
    // the stated margin: 0.10 AP50 above the baseline (which scores near 0: a centred box rarely overlaps a
    // garment by half)
    assert!(
        ap50 > base + 0.10,
        "AP50 {ap50} does not beat the baseline {base} by 0.10"
    );
}

#[test]
fn cli_trains_evaluates_predicts_and_benchmarks() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("det.safetensors");
    let dets = tmp.path().join("dets.json");
    let o = nv(&[
        "train",
        "--task",
        "detect",
        "--scenes",
        "16",
        "--test-scenes",
        "8",
        "--scene-size",
        "64",
        "--epochs",
        "1",
        "-o",
        s(&ck),
        "--dets-out",
        s(&dets),
        "-q",
    ]);
    assert_ok("train --task detect", &o);
    assert!(ck.exists() && dets.exists());
    let log = std::fs::read_to_string(ck.with_extension("jsonl")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"event\":\"epoch\"")),
        "{log}"
    );
    let o = nv(&[
        "eval",
        "--task",
        "detect",
        "--checkpoint",
        s(&ck),
        "--test-scenes",
        "8",
        "--scene-size",
        "64",
    ]);
    assert_ok("eval --task detect", &o);
    assert!(stdout(&o)
        .contains("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"));
    let o = nv(&[
        "eval",
        "--task",
        "detect",
        "--checkpoint",
        s(&ck),
        "--test-scenes",
        "8",
        "--scene-size",
        "64",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(v["stats"]["AP50"].as_f64().is_some());
    // the written detections evaluate to the same numbers through coco-eval (the scenes' own ground truth)
    let scenes = tmp.path().join("scenes");
    let o = nv(&[
        "scenes",
        "--out",
        s(&scenes),
        "--count",
        "8",
        "--size",
        "64",
        "--seed",
        "2",
        "--split",
        "test",
        "-q",
    ]);
    assert_ok("scenes", &o);
    let img = scenes.join("images/000000.png");
    let o = nv(&[
        "predict",
        "--task",
        "detect",
        "--checkpoint",
        s(&ck),
        s(&img),
    ]);
    assert_ok("predict --task detect", &o);
    assert!(scenes.join("images/000000.detections.png").exists());
    let js: serde_json::Value = serde_json::from_slice(
        &std::fs::read(scenes.join("images/000000.detections.json")).unwrap(),
    )
    .unwrap();
    assert!(js.is_array());
    let o = nv(&[
        "bench", "--task", "detect", "--side", "64", "--steps", "1", "--warmup", "0", "--json",
    ]);
    assert_ok("bench --task detect", &o);
    assert!(stdout(&o).contains("train_img_s"));
}

#[test]
fn cli_refuses_bad_detection_input() {
    let tmp = tempfile::tempdir().unwrap();
    let o = nv(&[
        "train",
        "--task",
        "detect",
        "--head-norm",
        "batch",
        "--scenes",
        "4",
        "--epochs",
        "1",
    ]);
    assert_fails("head norm", &o, &["--head-norm", "group", "none"]);
    let o = nv(&["eval", "--task", "detect"]);
    assert!(!o.status.success());
    let bogus = tmp.path().join("bogus.safetensors");
    std::fs::write(&bogus, b"not a checkpoint").unwrap();
    let o = nv(&[
        "eval",
        "--task",
        "detect",
        "--checkpoint",
        s(&bogus),
        "--test-scenes",
        "2",
    ]);
    assert_fails("bogus checkpoint", &o, &["bogus.safetensors"]);
    let ann = tmp.path().join("ann.json");
    std::fs::write(&ann, r#"{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": "x"}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4]}]}"#).unwrap();
    let o = nv(&[
        "train",
        "--task",
        "detect",
        "--coco",
        s(&ann),
        "--coco-images",
        s(tmp.path()),
        "--epochs",
        "1",
    ]);
    assert_fails("bad annotation", &o, &["ann.json", "annotations[0].bbox"]);
}

/// Writes `n` RGB PNG images of 64×64 under `dir` and returns their COCO image records.
fn coco_images(dir: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let img = image::RgbImage::from_fn(64, 64, |x, y| {
                let v = if (16..40).contains(&x) && (20..44).contains(&y) { 230 } else { (x + y + i as u32) as u8 };
                image::Rgb([v, v / 2, 255 - v])
            });
            img.save(dir.join(format!("im{i}.png"))).unwrap();
            serde_json::json!({"id": i + 1, "file_name": format!("im{i}.png"), "width": 64, "height": 64})
        })
        .collect()
}

#[test]
fn coco_data_is_checked_and_mended() {
    let tmp = tempfile::tempdir().unwrap();
    let images = coco_images(tmp.path(), 4);
    let cats = serde_json::json!([{"id": 3, "name": "square"}, {"id": 7, "name": "other"}]);
    let write = |name: &str, anns: serde_json::Value| {
        let p = tmp.path().join(name);
        let v = serde_json::json!({"images": images, "categories": cats, "annotations": anns});
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        p
    };
    let train = |ann: &std::path::Path| {
        nv(&[
            "train",
            "--task",
            "detect",
            "--coco",
            s(ann),
            "--coco-images",
            s(tmp.path()),
            "--test-coco",
            s(ann),
            "--test-coco-images",
            s(tmp.path()),
            "--epochs",
            "1",
            "-o",
            s(&tmp.path().join("m.safetensors")),
            "-q",
        ])
    };
    let ann = |id: u64, img: u64, cat: i64, b: [f64; 4]| serde_json::json!({"id": id, "image_id": img, "category_id": cat, "bbox": b, "area": b[2] * b[3], "iscrowd": 0});
    // good data, one box sticking out (clipped, with a warning naming it): trains and evaluates
    let good = write(
        "good.json",
        serde_json::json!([
            ann(1, 1, 3, [16.0, 20.0, 24.0, 24.0]),
            ann(2, 2, 3, [16.0, 20.0, 24.0, 24.0]),
            ann(3, 3, 7, [50.0, 50.0, 20.0, 20.0]),
            ann(4, 4, 3, [16.0, 20.0, 24.0, 24.0])
        ]),
    );
    let o = train(&good);
    assert_ok("coco training", &o);
    let e = crate::common::cli::stderr(&o);
    assert!(
        e.contains("warning: annotations[2] (id 3)") && e.contains("clipped"),
        "{e}"
    );
    // zero area, wholly outside, unknown category, missing image file, malformed JSON
    let zero = write(
        "zero.json",
        serde_json::json!([ann(1, 1, 3, [16.0, 20.0, 0.0, 24.0])]),
    );
    assert_fails(
        "zero area",
        &train(&zero),
        &["zero.json", "annotations[0] (id 1)", "zero area"],
    );
    let out = write(
        "out.json",
        serde_json::json!([
            ann(1, 2, 3, [10.0, 10.0, 5.0, 5.0]),
            ann(9, 2, 3, [70.0, 5.0, 5.0, 5.0])
        ]),
    );
    assert_fails(
        "outside",
        &train(&out),
        &["out.json", "annotations[1] (id 9)", "wholly outside"],
    );
    let cat = write(
        "cat.json",
        serde_json::json!([ann(1, 1, 5, [16.0, 20.0, 4.0, 4.0])]),
    );
    assert_fails(
        "category",
        &train(&cat),
        &["cat.json", "annotations[0]", "category_id 5"],
    );
    std::fs::remove_file(tmp.path().join("im3.png")).unwrap();
    assert_fails(
        "missing image",
        &train(&good),
        &["good.json", "image 4", "im3.png", "does not exist"],
    );
    let broken = tmp.path().join("broken.json");
    std::fs::write(&broken, b"{\"images\": [").unwrap();
    assert_fails(
        "malformed",
        &train(&broken),
        &["broken.json", "not valid JSON"],
    );
}
