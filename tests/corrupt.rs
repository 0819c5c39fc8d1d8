//! Corrupted test sets: the corruptions' definitions against hand-computed values, determinism, and the CLI
//! (`eval --corruption`, `eval --adapt-bn`, `corrupt`, `adapt --corruption`) with its errors.

use crate::common;

use common::cli::*;
use normvision::data::corrupt::{split_seed, SEVERITIES};
use normvision::data::{Corruption, CorruptionKind, Dataset};

fn img() -> Vec<u8> {
    (0..28 * 28)
        .map(|i| ((i * 7 + i / 28 * 13) % 256) as u8)
        .collect()
}

fn corrupt(kind: CorruptionKind, s: u8, x: &[u8], seed: u64, index: usize) -> Vec<u8> {
    let mut y = x.to_vec();
    Corruption::new(kind, s)
        .unwrap()
        .apply(&mut y, [1, 28, 28], seed, index)
        .unwrap();
    y
}

fn q(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

#[test]
fn pointwise_corruptions_follow_the_table() {
    let x = img();
    let m = x.iter().map(|&v| v as f64).sum::<f64>() as f32 / (255.0 * x.len() as f32);
    for s in 1..=5u8 {
        let b = CorruptionKind::Brightness.param(s);
        let a = CorruptionKind::Contrast.param(s);
        let al = CorruptionKind::Inversion.param(s);
        let yb = corrupt(CorruptionKind::Brightness, s, &x, 0, 0);
        let yc = corrupt(CorruptionKind::Contrast, s, &x, 0, 0);
        let yi = corrupt(CorruptionKind::Inversion, s, &x, 0, 0);
        for (i, &v) in x.iter().enumerate() {
            let u = v as f32 / 255.0;
            assert_eq!(yb[i], q(u + b), "brightness {s} at {i}");
            assert_eq!(yc[i], q((u - m) * a + m), "contrast {s} at {i}");
            assert_eq!(
                yi[i],
                q((1.0 - al) * u + al * (1.0 - u)),
                "inversion {s} at {i}"
            );
        }
    }
    // severity 5 of inversion is the negative image
    let neg = corrupt(CorruptionKind::Inversion, 5, &x, 0, 0);
    assert!(x
        .iter()
        .zip(&neg)
        .all(|(&a, &b)| a as u16 + b as u16 == 255));
}

#[test]
fn noise_has_the_tables_spread_and_is_deterministic() {
    let gray = vec![128u8; 28 * 28];
    let mut last = 0.0;
    for s in 1..=5u8 {
        let sd = CorruptionKind::GaussianNoise.param(s) as f64;
        let mut sum2 = 0.0;
        let mut n = 0.0;
        for index in 0..40 {
            let y = corrupt(CorruptionKind::GaussianNoise, s, &gray, 3, index);
            assert_eq!(
                y,
                corrupt(CorruptionKind::GaussianNoise, s, &gray, 3, index)
            );
            for &v in &y {
                sum2 += ((v as f64 - 128.0) / 255.0).powi(2);
                n += 1.0;
            }
        }
        let est = (sum2 / n).sqrt();
        // clipping to [0, 1] trims the tails (2.8 sd from mid-gray at severity 3, 1.3 at 5)
        if s <= 3 {
            assert!(
                est > 0.95 * sd && est < 1.05 * sd,
                "severity {s}: std {est} vs {sd}"
            );
        }
        assert!(est > last, "severity {s}: std {est} <= {last}");
        last = est;
    }
    // other seeds and other samples draw other noise
    let a = corrupt(CorruptionKind::GaussianNoise, 3, &gray, 3, 0);
    assert_ne!(a, corrupt(CorruptionKind::GaussianNoise, 3, &gray, 4, 0));
    assert_ne!(a, corrupt(CorruptionKind::GaussianNoise, 3, &gray, 3, 1));
    assert_ne!(split_seed(3, true), split_seed(3, false));
}

#[test]
fn spatial_corruptions_keep_flat_images_and_occlude_a_square() {
    let flat = vec![77u8; 28 * 28];
    for kind in [CorruptionKind::GaussianBlur, CorruptionKind::Pixelate] {
        for s in 1..=5 {
            assert_eq!(corrupt(kind, s, &flat, 0, 0), flat, "{kind:?}:{s}");
        }
    }
    // JPEG of a flat image stays within one level
    for s in 1..=5 {
        let y = corrupt(CorruptionKind::Jpeg, s, &flat, 0, 0);
        assert!(y.iter().all(|&v| v.abs_diff(77) <= 1), "jpeg {s}");
    }
    // blur preserves the mean of a smooth image away from edges, and lowers the variance
    let x = img();
    let var = |v: &[u8]| {
        let m = v.iter().map(|&a| a as f64).sum::<f64>() / v.len() as f64;
        v.iter().map(|&a| (a as f64 - m).powi(2)).sum::<f64>() / v.len() as f64
    };
    let yb = corrupt(CorruptionKind::GaussianBlur, 5, &x, 0, 0);
    assert!(var(&yb) < 0.8 * var(&x));
    // occlusion: exactly one mid-gray square of the table's side
    for s in 1..=5u8 {
        let side = (28.0 * CorruptionKind::Occlusion.param(s)).round() as usize;
        let zeros = vec![0u8; 28 * 28];
        let y = corrupt(CorruptionKind::Occlusion, s, &zeros, 9, 5);
        let covered: Vec<usize> = (0..y.len()).filter(|&i| y[i] == 128).collect();
        assert_eq!(covered.len(), side * side, "occlusion {s}");
        let (r0, c0) = (covered[0] / 28, covered[0] % 28);
        assert!(covered
            .iter()
            .all(|&i| (r0..r0 + side).contains(&(i / 28)) && (c0..c0 + side).contains(&(i % 28))));
    }
}

#[test]
fn a_data_set_corrupts_the_same_at_any_thread_count_and_rgb_jpeg_works() {
    let ds = synthetic(300, 5);
    let c: Corruption = "gaussian-noise:2".parse().unwrap();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| c.apply_to(&ds, 11).unwrap());
    let two = c.apply_to(&ds, 11).unwrap();
    assert_eq!(one, two);
    assert_eq!(one.labels, ds.labels);
    // sample i is corrupted as sample i alone would be
    let mut s7 = ds.image(7).to_vec();
    c.apply(&mut s7, ds.shape, 11, 7).unwrap();
    assert_eq!(one.image(7), &s7[..]);
    // RGB JPEG round trip through one colour image
    let rgb = Dataset::new(
        (0..3 * 16 * 16 * 2).map(|i| (i * 5 % 256) as u8).collect(),
        vec![0, 1],
        vec!["a".into(), "b".into()],
        [3, 16, 16],
    )
    .unwrap();
    let j = "jpeg:5"
        .parse::<Corruption>()
        .unwrap()
        .apply_to(&rgb, 0)
        .unwrap();
    assert_ne!(j.images, rgb.images);
    assert_eq!(SEVERITIES.len(), 8);
}

