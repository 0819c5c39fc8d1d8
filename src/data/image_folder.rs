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
//!   [`NvError::Format`] naming the file, as is a corrupt image. A class folder with no image is an error.
//! * Images are converted to grayscale (`channels = 1`, PIL's `convert("L")` weights 0.299/0.587/0.114) or RGB
//!   (`channels = 3`, alpha dropped), then **resized to exactly `(h, w)`** with bilinear (triangle) filtering
//!   when their size differs; the aspect ratio is not preserved. An image already `(h, w)` is not resampled.

use super::dataset::Dataset;
use crate::{NvError, Result};
use image::{imageops::FilterType, DynamicImage, ImageFormat, ImageReader};
use ndarray::Array4;
use std::path::{Path, PathBuf};

fn format_err(path: &Path, msg: impl Into<String>) -> NvError {
    NvError::Format {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

fn check_target(channels: usize, h: usize, w: usize) -> Result<()> {
    if channels != 1 && channels != 3 {
        return Err(NvError::Config(format!(
            "images: channels must be 1 (grayscale) or 3 (RGB), got {channels}"
        )));
    }
    if h == 0 || w == 0 || h > u32::MAX as usize || w > u32::MAX as usize {
        return Err(NvError::Config(format!(
            "images: target size {h}x{w} must be positive"
        )));
    }
    Ok(())
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Decodes one PNG/JPEG file (format from content).
fn decode(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| {
        NvError::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    })?;
    let reader = ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| format_err(path, format!("cannot read image: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png) | Some(ImageFormat::Jpeg) => {}
        Some(f) => {
            return Err(format_err(
                path,
                format!("unsupported image format {f:?} (expected PNG or JPEG)"),
            ))
        }
        None => {
            return Err(format_err(
                path,
                "not a PNG or JPEG image (unrecognized content)",
            ))
        }
    }
    reader
        .decode()
        .map_err(|e| format_err(path, format!("corrupt image: {e}")))
}

/// Converts a decoded image to `channels` and size `(h, w)`, as `C * H * W` bytes (channel-major).
pub fn to_chw(img: &DynamicImage, channels: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    check_target(channels, h, w)?;
    let rgb = img.to_rgb8();
    let (h32, w32) = (h as u32, w as u32);
    if channels == 1 {
        // PIL convert("L"): L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16
        let (iw, ih) = rgb.dimensions();
        let luma: Vec<u8> = rgb
            .pixels()
            .map(|p| {
                let [r, g, b] = p.0;
                ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 0x8000) >> 16) as u8
            })
            .collect();
        let mut gray = image::GrayImage::from_raw(iw, ih, luma).expect("sizes match");
        if (iw, ih) != (w32, h32) {
            gray = image::imageops::resize(&gray, w32, h32, FilterType::Triangle);
        }
        Ok(gray.into_raw())
    } else {
        let rgb = if rgb.dimensions() != (w32, h32) {
            image::imageops::resize(&rgb, w32, h32, FilterType::Triangle)
        } else {
            rgb
        };
        let hw = h * w;
        let mut out = vec![0u8; 3 * hw];
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * hw + i] = p.0[c];
            }
        }
        Ok(out)
    }
}

/// Loads one image file as `C * H * W` bytes (see the module docs for conversion and resizing).
pub fn load_image(path: &Path, channels: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    check_target(channels, h, w)?;
    to_chw(&decode(path)?, channels, h, w)
}

/// Loads one image for `predict`: a `(1, C, H, W)` batch of `x / 255` in `[0, 1]`.
/// **Not normalized**: apply the model's saved [`super::Normalization::normalize`] before the forward pass.
pub fn load_image_for_model(
    path: &Path,
    channels: usize,
    h: usize,
    w: usize,
) -> Result<Array4<f32>> {
    let px = load_image(path, channels, h, w)?;
    let v: Vec<f32> = px.iter().map(|&p| p as f32 / 255.0).collect();
    Ok(Array4::from_shape_vec((1, channels, h, w), v).expect("sizes match"))
}

/// The class names (sorted sub-folder names) and the files of each class, sorted.
pub fn scan(root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let read_dir = |d: &Path| -> Result<Vec<PathBuf>> {
        let rd = std::fs::read_dir(d).map_err(|e| {
            NvError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", d.display()),
            ))
        })?;
        let mut v = Vec::new();
        for entry in rd {
            let p = entry?.path();
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
