//! PyTorch state dicts in and out: the zoo's PyTorch twins (`tools/gen_zoo_twins.py`, fixtures in
//! `tests/fixtures/twins/`: cnn, mlp and resnet with every norm PyTorch has, saved in BF16 or F16 by
//! `safetensors.torch.save_file`) load strictly and give PyTorch's eval logits; strict loading names what is
//! wrong; `import --torch`, `export --torch` and `--weights` work from the CLI.

use crate::common;

use common::cli::*;
use ndarray::ArrayD;
use normvision::io::{load_state_dict, save_state_dict, torch};
use normvision::model::{Model, ModelConfig, ModelKind, NormKind};
use normvision::state::StateTensor;
use normvision::Ctx;
use std::path::{Path, PathBuf};

fn twins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/twins")
}

fn f32_tensor(sd: &normvision::state::StateDict, k: &str) -> ArrayD<f32> {
    match sd.get(k) {
        Some(StateTensor::F32(a)) => a.clone(),
        other => panic!("{k}: {other:?}"),
    }
}

/// (model, norm) of every twin fixture.
fn twins() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(twins_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".io.safetensors"))
        .map(|n| {
            let stem = n.trim_end_matches(".io.safetensors").to_string();
            let (m, k) = stem.split_once('-').unwrap();
            (m.to_string(), k.to_string())
        })
        .collect();
    v.sort();
    v
}

fn twin_model(model: &str, norm: &str) -> Model {
    let mut cfg = ModelConfig::fashion(
        model.parse::<ModelKind>().unwrap(),
        norm.parse::<NormKind>().unwrap(),
    );
    (cfg.height, cfg.width) = (8, 8);
    Model::new(cfg).unwrap()
}

#[test]
fn every_twin_loads_strictly_and_gives_pytorch_eval_logits() {
    let list = twins();
    assert!(list.len() >= 12, "{list:?}");
    for (model, norm) in list {
        let name = format!("{model}-{norm}");
        let mut m = twin_model(&model, &norm);
        torch::load_into(
            &mut m,
            &twins_dir().join(format!("{name}.safetensors")),
            true,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (io, _) = load_state_dict(&twins_dir().join(format!("{name}.io.safetensors"))).unwrap();
        let (x, want) = (f32_tensor(&io, "x"), f32_tensor(&io, "logits"));
        let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1.0);
        for (how, got) in [
            ("inference", m.forward_inference(&x).unwrap()),
            ("eval", m.forward(&x, Ctx::eval()).unwrap()),
        ] {
            let err = got
                .iter()
                .zip(want.iter())
                .fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
            eprintln!("{name} {how}: max |logit - PyTorch's| = {err:.2e} (max |logit| {scale:.2})");
            assert!(
                err <= 1e-4 * scale,
                "{name} {how}: logits off by {err} (scale {scale})"
            );
        }
    }
}

#[test]
fn strict_loading_names_the_key_and_fills_num_batches_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let src = twins_dir().join("cnn-batch.safetensors");
    let (sd, md) = load_state_dict(&src).unwrap();
    let write = |name: &str, f: &dyn Fn(&mut normvision::state::StateDict)| -> PathBuf {
        let mut s = sd.clone();
        f(&mut s);
        let p = dir.path().join(name);
        save_state_dict(&p, &s, &md).unwrap();
        p
    };
    let load = |p: &Path, strict: bool| {
        let mut m = twin_model("cnn", "batch");
        torch::load_into(&mut m, p, strict)
    };
    // No num_batches_tracked (a state dict without version metadata): filled with 0.
    let p = write("no_nbt.safetensors", &|s| {
        s.tensors.retain(|k, _| !k.ends_with("num_batches_tracked"))
    });
    let r = load(&p, true).unwrap();
    assert_eq!(r.filled.len(), 5, "{:?}", r.filled);
    // Unexpected, missing, wrong shape, wrong dtype: errors naming the key and the file.
    type Edit = Box<dyn Fn(&mut normvision::state::StateDict)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "extra",
            Box::new(|s| s.insert_i64("head.extra".into(), 1)),
            "head.extra",
        ),
        (
            "missing",
            Box::new(|s| {
                s.tensors.remove("3.weight");
            }),
            "3.weight",
        ),
        (
            "shape",
            Box::new(|s| {
                s.tensors.insert(
                    "1.weight".into(),
                    StateTensor::F32(ArrayD::zeros(ndarray::IxDyn(&[3]))),
                );
            }),
            "1.weight",
        ),
        (
            "dtype",
            Box::new(|s| {
                s.tensors.insert(
                    "1.num_batches_tracked".into(),
                    StateTensor::F32(ArrayD::zeros(ndarray::IxDyn(&[]))),
                );
            }),
            "1.num_batches_tracked",
        ),
    ];
    for (name, f, key) in cases {
        let p = write(&format!("{name}.safetensors"), &*f);
        let e = load(&p, true).unwrap_err().to_string();
        assert!(
            e.contains(key) && e.contains(&format!("{name}.safetensors")),
            "{name}: {e}"
        );
    }
    // Non-strict: loads the rest and lists what it skipped.
    let p = write("lenient.safetensors", &|s| {
        s.tensors.remove("3.weight");
        s.insert_i64("head.extra".into(), 1);
    });
    let r = load(&p, false).unwrap();
    assert_eq!(r.skipped.missing, vec!["3.weight".to_string()]);
    assert_eq!(r.skipped.unexpected, vec!["head.extra".to_string()]);
}

