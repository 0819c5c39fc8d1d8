//! Fine-tuning (`normvision finetune`, `train::finetune`): frozen BatchNorm and a frozen backbone leave their
//! tensors bitwise unchanged, `--bn train` changes them, eval-stats trains the affine only; the checkpoint
//! records what was frozen and `eval`/`predict` load it; bad input gets an error that names it.

use crate::common;

use common::cli::*;
use ndarray::{ArrayD, IxDyn};
use normvision::io::load_state_dict;
use normvision::norm::{BatchNormConfig, FrozenBatchNorm};
use normvision::state::{StateDict, StateTensor, Stateful};
use normvision::train::checkpoint;
use normvision::{Ctx, Layer};
use rand::{Rng, SeedableRng};
use std::path::Path;

fn tensors(p: &Path) -> StateDict {
    let (sd, _) = load_state_dict(p).unwrap();
    sd
}

fn f32s(t: &StateTensor) -> Vec<u32> {
    match t {
        StateTensor::F32(a) => a.iter().map(|v| v.to_bits()).collect(),
        other => panic!("not f32: {other:?}"),
    }
}

/// Keys of `a`'s model tensors (no optimizer state) matching `pred`, with whether each is bitwise unchanged
/// in `b`.
fn unchanged(a: &StateDict, b: &StateDict, pred: impl Fn(&str) -> bool) -> Vec<(String, bool)> {
    a.tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("optim.") && pred(k))
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, t)| {
            let same = b.tensors.get(k).is_some_and(|u| f32s(t) == f32s(u));
            (k.clone(), same)
        })
        .collect()
}

fn finetune(src: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec![
        "finetune",
        "--from",
        s(src),
        "--data",
        s(data),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "0.05",
        "-q",
        "-o",
        s(out),
    ];
    a.extend_from_slice(extra);
    nv(&a)
}

#[test]
fn frozen_bn_and_backbone_stay_bitwise_and_train_bn_moves() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ck) = train_mlp(dir.path(), 200, &[]);
    let src = tensors(&ck);
    let bn_keys: Vec<String> = src
        .tensors
        .keys()
        .filter(|k| k.ends_with("running_mean"))
        .map(|k| k.trim_end_matches("running_mean").to_string())
        .collect();
    assert!(bn_keys.len() >= 2, "{bn_keys:?}");
    let in_bn = |k: &str| bn_keys.iter().any(|p| k.starts_with(p.as_str()));

    // --bn frozen: every BN tensor (affine and statistics) bitwise the source's
    let frozen = dir.path().join("frozen.safetensors");
    assert_ok(
        "finetune --bn frozen",
        &finetune(&ck, &data, &frozen, &["--bn", "frozen"]),
    );
    let f = tensors(&frozen);
    let rows = unchanged(&src, &f, in_bn);
    assert!(rows.len() >= 4 * bn_keys.len());
    assert!(rows.iter().all(|(_, same)| *same), "{rows:?}");
    // ... while the convolutions and linear layers trained
    assert!(unchanged(&src, &f, |k| !in_bn(k))
        .iter()
        .any(|(_, same)| !same));

    // --bn train: the statistics and the affine move
    let trained = dir.path().join("train.safetensors");
    assert_ok(
        "finetune --bn train",
        &finetune(&ck, &data, &trained, &["--bn", "train"]),
    );
    let t = tensors(&trained);
    for (k, same) in unchanged(&src, &t, in_bn) {
        assert!(!same, "--bn train left {k} unchanged");
    }

    // --bn eval-stats: statistics bitwise, affine trained
    let es = dir.path().join("eval-stats.safetensors");
    assert_ok(
        "finetune --bn eval-stats",
        &finetune(&ck, &data, &es, &["--bn", "eval-stats"]),
    );
    let e = tensors(&es);
    for (k, same) in unchanged(&src, &e, in_bn) {
        let stat = k.ends_with("running_mean") || k.ends_with("running_var");
        assert_eq!(same, stat, "--bn eval-stats: {k}");
    }

    // --freeze-backbone --bn frozen: only the classifier changes
    let fb = dir.path().join("backbone.safetensors");
    assert_ok(
        "finetune --freeze-backbone",
        &finetune(&ck, &data, &fb, &["--bn", "frozen", "--freeze-backbone"]),
    );
    let b = tensors(&fb);
    let ckb = checkpoint::load(&fb).unwrap();
    let rec = ckb.config.finetune.clone().unwrap();
    let head = format!(
        "{}.",
        ckb.graph
            .as_ref()
            .unwrap()
            .nodes
            .iter()
            .rev()
            .find(|n| !n.frozen
                && matches!(
                    n.op,
                    normvision::model::spec::OpSpec::Layer(
                        normvision::model::spec::LayerSpec::Linear(_)
                    )
                ))
            .unwrap()
            .name
    );
    for (k, same) in unchanged(&src, &b, |_| true) {
        assert_eq!(!same, k.starts_with(&head), "--freeze-backbone: {k}");
    }
    // the checkpoint records what was frozen, in its architecture and its run configuration
    let spec = ckb.graph.as_ref().unwrap();
    let frozen_in_spec: Vec<&str> = spec
        .nodes
        .iter()
        .filter(|n| n.frozen)
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(frozen_in_spec, rec.frozen_nodes);
    assert!(!rec.frozen_nodes.is_empty() && rec.converted_batch_norms.len() == bn_keys.len());
    assert!(
        spec.nodes
            .iter()
            .filter(|n| matches!(
                n.op,
                normvision::model::spec::OpSpec::Layer(
                    normvision::model::spec::LayerSpec::FrozenBatchNorm(_)
                )
            ))
            .count()
            == bn_keys.len()
    );
    // eval loads every one of them
    for p in [&frozen, &trained, &es, &fb] {
        assert_ok(
            "eval a fine-tuned checkpoint",
            &nv(&["eval", "--checkpoint", s(p), "--data", s(&data)]),
        );
    }
}

