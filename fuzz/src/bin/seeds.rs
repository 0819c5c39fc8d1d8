//! Writes the seed corpora (inputs that parse) into fuzz/corpus/<target>/:
//!   cargo run --manifest-path fuzz/Cargo.toml --bin seeds
//! IDX files (raw and gzipped, images and labels), a tiny checkpoint (a 2x2-image classifier with a Linear,
//! a BatchNorm1d and a GroupNorm-free head, trained for one step so that the optimizer state is there), and small
//! PNG (gray, RGB, RGBA, palette) and JPEG images, ONNX models, and COCO ground truth and detections.
use normvision::data::idx::{encode_idx, IdxArray, IdxData};
use normvision::data::Normalization;
use normvision::io::onnx;
use normvision::model::{Graph, Model, ModelConfig, ModelKind, NormKind};
use normvision::nn::{Flatten, LinearConfig, ReLU};
use normvision::norm::BatchNormConfig;
use normvision::train::{checkpoint, Position, TrainConfig};
use std::io::Write;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let dir = |t: &str| {
        let d = root.join(t);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // IDX
    let d = dir("idx");
    let imgs = IdxArray::new(vec![2, 3, 3], IdxData::U8((0..18).collect())).unwrap();
    let labels = IdxArray::new(vec![2], IdxData::U8(vec![1, 7])).unwrap();
    let f32s = IdxArray::new(vec![2, 2], IdxData::F32(vec![0.5, -1.0, 3.0, 1e-3])).unwrap();
    for (name, a) in [("images", &imgs), ("labels", &labels), ("floats", &f32s)] {
        let raw = encode_idx(a).unwrap();
        std::fs::write(d.join(format!("{name}.idx")), &raw).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&raw).unwrap();
        std::fs::write(d.join(format!("{name}.idx.gz")), gz.finish().unwrap()).unwrap();
    }
    // Checkpoint
    let mut rng = rand::thread_rng();
    let mut g = Graph::new();
    let x = g.input("x");
    let f = g.layer("flat", Flatten::new(), x).unwrap();
    let l = g
        .layer(
            "fc",
            LinearConfig::new(4, 3).build::<f32>(&mut rng).unwrap(),
            f,
        )
        .unwrap();
    let b = g
        .layer("bn", BatchNormConfig::d1(3).build::<f32>().unwrap(), l)
        .unwrap();
    let r = g.layer("relu", ReLU::new(), b).unwrap();
    let h = g
        .layer(
            "head",
            LinearConfig::new(3, 2).build::<f32>(&mut rng).unwrap(),
            r,
        )
        .unwrap();
    g.set_outputs(&[h]).unwrap();
    let model = Model::from_graph(g, [1, 2, 2]).unwrap();
    let mut cfg = TrainConfig::reference(ModelKind::Mlp, NormKind::Batch);
    cfg.model = ModelConfig {
        height: 2,
        width: 2,
        num_classes: 2,
        ..cfg.model
    };
    let opt = cfg.optim.build().unwrap();
    let pos = Position {
        step: 3,
        epoch: 1,
        batch: 1,
    };
    checkpoint::save(
        &dir("checkpoint").join("tiny.safetensors"),
        &cfg,
        &Normalization::identity(1),
        pos,
        &model,
        opt.as_ref(),
        Some(0.5),
    )
    .unwrap();
    // Images
    let d = dir("image");
    let gray = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y * 9) as u8]));
    gray.save(d.join("gray.png")).unwrap();
    let rgb = image::RgbImage::from_fn(4, 3, |x, y| {
        image::Rgb([(x * 60) as u8, (y * 80) as u8, 128])
    });
    rgb.save(d.join("rgb.png")).unwrap();
    rgb.save(d.join("rgb.jpg")).unwrap();
    let rgba = image::RgbaImage::from_fn(3, 3, |x, y| {
        image::Rgba([(x * 80) as u8, (y * 80) as u8, 9, 200])
    });
    rgba.save(d.join("rgba.png")).unwrap();
    gray.save(d.join("gray.jpg")).unwrap();
    // ONNX: small exported graphs (BN kept and folded, GroupNorm's decomposition, LayerNorm), and a hand-built
    // graph with the shape subgraph exporters write for x.view(x.size(0), -1)
    let d = dir("onnx");
    // conv(1→2) + norm + ReLU + 2x2 max pool + flatten + linear(8→3) + norm, on 1x4x4 inputs
    let small = |norm: NormKind| -> Graph {
        let mut rng = rand::thread_rng();
        let mut seq = normvision::model::Sequential::new();
        seq.push("conv", normvision::nn::Conv2dConfig::new(1, 2, 3).padding(1).build::<f32>(&mut rng).unwrap());
        if let Some(n) = normvision::model::build_norm(
            norm,
            2,
            true,
            &normvision::model::NormParams { groups: 2, ..Default::default() },
        )
        .unwrap() {
            seq.push_boxed("norm", n);
        }
        seq.push("relu", ReLU::new())
            .push("pool", normvision::nn::MaxPool2dConfig::new(2).build::<f32>().unwrap())
            .push("flatten", Flatten::new())
            .push("fc", LinearConfig::new(8, 3).build::<f32>(&mut rng).unwrap());
        if let Some(n) = normvision::model::build_norm(
            norm,
            3,
            false,
            &normvision::model::NormParams { groups: 1, ..Default::default() },
        )
        .unwrap() {
            seq.push_boxed("fc_norm", n);
        }
        seq.into_graph().unwrap()
    };
    for (name, norm, fold) in [
        ("cnn-batch", NormKind::Batch, false),
        ("cnn-batch-folded", NormKind::Batch, true),
        ("cnn-group", NormKind::Group, false),
        ("cnn-layer", NormKind::Layer, false),
    ] {
        let g = small(norm);
        let opts = onnx::ExportOptions { fold_bn: fold, ..Default::default() };
        let bytes = onnx::to_onnx_bytes(&g, &[1, 4, 4], &opts).unwrap();
        std::fs::write(d.join(format!("{name}.onnx")), bytes).unwrap();
    }
    std::fs::write(d.join("shape-subgraph.onnx"), shape_subgraph()).unwrap();
    // COCO JSON: the pycocotools fixtures (ground truth and detections), detections of the target's fixed
    // ground truth, and ground truth with crowds, boxes sticking out of or outside their image and no sizes
    let d = dir("coco");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/coco");
    for case in ["dense", "mixed", "perfect", "sparse"] {
        for kind in ["gt", "dets"] {
            let name = format!("{case}.{kind}.json");
            std::fs::copy(fixtures.join(&name), d.join(&name)).unwrap();
        }
    }
    std::fs::write(
        d.join("fixed-gt.dets.json"),
        r#"[{"image_id": 1, "category_id": 1, "bbox": [2, 3, 20, 10], "score": 0.9},
 {"image_id": 1, "category_id": 3, "bbox": [29, 6, 8, 38.5], "score": 0.9},
 {"image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5},
 {"image_id": 0, "category_id": 5, "bbox": [1, 1, 2, 2], "score": 0.1}]"#,
    )
    .unwrap();
    std::fs::write(
        d.join("edges.gt.json"),
        r#"{"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}, {"id": 2, "file_name": "b.png"}],
 "categories": [{"id": 7, "name": "shirt"}, {"id": 2, "name": "bag"}],
 "annotations": [
  {"id": 1, "image_id": 1, "category_id": 7, "bbox": [-3, 4, 10, 40], "area": 120},
  {"id": 2, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 3], "iscrowd": 1},
  {"id": 3, "image_id": 2, "category_id": 2, "bbox": [1.5, 2.25, 3, 4], "iscrowd": false},
  {"id": 4, "image_id": 1, "category_id": 2, "bbox": [40, 1, 3, 3]}]}"#,
    )
    .unwrap();
    println!("seed corpora written under {}", root.display());
}

