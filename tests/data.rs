//! Data pipeline: IDX files, Fashion-MNIST, image folders, the loader.

use ndarray::Array4;
use normvision::data::fashion_mnist::{self, Split};
use normvision::data::idx::{self, IdxArray, IdxData};
use normvision::data::{
    load_image_folder, load_image_for_model, Augment, DataLoader, Dataset, LoaderConfig,
    Normalization,
};
use normvision::NvError;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn format_msg<T: std::fmt::Debug>(r: normvision::Result<T>) -> String {
    match r {
        Err(e @ NvError::Format { .. }) => e.to_string(),
        other => panic!("expected NvError::Format, got {other:?}"),
    }
}

fn write_pair(
    dir: &Path,
    n_img: usize,
    n_lab: usize,
    gz: bool,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let imgs = IdxArray::new(
        vec![n_img, 4, 3],
        IdxData::U8((0..n_img * 12).map(|v| (v * 7 % 256) as u8).collect()),
    )
    .unwrap();
    let labs = IdxArray::new(
        vec![n_lab],
        IdxData::U8((0..n_lab).map(|v| (v % 10) as u8).collect()),
    )
    .unwrap();
    let (pi, pl) = (dir.join(format!("img-{gz}")), dir.join(format!("lab-{gz}")));
    idx::write_idx(&pi, &imgs, gz).unwrap();
    idx::write_idx(&pl, &labs, gz).unwrap();
    (pi, pl)
}

#[test]
fn idx_pair_round_trip_gzip_and_raw() {
    let dir = tempfile::tempdir().unwrap();
    for gz in [false, true] {
        let (pi, pl) = write_pair(dir.path(), 5, 5, gz);
        let (x, y) = idx::load_pair(&pi, &pl, Some(10)).unwrap();
        assert_eq!(x.dim(), (5, 4, 3));
        assert_eq!(x[[4, 3, 2]], (59 * 7 % 256) as u8);
        assert_eq!(y, vec![0, 1, 2, 3, 4]);
    }
}

#[test]
fn idx_truncated_file_names_file_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for gz in [false, true] {
        let (pi, _) = write_pair(dir.path(), 5, 5, false);
        let bytes = std::fs::read(&pi).unwrap();
        let cut = dir.path().join(format!("cut-{gz}"));
        let short = &bytes[..bytes.len() - 10];
        if gz {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(short).unwrap();
            std::fs::write(&cut, e.finish().unwrap()).unwrap();
        } else {
            std::fs::write(&cut, short).unwrap();
        }
        let m = format_msg(idx::load_images(&cut));
        assert!(m.starts_with(&cut.display().to_string()), "{m}");
        assert!(
            m.contains("truncated")
                && m.contains("need 60 data bytes")
                && m.contains("found 50 data bytes"),
            "{m}"
        );
    }
    // a gzip stream cut short is also a Format error naming the file
    let (pi, _) = write_pair(dir.path(), 5, 5, true);
    let bytes = std::fs::read(&pi).unwrap();
    let cut = dir.path().join("cut.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let m = format_msg(idx::load_images(&cut));
    assert!(m.contains("cut.gz") && m.contains("gzip"), "{m}");
}

#[test]
fn idx_trailing_garbage_wrong_magic_bad_dims() {
    let dir = tempfile::tempdir().unwrap();
    let (pi, pl) = write_pair(dir.path(), 5, 5, false);
    let mut bytes = std::fs::read(&pi).unwrap();
    bytes.extend_from_slice(b"junk");
    let p = dir.path().join("trailing");
    std::fs::write(&p, &bytes).unwrap();
    assert!(format_msg(idx::load_images(&p)).contains("4 trailing bytes"));

    let p = dir.path().join("magic");
    std::fs::write(&p, b"\x89PNG\r\n\x1a\n....").unwrap();
    assert!(format_msg(idx::load_images(&p)).contains("bad magic"));

    // label file given as images, image file given as labels: wrong number of dims
    assert!(format_msg(idx::load_images(&pl)).contains("expected an image file with 3 dimensions"));
    assert!(
        format_msg(idx::load_labels(&pi, None)).contains("expected a label file with 1 dimension")
    );
    // zero height
    let p = dir.path().join("zero");
    idx::write_idx(
        &p,
        &IdxArray::new(vec![3, 0, 4], IdxData::U8(vec![])).unwrap(),
        false,
    )
    .unwrap();
    assert!(format_msg(idx::load_images(&p)).contains("height and width must be positive"));
    // non-u8 pixels
    let p = dir.path().join("f32");
    idx::write_idx(
        &p,
        &IdxArray::new(vec![1, 1, 2], IdxData::F32(vec![0.5, 1.0])).unwrap(),
        false,
    )
    .unwrap();
    assert!(format_msg(idx::load_images(&p)).contains("expected u8"));
    // label out of range
    assert!(
        format_msg(idx::load_labels(&pl, Some(3))).contains("label 3 at index 3 is out of range")
    );
}