#[test]
fn subsets_new_heads_and_per_class() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ck) = train_mlp(dir.path(), 300, &[]);
    let out = dir.path().join("ft.safetensors");
    let o = finetune(
        &ck,
        &data,
        &out,
        &[
            "--classes",
            "8,9",
            "--new-head",
            "2",
            "--per-class",
            "10",
            "--bn",
            "frozen",
            "--json",
        ],
    );
    assert_ok("finetune on classes 8,9", &o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // 10 images of each of the two classes: 20 images, 5 steps of 4
    assert_eq!(v["report"]["steps"], 5);
    assert_eq!(
        v["finetune"]["class_names"],
        serde_json::json!(["Bag", "Ankle boot"])
    );
    // eval selects the same classes from the full data; predict names them
    let o = nv(&[
        "eval",
        "--checkpoint",
        s(&out),
        "--data",
        s(&data),
        "--json",
    ]);
    assert_ok("eval", &o);
    let ev: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let n_test = common::cli::synthetic(40, 4)
        .labels
        .iter()
        .filter(|&&l| l >= 8)
        .count();
    assert_eq!(ev["samples"], n_test);
    let img = dir.path().join("x.png");
    image::GrayImage::from_pixel(28, 28, image::Luma([90]))
        .save(&img)
        .unwrap();
    let o = nv(&["predict", "--checkpoint", s(&out), s(&img), "--json"]);
    assert_ok("predict", &o);
    assert!(stdout(&o).contains("Ankle boot") && stdout(&o).contains("Bag"));

    // errors that name the problem
    assert_fails(
        "missing label",
        &finetune(&ck, &data, &out, &["--classes", "8,12", "--new-head", "2"]),
        &["--classes", "class 12 does not exist"],
    );
    assert_fails(
        "a head of the wrong size",
        &finetune(&ck, &data, &out, &["--classes", "8,9"]),
        &["10 outputs", "2 classes", "--new-head 2"],
    );
    assert_fails(
        "too few per class",
        &finetune(&ck, &data, &out, &["--per-class", "1000"]),
        &["--per-class 1000", "has only"],
    );
    assert_fails(
        "unknown --bn",
        &finetune(&ck, &data, &out, &["--bn", "sync"]),
        &["--bn must be train, frozen or eval-stats"],
    );
    let none_dir = dir.path().join("none");
    let (d2, ck2) = train_mlp(&none_dir, 100, &["--norm", "none"]);
    assert_fails(
        "--bn frozen without BN",
        &finetune(&ck2, &d2, &out, &["--bn", "frozen"]),
        &["no BatchNorm to freeze"],
    );
    // a PyTorch state dict of another architecture: strict loading names the key
    let plain = dir.path().join("plain.safetensors");
    assert_ok(
        "export --torch",
        &nv(&["export", "--torch", "--checkpoint", s(&ck), "-o", s(&plain)]),
    );
    assert_fails(
        "weights of another architecture",
        &nv(&[
            "finetune",
            "--weights",
            s(&plain),
            "--model",
            "cnn",
            "--norm",
            "batch",
            "--data",
            s(&data),
            "-o",
            s(&out),
            "-q",
        ]),
        &["plain.safetensors"],
    );
    // the same state dict with its own architecture fine-tunes
    assert_ok(
        "finetune --weights",
        &nv(&[
            "finetune",
            "--weights",
            s(&plain),
            "--model",
            "mlp",
            "--norm",
            "batch",
            "--data",
            s(&data),
            "--epochs",
            "1",
            "-o",
            s(&out),
            "-q",
        ]),
    );
}

