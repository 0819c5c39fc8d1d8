//! A folder of images, one sub-folder per class (torchvision's `ImageFolder` layout):
//!
//! ```text
//! root/cat/001.png
//! root/cat/002.jpg
//! root/dog/a.jpeg
//! ```
//!
//! * Classes are the sub-folder names sorted by byte order; label `k` is the `k`-th name. Files directly in `root`
//!   and hidden entries (names starting with `.`) are ignored; files inside a class folder are sorted by name.
//! * Every non-hidden file inside a class folder must be a PNG or JPEG image. The format is detected from the
//!   content, not the extension, so a text file named `x.png` (or any other non-image) is an
//!   [`crate::NvError::Format`] naming the file, as is a corrupt image. A class folder with no image is an error.
//! * Images are converted and resized to `(channels, h, w)` as [`super::decode`] says (grayscale or RGB,
//!   bilinear resize to exactly `(h, w)`).
//! * [`load_image_folder`] decodes the whole folder into memory; [`stream_image_folder`] lists it and decodes
//!   each image when a batch is made.

use super::dataset::Dataset;
use super::decode::{check_target, format_err};
pub use super::decode::{
    decode_bytes, load_image, load_image_for_model, to_chw, MAX_DECODE_BYTES, MAX_DECODE_SIDE,
};
use crate::Result;
use std::path::{Path, PathBuf};

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The class names (sorted sub-folder names) and the files of each class, sorted.
pub fn scan(root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let read_dir = |d: &Path| -> Result<Vec<PathBuf>> {
        let rd = std::fs::read_dir(d).map_err(crate::error::io_at(d, "list"))?;
        let mut v = Vec::new();
        for entry in rd {
            let p = entry.map_err(crate::error::io_at(d, "list"))?.path();
            if !is_hidden(&p) {
                v.push(p);
            }
        }
        v.sort();
        Ok(v)
    };
    let mut classes = Vec::new();
    for dir in read_dir(root)?.into_iter().filter(|p| p.is_dir()) {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format_err(&dir, "class folder name is not valid UTF-8"))?
            .to_string();
        let files: Vec<PathBuf> = read_dir(&dir)?
            .into_iter()
            .filter(|p| p.is_file())
            .collect();
        if files.is_empty() {
            return Err(format_err(
                &dir,
                format!("class folder `{name}` holds no image"),
            ));
        }
        classes.push((name, files));
    }
    if classes.is_empty() {
        return Err(format_err(
            root,
            "no class sub-folders: expected root/<class>/<image>.png|jpg",
        ));
    }
    Ok(classes)
}

/// Loads a whole image folder into memory as a `(N, channels, h, w)` [`Dataset`].
pub fn load_image_folder(root: &Path, channels: usize, h: usize, w: usize) -> Result<Dataset> {
    check_target(channels, h, w)?;
    let classes = scan(root)?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (k, (_, files)) in classes.iter().enumerate() {
        for f in files {
            images.extend_from_slice(&load_image(f, channels, h, w)?);
            labels.push(k);
        }
    }
    Dataset::new(
        images,
        labels,
        classes.into_iter().map(|(n, _)| n).collect(),
        [channels, h, w],
    )
}

/// The image folder as a streaming [`Dataset`]: the files are listed now (classes and order as
/// [`load_image_folder`]'s) and decoded when batches are made, in the loader's threads, so a folder larger than
/// memory trains in bounded memory.
pub fn stream_image_folder(root: &Path, channels: usize, h: usize, w: usize) -> Result<Dataset> {
    check_target(channels, h, w)?;
    let classes = scan(root)?;
    let mut files = Vec::new();
    let mut labels = Vec::new();
    for (k, (_, fs)) in classes.iter().enumerate() {
        files.extend(fs.iter().cloned());
        labels.extend(std::iter::repeat_n(k, fs.len()));
    }
    Dataset::from_files(
        files,
        labels,
        classes.into_iter().map(|(n, _)| n).collect(),
        [channels, h, w],
    )
}