#[test]
fn idx_count_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (pi, pl) = write_pair(dir.path(), 5, 4, true);
    let m = format_msg(idx::load_pair(&pi, &pl, None));
    assert!(
        m.contains("label count mismatch") && m.contains("5 images") && m.contains("4 labels"),
        "{m}"
    );
}

#[test]
fn fashion_mnist_if_installed() {
    if !fashion_mnist::is_available(None) {
        eprintln!(
            "NOTE: skipping: Fashion-MNIST not found in {}; `apt-get install dataset-fashion-mnist` to run this test",
            fashion_mnist::DEFAULT_DIR
        );
        return;
    }
    let train = fashion_mnist::load(None, Split::Train).unwrap();
    let test = fashion_mnist::load(None, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.shape, [1, 28, 28]);
    assert_eq!(train.classes.len(), 10);
    assert_eq!(train.class_counts(), vec![6000; 10]);
    assert_eq!(test.class_counts(), vec![1000; 10]);
    let n = train.mean_std().unwrap();
    eprintln!(
        "Fashion-MNIST train mean {:.6} std {:.6}",
        n.mean[0], n.std[0]
    );
    assert!((n.mean[0] - 0.2860).abs() < 1e-4, "mean {}", n.mean[0]);
    assert!((n.std[0] - 0.3530).abs() < 1e-4, "std {}", n.std[0]);
    assert!((n.mean[0] - fashion_mnist::TRAIN_MEAN).abs() < 1e-6);
    assert!((n.std[0] - fashion_mnist::TRAIN_STD).abs() < 1e-6);
}

fn write_png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    img.save(path).unwrap();
}

#[test]
fn image_folder_loads_sorted_classes_and_resizes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for c in ["zebra", "apple", "mango"] {
        std::fs::create_dir(root.join(c)).unwrap();
    }
    write_png(&root.join("apple/b.png"), 4, 4, |x, _| [x as u8 * 60, 0, 0]);
    write_png(&root.join("apple/a.png"), 4, 4, |_, _| [255, 255, 255]);
    write_png(&root.join("mango/m.png"), 4, 4, |_, y| [0, y as u8 * 50, 0]);
    // a wrong-size image is resized (bilinear) to the target 4x4; a uniform image stays uniform
    write_png(&root.join("zebra/big.png"), 9, 7, |_, _| [10, 20, 30]);
    image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]))
        .save_with_format(root.join("zebra/photo.jpg"), image::ImageFormat::Jpeg)
        .unwrap();
    std::fs::write(root.join("README.txt"), "files in the root are ignored").unwrap();
    std::fs::write(root.join("apple/.DS_Store"), "hidden files are ignored").unwrap();

    let rgb = load_image_folder(root, 3, 4, 4).unwrap();
    assert_eq!(rgb.classes, vec!["apple", "mango", "zebra"]);
    assert_eq!(rgb.labels, vec![0, 0, 1, 2, 2]);
    assert_eq!(rgb.shape, [3, 4, 4]);
    assert_eq!(rgb.image(0), &[255u8; 48][..], "apple/a.png comes first");
    assert_eq!(
        &rgb.image(1)[..4],
        &[0, 60, 120, 180],
        "R plane row 0 of apple/b.png"
    );
    assert_eq!(
        rgb.image(3),
        &[[10u8; 16], [20; 16], [30; 16]].concat()[..],
        "resized 9x7 -> 4x4"
    );

    let gray = load_image_folder(root, 1, 2, 2).unwrap();
    assert_eq!(gray.shape, [1, 2, 2]);
    // PIL convert("L") of (10, 20, 30): (19595*10 + 38470*20 + 7471*30 + 32768) >> 16 = 18
    assert_eq!(gray.image(3), &[18, 18, 18, 18]);

    let x = load_image_for_model(&root.join("apple/a.png"), 1, 3, 5).unwrap();
    assert_eq!(x.shape(), &[1, 1, 3, 5]);
    assert!(x.iter().all(|&v| v == 1.0));
}

