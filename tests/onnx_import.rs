//! ONNX in and out: models exported by both of PyTorch's exporters (`tools/gen_onnx_fixtures.py`, fixtures in
//! `tests/fixtures/onnx/`) give PyTorch's logits within 1e-4 at a batch size other than the exported one;
//! our own export (BatchNorm kept or folded; GroupNorm as its decomposition; LayerNorm) imports back to the same
//! logits; corrupt and unsupported files are errors that name the
//! file, the node and the op, never a panic.

use crate::common;

use ndarray::ArrayD;
use normvision::io::load_state_dict;
use normvision::io::onnx::{load_onnx, parse_onnx, proto, to_onnx_bytes, ExportOptions};
use normvision::model::{Model, ModelConfig, ModelKind, NormKind};
use normvision::state::StateTensor;
use prost::Message;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn io(name: &str) -> (ArrayD<f32>, ArrayD<f32>) {
    let (sd, _) = load_state_dict(&dir().join(format!("{name}.io.safetensors"))).unwrap();
    let get = |k: &str| match sd.get(k) {
        Some(StateTensor::F32(a)) => a.clone(),
        o => panic!("{name}: {k}: {o:?}"),
    };
    (get("x"), get("logits"))
}

fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn pytorch_exports_match_pytorch_logits() {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter_map(|n| n.strip_suffix(".onnx").map(str::to_string))
        .collect();
    names.sort();
    assert_eq!(names.len(), 8, "{names:?}");
    for name in names {
        let mut m = load_onnx(&dir().join(format!("{name}.onnx")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (x, want) = io(&name);
        assert_eq!(x.shape()[0], 3, "exported at batch 2, run at 3");
        let got = m.graph.infer(&[&x]).unwrap().remove(0);
        let d = max_diff(&got, &want);
        eprintln!(
            "{name}: opset {}, {} BN folded, max |logit - PyTorch| = {d:.2e}",
            m.opset, m.folded_batch_norms
        );
        assert!(d <= 1e-4, "{name}: {d}");
        if name == "cnn-ts13" || name == "ops-ts13" || name == "ops-dynamo-noopt" {
            assert!(
                m.folded_batch_norms >= 3,
                "{name}: BatchNormalization nodes folded at load"
            );
        }
    }
}

#[test]
fn imported_models_classify_through_the_model_api() {
    let m = load_onnx(&dir().join("resnet-dynamo.onnx")).unwrap();
    assert_eq!(m.input_shape, vec![1, 8, 8]);
    let mut model = m.into_classifier().unwrap();
    let (x, want) = io("resnet-dynamo");
    assert!(max_diff(&model.forward_inference(&x).unwrap(), &want) <= 1e-4);
    assert_eq!(model.num_classes(), 10);
}

fn zoo(kind: ModelKind, norm: NormKind) -> Model {
    let mut cfg = ModelConfig::fashion(kind, norm);
    cfg.seed = 7;
    let mut m = Model::new(cfg).unwrap();
    // a few training steps, so that running statistics are not the identity
    let x = ArrayD::from_shape_fn(ndarray::IxDyn(&[8, 1, 28, 28]), |i| {
        ((i[2] * 7 + i[3] * 3 + i[0]) % 11) as f32 / 11.0
    });
    for _ in 0..3 {
        m.forward(&x, normvision::Ctx::train()).unwrap();
    }
    m
}

#[test]
fn our_export_imports_back_to_the_same_logits() {
    let x = ArrayD::from_shape_fn(ndarray::IxDyn(&[5, 1, 28, 28]), |i| {
        ((i[2] * 5 + i[3] + i[0] * 3) % 13) as f32 / 13.0
    });
    for kind in [ModelKind::Cnn, ModelKind::Mlp, ModelKind::Resnet] {
        for norm in [
            NormKind::Batch,
            NormKind::None,
            NormKind::Group,
            NormKind::Layer,
        ] {
            for fold in [false, true] {
                let mut ours = zoo(kind, norm);
                let want = ours.forward_inference(&x).unwrap();
                let opts = ExportOptions {
                    fold_bn: fold,
                    ..Default::default()
                };
                let bytes = to_onnx_bytes(ours.graph(), &[1, 28, 28], &opts).unwrap();
                let mut back = parse_onnx(&bytes, None, "roundtrip")
                    .unwrap()
                    .into_classifier()
                    .unwrap();
                let d = max_diff(&back.forward_inference(&x).unwrap(), &want);
                eprintln!("{kind:?}/{norm:?} fold={fold}: max |logit diff| = {d:.2e}");
                assert!(d <= 1e-4, "{kind:?}/{norm:?} fold={fold}: {d}");
            }
        }
    }
}

fn model_proto(name: &str) -> proto::ModelProto {
    proto::ModelProto::decode(&*std::fs::read(dir().join(format!("{name}.onnx"))).unwrap()).unwrap()
}

fn err_of(m: &proto::ModelProto) -> String {
    match parse_onnx(&m.encode_to_vec(), Some(&dir()), "edited.onnx") {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_and_unsupported_files_are_errors_naming_what_is_wrong() {
    let bytes = std::fs::read(dir().join("cnn-ts13.onnx")).unwrap();
    for cut in [10, bytes.len() / 2, bytes.len() - 3] {
        let e = parse_onnx(&bytes[..cut], None, "cut.onnx")
            .err()
            .expect("truncated file refused")
            .to_string();
        assert!(e.contains("cut.onnx"), "{e}");
    }
    let mut state = 0x9e3779b97f4a7c15u64;
    for len in [1usize, 7, 100, 4096] {
        let noise: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        assert!(parse_onnx(&noise, None, "noise.onnx").is_err());
    }

    let mut m = model_proto("cnn-ts13");
    let g = m.graph.as_mut().unwrap();
    let k = g
        .node
        .iter()
        .position(|n| n.op_type.as_deref() == Some("Relu"))
        .unwrap();
    g.node[k].op_type = Some("Swish".into());
    let node = g.node[k].name.clone().unwrap();
    let e = err_of(&m);
    assert!(
        e.contains("edited.onnx") && e.contains(&node) && e.contains("unsupported op Swish"),
        "{e}"
    );

    let mut m = model_proto("cnn-ts13");
    let g = m.graph.as_mut().unwrap();
    let k = g
        .node
        .iter()
        .position(|n| n.op_type.as_deref() == Some("MaxPool"))
        .unwrap();
    for a in &mut g.node[k].attribute {
        if a.name.as_deref() == Some("ceil_mode") {
            a.i = Some(1);
        }
    }
    if !g.node[k]
        .attribute
        .iter()
        .any(|a| a.name.as_deref() == Some("ceil_mode"))
    {
        g.node[k].attribute.push(proto::AttributeProto {
            name: Some("ceil_mode".into()),
            i: Some(1),
            r#type: Some(2),
            ..Default::default()
        });
    }
    let e = err_of(&m);
    assert!(e.contains("MaxPool") && e.contains("ceil_mode 1"), "{e}");

    let mut m = model_proto("cnn-ts13");
    let g = m.graph.as_mut().unwrap();
    let k = g
        .node
        .iter()
        .position(|n| n.op_type.as_deref() == Some("Conv"))
        .unwrap();
    g.node[k].attribute.push(proto::AttributeProto {
        name: Some("frobnicate".into()),
        i: Some(1),
        r#type: Some(2),
        ..Default::default()
    });
    let e = err_of(&m);
    assert!(
        e.contains("(Conv)") && e.contains("unsupported attribute \"frobnicate\""),
        "{e}"
    );

    let mut m = model_proto("cnn-ts13");
    let g = m.graph.as_mut().unwrap();
    for a in &mut g.node[k].attribute {
        if a.name.as_deref() == Some("pads") {
            a.ints = vec![1, 1, 0, 0];
        }
    }
    assert!(err_of(&m).contains("asymmetric pads"));

    // external data that leaves the model's directory, and external data past the end of its file
    for (loc, want) in [
        ("../../Cargo.toml", "leaves the model's directory"),
        ("/etc/passwd", "leaves the model's directory"),
    ] {
        let mut m = model_proto("cnn-dynamo");
        let t = &mut m.graph.as_mut().unwrap().initializer[0];
        for kv in &mut t.external_data {
            if kv.key.as_deref() == Some("location") {
                kv.value = Some(loc.into());
            }
        }
        let e = err_of(&m);
        assert!(e.contains(want), "{e}");
    }
    let mut m = model_proto("cnn-dynamo");
    let t = &mut m.graph.as_mut().unwrap().initializer[0];
    for kv in &mut t.external_data {
        if kv.key.as_deref() == Some("offset") {
            kv.value = Some("999999999".into());
        }
    }
    assert!(err_of(&m).contains("past its end"));

    // an initializer whose dims claim far more than its data: refused before allocating
    let mut m = model_proto("cnn-ts13");
    m.graph.as_mut().unwrap().initializer[0].dims = vec![1 << 20, 1 << 20, 1 << 20];
    assert!(err_of(&m).contains("elements"));

    // a dynamic dimension other than the batch
    let mut m = model_proto("cnn-ts13");
    let inp = &mut m.graph.as_mut().unwrap().input[0];
    if let Some(proto::type_proto::Value::TensorType(t)) =
        inp.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape.as_mut().unwrap().dim[2].value = Some(
            proto::tensor_shape_proto::dimension::Value::DimParam("h".into()),
        );
    }
    assert!(err_of(&m).contains("only the batch dimension may be dynamic"));
}

#[test]
fn a_file_that_is_missing_or_not_onnx_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("model.onnx");
    assert!(load_onnx(&p)
        .err()
        .unwrap()
        .to_string()
        .contains("model.onnx"));
    std::fs::write(&p, b"definitely not protobuf \xff\xff\xff").unwrap();
    let e = load_onnx(&p).err().unwrap().to_string();
    assert!(e.contains("model.onnx"), "{e}");
}

#[test]
fn cli_export_onnx_then_eval_predict_and_bench_it() {
    use common::cli::*;
    let dir = tempfile::tempdir().unwrap();
    let (data, ck) = train_mlp(dir.path(), 200, &[]);
    let onnx = dir.path().join("mlp.onnx");
    assert_ok(
        "export --onnx",
        &nv(&[
            "export",
            "--onnx",
            "--fold-bn",
            "--checkpoint",
            s(&ck),
            "-o",
            s(&onnx),
        ]),
    );
    let acc = |o: std::process::Output| -> f64 {
        assert_ok("eval", &o);
        let v: serde_json::Value =
            serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
        v["test_acc"].as_f64().unwrap()
    };
    let a = acc(nv(&[
        "eval",
        "--checkpoint",
        s(&ck),
        "--data",
        s(&data),
        "--json",
    ]));
    let b = acc(nv(&[
        "eval",
        "--onnx",
        s(&onnx),
        "--data",
        s(&data),
        "--json",
    ]));
    assert_eq!(
        a, b,
        "the exported model classifies the test set as the checkpoint does"
    );
    let imgs = dir.path().join("imgs");
    write_image_folder(&imgs, 2, 1, 28);
    let o = nv(&[
        "predict",
        "--onnx",
        s(&onnx),
        s(&imgs.join("class1/0.png")),
        "--json",
    ]);
    assert_ok("predict --onnx", &o);
    // `predict` serves from a pool that the main thread works in (`use_current_thread`): on two threads, where
    // the batch-1 linear layers split their columns over the threads, it predicts what one thread does
    let two = std::process::Command::new(env!("CARGO_BIN_EXE_normvision"))
        .args(["--threads", "2", "predict", "--onnx", s(&onnx)])
        .args([s(&imgs.join("class1/0.png")), "--json"])
        .output()
        .expect("run normvision");
    assert_ok("predict --onnx on 2 threads", &two);
    assert_eq!(stdout(&two), stdout(&o), "2 threads predict what 1 does");
    let o = nv(&[
        "bench",
        "--onnx",
        s(&onnx),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "4",
        "--json",
    ]);
    assert_ok("bench --onnx", &o);
    assert_eq!(stdout(&o).lines().count(), 2, "batch 1 and batch 4");
    // a PyTorch export, with its own input size (1x8x8) and the normalization given on the command line
    let folder = dir.path().join("small");
    write_image_folder(&folder, 10, 1, 8);
    let o = nv(&[
        "eval",
        "--onnx",
        s(&dir_of("cnn-dynamo.onnx")),
        "--image-folder",
        s(&folder),
        "--test-folder",
        s(&folder),
        "--image-size",
        "8",
        "--mean",
        "0",
        "--std",
        "1",
    ]);
    assert_ok("eval --onnx of a PyTorch export", &o);
    // an unsupported file is an error naming it, not a panic
    let bad = dir.path().join("bad.onnx");
    std::fs::write(&bad, b"\x08\x07garbage").unwrap();
    assert_fails(
        "eval --onnx garbage",
        &nv(&["eval", "--onnx", s(&bad), "--data", s(&data)]),
        &["bad.onnx"],
    );
}

fn dir_of(name: &str) -> PathBuf {
    dir().join(name)
}
