//! The defects found when the CLI was tried as a new user would (issue #5), one test each, through the real
//! binary: every one ends in a clear error (exit 1, an `error:` line naming the flag, file or key) or in the
//! documented behaviour, never in a panic, an abort or a silently wrong result.

use crate::common;

use common::cli::*;
use normvision::io::{load_state_dict, save_state_dict};
use std::io::Write;
use std::path::Path;

/// Rewrites a checkpoint's metadata entry through `f`.
fn edit_metadata(ck: &Path, key: &str, f: impl Fn(&str) -> String) {
    let (sd, mut md) = load_state_dict(ck).unwrap();
    let v = f(&md[key]);
    md.insert(key.to_string(), v);
    save_state_dict(ck, &sd, &md).unwrap();
}

fn edit_tensor(ck: &Path, key: &str, f: impl Fn(&mut [f32])) {
    let (mut sd, md) = load_state_dict(ck).unwrap();
    match sd.tensors.get_mut(key) {
        Some(normvision::state::StateTensor::F32(a)) => f(a.as_slice_mut().unwrap()),
        other => panic!("{key}: {other:?}"),
    }
    save_state_dict(ck, &sd, &md).unwrap();
}

#[test]
fn resume_writes_where_the_resumed_run_lives_and_refuses_contradicting_flags() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (data, ck) = train_mlp(root, 64, &["--norm", "group", "--groups", "4"]);
    // Resuming without repeating --norm group writes to the resumed run's checkpoint, not runs/mlp-batch.
    let o = nv_in(
        root,
        &[
            "train",
            "--data",
            s(&data),
            "--resume",
            s(&ck),
            "--epochs",
            "2",
            "--quiet",
        ],
    );
    assert_ok("resume", &o);
    assert!(
        !root.join("runs").exists(),
        "resume wrote under runs/: {}",
        stderr(&o)
    );
    let (_, md) = load_state_dict(&ck).unwrap();
    assert!(md["position"].contains("\"epoch\":2"), "{}", md["position"]);
    // The log was continued beside it.
    assert!(ck.with_extension("jsonl").is_file());
    // Flags that contradict the checkpoint are refused, naming both values; repeating a matching one is fine.
    for (flag, val) in [
        ("--norm", "batch"),
        ("--lr", "0.2"),
        ("--batch-size", "16"),
        ("--train-limit", "10"),
    ] {
        let o = nv_in(
            root,
            &[
                "train",
                "--data",
                s(&data),
                "--resume",
                s(&ck),
                "--epochs",
                "3",
                flag,
                val,
            ],
        );
        let e = assert_fails(&format!("resume with {flag}"), &o, &[flag, "contradict"]);
        assert!(
            e.contains("--epochs"),
            "the message lists what applies: {e}"
        );
    }
    let o = nv_in(
        root,
        &[
            "train",
            "--data",
            s(&data),
            "--resume",
            s(&ck),
            "--epochs",
            "3",
            "--norm",
            "group",
            "--quiet",
        ],
    );
    assert_ok("resume repeating --norm group", &o);
}

#[test]
fn a_last_batch_of_one_is_dropped_with_a_note_and_drop_last_drops_any() {
    let dir = tempfile::tempdir().unwrap();
    // 65 images at batch 32: the last batch is one image, which BatchNorm1d cannot train on.
    let (_, ck) = train_mlp(dir.path(), 65, &[]);
    let log = std::fs::read_to_string(ck.with_extension("jsonl")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("\"note\"") && l.contains("last batch")),
        "no note in the log:\n{log}"
    );
    let steps = log
        .lines()
        .filter(|l| l.contains("\"event\":\"step\""))
        .count();
    assert_eq!(steps, 2, "two full batches, the single image dropped");
    // --drop-last drops any partial last batch.
    let dir2 = tempfile::tempdir().unwrap();
    let (_, ck2) = train_mlp(dir2.path(), 70, &["--drop-last"]);
    let log = std::fs::read_to_string(ck2.with_extension("jsonl")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"event\":\"step\""))
            .count(),
        2
    );
    // Without a norm that needs two values, a last batch of one trains.
    let dir3 = tempfile::tempdir().unwrap();
    let (_, ck3) = train_mlp(dir3.path(), 65, &["--norm", "layer"]);
    let log = std::fs::read_to_string(ck3.with_extension("jsonl")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"event\":\"step\""))
            .count(),
        3
    );
}