#[test]
fn image_folder_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("cls")).unwrap();
    write_png(&root.join("cls/ok.png"), 2, 2, |_, _| [0, 0, 0]);
    std::fs::write(root.join("cls/x.png"), "this is text, not a PNG").unwrap();
    let m = format_msg(load_image_folder(root, 1, 2, 2));
    assert!(
        m.contains("x.png") && m.contains("not a PNG or JPEG"),
        "{m}"
    );

    // a PNG header followed by garbage: corrupt image
    let mut bytes = std::fs::read(root.join("cls/ok.png")).unwrap();
    bytes.truncate(20);
    std::fs::write(root.join("cls/x.png"), &bytes).unwrap();
    let m = format_msg(load_image_folder(root, 1, 2, 2));
    assert!(m.contains("x.png") && m.contains("corrupt image"), "{m}");
    std::fs::remove_file(root.join("cls/x.png")).unwrap();

    std::fs::create_dir(root.join("empty")).unwrap();
    assert!(format_msg(load_image_folder(root, 1, 2, 2)).contains("holds no image"));
    let nothing = tempfile::tempdir().unwrap();
    assert!(format_msg(load_image_folder(nothing.path(), 1, 2, 2)).contains("no class sub-folders"));
    assert!(matches!(
        load_image_folder(root, 2, 2, 2),
        Err(NvError::Config(_))
    ));
    assert!(matches!(
        load_image_for_model(&root.join("missing.png"), 1, 2, 2),
        Err(NvError::Io { ref path, .. }) if path.ends_with("missing.png")
    ));
}

/// 103 samples of 1x6x6 whose pixels encode the sample index, labels = index % 4.
fn toy(n: usize) -> Arc<Dataset> {
    let images = (0..n)
        .flat_map(|i| (0..36).map(move |k| ((i * 3 + k) % 256) as u8))
        .collect();
    let classes = (0..4).map(|c| format!("c{c}")).collect();
    Arc::new(Dataset::new(images, (0..n).map(|i| i % 4).collect(), classes, [1, 6, 6]).unwrap())
}

fn loader(n: usize, cfg: LoaderConfig) -> DataLoader {
    let d = toy(n);
    let norm = d.mean_std().unwrap();
    DataLoader::new(d, norm, cfg).unwrap()
}

fn collect(it: impl Iterator<Item = (Array4<f32>, Vec<usize>)>) -> Vec<(Array4<f32>, Vec<usize>)> {
    it.collect()
}

