//! The `normvision` binary's surface: help texts and the machine-readable (`--json`) output of the two
//! benchmark commands. Runs the real binary (`CARGO_BIN_EXE_normvision`) with tiny sizes.

use std::process::{Command, Output};

fn normvision(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_normvision"))
        .args(args)
        // Keep the shared machine quiet: one worker thread is plenty for these sizes.
        .args(["--threads", "1"])
        .output()
        .expect("run normvision")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn assert_ok(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// Every stdout line parsed as JSON (non-empty lines must all be JSON objects).
fn json_lines(what: &str, o: &Output) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let out = text(&o.stdout);
    let rows: Vec<_> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(serde_json::Value::Object(m)) => m,
            other => panic!("{what}: line is not a JSON object: {l:?} ({other:?})"),
        })
        .collect();
    assert!(!rows.is_empty(), "{what}: no output lines");
    rows
}

#[test]
fn top_level_help_lists_the_subcommands() {
    let o = normvision(&["--help"]);
    assert_ok("--help", &o);
    let h = text(&o.stdout);
    for cmd in [
        "train",
        "compare",
        "eval",
        "predict",
        "bench",
        "bench-kernels",
        "plan",
        "--threads",
    ] {
        assert!(h.contains(cmd), "--help does not mention {cmd}:\n{h}");
    }
}

#[test]
fn train_help_mentions_the_main_options() {
    let o = normvision(&["train", "--help"]);
    assert_ok("train --help", &o);
    let h = text(&o.stdout);
    for opt in [
        "--model",
        "--norm",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--schedule",
        "--seed",
        "--data",
        "--out",
        "--resume",
        "--train-limit",
        "--test-limit",
        "--divergence-window",
    ] {
        assert!(h.contains(opt), "train --help does not mention {opt}:\n{h}");
    }
    // the value enums are listed
    for v in ["batch", "none", "group", "cnn", "resnet"] {
        assert!(h.contains(v), "train --help does not list {v}:\n{h}");
    }
}

#[test]
fn unknown_option_fails_with_usage() {
    let o = normvision(&["train", "--no-such-option"]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("--no-such-option"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// `normvision bench` on batches of 8 for 2 steps with `extra` options, as JSON rows.
fn bench_rows(extra: &[&str]) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut args = vec![
        "bench",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--batch-size",
        "8",
    ];
    args.extend_from_slice(extra);
    args.push("--json");
    let what = format!("bench {}", extra.join(" "));
    let o = normvision(&args);
    assert_ok(&what, &o);
    json_lines(&what, &o)
}

#[test]
fn bench_json_lines() {
    let rows = bench_rows(&[]);
    // default --mode both: one train row, one eval row
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["train", "eval"]);
    for r in &rows {
        for k in ["model", "norm", "mode", "img_s"] {
            assert!(r.contains_key(k), "bench row without {k}: {r:?}");
        }
        assert_eq!(r["model"], "cnn");
        assert_eq!(r["norm"], "batch");
        assert_eq!(r["batch"], 8);
        let img_s = r["img_s"].as_f64().expect("img_s is a number");
        assert!(img_s.is_finite() && img_s > 0.0, "img_s {img_s}");
    }
}

#[test]
fn bench_fold_bn_folds_the_five_batch_norms() {
    let rows = bench_rows(&["--mode", "eval", "--fold-bn"]);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0]["folded_bn"], 5,
        "four after convolutions, one after the linear layer"
    );
}

#[test]
fn bench_profile_and_conv_algorithm() {
    for algo in ["direct", "winograd", "winograd2"] {
        let rows = bench_rows(&["--mode", "train", "--profile", "--conv", algo]);
        let (speed, layers): (Vec<_>, Vec<_>) = rows.iter().partition(|r| r.contains_key("img_s"));
        assert_eq!(speed.len(), 1, "{rows:?}");
        assert_eq!(speed[0]["conv"], algo);
        // one profile row per top-level layer of the reference CNN (4 conv blocks, 2 pools, flatten, 2 linear
        // with their BN/ReLU), each with non-negative times, shares summing to 1
        assert!(layers.len() >= 10, "{layers:?}");
        let mut share = 0.0;
        for r in &layers {
            assert_eq!(r["profile"], "train");
            for k in ["forward_ms", "backward_ms", "share"] {
                let v = r[k].as_f64().unwrap_or(-1.0);
                assert!(v.is_finite() && v >= 0.0, "{k} = {v} in {r:?}");
            }
            share += r["share"].as_f64().unwrap();
        }
        assert!((share - 1.0).abs() < 1e-6, "shares sum to {share}");
        assert!(layers
            .iter()
            .any(|r| r["kind"].as_str().unwrap().starts_with("Conv2d")));
    }
}

#[test]
fn bench_rejects_a_bad_mode() {
    let o = normvision(&["bench", "--steps", "1", "--mode", "sideways"]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("--mode") && !e.contains("panicked"), "{e}");
}