#[test]
fn zero_counts_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_idx_dir(&data, 64, 40);
    let o = nv(&[
        "train",
        "--data",
        s(&data),
        "--model",
        "mlp",
        "--eval-every",
        "0",
        "--out",
        s(&dir.path().join("m.safetensors")),
    ]);
    assert_fails("--eval-every 0", &o, &["--eval-every"]);
    let o = nv(&["bench", "--steps", "0", "--warmup", "0", "--model", "mlp"]);
    assert_fails("bench --steps 0", &o, &["--steps"]);
    let o = nv(&[
        "train",
        "--data",
        s(&data),
        "--model",
        "mlp",
        "--batch-size",
        "0",
        "--out",
        s(&dir.path().join("m.safetensors")),
    ]);
    assert_fails("--batch-size 0", &o, &["--batch-size"]);
}

#[test]
fn huge_sizes_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_image_folder(&root.join("imgs"), 2, 2, 8);
    let imgs = root.join("imgs");
    let o = nv(&[
        "train",
        "--image-folder",
        s(&imgs),
        "--test-folder",
        s(&imgs),
        "--image-size",
        "100000",
    ]);
    assert_fails("--image-size 100000", &o, &["--image-size"]);
    // A checkpoint whose config claims huge dimensions.
    let (data, ck) = train_mlp(root, 64, &[]);
    let bad = root.join("huge.safetensors");
    std::fs::copy(&ck, &bad).unwrap();
    edit_metadata(&bad, "config", |c| {
        c.replace("\"height\":28", "\"height\":1000000000")
    });
    let o = nv(&["eval", "--checkpoint", s(&bad), "--data", s(&data)]);
    assert_fails("huge config", &o, &["huge.safetensors", "height"]);
    // An architecture that claims a huge layer the file does not hold.
    std::fs::copy(&ck, &bad).unwrap();
    edit_metadata(&bad, "graph", |g| {
        g.replacen("\"out_features\":100", "\"out_features\":100000000000", 1)
    });
    let o = nv(&["eval", "--checkpoint", s(&bad), "--data", s(&data)]);
    assert_fails("huge graph", &o, &["huge.safetensors", "claims"]);
}

#[test]
fn a_gzip_bomb_stops_at_the_size_its_header_promises() {
    use normvision::data::idx::read_idx;
    let dir = tempfile::tempdir().unwrap();
    // Header: 10 u8 images of 28x28 (7840 bytes promised), then 64 MiB of zeros, gzipped (~64 KiB).
    let p = dir.path().join("bomb-idx3-ubyte.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&p).unwrap(),
        flate2::Compression::best(),
    );
    enc.write_all(&[0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28])
        .unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        enc.write_all(&zeros).unwrap();
    }
    enc.finish().unwrap();
    let before = peak_rss_kib();
    let e = read_idx(&p).unwrap_err().to_string();
    assert!(
        e.contains("trailing bytes") && e.contains("bomb-idx3-ubyte.gz"),
        "{e}"
    );
    let grown = peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "peak memory grew by {grown} KiB inflating a 64 MiB bomb"
    );
    // A header that promises more than the file could ever inflate to is refused before inflating.
    let p2 = dir.path().join("liar.gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&p2).unwrap(),
        flate2::Compression::best(),
    );
    enc.write_all(&[0, 0, 8, 3, 0, 1, 0, 0, 0, 0, 255, 255, 0, 0, 255, 255])
        .unwrap();
    enc.finish().unwrap();
    let e = read_idx(&p2).unwrap_err().to_string();
    assert!(e.contains("promises") && e.contains("liar.gz"), "{e}");
}

/// Peak resident set size of this process (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn silent_wrong_results_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (data, ck) = train_mlp(root, 64, &[]);
    // A 10-class checkpoint resumed on a 3-class image folder.
    let imgs = root.join("three");
    write_image_folder(&imgs, 3, 4, 28);
    let o = nv(&[
        "train",
        "--image-folder",
        s(&imgs),
        "--test-folder",
        s(&imgs),
        "--resume",
        s(&ck),
        "--epochs",
        "2",
    ]);
    assert_fails("10 classes on 3", &o, &["3 classes", "10"]);
    // A BatchNorm checkpoint relabelled norm=group.
    let bad = root.join("relabelled.safetensors");
    std::fs::copy(&ck, &bad).unwrap();
    edit_metadata(&bad, "config", |c| {
        c.replace("\"norm\":\"batch\"", "\"norm\":\"group\"")
    });
    let o = nv(&["eval", "--checkpoint", s(&bad), "--data", s(&data)]);
    assert_fails("relabelled norm", &o, &["norm group"]);
    // NaN weights, negative running_var.
    std::fs::copy(&ck, &bad).unwrap();
    edit_tensor(&bad, "1.weight", |w| w[3] = f32::NAN);
    assert_fails(
        "NaN weight",
        &nv(&["eval", "--checkpoint", s(&bad), "--data", s(&data)]),
        &["1.weight", "non-finite"],
    );
    std::fs::copy(&ck, &bad).unwrap();
    edit_tensor(&bad, "2.running_var", |v| v[0] = -1.0);
    assert_fails(
        "negative var",
        &nv(&["eval", "--checkpoint", s(&bad), "--data", s(&data)]),
        &["2.running_var", "negative"],
    );
}