/// Input (N, 2, 2, 2) → Shape → Gather(0) → Unsqueeze → Concat([-1]) → Reshape → Gemm(8 → 2) → Softmax.
fn shape_subgraph() -> Vec<u8> {
    use normvision::io::onnx::proto::*;
    use prost::Message;
    let node = |op: &str, ins: &[&str], out: &str, attrs: Vec<AttributeProto>| NodeProto {
        op_type: Some(op.into()),
        name: Some(out.into()),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        attribute: attrs,
        ..Default::default()
    };
    let ints = |name: &str, v: &[i64]| TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(7),
        int64_data: v.to_vec(),
        ..Default::default()
    };
    let floats = |name: &str, dims: &[i64], n: usize| TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(1),
        float_data: (0..n).map(|i| i as f32 * 0.1 - 0.4).collect(),
        ..Default::default()
    };
    let axis0 = AttributeProto { name: Some("axis".into()), i: Some(0), r#type: Some(2), ..Default::default() };
    let dim = |v: tensor_shape_proto::dimension::Value| tensor_shape_proto::Dimension { value: Some(v), ..Default::default() };
    use tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    let input = ValueInfoProto {
        name: Some("x".into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(TensorShapeProto { dim: vec![dim(DimParam("N".into())), dim(DimValue(2)), dim(DimValue(2)), dim(DimValue(2))] }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let graph = GraphProto {
        node: vec![
            node("Shape", &["x"], "shape", vec![]),
            node("Gather", &["shape", "zero"], "n", vec![axis0.clone()]),
            node("Unsqueeze", &["n", "axes0"], "n1", vec![]),
            node("Concat", &["n1", "minus1"], "target", vec![axis0]),
            node("Reshape", &["x", "target"], "flat", vec![]),
            node("Gemm", &["flat", "w", "b"], "logits", vec![AttributeProto { name: Some("transB".into()), i: Some(1), r#type: Some(2), ..Default::default() }]),
            node("Softmax", &["logits"], "probs", vec![]),
        ],
        initializer: vec![
            TensorProto { dims: vec![], ..ints("zero", &[0]) },
            ints("axes0", &[0]),
            ints("minus1", &[-1]),
            floats("w", &[2, 8], 16),
            floats("b", &[2], 2),
        ],
        input: vec![input],
        output: vec![ValueInfoProto { name: Some("probs".into()), ..Default::default() }],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}