/// A FrozenBatchNorm with a trainable affine computes what BatchNorm does in eval mode, forward and backward
/// (BatchNorm's eval backward is golden-tested against PyTorch in tests/golden_norm.rs).
#[test]
fn eval_stats_is_batch_norm_in_eval_mode() {
    let mut r = rand_pcg::Pcg64::seed_from_u64(3);
    let mut bn = BatchNormConfig::d2(5).build::<f64>().unwrap();
    for _ in 0..3 {
        let x = ArrayD::from_shape_simple_fn(IxDyn(&[4, 5, 3, 3]), || r.gen_range(-2.0..3.0));
        bn.forward(&x, Ctx::train()).unwrap();
    }
    bn.weight_mut()
        .unwrap()
        .value
        .mapv_inplace(|v| v * 1.5 - 0.2);
    let x = ArrayD::from_shape_simple_fn(IxDyn(&[4, 5, 3, 3]), || r.gen_range(-2.0..3.0));
    let dy = ArrayD::from_shape_simple_fn(IxDyn(&[4, 5, 3, 3]), || r.gen_range(-1.0..1.0));
    let mut f = FrozenBatchNorm::from_batch_norm(&bn)
        .unwrap()
        .with_train_affine(true);
    let y1 = bn.forward(&x, Ctx::eval()).unwrap();
    let y2 = f.forward(&x, Ctx::train()).unwrap();
    let dx1 = bn.backward(&x, &dy, Ctx::eval()).unwrap();
    let dx2 = f.backward(&x, &dy, Ctx::train()).unwrap();
    let close =
        |a: &ArrayD<f64>, b: &ArrayD<f64>| a.iter().zip(b).all(|(p, q)| (p - q).abs() <= 1e-12);
    assert!(close(&y1, &y2) && close(&dx1, &dx2));
    let mut g1 = vec![];
    bn.visit_params("", &mut |n, p| g1.push((n.to_string(), p.grad.clone())));
    let mut g2 = vec![];
    f.visit_params("", &mut |n, p| g2.push((n.to_string(), p.grad.clone())));
    assert_eq!(g1.len(), 2);
    for ((n1, a), (n2, b)) in g1.iter().zip(&g2) {
        assert_eq!(n1, n2);
        assert!(close(a, b), "{n1}");
    }
}
