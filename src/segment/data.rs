//! Segmentation data: images with a class per pixel, from garment scenes drawn on the fly
//! ([`SegSource::scenes`], nothing stored) or from a user's folders ([`SegSource::folder`]: `--images DIR
//! --masks DIR`, Pascal-VOC-style PNG masks, any size).
//!
//! A mask is a PNG whose pixel values are class ids: indexed colour (VOC: the palette index is the class, the
//! palette only colours it) or 8-bit grayscale. 255 is ignored. The mask of `images/NAME.ext` is
//! `masks/NAME.png`. Everything is checked when the folder is read, so training never meets a bad file: a
//! missing mask, a mask whose size differs from its image, an RGB mask, and (once the class count is known,
//! [`SegSource::check_labels`]) a label outside the classes that is not 255, each named by file.

use crate::data::decode::{decode_bytes, to_chw};
use crate::data::scenes::{SceneGenerator, IGNORE};
use crate::{NvError, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// One image (`channels × height × width` bytes, channel-major) and its mask (`height × width` class ids, 255
/// ignored).
#[derive(Debug, Clone, PartialEq)]
pub struct SegSample {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub image: Vec<u8>,
    pub mask: Vec<u8>,
}

/// Where segmentation samples come from.
pub enum SegSource {
    /// Scenes `first..first + count` of a generator, drawn when asked for.
    Scenes {
        gen: SceneGenerator,
        first: u64,
        count: usize,
    },
    /// Samples read from disk, with their image files' names.
    Folder {
        samples: Vec<SegSample>,
        names: Vec<PathBuf>,
    },
}

fn format_err(path: &Path, msg: impl Into<String>) -> NvError {
    NvError::Format {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// Image files of a folder (PNG or JPEG by extension), sorted by name.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| NvError::io(dir, "read directory", e))?;
    let mut files = vec![];
    for e in rd {
        let p = e.map_err(|e| NvError::io(dir, "read directory", e))?.path();
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if p.is_file() && matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// A decoded mask: height, width and the class ids.
pub type Mask = (usize, usize, Vec<u8>);

/// Decodes a mask PNG into class ids: indexed colour (palette indices, any bit depth) or 8-bit grayscale.
pub fn read_mask(path: &Path) -> Result<Mask> {
    let bytes = std::fs::read(path).map_err(|e| NvError::io(path, "read", e))?;
    let mut dec = png::Decoder::new(std::io::Cursor::new(&bytes));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec
        .read_info()
        .map_err(|e| format_err(path, format!("not a readable PNG mask: {e}")))?;
    let info = reader.info();
    let (w, h) = (info.width as usize, info.height as usize);
    let (color, depth) = (info.color_type, info.bit_depth);
    if w == 0 || h == 0 || w > 8192 || h > 8192 {
        return Err(format_err(
            path,
            format!("mask of {w}x{h}: each side must be in 1..=8192"),
        ));
    }
    let bits = match (color, depth) {
        (png::ColorType::Indexed, d) => d as usize,
        (png::ColorType::Grayscale, png::BitDepth::Eight) => 8,
        (c, d) => {
            return Err(format_err(
                path,
                format!(
                    "a mask holds class ids as palette indices (indexed PNG, as Pascal VOC) or 8-bit gray \
                     values; this one is {c:?} at {d:?} bits (a colour rendering of a mask is not a mask)"
                ),
            ))
        }
    };
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| format_err(path, "mask too large"))?;
    let mut buf = vec![0u8; size];
    let out = reader
        .next_frame(&mut buf)
        .map_err(|e| format_err(path, format!("corrupt PNG mask: {e}")))?;
    let stride = out.line_size;
    let mut ids = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * stride..(y + 1) * stride];
        if bits == 8 {
            ids.extend_from_slice(&row[..w]);
        } else {
            let per = 8 / bits;
            let maskv = (1u8 << bits) - 1;
            for x in 0..w {
                let byte = row[x / per];
                let shift = 8 - bits * (x % per + 1);
                ids.push((byte >> shift) & maskv);
            }
        }
    }
    Ok((h, w, ids))
}

impl SegSource {
    /// Scenes `first..first + count` of `gen`.
    pub fn scenes(gen: SceneGenerator, first: u64, count: usize) -> Result<Self> {
        if count == 0 {
            return Err(NvError::Config("segmentation: no scenes asked for".into()));
        }
        Ok(SegSource::Scenes { gen, first, count })
    }

    /// Every image of `images` with its mask in `masks`, as `channels` (1 or 3; `None`: 1 when every image
    /// is grayscale, else 3), the first `limit` only when given. The errors name the file.
    pub fn folder(
        images: &Path,
        masks: &Path,
        channels: Option<usize>,
        limit: Option<usize>,
    ) -> Result<Self> {
        let mut files = image_files(images)?;
        if files.is_empty() {
            return Err(format_err(
                images,
                "no PNG or JPEG images in this directory",
            ));
        }
        if let Some(l) = limit {
            files.truncate(l.max(1));
        }
        let missing: Vec<String> = files
            .iter()
            .filter_map(|f| {
                let m = mask_path(masks, f);
                (!m.is_file()).then(|| m.display().to_string())
            })
            .collect();
        if !missing.is_empty() {
            return Err(format_err(
                masks,
                format!(
                    "{} of {} images have no mask here (the mask of images/NAME.ext is masks/NAME.png); missing: {}{}",
                    missing.len(),
                    files.len(),
                    missing[..missing.len().min(5)].join(", "),
                    if missing.len() > 5 { ", ..." } else { "" }
                ),
            ));
        }
        let decoded: Vec<(image::DynamicImage, Mask)> = files
            .par_iter()
            .map(|f| {
                let bytes = std::fs::read(f).map_err(|e| NvError::io(f, "read", e))?;
                let img = decode_bytes(&bytes, f)?;
                let m = mask_path(masks, f);
                let mask = read_mask(&m)?;
                let (mh, mw, _) = &mask;
                if (img.height() as usize, img.width() as usize) != (*mh, *mw) {
                    return Err(format_err(
                        &m,
                        format!(
                            "the mask is {mw}x{mh} but its image {} is {}x{}",
                            f.display(),
                            img.width(),
                            img.height()
                        ),
                    ));
                }
                Ok((img, mask))
            })
            .collect::<Result<_>>()?;
        let channels = match channels {
            Some(c) if c == 1 || c == 3 => c,
            Some(c) => {
                return Err(NvError::Config(format!(
                    "segmentation: --channels must be 1 or 3, got {c}"
                )))
            }
            None => {
                let gray = decoded.iter().all(|(i, _)| {
                    matches!(
                        i.color(),
                        image::ColorType::L8 | image::ColorType::L16 | image::ColorType::La8
                    )
                });
                if gray {
                    1
                } else {
                    3
                }
            }
        };
        let samples = decoded
            .into_iter()
            .zip(&files)
            .map(|((img, (h, w, mask)), f)| {
                let image = to_chw(&img, channels, h, w).map_err(|e| match e {
                    NvError::Config(m) => format_err(f, m),
                    e => e,
                })?;
                Ok(SegSample {
                    channels,
                    height: h,
                    width: w,
                    image,
                    mask,
                })
            })
            .collect::<Result<_>>()?;
        Ok(SegSource::Folder {
            samples,
            names: files,
        })
    }

    pub fn len(&self) -> usize {
        match self {
            SegSource::Scenes { count, .. } => *count,
            SegSource::Folder { samples, .. } => samples.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Channels of every image.
    pub fn channels(&self) -> usize {
        match self {
            SegSource::Scenes { .. } => 1,
            SegSource::Folder { samples, .. } => samples[0].channels,
        }
    }

    /// Sample `i`: drawn (scenes) or borrowed (folders; no copy per batch).
    pub fn sample(&self, i: usize) -> Result<Cow<'_, SegSample>> {
        match self {
            SegSource::Scenes { gen, first, .. } => {
                let s = gen.scene(first + i as u64)?;
                Ok(Cow::Owned(SegSample {
                    channels: 1,
                    height: s.size,
                    width: s.size,
                    image: s.image,
                    mask: s.mask,
                }))
            }
            SegSource::Folder { samples, .. } => Ok(Cow::Borrowed(&samples[i])),
        }
    }

    /// (height, width) of sample `i`, without drawing it.
    pub fn size(&self, i: usize) -> (usize, usize) {
        match self {
            SegSource::Scenes { gen, .. } => (gen.size(), gen.size()),
            SegSource::Folder { samples, .. } => (samples[i].height, samples[i].width),
        }
    }

    /// A short fingerprint of the samples (data-parallel ranks must agree on it): the count, and the
    /// generator's seed and size, or FNV-1a of the folder's pixels and masks.
    pub fn describe(&self) -> serde_json::Value {
        match self {
            SegSource::Scenes { gen, first, count } => serde_json::json!({"scenes": count,
                "first": first, "seed": gen.seed(), "size": gen.size()}),
            SegSource::Folder { samples, .. } => {
                let h = crate::rng::fnv1a(
                    samples
                        .iter()
                        .flat_map(|s| s.image.iter().chain(&s.mask).copied()),
                );
                serde_json::json!({"images": samples.len(), "fnv1a": format!("{h:016x}")})
            }
        }
    }

    /// What sample `i` is called in messages.
    pub fn name(&self, i: usize) -> String {
        match self {
            SegSource::Scenes { gen, first, .. } => {
                format!("scene {} of seed {}", first + i as u64, gen.seed())
            }
            SegSource::Folder { names, .. } => names[i].display().to_string(),
        }
    }

    /// The largest class id in the masks, 255 apart (scenes: 10, their last garment class).
    pub fn max_label(&self) -> u8 {
        match self {
            SegSource::Scenes { gen, .. } => gen.classes().len() as u8,
            SegSource::Folder { samples, .. } => samples
                .iter()
                .flat_map(|s| s.mask.iter().copied().filter(|&v| v != IGNORE))
                .max()
                .unwrap_or(0),
        }
    }

    /// Errors when a mask holds a label that is neither a class of `0..classes` nor 255, naming the file,
    /// the pixel and the value.
    pub fn check_labels(&self, classes: usize, masks: Option<&Path>) -> Result<()> {
        let SegSource::Folder { samples, names } = self else {
            return Ok(());
        };
        for (s, f) in samples.iter().zip(names) {
            if let Some(p) = s
                .mask
                .iter()
                .position(|&v| v != IGNORE && v as usize >= classes)
            {
                let path = masks.map_or_else(|| f.clone(), |m| mask_path(m, f));
                return Err(format_err(
                    &path,
                    format!(
                        "label {} at pixel (x {}, y {}) is outside the {classes} classes 0..={} and is not \
                         the ignore value 255",
                        s.mask[p],
                        p % s.width,
                        p / s.width,
                        classes - 1
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The mask file of image `image` in `masks`: the same stem, `.png`.
pub fn mask_path(masks: &Path, image: &Path) -> PathBuf {
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    masks.join(format!("{stem}.png"))
}
