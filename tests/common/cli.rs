//! Helpers for tests that run the `normvision` binary on synthetic data.
#![allow(dead_code)]

use normvision::data::idx::{write_idx, IdxArray, IdxData};
use normvision::data::Dataset;
use std::path::Path;
use std::process::{Command, Output};

/// A learnable synthetic 10-class 1x28x28 dataset: a bright 8x8 square whose position depends on the class,
/// on noise. Deterministic in `seed`.
pub fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let mut images = Vec::with_capacity(n * 784);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i * 7 + (next() as usize % 3)) % 10;
        let (r0, c0) = ((label / 5) * 12 + 3, (label % 5) * 5 + 1);
        for r in 0..28 {
            for c in 0..28 {
                let inside = (r0..r0 + 8).contains(&r) && (c0..c0 + 6).contains(&c);
                let base = if inside { 170 } else { 20 };
                images.push((base + next() % 60) as u8);
            }
        }
        labels.push(label);
    }
    let classes = (0..10).map(|k| format!("class {k}")).collect();
    Dataset::new(images, labels, classes, [1, 28, 28]).unwrap()
}

pub fn nv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_normvision"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .expect("run normvision")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts a clean failure: non-zero exit, an `error:` line mentioning every `needles`, no panic.
pub fn assert_fails(what: &str, o: &Output, needles: &[&str]) -> String {
    let e = stderr(o);
    assert!(
        !o.status.success(),
        "{what}: expected failure, got success\nstdout:\n{}\nstderr:\n{e}",
        stdout(o)
    );
    assert_eq!(o.status.code(), Some(1), "{what}: exit code\n{e}");
    assert!(!e.contains("panicked"), "{what}: panicked:\n{e}");
    assert!(e.contains("error:"), "{what}: no error line:\n{e}");
    for n in needles {
        assert!(e.contains(n), "{what}: stderr does not mention {n:?}:\n{e}");
    }
    e
}

pub fn assert_ok(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

/// Writes a small valid Fashion-MNIST-format directory (raw, uncompressed IDX files).
pub fn write_idx_dir(dir: &Path, n_train: usize, n_test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (stem_i, stem_l, n, seed) in [
        (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            n_train,
            3,
        ),
        (
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
            n_test,
            4,
        ),
    ] {
        let d = synthetic(n, seed);
        let imgs = IdxArray::new(vec![n, 28, 28], IdxData::U8(d.images)).unwrap();
        let labs = IdxArray::new(
            vec![n],
            IdxData::U8(d.labels.iter().map(|&l| l as u8).collect()),
        )
        .unwrap();
        write_idx(&dir.join(stem_i), &imgs, false).unwrap();
        write_idx(&dir.join(stem_l), &labs, false).unwrap();
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the binary in working directory `cwd`.
pub fn nv_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_normvision"))
        .current_dir(cwd)
        .args(["--threads", "1"])
        .args(args)
        .output()
        .expect("run normvision")
}

/// Writes an image folder (one sub-folder per class, `per_class` PNGs each) of `side`x`side` grayscale images.
pub fn write_image_folder(dir: &Path, classes: usize, per_class: usize, side: u32) {
    for k in 0..classes {
        let d = dir.join(format!("class{k}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let img = image::GrayImage::from_fn(side, side, |x, y| {
                image::Luma([((x * 7 + y * 3 + (k * 40 + i) as u32) % 256) as u8])
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// Trains a tiny MLP through the CLI for one epoch on synthetic IDX data (`n_train` training images, 40 test
/// images, batch 32) under `root`, with `extra` flags; returns (data dir, checkpoint).
pub fn train_mlp(
    root: &Path,
    n_train: usize,
    extra: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = root.join("data");
    write_idx_dir(&data, n_train, 40);
    let ck = root.join("run").join("model.safetensors");
    let mut args = vec![
        "train",
        "--data",
        s(&data),
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--quiet",
        "--out",
        s(&ck),
    ];
    args.extend_from_slice(extra);
    assert_ok("train on synthetic IDX", &nv(&args));
    assert!(ck.is_file());
    (data, ck)
}