#[test]
fn cli_import_export_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let src = twins_dir().join("cnn-batch.safetensors");
    let ck = dir.path().join("ck.safetensors");
    let common = ["--input", "1x8x8", "--mean", "0", "--std", "1"];
    let mut args = vec!["import", "--torch", s(&src), "-o", s(&ck)];
    args.extend(common);
    assert_ok("import", &nv(&args));
    // export gives back PyTorch's tensors (BF16 values, exactly, as F32), with the counters the file had
    let back = dir.path().join("back.safetensors");
    assert_ok(
        "export",
        &nv(&["export", "--torch", "--checkpoint", s(&ck), "-o", s(&back)]),
    );
    let (a, _) = load_state_dict(&src).unwrap();
    let (b, md) = load_state_dict(&back).unwrap();
    assert!(md.is_empty(), "a plain state dict: {md:?}");
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for k in a.keys() {
        assert_eq!(a.get(k), b.get(k), "{k}");
    }
    // folded: no BatchNorm left, and the export still loads as a graph of the same logits
    let folded = dir.path().join("folded.safetensors");
    assert_ok(
        "export --fold-bn",
        &nv(&[
            "export",
            "--torch",
            "--fold-bn",
            "--checkpoint",
            s(&ck),
            "-o",
            s(&folded),
        ]),
    );
    let (f, _) = load_state_dict(&folded).unwrap();
    assert!(
        !f.keys().any(|k| k.contains("running_mean")),
        "{:?}",
        f.keys().collect::<Vec<_>>()
    );
    // --weights on eval and predict
    let imgs = dir.path().join("imgs");
    write_image_folder(&imgs, 10, 1, 8);
    let mut args = vec![
        "eval",
        "--weights",
        s(&src),
        "--image-folder",
        s(&imgs),
        "--test-folder",
        s(&imgs),
        "--image-size",
        "8",
    ];
    args.extend(common);
    assert_ok("eval --weights", &nv(&args));
    let img = imgs.join("class3/0.png");
    let mut args = vec!["predict", "--weights", s(&src), s(&img)];
    args.extend(common);
    assert_ok("predict --weights", &nv(&args));
    // a state dict that does not fit the flags: a clear error naming a key
    let mut args = vec![
        "eval",
        "--weights",
        s(&src),
        "--norm",
        "group",
        "--image-folder",
        s(&imgs),
        "--test-folder",
        s(&imgs),
        "--image-size",
        "8",
    ];
    args.extend(common);
    assert_fails(
        "wrong --norm",
        &nv(&args),
        &["cnn-batch.safetensors", "running_mean"],
    );
}

/// Corrupt safetensors files are clear errors naming the file (and the tensor, where there is one).
#[test]
fn corrupt_state_dicts_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, header: &str, data: &[u8]| -> PathBuf {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let cases = [
        (
            file("header.safetensors", "{not json", &[]),
            vec!["header.safetensors"],
        ),
        (
            file(
                "dtype.safetensors",
                r#"{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
                &[1, 2],
            ),
            vec!["dtype.safetensors", "w", "U8"],
        ),
        (
            file(
                "length.safetensors",
                r#"{"w":{"dtype":"F32","shape":[10],"data_offsets":[0,8]}}"#,
                &[0; 8],
            ),
            vec!["length.safetensors"],
        ),
        (
            file(
                "short.safetensors",
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                &[0; 4],
            ),
            vec!["short.safetensors"],
        ),
    ];
    for (p, needles) in cases {
        let e = load_state_dict(&p).unwrap_err().to_string();
        for n in needles {
            assert!(e.contains(n), "{}: {e}", p.display());
        }
        let mut m = twin_model("mlp", "batch");
        assert!(torch::load_into(&mut m, &p, true).is_err());
    }
    // A 12-byte file whose header length claims 2^60 bytes: refused, nothing allocated.
    let p = dir.path().join("huge.safetensors");
    let mut b = (1u64 << 60).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}  ");
    std::fs::write(&p, b).unwrap();
    assert!(load_state_dict(&p)
        .unwrap_err()
        .to_string()
        .contains("huge.safetensors"));
}