fn bench_kernels_rows(shapes: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let o = normvision(&[
        "bench-kernels",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--shapes",
        shapes,
        "--json",
    ]);
    let what = format!("bench-kernels --shapes {shapes} --json");
    assert_ok(&what, &o);
    let rows = json_lines(&what, &o);
    for r in &rows {
        for k in ["op", "shape", "mode", "threads", "min_ms", "median_ms"] {
            assert!(r.contains_key(k), "bench-kernels row without {k}: {r:?}");
        }
        assert_eq!(r["threads"], 1);
        let (min, med) = (
            r["min_ms"].as_f64().expect("min_ms is a number"),
            r["median_ms"].as_f64().expect("median_ms is a number"),
        );
        assert!(min >= 0.0 && min <= med, "min {min} median {med}");
    }
    rows
}

fn op_modes(
    rows: &[serde_json::Map<String, serde_json::Value>],
) -> std::collections::BTreeSet<(String, String)> {
    let set: std::collections::BTreeSet<_> = rows
        .iter()
        .map(|r| {
            (
                r["op"].as_str().unwrap().to_string(),
                r["mode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(set.len(), rows.len(), "duplicate rows: {rows:?}");
    set
}

const MODES: [&str; 3] = ["train_fwd", "train_fwd_bwd", "eval_fwd"];

#[test]
fn bench_kernels_json_lines() {
    // C = 3: GroupNorm(8, C) does not apply (C not divisible by 8) and is skipped, as in the PyTorch script;
    // the three other ops run in all three modes.
    let rows = bench_kernels_rows("4x3x5x5");
    assert_eq!(rows.len(), 9, "{rows:?}");
    for r in &rows {
        assert_eq!(r["shape"], serde_json::json!([4, 3, 5, 5]));
    }
    let seen = op_modes(&rows);
    for op in ["batch_norm", "layer_norm", "instance_norm"] {
        for mode in MODES {
            assert!(
                seen.contains(&(op.into(), mode.into())),
                "missing {op}/{mode}"
            );
        }
    }
}

#[test]
fn bench_kernels_all_ops_on_eight_channels() {
    let rows = bench_kernels_rows("2x8x3x3");
    assert_eq!(rows.len(), 12, "{rows:?}");
    let seen = op_modes(&rows);
    for op in ["batch_norm", "group_norm", "layer_norm", "instance_norm"] {
        for mode in MODES {
            assert!(
                seen.contains(&(op.into(), mode.into())),
                "missing {op}/{mode}"
            );
        }
    }
}

#[test]
fn bench_kernels_rejects_a_bad_shape() {
    let o = normvision(&["bench-kernels", "--shapes", "4xAx5", "--reps", "1"]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("bad shape") && !e.contains("panicked"), "{e}");
}

#[test]
fn plan_prints_the_steps_and_the_planned_memory() {
    let o = normvision(&["plan", "--batch-size", "8"]);
    assert_ok("plan", &o);
    let out = text(&o.stdout);
    assert!(out.contains("train plan"), "{out}");
    assert!(
        out.contains("1+2") && out.contains("+ ReLU"),
        "BN+ReLU fused:\n{out}"
    );
    assert!(out.contains("kept for the backward"), "{out}");
    let rows = json_lines(
        "plan --json",
        &normvision(&["plan", "--model", "resnet", "--mode", "inference", "--json"]),
    );
    assert_eq!(rows[0]["kept_bytes"], 0);
    assert!(rows[0]["peak_bytes"].as_u64().unwrap() > 0);
    assert!(rows[0]["steps"].as_array().unwrap().len() > 20);
    let bad = normvision(&["plan", "--mode", "sideways"]);
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("--mode must be train, eval or inference"));
}

#[test]
fn bench_inference_reports_throughput_and_latency_at_batch_1_and_n() {
    let o = normvision(&[
        "bench",
        "--inference",
        "--model",
        "mlp",
        "--batch-size",
        "8",
        "--steps",
        "3",
        "--json",
    ]);
    let rows = json_lines("bench --inference", &o);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["batch"], 1);
    assert_eq!(rows[1]["batch"], 8);
    for r in &rows {
        for k in ["img_s", "latency_ms_p50", "latency_ms_p99", "folded_bn"] {
            assert!(r.contains_key(k), "{k} missing: {r:?}");
        }
        assert!(r["latency_ms_p99"].as_f64().unwrap() >= r["latency_ms_p50"].as_f64().unwrap());
    }
    assert_eq!(
        rows[0]["folded_bn"], 3,
        "the mlp's three BatchNorm1d fold into its linear layers"
    );
}

/// `bench --inference` serves from a pool that the main thread works in (rayon's `use_current_thread`); on two
/// threads the reference CNN's batch-1 convolutions split by bands of tile rows. It runs to the end and reports
/// both batch sizes.
#[test]
fn bench_inference_of_the_cnn_runs_on_two_threads() {
    let o = Command::new(env!("CARGO_BIN_EXE_normvision"))
        .args(["--threads", "2", "bench", "--inference", "--model", "cnn"])
        .args(["--batch-size", "2", "--steps", "2", "--json"])
        .output()
        .expect("run normvision");
    let rows = json_lines("bench --inference on 2 threads", &o);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["threads"], 2);
    assert_eq!(rows[1]["batch"], 2);
}
