//! Fashion-MNIST (Zalando): 60 000 training and 10 000 test grayscale 28×28 images in 10 classes.
//!
//! The Debian package `dataset-fashion-mnist` installs the four files into [`DEFAULT_DIR`]:
//! `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`,
//! `t10k-labels-idx1-ubyte.gz`. Uncompressed copies (`train-images-idx3-ubyte`) and the dotted spelling of
//! some mirrors (`train-images.idx3-ubyte`) are accepted too; gzip is detected from the content, not the name.

use super::dataset::Dataset;
use super::idx;
use crate::{NvError, Result};
use std::path::{Path, PathBuf};

/// Where `apt-get install dataset-fashion-mnist` puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The ten class names, in label order.
pub const CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Measured on the 60 000 training images (`x / 255`, population std): 0.286041, 0.353024.
pub const TRAIN_MEAN: f32 = 0.286_040_6;
pub const TRAIN_STD: f32 = 0.353_024_24;

/// Which half of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// The file-name stems `(images, labels)`.
    pub fn stems(self) -> (&'static str, &'static str) {
        match self {
            Split::Train => ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            Split::Test => ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        }
    }
    pub fn expected_len(self) -> usize {
        match self {
            Split::Train => 60_000,
            Split::Test => 10_000,
        }
    }
}

/// `dir`, or [`DEFAULT_DIR`] when `None`.
pub fn resolve_dir(dir: Option<&Path>) -> PathBuf {
    dir.map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

fn candidates(stem: &str) -> Vec<String> {
    // `train-images-idx3-ubyte` → also `train-images.idx3-ubyte` (the original MNIST site's spelling)
    let dotted = match stem.rfind("-idx") {
        Some(p) => format!("{}.{}", &stem[..p], &stem[p + 1..]),
        None => stem.to_string(),
    };
    vec![
        format!("{stem}.gz"),
        stem.to_string(),
        format!("{dotted}.gz"),
        dotted,
    ]
}

/// Finds the file for `stem` in `dir` under any accepted name.
pub fn find_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in candidates(stem) {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(NvError::io(
        dir,
        "find Fashion-MNIST in",
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "Fashion-MNIST not found: no {stem}.gz or {stem} here. Install it with `apt-get install dataset-fashion-mnist` \
                 (files go to {DEFAULT_DIR}) or pass `--data DIR` pointing at a folder holding the four IDX files"
            ),
        ),
    ))
}

/// Whether all four files are present in `dir` (or [`DEFAULT_DIR`]).
pub fn is_available(dir: Option<&Path>) -> bool {
    let d = resolve_dir(dir);
    [Split::Train, Split::Test].iter().all(|s| {
        let (i, l) = s.stems();
        find_file(&d, i).is_ok() && find_file(&d, l).is_ok()
    })
}

/// Loads one split as a `(N, 1, 28, 28)` [`Dataset`] with labels validated against the 10 classes.
pub fn load(dir: Option<&Path>, split: Split) -> Result<Dataset> {
    let d = resolve_dir(dir);
    let (si, sl) = split.stems();
    let (pi, pl) = (find_file(&d, si)?, find_file(&d, sl)?);
    let (x, y) = idx::load_pair(&pi, &pl, Some(CLASSES.len()))?;
    let (n, h, w) = x.dim();
    let images = x.into_raw_vec_and_offset().0;
    Dataset::new(
        images,
        y.into_iter().map(usize::from).collect(),
        CLASSES.iter().map(|s| s.to_string()).collect(),
        [1, h, w],
    )
    .map_err(|e| NvError::Format {
        path: pi.display().to_string(),
        msg: format!("{e} ({n} images)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::idx::{write_idx, IdxArray, IdxData};

    #[test]
    fn missing_dir_error_mentions_apt_and_flag() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(Some(dir.path()), Split::Train).unwrap_err();
        let m = e.to_string();
        assert!(
            matches!(&e, NvError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(
            m.contains("apt-get install dataset-fashion-mnist") && m.contains("--data DIR"),
            "{m}"
        );
    }

    #[test]
    fn loads_raw_and_dotted_names() {
        let dir = tempfile::tempdir().unwrap();
        let imgs = IdxArray::new(vec![3, 2, 2], IdxData::U8((0..12).collect())).unwrap();
        let labs = IdxArray::new(vec![3], IdxData::U8(vec![9, 0, 4])).unwrap();
        write_idx(&dir.path().join("t10k-images.idx3-ubyte"), &imgs, false).unwrap();
        write_idx(&dir.path().join("t10k-labels-idx1-ubyte.gz"), &labs, true).unwrap();
        let d = load(Some(dir.path()), Split::Test).unwrap();
        assert_eq!(d.shape, [1, 2, 2]);
        assert_eq!(d.labels, vec![9, 0, 4]);
        assert_eq!(d.image(2), &[8, 9, 10, 11]);
        assert_eq!(d.classes[9], "Ankle boot");
        // a label of 10 is out of range for Fashion-MNIST
        let bad = IdxArray::new(vec![3], IdxData::U8(vec![9, 10, 4])).unwrap();
        write_idx(&dir.path().join("t10k-labels-idx1-ubyte.gz"), &bad, true).unwrap();
        let m = load(Some(dir.path()), Split::Test).unwrap_err().to_string();
        assert!(m.contains("label 10 at index 1"), "{m}");
    }
}
