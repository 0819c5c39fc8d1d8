//! IDX files (the MNIST / Fashion-MNIST container format), read with full validation, and a writer for tests.
//!
//! Layout (all integers big-endian):
//!
//! | bytes | meaning |
//! |---|---|
//! | 0, 1 | `0x00 0x00` |
//! | 2 | element type: `0x08` u8, `0x09` i8, `0x0B` i16, `0x0C` i32, `0x0D` f32, `0x0E` f64 |
//! | 3 | number of dimensions (≥ 1) |
//! | 4 .. 4+4·ndim | each dimension size as a big-endian u32 |
//! | then | the elements, row-major, big-endian, exactly `prod(dims)` of them |
//!
//! A file starting with the gzip magic `1f 8b` is decompressed first (whatever its name), otherwise read raw.
//! Every departure from the layout is an [`NvError::Format`] naming the file: wrong magic, unknown type,
//! zero dimensions, a truncated file (expected vs found byte counts), trailing bytes after the data.

use crate::{NvError, Result};
use flate2::read::MultiGzDecoder;
use ndarray::Array3;
use std::io::{Read, Write};
use std::path::Path;

/// The element type code of an IDX file (byte 2 of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdxType {
    U8,
    I8,
    I16,
    I32,
    F32,
    F64,
}

impl IdxType {
    /// Parses the type byte.
    pub fn from_code(code: u8) -> Option<IdxType> {
        Some(match code {
            0x08 => IdxType::U8,
            0x09 => IdxType::I8,
            0x0B => IdxType::I16,
            0x0C => IdxType::I32,
            0x0D => IdxType::F32,
            0x0E => IdxType::F64,
            _ => return None,
        })
    }
    /// The type byte.
    pub fn code(self) -> u8 {
        match self {
            IdxType::U8 => 0x08,
            IdxType::I8 => 0x09,
            IdxType::I16 => 0x0B,
            IdxType::I32 => 0x0C,
            IdxType::F32 => 0x0D,
            IdxType::F64 => 0x0E,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            IdxType::U8 | IdxType::I8 => 1,
            IdxType::I16 => 2,
            IdxType::I32 | IdxType::F32 => 4,
            IdxType::F64 => 8,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            IdxType::U8 => "u8",
            IdxType::I8 => "i8",
            IdxType::I16 => "i16",
            IdxType::I32 => "i32",
            IdxType::F32 => "f32",
            IdxType::F64 => "f64",
        }
    }
}

