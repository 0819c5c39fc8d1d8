//! Decoding one image file (PNG or JPEG, the format from the content) into `C * H * W` bytes: converted to
//! grayscale (`channels = 1`, PIL's `convert("L")` weights 0.299/0.587/0.114) or RGB (`channels = 3`, alpha
//! dropped), then **resized to exactly `(h, w)`** with bilinear (triangle) filtering when its size differs (the
//! aspect ratio is not preserved; an image already `(h, w)` is not resampled). A header that claims more than
//! [`MAX_DECODE_SIDE`] pixels a side or [`MAX_DECODE_BYTES`] of pixels is refused before anything is allocated.

use crate::{NvError, Result};
use image::{imageops::FilterType, DynamicImage, ImageFormat, ImageReader};
use ndarray::Array4;
use std::path::Path;

pub(super) fn format_err(path: &Path, msg: impl Into<String>) -> NvError {
    NvError::Format {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

pub(super) fn check_target(channels: usize, h: usize, w: usize) -> Result<()> {
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

/// Largest image side decoded (PNG and JPEG headers can claim up to 2^31 and 65535): a header that claims more
/// is refused before its pixels are allocated.
pub const MAX_DECODE_SIDE: u32 = 8192;
/// Most bytes a decoder may allocate for one image.
pub const MAX_DECODE_BYTES: u64 = 256 << 20;

/// Decodes one PNG/JPEG file (format from content).
/// Reads and decodes one PNG/JPEG file ([`decode_bytes`]: size limits, decoder panics contained).
pub fn decode_file(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(crate::error::io_at(path, "read"))?;
    decode_bytes(&bytes, path)
}

/// Decodes PNG/JPEG bytes (format from content) within [`MAX_DECODE_SIDE`] and [`MAX_DECODE_BYTES`]; `path`
/// names the source in errors.
pub fn decode_bytes(bytes: &[u8], path: &Path) -> Result<DynamicImage> {
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format_err(path, format!("cannot read image: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODE_SIDE);
    limits.max_image_height = Some(MAX_DECODE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
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
    // The JPEG decoder (zune-jpeg 0.5) panics on some malformed files instead of returning an error (found by
    // fuzzing, docs/RELIABILITY.md; known upstream, etemesi254/zune-image#236 and #281): such a file is a
    // corrupt image like any other, so the panic is contained here.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.decode())) {
        Ok(r) => r.map_err(|e| format_err(path, format!("corrupt image: {e}"))),
        Err(p) => {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(format_err(
                path,
                format!("corrupt image: the decoder failed on it ({why})"),
            ))
        }
    }
}

/// Whether a panic was raised inside the image decoders, whose panics [`decode_bytes`] turns into errors (a
/// panic hook can stay quiet about those).
pub fn is_decoder_panic(info: &std::panic::PanicHookInfo<'_>) -> bool {
    info.location()
        .is_some_and(|l| l.file().contains("/zune-jpeg-") || l.file().contains("/png-"))
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
    to_chw(&decode_file(path)?, channels, h, w)
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
