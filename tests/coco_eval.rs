//! COCO box evaluation against pycocotools: the fixtures of `tools/gen_coco_fixtures.py` (ground truth,
//! detections, and pycocotools' numbers) must be reproduced to 1e-6, through the library and through
//! `normvision coco-eval`; plus the rules checked on cases small enough to work by hand, and bad input.

use crate::common::cli::{assert_fails, assert_ok, nv, s, stdout};
use crate::common::fixture_dir;
use normvision::detect::{coco_eval, load_detections, CocoDataset, CocoDetection};
use serde_json::{json, Value};
use std::path::Path;

const CASES: [&str; 4] = ["mixed", "dense", "sparse", "perfect"];

fn expected(case: &str) -> Value {
    let p = fixture_dir("coco").join(format!("{case}.expected.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: normvision {got}, pycocotools {want} (|diff| {:e})",
        (got - want).abs()
    );
}

#[test]
fn matches_pycocotools_on_every_fixture() {
    for case in CASES {
        let dir = fixture_dir("coco");
        let gt = CocoDataset::load(&dir.join(format!("{case}.gt.json"))).unwrap();
        let dets = load_detections(&dir.join(format!("{case}.dets.json")), &gt).unwrap();
        let ev = coco_eval::evaluate(&gt, &dets);
        let want = expected(case);
        for (k, (g, w)) in ev.stats.iter().zip(floats(&want["stats"])).enumerate() {
            close(&format!("{case} {}", coco_eval::STAT_NAMES[k]), *g, w, 1e-6);
        }
        let cats: Vec<i64> = want["category_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(ev.category_ids, cats, "{case}: category order");
        for (k, (g, w)) in ev
            .per_category_ap()
            .iter()
            .zip(floats(&want["per_category_ap"]))
            .enumerate()
        {
            close(&format!("{case} AP of category {}", cats[k]), *g, w, 1e-6);
        }
        // the whole precision and recall arrays, through their defined entries' count and sum
        let defined = |v: &[f64]| v.iter().filter(|&&x| x > -1.0).copied().collect::<Vec<_>>();
        let (p, r) = (defined(&ev.precision), defined(&ev.recall));
        assert_eq!(
            p.len() as u64,
            want["precision_defined"].as_u64().unwrap(),
            "{case}"
        );
        assert_eq!(
            r.len() as u64,
            want["recall_defined"].as_u64().unwrap(),
            "{case}"
        );
        close(
            &format!("{case} Σ precision"),
            p.iter().sum(),
            want["precision_sum"].as_f64().unwrap(),
            1e-6,
        );
        close(
            &format!("{case} Σ recall"),
            r.iter().sum(),
            want["recall_sum"].as_f64().unwrap(),
            1e-6,
        );
    }
}

#[test]
fn the_fixtures_exercise_the_rules() {
    // the cases must hold what they claim to test, or the parity test proves less than it says
    let dir = fixture_dir("coco");
    let gt = CocoDataset::load(&dir.join("mixed.gt.json")).unwrap();
    let dets = load_detections(&dir.join("mixed.dets.json"), &gt).unwrap();
    assert!(gt.annotations.iter().any(|a| a.id == 0), "a gt with id 0");
    assert!(gt.annotations.iter().any(|a| a.iscrowd), "crowd gt");
    for (lo, hi) in [(0.0, 1024.0), (1024.0, 9216.0), (9216.0, 1e10)] {
        assert!(gt.annotations.iter().any(|a| a.area > lo && a.area <= hi));
    }
    let per_image = |id: i64| dets.iter().filter(|d| d.image_id == id).count();
    assert!(
        gt.images.iter().any(|i| per_image(i.id) > 100),
        "an image past maxDets"
    );
    assert!(
        gt.images.iter().any(|i| per_image(i.id) == 0),
        "an image without detections"
    );
    assert!(
        gt.images
            .iter()
            .any(|i| !gt.annotations.iter().any(|a| a.image_id == i.id)),
        "an image without gt"
    );
    let mut scores: Vec<f64> = dets.iter().map(|d| d.score).collect();
    scores.sort_by(f64::total_cmp);
    assert!(scores.windows(2).any(|w| w[0] == w[1]), "tied scores");
    let ev = coco_eval::evaluate(&gt, &dets);
    assert!(
        ev.per_category_ap().contains(&0.0),
        "a category with gt and no detection"
    );
    assert!(
        ev.skipped_detections > 0,
        "detections of a category without gt"
    );
}

fn dataset(anns: &[(i64, i64, [f64; 4], bool)]) -> CocoDataset {
    let v = json!({
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": anns.iter().enumerate().map(|(k, (img, cat, b, crowd))| json!({
            "id": k + 1, "image_id": img, "category_id": cat, "bbox": b, "area": b[2] * b[3],
            "iscrowd": *crowd as u8})).collect::<Vec<_>>(),
    });
    CocoDataset::from_json(&v, Path::new("test.json")).unwrap()
}

