//! Resource bounds: training memory does not grow from epoch to epoch (resident set size read over three short
//! epochs of the reference CNN), and an image folder streamed from disk gives the batches of the in-memory one
//! while holding no decoded image.

mod common;

use common::cli::*;
use normvision::data::{load_image_folder, stream_image_folder, DataLoader, LoaderConfig};
use normvision::model::{ModelKind, NormKind};
use normvision::train::{self, Progress, RunOptions, TrainConfig};
use std::sync::{Arc, Mutex};

/// Resident set size of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

struct RssAtEpochEnd(Arc<Mutex<Vec<u64>>>);
impl Progress for RssAtEpochEnd {
    fn epoch_start(&mut self, _: usize, _: usize, _: usize) {}
    fn step(&mut self, _: &str) {}
    fn epoch_end(&mut self) {
        self.0.lock().unwrap().push(rss_kib());
    }
}

#[test]
fn training_memory_does_not_grow_from_epoch_two_to_three() {
    let train_ds = Arc::new(synthetic(1024, 1));
    let test_ds = Arc::new(synthetic(256, 2));
    let mut cfg = TrainConfig::reference(ModelKind::Cnn, NormKind::Batch);
    cfg.epochs = 3;
    let rss = Arc::new(Mutex::new(vec![]));
    let opts = RunOptions {
        progress: Some(Box::new(RssAtEpochEnd(Arc::clone(&rss)))),
        ..Default::default()
    };
    let r = train::train(&cfg, train_ds, test_ds, opts).unwrap();
    assert!(r.diverged.is_none());
    let rss = rss.lock().unwrap().clone();
    eprintln!("RSS at the end of epochs 1-3: {rss:?} KiB");
    assert_eq!(rss.len(), 3);
    let growth = rss[2] as f64 / rss[1] as f64 - 1.0;
    assert!(
        growth <= 0.05,
        "RSS grew {:.1}% from epoch 2 to 3 ({rss:?} KiB)",
        growth * 100.0
    );
}

#[test]
fn a_streamed_image_folder_gives_the_in_memory_batches() {
    let dir = tempfile::tempdir().unwrap();
    write_image_folder(dir.path(), 3, 7, 12);
    let mem = load_image_folder(dir.path(), 1, 10, 10).unwrap();
    let st = stream_image_folder(dir.path(), 1, 10, 10).unwrap();
    assert!(st.is_streaming() && st.images.is_empty());
    assert_eq!(st.labels, mem.labels);
    let norm = mem.mean_std().unwrap();
    assert_eq!(st.mean_std().unwrap(), norm);
    let cfg = LoaderConfig::train(4, 9);
    let a = DataLoader::new(Arc::new(mem), norm.clone(), cfg.clone()).unwrap();
    let b = DataLoader::new(Arc::new(st.clone()), norm.clone(), cfg.clone()).unwrap();
    for epoch in 0..2 {
        let xa: Vec<_> = a.epoch(epoch).collect();
        let xb: Vec<_> = b.epoch(epoch).collect();
        assert_eq!(xa, xb, "epoch {epoch}");
    }
    // A file that stops decoding mid-run ends the epoch with an error naming it, not a panic.
    let victim = st.files.as_ref().unwrap()[5].clone();
    std::fs::write(&victim, b"not an image").unwrap();
    let mut it = b.epoch(0);
    let n = (&mut it).count();
    assert!(n < b.num_batches());
    let e = it.error().unwrap_err().to_string();
    assert!(
        e.contains(victim.file_name().unwrap().to_str().unwrap()),
        "{e}"
    );
}

#[test]
fn cli_trains_on_a_streamed_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    write_image_folder(&imgs, 2, 12, 28);
    let out = dir.path().join("m.safetensors");
    let o = nv(&[
        "train",
        "--image-folder",
        s(&imgs),
        "--test-folder",
        s(&imgs),
        "--stream",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--quiet",
        "--out",
        s(&out),
    ]);
    assert_ok("train --stream", &o);
    assert!(out.is_file());
}