#[test]
fn cli_corruption_eval_online_adaptation_and_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ck) = train_mlp(dir.path(), 200, &[]);
    let acc = |extra: &[&str]| -> f64 {
        let mut a = vec!["eval", "--checkpoint", s(&ck), "--data", s(&data), "--json"];
        a.extend_from_slice(extra);
        let o = nv(&a);
        assert_ok("eval", &o);
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        v["test_acc"].as_f64().unwrap()
    };
    acc(&["--corruption", "contrast:3"]);
    acc(&[
        "--corruption",
        "contrast:3",
        "--adapt-bn",
        "--prior",
        "8",
        "--batch-size",
        "16",
    ]);
    // corrupt writes the images eval --corruption evaluates: the same accuracy from the files
    let out = dir.path().join("corrupted");
    let o = nv(&[
        "corrupt",
        "--corruption",
        "gaussian-noise:4",
        "--corruption-seed",
        "5",
        "--data",
        s(&data),
        "-o",
        s(&out),
    ]);
    assert_ok("corrupt", &o);
    for f in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let on_the_fly = acc(&["--corruption", "gaussian-noise:4", "--corruption-seed", "5"]);
    let o = nv(&["eval", "--checkpoint", s(&ck), "--data", s(&out), "--json"]);
    assert_ok("eval the written copy", &o);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["test_acc"].as_f64().unwrap(), on_the_fly);
    // the table
    let o = nv(&["corrupt", "--list"]);
    assert_ok("corrupt --list", &o);
    assert_eq!(stdout(&o).lines().count(), 8);
    // errors that name the problem
    for (bad, needle) in [
        ("fog:2", "unknown corruption \"fog\""),
        ("contrast:6", "from 1 to 5"),
        ("contrast:0", "from 1 to 5"),
        ("contrast", "NAME:SEVERITY"),
    ] {
        assert_fails(
            bad,
            &nv(&[
                "eval",
                "--checkpoint",
                s(&ck),
                "--data",
                s(&data),
                "--corruption",
                bad,
            ]),
            &["--corruption", needle],
        );
        assert_fails(
            bad,
            &nv(&[
                "adapt",
                "--checkpoint",
                s(&ck),
                "--data",
                s(&data),
                "--corruption",
                bad,
                "-o",
                s(&dir.path().join("x")),
            ]),
            &[needle],
        );
    }
    // online adaptation of a model without BatchNorm
    let (d2, ck2) = train_mlp(&dir.path().join("none"), 100, &["--norm", "none"]);
    assert_fails(
        "--adapt-bn without BN",
        &nv(&[
            "eval",
            "--checkpoint",
            s(&ck2),
            "--data",
            s(&d2),
            "--adapt-bn",
        ]),
        &["--adapt-bn", "no BatchNorm"],
    );
}
