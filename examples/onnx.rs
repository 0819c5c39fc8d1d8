//! ONNX in and out through the library API: run a model exported by PyTorch, then export a zoo model and read it
//! back.
//!
//! `cargo run --release --example onnx [MODEL.onnx]`
//!
//! The default model is `tests/fixtures/onnx/ops-dynamo.onnx`, written by `tools/gen_onnx_fixtures.py` with
//! torch 2.15's default (`torch.export`-based) exporter: an RGB network with a dilated and a depthwise
//! convolution, a residual Add, ReLU6, pooling and a Softmax, its weights in `ops-dynamo.onnx.data` beside it.
//! Its input batch and PyTorch's outputs are in `ops-dynamo.io.safetensors`.

use normvision::io::load_state_dict;
use normvision::io::onnx::{load_onnx, parse_onnx, to_onnx_bytes, ExportOptions};
use normvision::model::{Model, ModelConfig, ModelKind, NormKind};
use normvision::ndarray::{ArrayD, IxDyn};
use normvision::state::StateTensor;
use std::path::PathBuf;

fn main() -> normvision::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx");
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("ops-dynamo.onnx"));

    // 1. A PyTorch export: any batch size, BatchNorm folded at load, the graph run by the inference plan.
    let mut m = load_onnx(&path)?;
    println!(
        "{}: opset {}, producer {:?}, input {:?} of per-sample shape {:?}, {} BatchNorms folded",
        path.display(),
        m.opset,
        m.producer,
        m.input_name,
        m.input_shape,
        m.folded_batch_norms
    );
    print!("{:?}", m.graph);
    if path == dir.join("ops-dynamo.onnx") {
        let (io, _) = load_state_dict(&dir.join("ops-dynamo.io.safetensors"))?;
        let get = |k: &str| match io.get(k) {
            Some(StateTensor::F32(a)) => a.clone(),
            _ => unreachable!("the fixture has {k}"),
        };
        let y = m.graph.infer(&[&get("x")])?.remove(0);
        let diff = y
            .iter()
            .zip(get("logits").iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!("max |normvision - PyTorch| over the fixture's batch: {diff:.2e}");
    }

    // 2. A zoo model out to ONNX (BatchNorm kept) and back: the same logits.
    let mut cnn = Model::new(ModelConfig::fashion(ModelKind::Cnn, NormKind::Batch))?;
    let bytes = to_onnx_bytes(cnn.graph(), &[1, 28, 28], &ExportOptions::default())?;
    let mut back = parse_onnx(&bytes, None, "cnn.onnx")?.into_classifier()?;
    let x = ArrayD::from_shape_fn(IxDyn(&[4, 1, 28, 28]), |i| {
        ((i[2] + i[3] + i[0]) % 7) as f32 / 7.0
    });
    let (a, b) = (cnn.forward_inference(&x)?, back.forward_inference(&x)?);
    let diff = a
        .iter()
        .zip(b.iter())
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    println!(
        "zoo cnn -> ONNX ({} bytes) -> normvision: max logit difference {diff:.2e}",
        bytes.len()
    );
    Ok(())
}