fn det(img: i64, cat: i64, bbox: [f64; 4], score: f64) -> CocoDetection {
    CocoDetection {
        image_id: img,
        category_id: cat,
        bbox,
        score,
    }
}

#[test]
fn hand_worked_cases() {
    // one medium gt, found exactly: AP 1 everywhere it is defined; small and large have no gt: -1
    let gt = dataset(&[(1, 1, [10.0, 10.0, 50.0, 50.0], false)]);
    let ev = coco_eval::evaluate(&gt, &[det(1, 1, [10.0, 10.0, 50.0, 50.0], 0.9)]);
    // (precision is tp / (tp + fp + eps), as in pycocotools: 1 - 1.1e-16)
    let want = [
        1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0,
    ];
    for (g, w) in ev.stats.iter().zip(want) {
        close("one exact hit", *g, w, 1e-15);
    }

    // IoU 0.6 (box shifted by 10 of 40 across): a hit at 0.50 and 0.55, a miss from 0.60 up?
    // 30·40 / (40·40·2 − 30·40) = 1200 / 2000 = 0.6 ≥ 0.6, so a hit at 0.50, 0.55 and 0.60 (3 of 10)
    let gt = dataset(&[(1, 1, [0.0, 0.0, 40.0, 40.0], false)]);
    let ev = coco_eval::evaluate(&gt, &[det(1, 1, [10.0, 0.0, 40.0, 40.0], 0.5)]);
    assert!((ev.stats[0] - 0.3).abs() < 1e-12, "{:?}", ev.stats);
    close("AP50", ev.stats[1], 1.0, 1e-15);
    assert_eq!(ev.stats[2], 0.0);

    // a false positive ranked first halves precision at full recall: AP50 = 0.5 (101-point, every
    // threshold reached at rank 2 with precision 1/2)
    let ev = coco_eval::evaluate(
        &gt,
        &[
            det(1, 1, [60.0, 60.0, 30.0, 30.0], 0.9),
            det(1, 1, [0.0, 0.0, 40.0, 40.0], 0.8),
        ],
    );
    assert!((ev.stats[1] - 0.5).abs() < 1e-12, "{:?}", ev.stats);
    // ranked second instead: precision 1 at recall 1
    let ev = coco_eval::evaluate(
        &gt,
        &[
            det(1, 1, [60.0, 60.0, 30.0, 30.0], 0.7),
            det(1, 1, [0.0, 0.0, 40.0, 40.0], 0.8),
        ],
    );
    close("AP50", ev.stats[1], 1.0, 1e-15);
    // a tie: input order decides, as in pycocotools' mergesort
    let ev = coco_eval::evaluate(
        &gt,
        &[
            det(1, 1, [60.0, 60.0, 30.0, 30.0], 0.8),
            det(1, 1, [0.0, 0.0, 40.0, 40.0], 0.8),
        ],
    );
    assert!((ev.stats[1] - 0.5).abs() < 1e-12);

    // a crowd gt absorbs any number of detections inside it, which count neither as TP nor FP; with no
    // regular gt the category is undefined (-1)
    let gt = dataset(&[(1, 1, [0.0, 0.0, 80.0, 80.0], true)]);
    let ev = coco_eval::evaluate(
        &gt,
        &[
            det(1, 1, [0.0, 0.0, 40.0, 40.0], 0.9),
            det(1, 1, [40.0, 40.0, 40.0, 40.0], 0.8),
        ],
    );
    assert_eq!(ev.stats[0], -1.0);
    // next to a regular gt: the detections inside the crowd are ignored, not false positives
    let gt = dataset(&[
        (1, 1, [0.0, 0.0, 40.0, 40.0], true),
        (1, 1, [50.0, 50.0, 40.0, 40.0], false),
    ]);
    let ev = coco_eval::evaluate(
        &gt,
        &[
            det(1, 1, [0.0, 0.0, 20.0, 20.0], 0.9),
            det(1, 1, [50.0, 50.0, 40.0, 40.0], 0.5),
        ],
    );
    close("AP50 beside a crowd", ev.stats[1], 1.0, 1e-15);

    // maxDets: the true detection ranked 2nd counts for AR@10 but not AR@1
    let gt = dataset(&[(1, 1, [0.0, 0.0, 40.0, 40.0], false)]);
    let ev = coco_eval::evaluate(
        &gt,
        &[
            det(1, 1, [60.0, 60.0, 30.0, 30.0], 0.9),
            det(1, 1, [0.0, 0.0, 40.0, 40.0], 0.8),
        ],
    );
    assert_eq!((ev.stats[6], ev.stats[7]), (0.0, 1.0));

    // detections of another image or class do not match
    let ev = coco_eval::evaluate(&gt, &[det(2, 1, [0.0, 0.0, 40.0, 40.0], 0.9)]);
    assert_eq!(ev.stats[1], 0.0);
    let ev = coco_eval::evaluate(&gt, &[det(1, 2, [0.0, 0.0, 40.0, 40.0], 0.9)]);
    assert_eq!(ev.stats[1], 0.0);
    // no detections at all: 0 (pycocotools' loadRes cannot take an empty list; 0 is what it would give)
    let ev = coco_eval::evaluate(&gt, &[]);
    assert_eq!(ev.stats[0], 0.0);
}

