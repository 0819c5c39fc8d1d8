//! `normvision experiment shift|finetune --quick` on Fashion-MNIST (installed by scripts/setup.sh): each
//! writes its Markdown, JSON and SVG, and the shift experiment shows AdaBN's gain of at least 5 points on
//! brightness and contrast at severity 3 (issue #7's requirement).

mod common;

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
    for ext in ["md", "json", "svg"] {
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
