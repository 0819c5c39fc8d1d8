//! `normvision experiment NAME --quick` for every experiment, on Fashion-MNIST (installed by scripts/setup.sh):
//! each writes its Markdown, JSON, PNG and SVG, and asserts what must hold if the code is right (the plain net
//! fails at lr 0.2 where BN trains; BN at batch 2 ends below GroupNorm at batch 2; AdaBN's gain on brightness and
//! contrast; ...). Then `normvision report` assembles RESULTS.md from the reports and docs/claims.json.

use crate::common;

use common::cli::*;

fn run(name: &str, dir: &std::path::Path) -> serde_json::Value {
    assert!(
        normvision::data::fashion_mnist::is_available(None),
        "Fashion-MNIST is missing: scripts/setup.sh installs it (apt-get install dataset-fashion-mnist)"
    );
    // both cores (the shared helper runs one thread)
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_normvision"))
        .args([
            "--threads",
            "2",
            "experiment",
            name,
            "--quick",
            "--json",
            "-o",
            s(dir),
        ])
        .output()
        .unwrap();
    assert_ok(name, &o);
    for ext in ["md", "json", "svg", "png"] {
        let p = dir.join(format!("{name}.{ext}"));
        assert!(p.is_file(), "{}", p.display());
    }
    let svg = std::fs::read_to_string(dir.join(format!("{name}.svg"))).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "a line plot"
    );
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

#[test]
fn shift_quick_shows_adabn_recovering_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("shift", dir.path());
    let v = &r["verdicts"][0];
    assert!(v["claim"].as_str().unwrap().contains("AdaBN beats"), "{v}");
    assert_eq!(v["holds"], true, "{v}");
    // 8 corruptions x 1 severity x 7 methods, plus the 7 summary records
    assert_eq!(r["records"].as_array().unwrap().len(), 8 * 7 + 7);
    // the N = 16 mix with n = 0 would be the source; with growing n it approaches AdaBN
    let err = |m: &str| {
        r["records"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["method"] == m && x.get("mean_error").is_some())
            .unwrap()["mean_error"]
            .as_f64()
            .unwrap()
    };
    assert!(err("AdaBN") < err("source"));
    assert!(err("mix n=128") < err("mix n=1"));
}

#[test]
fn finetune_quick_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("finetune", dir.path());
    // 4 methods x 2 batches x 1 seed
    assert_eq!(r["records"].as_array().unwrap().len(), 8);
    assert_eq!(r["verdicts"].as_array().unwrap().len(), 2);
    assert!(r["records"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| (0.0..=1.0).contains(&x["accuracy"].as_f64().unwrap())));
    let o = nv(&["experiment", "landscape-x", "--quick"]);
    assert_fails(
        "unknown experiment",
        &o,
        &["unknown experiment", "shift, finetune"],
    );
}

fn records(r: &serde_json::Value) -> &Vec<serde_json::Value> {
    r["records"].as_array().unwrap()
}

#[test]
fn convergence_quick_plain_net_fails_at_lr_0_2_where_bn_trains() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("convergence", dir.path());
    let rec = records(&r);
    assert_eq!(rec.len(), 4); // BN and plain at lr 0.05 and 0.2
                              // records are [norm][lr]: BN 0.05, BN 0.2, plain 0.05, plain 0.2
    assert_eq!(rec[1]["outcome"], "trained", "BN at lr 0.2: {}", rec[1]);
    assert_ne!(rec[3]["outcome"], "trained", "plain at lr 0.2: {}", rec[3]);
    assert_eq!(rec[2]["outcome"], "trained", "plain at lr 0.05: {}", rec[2]);
    assert_eq!(
        r["verdicts"][1]["status"], "confirmed",
        "{}",
        r["verdicts"][1]
    );
    // a second invocation reads every run from the cache
    let t = std::time::Instant::now();
    run("convergence", dir.path());
    assert!(
        t.elapsed().as_secs_f64() < 5.0,
        "the cached runs were not reused"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("runs/convergence-quick"))
            .unwrap()
            .count(),
        4
    );
}

#[test]
fn mlp_sigmoid_quick_records_the_percentiles() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("mlp-sigmoid", dir.path());
    for rec in records(&r) {
        let p = rec["percentiles"].as_array().unwrap();
        assert_eq!(
            p.len(),
            16,
            "a probe every 100 of 1500 steps, and one at the end"
        );
        for q in p {
            let v: Vec<f64> = q[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert!(v[0] <= v[1] && v[1] <= v[2], "percentiles in order: {v:?}");
        }
        let acc = rec["accuracy"].as_array().unwrap();
        assert!(
            acc.last().unwrap()[1].as_f64().unwrap() > 0.5,
            "the mlp learns: {acc:?}"
        );
    }
    assert!(
        dir.path().join("mlp-sigmoid-2.png").is_file(),
        "the accuracy plot"
    );
}

#[test]
fn init_quick_confirms_the_exact_scale_invariance() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("init", dir.path());
    assert_eq!(
        r["verdicts"][0]["status"], "confirmed",
        "{}",
        r["verdicts"][0]
    );
    assert_eq!(records(&r).len(), 6); // 3 scales x 2 nets
}

