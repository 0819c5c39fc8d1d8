//! The parsers' fuzz targets (`fuzz/`, AFL++), kept in the library so that CI replays the fuzz corpora and the
//! crashes found through exactly the code the fuzzer ran (`tests/fuzz_replay.rs`). Each takes arbitrary bytes
//! and must return — an error is fine — without panicking, aborting or allocating what the input merely claims.
#![doc(hidden)]

use crate::data::decode::{decode_bytes, to_chw};
use crate::data::idx::{inflate_idx, parse_idx};
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

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// The targets by name, for the replay test and the fuzz binaries.
pub const TARGETS: [(&str, Target); 4] = [
    ("idx", idx),
    ("checkpoint", checkpoint),
    ("image", image),
    ("onnx", onnx),
];