#[test]
fn loader_order_is_seeded_per_epoch() {
    let cfg = LoaderConfig::train(10, 42);
    let a = loader(103, cfg.clone());
    let b = loader(103, cfg.clone());
    assert_eq!(a.num_batches(), 11);
    assert_eq!(a.epoch_order(0), b.epoch_order(0), "same seed, same order");
    assert_ne!(a.epoch_order(0), a.epoch_order(1), "epochs differ");
    let c = loader(
        103,
        LoaderConfig {
            seed: 43,
            ..cfg.clone()
        },
    );
    assert_ne!(a.epoch_order(0), c.epoch_order(0), "seeds differ");
    let mut sorted = a.epoch_order(3);
    sorted.sort();
    assert_eq!(sorted, (0..103).collect::<Vec<_>>(), "a permutation");

    let ea = collect(a.epoch(0));
    let eb = collect(b.epoch(0));
    assert_eq!(ea, eb);
    assert_eq!(ea.len(), 11);
    assert_eq!(ea[10].1.len(), 3, "last partial batch kept");
    let labels: Vec<usize> = ea.iter().flat_map(|(_, y)| y.clone()).collect();
    assert_eq!(
        labels,
        a.epoch_order(0).iter().map(|i| i % 4).collect::<Vec<_>>()
    );
    assert_ne!(collect(a.epoch(1))[0].1, ea[0].1);

    let d = loader(
        103,
        LoaderConfig {
            drop_last: true,
            ..cfg
        },
    );
    assert_eq!(d.num_batches(), 10);
    assert!(collect(d.epoch(0))
        .iter()
        .all(|(x, y)| x.shape() == [10, 1, 6, 6] && y.len() == 10));

    let e = loader(103, LoaderConfig::eval(50));
    assert_eq!(e.epoch_order(7), (0..103).collect::<Vec<_>>());
    let (x, y) = e.epoch(0).next().unwrap();
    let ds = toy(103);
    let (x0, y0) = ds
        .batch(&(0..50).collect::<Vec<_>>(), &ds.mean_std().unwrap())
        .unwrap();
    assert_eq!(
        (x, y),
        (x0, y0),
        "eval batches are the plain normalized samples"
    );
}

#[test]
fn loader_resume_reproduces_batches_with_augmentation() {
    let cfg = LoaderConfig {
        augment: Some(Augment {
            crop_pad: 2,
            hflip: true,
            brightness: 0.3,
            contrast: 0.3,
        }),
        ..LoaderConfig::train(8, 7)
    };
    let full = loader(103, cfg.clone());
    let plain = loader(
        103,
        LoaderConfig {
            augment: None,
            ..cfg.clone()
        },
    );
    let e2 = collect(full.epoch(2));
    assert_ne!(
        e2[0].0,
        plain.epoch(2).next().unwrap().0,
        "augmentation changes pixels"
    );
    assert_eq!(
        e2[0].1,
        plain.epoch(2).next().unwrap().1,
        "but not the order"
    );
    // a fresh loader (as after a restart) resumed at epoch 2, batch 5
    let resumed = loader(103, cfg);
    let it = resumed.epoch_from(2, 5).unwrap();
    assert_eq!(
        (it.epoch(), it.next_index(), it.len()),
        (2, 5, e2.len() - 5)
    );
    let tail = collect(it);
    assert_eq!(tail.as_slice(), &e2[5..]);
    assert_eq!(resumed.batch_at(2, 6).unwrap(), e2[6]);
    assert_eq!(
        collect(resumed.epoch_from(2, resumed.num_batches()).unwrap()).len(),
        0
    );
    assert!(resumed.epoch_from(2, resumed.num_batches() + 1).is_err());
}

#[test]
fn loader_drop_mid_epoch_does_not_hang() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let l = loader(
            2000,
            LoaderConfig {
                prefetch: 2,
                ..LoaderConfig::train(1, 1)
            },
        );
        for _ in 0..20 {
            let mut it = l.epoch(0);
            let _ = it.next();
            std::thread::sleep(Duration::from_millis(2)); // let the producer fill the channel and block
            drop(it);
        }
        drop(l.epoch(1)); // dropped before any batch was taken
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("dropping an EpochIter mid-epoch must stop its producer thread");
}

#[test]
fn loader_config_errors() {
    let d = toy(10);
    let n = d.mean_std().unwrap();
    assert!(DataLoader::new(d.clone(), n.clone(), LoaderConfig::train(0, 0)).is_err());
    assert!(DataLoader::new(
        d.clone(),
        Normalization::identity(3),
        LoaderConfig::train(4, 0)
    )
    .is_err());
    let bad = LoaderConfig {
        augment: Some(Augment {
            contrast: f32::NAN,
            ..Default::default()
        }),
        ..LoaderConfig::train(4, 0)
    };
    assert!(DataLoader::new(d, n, bad).is_err());
}