#[test]
fn incompatible_data_and_unwritable_outputs_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_image_folder(&root.join("tr"), 2, 3, 28);
    write_image_folder(&root.join("te"), 2, 3, 32);
    // --image-size resizes both folders to one size, so a mismatch comes from the API path: check that the
    // trainer refuses it before the first step.
    let a = normvision::data::load_image_folder(&root.join("tr"), 1, 28, 28).unwrap();
    let b = normvision::data::load_image_folder(&root.join("te"), 1, 32, 32).unwrap();
    let cfg = normvision::train::TrainConfig::reference(
        normvision::model::ModelKind::Mlp,
        normvision::model::NormKind::Batch,
    );
    let mut cfg = cfg;
    cfg.model.num_classes = 2;
    let t = std::time::Instant::now();
    let e = normvision::train::train(&cfg, a.into(), b.into(), Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("test images are 1x32x32"), "{e}");
    assert!(t.elapsed().as_secs_f64() < 5.0);
    // An output whose parent is a file: refused before training, naming the path.
    let data = root.join("data");
    write_idx_dir(&data, 64, 40);
    std::fs::write(root.join("file"), b"x").unwrap();
    let out = root.join("file").join("model.safetensors");
    let o = nv(&[
        "train",
        "--data",
        s(&data),
        "--model",
        "mlp",
        "--out",
        s(&out),
        "--quiet",
    ]);
    let e = assert_fails("output under a file", &o, &["file"]);
    assert!(!e.contains("step"), "{e}");
    // A directory as the output path.
    let o = nv(&[
        "train",
        "--data",
        s(&data),
        "--model",
        "mlp",
        "--out",
        s(root),
        "--quiet",
    ]);
    assert_fails("output is a directory", &o, &["directory"]);
}

#[test]
fn divergence_exits_non_zero_in_train_and_is_an_outcome_in_compare() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_idx_dir(&data, 64, 40);
    let out = dir.path().join("d.safetensors");
    let o = nv(&[
        "train",
        "--data",
        s(&data),
        "--model",
        "cnn",
        "--norm",
        "none",
        "--lr",
        "1e30",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--out",
        s(&out),
        "--quiet",
    ]);
    let e = assert_fails(
        "diverging train",
        &o,
        &["diverged", "no checkpoint was written"],
    );
    assert!(!e.contains("last good checkpoint"), "{e}");
    let o = nv(&[
        "compare",
        "--data",
        s(&data),
        "--model",
        "cnn",
        "--norms",
        "none",
        "--lr",
        "1e30",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--out-dir",
        s(&dir.path().join("cmp")),
        "--quiet",
    ]);
    assert_ok("diverging compare", &o);
    assert!(stdout(&o).contains("diverged"), "{}", stdout(&o));
}

#[test]
fn io_errors_name_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.safetensors");
    let o = nv(&["eval", "--checkpoint", s(&missing)]);
    assert_fails("missing checkpoint", &o, &["nowhere.safetensors"]);
    let o = nv(&[
        "train",
        "--data",
        s(&dir.path().join("no-data")),
        "--model",
        "mlp",
    ]);
    assert_fails("missing data", &o, &["no-data"]);
    let o = nv(&["predict", "--checkpoint", s(&missing), "x.png"]);
    assert_fails("predict missing checkpoint", &o, &["nowhere.safetensors"]);
}

/// Fuzzing found JPEGs on which the decoder (zune-jpeg) panics, and JPEG headers claiming 10000x10000 pixels
/// whose decoding took 6-12 s: both are now clear errors from `predict`, at once.
#[test]
fn fuzz_found_images_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ck) = train_mlp(dir.path(), 64, &[]);
    let crashes = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/crashes/image");
    for name in [
        "jpeg-decoder-panic-0",
        "jpeg-decoder-panic-3",
        "huge-image-2",
    ] {
        let t = std::time::Instant::now();
        let o = nv(&["predict", "--checkpoint", s(&ck), s(&crashes.join(name))]);
        assert_fails(name, &o, &[name, "image"]);
        assert!(t.elapsed().as_secs_f64() < 5.0, "{name}: {:?}", t.elapsed());
    }
}