/// The elements of an IDX file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum IdxData {
    U8(Vec<u8>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl IdxData {
    pub fn idx_type(&self) -> IdxType {
        match self {
            IdxData::U8(_) => IdxType::U8,
            IdxData::I8(_) => IdxType::I8,
            IdxData::I16(_) => IdxType::I16,
            IdxData::I32(_) => IdxType::I32,
            IdxData::F32(_) => IdxType::F32,
            IdxData::F64(_) => IdxType::F64,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            IdxData::U8(v) => v.len(),
            IdxData::I8(v) => v.len(),
            IdxData::I16(v) => v.len(),
            IdxData::I32(v) => v.len(),
            IdxData::F32(v) => v.len(),
            IdxData::F64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parsed IDX file: its dimension sizes and its elements.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: IdxData,
}

impl IdxArray {
    /// Builds an array, checking that `prod(dims)` equals the number of elements.
    pub fn new(dims: Vec<usize>, data: IdxData) -> Result<IdxArray> {
        let n: usize = dims.iter().product();
        if dims.is_empty() || n != data.len() {
            return Err(NvError::Config(format!(
                "IDX array: dims {dims:?} hold {n} elements but {} were given",
                data.len()
            )));
        }
        Ok(IdxArray { dims, data })
    }
}

fn format_err(path: &str, msg: impl Into<String>) -> NvError {
    NvError::Format {
        path: path.to_string(),
        msg: msg.into(),
    }
}

/// Deflate inflates at most 1032:1; a gzip file whose IDX header promises more than this many bytes per
/// compressed byte lies, and is refused before anything is inflated or allocated.
const MAX_GZIP_RATIO: u64 = 1100;

/// The total size (header + data) an IDX header promises, when `head` holds a well-formed header.
fn promised_size(head: &[u8]) -> Option<u64> {
    if head.len() < 4 || head[0] != 0 || head[1] != 0 {
        return None;
    }
    let ty = IdxType::from_code(head[2])?;
    let ndim = head[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || head.len() < header {
        return None;
    }
    (0..ndim)
        .map(|i| u32::from_be_bytes(head[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as u64)
        .try_fold(ty.size() as u64, |acc, d| acc.checked_mul(d))?
        .checked_add(header as u64)
}

/// Reads a file fully, gunzipping it when it starts with `1f 8b`. A gzip stream is inflated only up to the
/// size its IDX header promises (one byte more, so that [`parse_idx`] reports trailing data): a gzip bomb
/// costs no more memory than the file it claims to be, and a header that claims more than the compressed
/// file can hold is refused before any allocation.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(crate::error::io_at(path, "read"))?;
    inflate_idx(raw, &path.display().to_string())
}

/// [`read_maybe_gz`] on bytes already read: gunzips them (bounded by the IDX header's promise) when they start
/// with `1f 8b`, else returns them. `name` is used in error messages.
pub fn inflate_idx(raw: Vec<u8>, name: &str) -> Result<Vec<u8>> {
    let name = name.to_string();
    if raw.len() < 2 || raw[0] != 0x1f || raw[1] != 0x8b {
        return Ok(raw);
    }
    let gz_err = |e: std::io::Error| format_err(&name, format!("corrupt gzip stream: {e}"));
    let mut dec = MultiGzDecoder::new(raw.as_slice());
    let mut out = Vec::new();
    (&mut dec).take(4).read_to_end(&mut out).map_err(gz_err)?;
    if out.len() == 4 && out[0] == 0 && out[1] == 0 {
        (&mut dec)
            .take(4 * out[3] as u64)
            .read_to_end(&mut out)
            .map_err(gz_err)?;
    }
    // A malformed header: parse_idx says what is wrong with it.
    let Some(total) = promised_size(&out) else {
        return Ok(out);
    };
    let plausible = (raw.len() as u64).saturating_mul(MAX_GZIP_RATIO);
    if total > plausible {
        return Err(format_err(
            &name,
            format!(
                "the IDX header promises {total} bytes, more than a {}-byte gzip file can inflate to \
                 (deflate's ratio is at most 1032:1); refused before inflating",
                raw.len()
            ),
        ));
    }
    out.reserve_exact(total as usize + 1 - out.len());
    (&mut dec)
        .take(total + 1 - out.len() as u64)
        .read_to_end(&mut out)
        .map_err(gz_err)?;
    Ok(out)
}

/// Parses IDX bytes (already decompressed). `name` is used in error messages.
pub fn parse_idx(bytes: &[u8], name: &str) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return Err(format_err(
            name,
            format!(
                "not an IDX file: expected a 4-byte header (00 00 type ndim), found only {} bytes",
                bytes.len()
            ),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format_err(
            name,
            format!(
                "not an IDX file: bad magic {:02x} {:02x} {:02x} {:02x} (expected 00 00 <type> <ndim>)",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    let ty = IdxType::from_code(bytes[2]).ok_or_else(|| {
        format_err(
            name,
            format!(
                "unsupported IDX element type 0x{:02x} (expected 0x08 u8, 0x09 i8, 0x0b i16, 0x0c i32, 0x0d f32 or 0x0e f64)",
                bytes[2]
            ),
        )
    })?;
    let ndim = bytes[3] as usize;
    if ndim == 0 {
        return Err(format_err(name, "bad IDX header: 0 dimensions"));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(format_err(
            name,
            format!(
                "truncated IDX header: {ndim} dimensions need {header} header bytes, found {} bytes",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(ty.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format_err(name, format!("bad IDX dims {dims:?}: size overflows")))?;
    let found = bytes.len() - header;
    if found < expected {
        return Err(format_err(
            name,
            format!(
                "truncated IDX file: dims {dims:?} of {} need {expected} data bytes ({} in all), found {found} data bytes ({} in all)",
                ty.name(),
                expected + header,
                bytes.len()
            ),
        ));
    }
    if found > expected {
        return Err(format_err(
            name,
            format!(
                "{} trailing bytes after the IDX data: dims {dims:?} of {} need {expected} data bytes, found {found}",
                found - expected,
                ty.name()
            ),
        ));
    }
    let body = &bytes[header..];
    let data = match ty {
        IdxType::U8 => IdxData::U8(body.to_vec()),
        IdxType::I8 => IdxData::I8(body.iter().map(|&b| b as i8).collect()),
        IdxType::I16 => IdxData::I16(
            body.chunks_exact(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]))
                .collect(),
        ),
        IdxType::I32 => IdxData::I32(
            body.chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        IdxType::F32 => IdxData::F32(
            body.chunks_exact(4)
                .map(|c| f32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        IdxType::F64 => IdxData::F64(
            body.chunks_exact(8)
                .map(|c| f64::from_be_bytes(c.try_into().unwrap()))
                .collect(),
        ),
    };
    Ok(IdxArray { dims, data })
}

/// Reads and validates an IDX file, gzipped or raw.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = read_maybe_gz(path)?;
    parse_idx(&bytes, &path.display().to_string())
}

/// Encodes an array as IDX bytes (uncompressed).
pub fn encode_idx(a: &IdxArray) -> Result<Vec<u8>> {
    if a.dims.is_empty() || a.dims.len() > 255 {
        return Err(NvError::Config(format!(
            "IDX: cannot write {} dimensions (1..=255)",
            a.dims.len()
        )));
    }
    let ty = a.data.idx_type();
    let mut out = Vec::with_capacity(4 + 4 * a.dims.len() + a.data.len() * ty.size());
    out.extend_from_slice(&[0, 0, ty.code(), a.dims.len() as u8]);
    for &d in &a.dims {
        let d = u32::try_from(d)
            .map_err(|_| NvError::Config(format!("IDX: dimension {d} exceeds u32")))?;
        out.extend_from_slice(&d.to_be_bytes());
    }
    match &a.data {
        IdxData::U8(v) => out.extend_from_slice(v),
        IdxData::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        IdxData::I16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
        IdxData::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
        IdxData::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
        IdxData::F64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
    }
    Ok(out)
}

/// Writes an IDX file, gzipped when `gzip` is true (used by tests and tools).
pub fn write_idx(path: &Path, a: &IdxArray, gzip: bool) -> Result<()> {
    let bytes = encode_idx(a)?;
    let err = crate::error::io_at(path, "write");
    let f = std::fs::File::create(path).map_err(crate::error::io_at(path, "create"))?;
    let mut w = std::io::BufWriter::new(f);
    let written = if gzip {
        let mut enc = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
        enc.write_all(&bytes)
            .and_then(|_| enc.finish())
            .and_then(|mut w| w.flush())
    } else {
        w.write_all(&bytes).and_then(|_| w.flush())
    };
    written.map_err(err)
}

/// Loads an image file: a u8 IDX file with 3 dims (N, H, W), H and W positive.
pub fn load_images(path: &Path) -> Result<Array3<u8>> {
    let name = path.display().to_string();
    let a = read_idx(path)?;
    if a.dims.len() != 3 {
        return Err(format_err(
            &name,
            format!(
                "expected an image file with 3 dimensions (N, H, W), found {} dimensions {:?}",
                a.dims.len(),
                a.dims
            ),
        ));
    }
    if a.dims[1] == 0 || a.dims[2] == 0 {
        return Err(format_err(
            &name,
            format!(
                "bad image dims {:?}: height and width must be positive",
                a.dims
            ),
        ));
    }
    let (n, h, w) = (a.dims[0], a.dims[1], a.dims[2]);
    match a.data {
        IdxData::U8(v) => Ok(Array3::from_shape_vec((n, h, w), v).expect("length validated")),
        other => Err(format_err(
            &name,
            format!(
                "expected u8 (type 0x08) pixels, found {}",
                other.idx_type().name()
            ),
        )),
    }
}

/// Loads a label file: a u8 IDX file with 1 dim (N). With `num_classes`, every label must be below it.
pub fn load_labels(path: &Path, num_classes: Option<usize>) -> Result<Vec<u8>> {
    let name = path.display().to_string();
    let a = read_idx(path)?;
    if a.dims.len() != 1 {
        return Err(format_err(
            &name,
            format!(
                "expected a label file with 1 dimension (N), found {} dimensions {:?}",
                a.dims.len(),
                a.dims
            ),
        ));
    }
    let labels = match a.data {
        IdxData::U8(v) => v,
        other => {
            return Err(format_err(
                &name,
                format!(
                    "expected u8 (type 0x08) labels, found {}",
                    other.idx_type().name()
                ),
            ))
        }
    };
    if let Some(k) = num_classes {
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
            return Err(format_err(
                &name,
                format!("label {l} at index {i} is out of range: expected labels in 0..{k}"),
            ));
        }
    }
    Ok(labels)
}

/// Loads an (images, labels) pair and checks that their counts match.
pub fn load_pair(
    images: &Path,
    labels: &Path,
    num_classes: Option<usize>,
) -> Result<(Array3<u8>, Vec<u8>)> {
    let x = load_images(images)?;
    let y = load_labels(labels, num_classes)?;
    if x.shape()[0] != y.len() {
        return Err(format_err(
            &labels.display().to_string(),
            format!(
                "label count mismatch: {} holds {} images but this file holds {} labels",
                images.display(),
                x.shape()[0],
                y.len()
            ),
        ));
    }
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        let e = r.unwrap_err();
        assert!(
            matches!(e, NvError::Format { .. }),
            "expected Format, got {e:?}"
        );
        e.to_string()
    }

    #[test]
    fn round_trip_all_types() {
        let dir = tempfile::tempdir().unwrap();
        let arrays = [
            IdxArray::new(vec![2, 3], IdxData::U8(vec![0, 1, 2, 253, 254, 255])).unwrap(),
            IdxArray::new(vec![4], IdxData::I8(vec![-128, -1, 0, 127])).unwrap(),
            IdxArray::new(vec![2, 1, 2], IdxData::I16(vec![-32768, -2, 3, 32767])).unwrap(),
            IdxArray::new(vec![3], IdxData::I32(vec![i32::MIN, 7, i32::MAX])).unwrap(),
            IdxArray::new(vec![1, 2], IdxData::F32(vec![-1.5, 3.25e7])).unwrap(),
            IdxArray::new(vec![2], IdxData::F64(vec![std::f64::consts::PI, -0.0])).unwrap(),
        ];
        for (i, a) in arrays.iter().enumerate() {
            for gz in [false, true] {
                let p = dir.path().join(format!("a{i}_{gz}.idx"));
                write_idx(&p, a, gz).unwrap();
                let raw = std::fs::read(&p).unwrap();
                assert_eq!(raw[0] == 0x1f && raw[1] == 0x8b, gz);
                assert_eq!(&read_idx(&p).unwrap(), a);
            }
        }
    }

    #[test]
    fn header_errors() {
        assert!(msg(parse_idx(&[0, 0], "f")).contains("4-byte header"));
        let m = msg(parse_idx(&[1, 0, 8, 1, 0, 0, 0, 0], "f.idx"));
        assert!(m.contains("f.idx") && m.contains("bad magic"), "{m}");
        let m = msg(parse_idx(&[0, 0, 0x0a, 1, 0, 0, 0, 0], "f"));
        assert!(m.contains("unsupported IDX element type 0x0a"), "{m}");
        assert!(msg(parse_idx(&[0, 0, 8, 0], "f")).contains("0 dimensions"));
        let m = msg(parse_idx(&[0, 0, 8, 3, 0, 0, 0, 1, 0, 0], "f"));
        assert!(m.contains("truncated IDX header"), "{m}");
        // 2^32-1 cubed elements of f64 overflows usize arithmetic
        let mut b = vec![0, 0, 0x0e, 3];
        for _ in 0..3 {
            b.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        assert!(msg(parse_idx(&b, "f")).contains("overflows"));
    }

    #[test]
    fn length_errors() {
        let a = IdxArray::new(vec![2, 2, 2], IdxData::U8(vec![7; 8])).unwrap();
        let mut b = encode_idx(&a).unwrap();
        b.pop();
        let m = msg(parse_idx(&b, "imgs"));
        assert!(m.starts_with("imgs: truncated IDX file"), "{m}");
        assert!(
            m.contains("need 8 data bytes") && m.contains("found 7 data bytes"),
            "{m}"
        );
        b.extend_from_slice(&[1, 2, 3]);
        let m = msg(parse_idx(&b, "imgs"));
        assert!(m.contains("2 trailing bytes"), "{m}");
    }
}
