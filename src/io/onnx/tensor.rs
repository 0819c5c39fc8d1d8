//! ONNX tensors (`TensorProto`) as constants: inline (`raw_data` or the typed fields) or external (a range of a
//! file beside the model, as `torch.onnx.export` writes `model.onnx.data`). Every size is checked against the
//! data before anything is allocated, and an external path that leaves the model's directory is refused.

use super::proto::TensorProto;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

/// At most this many elements in one tensor (2^31: ONNX's own 2 GiB protobuf limit for f32).
pub(crate) const MAX_ELEMENTS: u128 = 1 << 31;

/// An integer element: a known value, or the batch size, which is not known when the graph is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dim {
    K(i64),
    Batch,
}

/// Constant elements: floats (held as f64, so folding rounds once) or integers.
#[derive(Debug, Clone)]
pub(crate) enum Data {
    F(Vec<f64>),
    I(Vec<Dim>),
}

/// A constant tensor.
#[derive(Debug, Clone)]
pub(crate) struct Const {
    pub dims: Vec<usize>,
    pub data: Data,
}

impl Const {
    pub fn len(&self) -> usize {
        match &self.data {
            Data::F(v) => v.len(),
            Data::I(v) => v.len(),
        }
    }
    pub fn floats(dims: Vec<usize>, v: Vec<f64>) -> Self {
        Const {
            dims,
            data: Data::F(v),
        }
    }
    pub fn ints(dims: Vec<usize>, v: Vec<Dim>) -> Self {
        Const {
            dims,
            data: Data::I(v),
        }
    }
    /// The values as floats; the batch size has no value.
    pub fn to_f64(&self) -> Result<Vec<f64>, String> {
        match &self.data {
            Data::F(v) => Ok(v.clone()),
            Data::I(v) => v
                .iter()
                .map(|d| match d {
                    Dim::K(k) => Ok(*k as f64),
                    Dim::Batch => Err("the value depends on the batch size".to_string()),
                })
                .collect(),
        }
    }
    /// The values as integers (floats truncated, as ONNX's Cast does); the batch size stays symbolic.
    pub fn to_dims(&self) -> Vec<Dim> {
        match &self.data {
            Data::F(v) => v.iter().map(|f| Dim::K(*f as i64)).collect(),
            Data::I(v) => v.clone(),
        }
    }
    /// Known integer values, or an error when one is the batch size.
    pub fn to_i64(&self) -> Result<Vec<i64>, String> {
        self.to_dims()
            .into_iter()
            .map(|d| match d {
                Dim::K(k) => Ok(k),
                Dim::Batch => Err("the value depends on the batch size".to_string()),
            })
            .collect()
    }
    /// As an f32 array of its shape.
    pub fn to_array(&self) -> Result<ndarray::ArrayD<f32>, String> {
        let v: Vec<f32> = self.to_f64()?.into_iter().map(|x| x as f32).collect();
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&self.dims), v).map_err(|e| e.to_string())
    }
}

/// Element size and kind of the data types a CNN's constants use.
fn elem(dtype: i32) -> Option<(usize, &'static str)> {
    Some(match dtype {
        1 => (4, "float"),
        2 => (1, "uint8"),
        3 => (1, "int8"),
        6 => (4, "int32"),
        7 => (8, "int64"),
        9 => (1, "bool"),
        10 => (2, "float16"),
        11 => (8, "double"),
        16 => (2, "bfloat16"),
        _ => return None,
    })
}

fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((bits >> 10) & 0x1f) as i32;
    let frac = (bits & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

fn bf16_to_f64(bits: u16) -> f64 {
    f32::from_bits((bits as u32) << 16) as f64
}

/// Decodes `n` little-endian elements of `dtype` from `b` (whose length is checked by the caller).
fn decode_raw(b: &[u8], dtype: i32) -> Data {
    let f = |v: Vec<f64>| Data::F(v);
    let i = |v: Vec<i64>| Data::I(v.into_iter().map(Dim::K).collect());
    match dtype {
        1 => f(b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect()),
        11 => f(b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()),
        10 => f(b
            .chunks_exact(2)
            .map(|c| f16_to_f64(u16::from_le_bytes([c[0], c[1]])))
            .collect()),
        16 => f(b
            .chunks_exact(2)
            .map(|c| bf16_to_f64(u16::from_le_bytes([c[0], c[1]])))
            .collect()),
        7 => i(b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()),
        6 => i(b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect()),
        3 => i(b.iter().map(|&v| v as i8 as i64).collect()),
        _ => i(b.iter().map(|&v| v as i64).collect()), // uint8, bool
    }
}

/// Reads `t`. `dir` is the model's directory (external data is refused without one); errors are messages for
/// the caller to prefix with the file and the tensor's name.
pub(crate) fn read_tensor(t: &TensorProto, dir: Option<&Path>) -> Result<Const, String> {
    let dtype = t.data_type.unwrap_or(0);
    let (size, kind) = elem(dtype).ok_or_else(|| format!("unsupported data type {dtype}"))?;
    let mut n: u128 = 1;
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(format!("negative dimension {d} in {:?}", t.dims));
        }
        n = n.saturating_mul(d as u128);
        dims.push(d as usize);
    }
    if n > MAX_ELEMENTS {
        return Err(format!(
            "{n} elements (dims {:?}): more than {MAX_ELEMENTS}",
            t.dims
        ));
    }
    let n = n as usize;
    let bytes = n * size;
    if t.data_location == Some(1) {
        let bytes_read = read_external(t, dir, bytes)?;
        return Ok(Const {
            dims,
            data: decode_raw(&bytes_read, dtype),
        });
    }
    if let Some(raw) = &t.raw_data {
        if raw.len() != bytes {
            return Err(format!(
                "raw_data holds {} bytes, {n} {kind} elements of dims {:?} need {bytes}",
                raw.len(),
                t.dims
            ));
        }
        return Ok(Const {
            dims,
            data: decode_raw(raw, dtype),
        });
    }
    let count = |len: usize, field: &str| {
        if len == n {
            Ok(())
        } else {
            Err(format!(
                "{field} holds {len} values, dims {:?} need {n}",
                t.dims
            ))
        }
    };
    let data = match dtype {
        1 => {
            count(t.float_data.len(), "float_data")?;
            Data::F(t.float_data.iter().map(|&v| v as f64).collect())
        }
        11 => {
            count(t.double_data.len(), "double_data")?;
            Data::F(t.double_data.clone())
        }
        10 | 16 => {
            count(t.int32_data.len(), "int32_data")?;
            let conv = if dtype == 10 { f16_to_f64 } else { bf16_to_f64 };
            Data::F(t.int32_data.iter().map(|&v| conv(v as u16)).collect())
        }
        7 => {
            count(t.int64_data.len(), "int64_data")?;
            Data::I(t.int64_data.iter().map(|&v| Dim::K(v)).collect())
        }
        _ => {
            count(t.int32_data.len(), "int32_data")?;
            Data::I(t.int32_data.iter().map(|&v| Dim::K(v as i64)).collect())
        }
    };
    Ok(Const { dims, data })
}

/// The `bytes` bytes of an external tensor, after checking its location (relative, inside `dir`), offset
/// and length against the file.
fn read_external(t: &TensorProto, dir: Option<&Path>, bytes: usize) -> Result<Vec<u8>, String> {
    let dir = dir.ok_or("external data, but the model was not read from a file")?;
    let (mut loc, mut offset, mut length) = (None, 0u64, None);
    for kv in &t.external_data {
        let v = kv.value.as_deref().unwrap_or("");
        let num = |what: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("external data {what} {v:?} is not a non-negative integer"))
        };
        match kv.key.as_deref().unwrap_or("") {
            "location" => loc = Some(v.to_string()),
            "offset" => offset = num("offset")?,
            "length" => length = Some(num("length")?),
            _ => {}
        }
    }
    let loc = loc.ok_or("external data without a location")?;
    let rel = Path::new(&loc);
    if loc.is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "external data location {loc:?} leaves the model's directory (only plain relative paths are read)"
        ));
    }
    let file = dir.join(rel);
    // a symbolic link may still point outside: compare canonical paths
    let (canon_dir, canon_file) = (
        dir.canonicalize()
            .map_err(|e| format!("{}: {e}", dir.display()))?,
        file.canonicalize()
            .map_err(|e| format!("external data {}: {e}", file.display()))?,
    );
    if !canon_file.starts_with(&canon_dir) {
        return Err(format!(
            "external data location {loc:?} resolves to {}, outside the model's directory",
            canon_file.display()
        ));
    }
    if let Some(l) = length {
        if l != bytes as u64 {
            return Err(format!(
                "external data length {l}, the tensor's dims need {bytes} bytes"
            ));
        }
    }
    let mut f = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("{}: {e}", file.display()))?
        .len();
    if offset
        .checked_add(bytes as u64)
        .is_none_or(|end| end > size)
    {
        return Err(format!(
            "external data {}: bytes {offset}..{} are past its end ({size} bytes)",
            file.display(),
            offset as u128 + bytes as u128
        ));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let mut buf = vec![0u8; bytes];
    f.read_exact(&mut buf)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_decode() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert!(f16_to_f64(0x7c00).is_infinite());
        assert_eq!(bf16_to_f64(0x3f80), 1.0);
    }

    #[test]
    fn sizes_are_checked_before_allocating() {
        let t = TensorProto {
            dims: vec![1 << 40, 1 << 40],
            data_type: Some(1),
            ..Default::default()
        };
        assert!(read_tensor(&t, None).unwrap_err().contains("elements"));
        let t = TensorProto {
            dims: vec![3],
            data_type: Some(1),
            raw_data: Some(vec![0; 8]),
            ..Default::default()
        };
        assert!(read_tensor(&t, None)
            .unwrap_err()
            .contains("raw_data holds 8 bytes"));
    }
}