#[test]
fn cli_prints_pycocotools_table_and_json() {
    let dir = fixture_dir("coco");
    let (g, d) = (dir.join("mixed.gt.json"), dir.join("mixed.dets.json"));
    let o = nv(&["coco-eval", "--gt", s(&g), "--dets", s(&d)]);
    assert_ok("coco-eval", &o);
    let out = stdout(&o);
    let want = floats(&expected("mixed")["stats"]);
    assert!(
        out.contains(&format!(
            " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = {:.3}",
            want[0]
        )),
        "{out}"
    );
    assert!(out.contains(&format!(
        " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = {:.3}",
        want[11]
    )));
    let o = nv(&["coco-eval", "--gt", s(&g), "--dets", s(&d), "--json"]);
    assert_ok("coco-eval --json", &o);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    for (k, name) in coco_eval::STAT_NAMES.iter().enumerate() {
        close(name, v["stats"][name].as_f64().unwrap(), want[k], 1e-12);
    }
    assert_eq!(v["per_category"].as_array().unwrap().len(), 4);
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let gt = w(
        "valid-gt.json",
        r#"{"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": []}"#,
    );
    let cases: [(&str, &str, &[&str]); 5] = [
        ("not-json.json", "[{", &["not-json.json", "not valid JSON"]),
        ("object.json", "{}", &["object.json", "list of detections"]),
        (
            "bbox.json",
            r#"[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]"#,
            &["bbox.json", "[0].bbox"],
        ),
        (
            "image.json",
            r#"[{"image_id": 123456, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]"#,
            &["image.json", "image_id 123456"],
        ),
        (
            "score.json",
            r#"[{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}]"#,
            &["score.json", "\"score\""],
        ),
    ];
    for (name, text, needles) in cases {
        let p = w(name, text);
        let o = nv(&["coco-eval", "--gt", s(&gt), "--dets", s(&p)]);
        assert_fails(name, &o, needles);
    }
    let bad_gt = w(
        "gt.json",
        r#"{"images": [{"id": 1}], "categories": [{"id": 1}], "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}"#,
    );
    let dets = w("ok.json", "[]");
    let o = nv(&["coco-eval", "--gt", s(&bad_gt), "--dets", s(&dets)]);
    assert_fails(
        "unknown image",
        &o,
        &["gt.json", "annotations[0]", "image_id 2"],
    );
    let o = nv(&[
        "coco-eval",
        "--gt",
        s(&tmp.path().join("missing.json")),
        "--dets",
        s(&dets),
    ]);
    assert_fails("missing file", &o, &["missing.json"]);
}