#[test]
fn batch_size_quick_bn_at_batch_2_ends_below_group_norm() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("batch-size", dir.path());
    let acc = |norm: &str, b: u64| {
        records(&r)
            .iter()
            .find(|x| x["key"]["norm"] == norm && x["key"]["batch"] == b)
            .unwrap()["result"]["accuracy"]
            .as_f64()
            .unwrap()
    };
    assert!(
        acc("batch", 2) < acc("group", 2),
        "BN {} vs GN {} at batch 2",
        acc("batch", 2),
        acc("group", 2)
    );
    assert!(acc("batch", 32) > acc("batch", 2));
}

#[test]
fn regularization_quick_measures_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("regularization", dir.path());
    assert_eq!(records(&r).len(), 4);
    for x in records(&r) {
        let (tr, te) = (
            x["result"]["train_acc"].as_f64().unwrap(),
            x["result"]["test_acc"].as_f64().unwrap(),
        );
        assert!(
            (0.3..=1.0).contains(&tr) && (0.3..=1.0).contains(&te),
            "{x}"
        );
    }
}

#[test]
fn landscape_quick_probes_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("landscape", dir.path());
    for rec in records(&r) {
        let p = rec["probes"].as_array().unwrap();
        assert_eq!(p.len(), 4, "a probe every 15 of 60 steps");
        assert!(p
            .iter()
            .all(|q| (1..4)
                .all(|k| q[k].as_f64().unwrap().is_finite() && q[k].as_f64().unwrap() >= 0.0)));
    }
    assert!(dir.path().join("landscape-3.svg").is_file(), "three plots");
    // the report assembles RESULTS.md from whatever reports are there
    let out = dir.path().join("RESULTS.md");
    let claims = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/claims.json");
    let o = nv(&[
        "report",
        "--claims",
        claims,
        "--results",
        s(dir.path()),
        "--out",
        s(&out),
    ]);
    assert_ok("report", &o);
    let md = std::fs::read_to_string(&out).unwrap();
    assert!(
        md.contains("BN smooths the loss landscape") && md.contains("(quick run only)"),
        "{md}"
    );
    assert!(
        md.contains("Not run yet: `normvision experiment convergence"),
        "{md}"
    );
    assert!(md.contains("](landscape-2.png)"), "{md}");
}

#[test]
fn seg_norm_quick_compares_the_norms_and_syncbn_matches_bn() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("seg-norm", dir.path());
    // 4 variants x 2 batches x 1 seed, each a trained run with its mIoU curve
    let recs = records(&r);
    assert_eq!(recs.len(), 8);
    for rec in recs {
        let res = &rec["result"];
        assert!(res["diverged"].is_null(), "{rec}");
        assert!(
            (0.0..=1.0).contains(&res["miou"].as_f64().unwrap()),
            "{rec}"
        );
        assert_eq!(res["miou_per_epoch"].as_array().unwrap().len(), 1);
    }
    let variants: std::collections::BTreeSet<&str> = recs
        .iter()
        .map(|x| x["key"]["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        variants.into_iter().collect::<Vec<_>>(),
        ["batch", "frozen", "group", "sync"]
    );
    // SyncBN over 2 ranks of B/2 computes BN's statistics at B: the same global batch, the same mIoU to rounding
    let miou = |v: &str, b: u64| {
        recs.iter()
            .find(|x| x["key"]["variant"] == v && x["key"]["batch"] == b)
            .unwrap()["result"]["miou"]
            .as_f64()
            .unwrap()
    };
    for b in [2, 4] {
        assert!(
            (miou("sync", b) - miou("batch", b)).abs() < 0.02,
            "B = {b}: SyncBN {} against BN {}",
            miou("sync", b),
            miou("batch", b)
        );
    }
    assert_eq!(r["verdicts"].as_array().unwrap().len(), 3);
    assert!(
        dir.path().join("seg-norm-2.svg").is_file(),
        "the per-epoch plot"
    );
}

#[test]
fn det_norm_quick_trains_the_four_detectors_from_their_pretrained_backbones() {
    let dir = tempfile::tempdir().unwrap();
    let r = run("det-norm", dir.path());
    // 4 variants x 1 seed, each a trained and COCO-evaluated run
    let recs = records(&r);
    assert_eq!(recs.len(), 4);
    let variants: std::collections::BTreeSet<&str> = recs
        .iter()
        .map(|x| x["key"]["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        variants.into_iter().collect::<Vec<_>>(),
        ["bn-2fc", "frozen-2fc", "frozen-gn", "gn-gn"]
    );
    for rec in recs {
        let res = &rec["result"];
        let stats = res["stats"].as_array().unwrap();
        assert_eq!(stats.len(), 12, "{rec}");
        // AP and AP50 are defined (the test scenes have objects) and within [0, 1]
        for s in &stats[..2] {
            assert!((0.0..=1.0).contains(&s.as_f64().unwrap()), "{rec}");
        }
        assert_eq!(res["ap_per_epoch"].as_array().unwrap().len(), 1);
        assert!(res["train_img_s"].as_f64().unwrap() > 0.0);
        // every backbone starts from a classifier that learned something (10 classes: chance is 10%)
        assert!(
            res["pretrained_test_accuracy"].as_f64().unwrap() > 0.3,
            "{rec}"
        );
        let norm = rec["key"]["config"]["detector"]["net"]["backbone_norm"]
            .as_str()
            .unwrap();
        let want = match rec["key"]["variant"].as_str().unwrap() {
            "gn-gn" => "group",
            "bn-2fc" => "batch",
            _ => "frozen",
        };
        assert_eq!(norm, want, "{rec}");
    }
    assert_eq!(r["verdicts"].as_array().unwrap().len(), 3);
    assert!(dir.path().join("det-norm.svg").is_file());
}
