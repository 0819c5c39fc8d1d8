//! The parsers' fuzz targets (`fuzz/`, AFL++), kept in the library so that CI replays the fuzz corpora and the
//! crashes found through exactly the code the fuzzer ran (`tests/fuzz_replay.rs`). Each takes arbitrary bytes
//! and must return — an error is fine — without panicking, aborting or allocating what the input merely claims.
#![doc(hidden)]

use crate::data::decode::{decode_bytes, to_chw};
use crate::data::idx::{inflate_idx, parse_idx};
use crate::detect::coco::{detections_from_json, CocoDataset, CocoDetection};
use crate::detect::coco_eval;
use crate::detect::data::check_annotations;
use crate::train::checkpoint;
use std::path::Path;

/// IDX files, gzipped or raw, as `read_idx` reads them.
pub fn idx(data: &[u8]) {
    if let Ok(bytes) = inflate_idx(data.to_vec(), "fuzz.idx") {
        let _ = parse_idx(&bytes, "fuzz.idx");
    }
}

/// Checkpoints (safetensors with normvision's metadata): parsed, validated and, when that succeeds, the
/// model rebuilt from its architecture and loaded with its tensors, as `eval` and `--resume` do.
pub fn checkpoint(data: &[u8]) {
    if let Ok(ck) = checkpoint::from_bytes(data, Path::new("fuzz.safetensors")) {
        let _ = checkpoint::restore_model(&ck);
    }
}

/// Images as `predict` and image folders read them: decoded (PNG or JPEG, from the content), converted to
/// grayscale and RGB and resized.
pub fn image(data: &[u8]) {
    if let Ok(img) = decode_bytes(data, Path::new("fuzz.png")) {
        let _ = to_chw(&img, 1, 28, 28);
        let _ = to_chw(&img, 3, 32, 32);
    }
}

/// ONNX models as `--onnx` reads them: parsed, imported (constant folding, BN folding) and, when that succeeds
/// and the input is small, run on one sample. External data is refused here (no directory).
pub fn onnx(data: &[u8]) {
    if let Ok(mut m) = crate::io::onnx::parse_onnx(data, None, "fuzz.onnx") {
        let per = m
            .input_shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d));
        if per.is_some_and(|p| p <= 1 << 14) {
            let mut shape = vec![1];
            shape.extend_from_slice(&m.input_shape);
            let x = ndarray::ArrayD::<f32>::from_elem(ndarray::IxDyn(&shape), 0.5);
            let _ = m.graph.infer(&[&x]);
        }
    }
}

/// COCO JSON as `coco-eval` and `--coco` read it. An object is ground truth: read, checked as training data
/// (boxes of zero area or outside their image refused, the rest clipped) and evaluated against its own boxes.
/// A list is detections in COCO's result format: read against a small fixed ground truth and evaluated.
pub fn coco(data: &[u8]) {
    let path = Path::new("fuzz.json");
    let Ok(root) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if root.is_array() {
        let gt = serde_json::json!({
        "images": [{"id": 1, "width": 64, "height": 48}, {"id": 2}, {"id": 0, "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 20, 10]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 5, 8, 40], "area": 100},
            {"id": 0, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ]});
        let gt = CocoDataset::from_json(&gt, Path::new("gt.json"))
            .expect("the fixed ground truth reads");
        if let Ok(dets) = detections_from_json(&root, path, &gt) {
            let _ = coco_eval::evaluate(&gt, &dets);
        }
    } else if let Ok(mut gt) = CocoDataset::from_json(&root, path) {
        let own: Vec<CocoDetection> = gt
            .annotations
            .iter()
            .enumerate()
            .map(|(k, a)| CocoDetection {
                image_id: a.image_id,
                category_id: a.category_id,
                bbox: a.bbox,
                score: 1.0 / (1.0 + (k % 7) as f64),
            })
            .collect();
        let _ = coco_eval::evaluate(&gt, &own);
        let _ = check_annotations(&mut gt, path);
    }
}

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// The targets by name, for the replay test and the fuzz binaries.
pub const TARGETS: [(&str, Target); 5] = [
    ("idx", idx),
    ("checkpoint", checkpoint),
    ("image", image),
    ("onnx", onnx),
    ("coco", coco),
];
