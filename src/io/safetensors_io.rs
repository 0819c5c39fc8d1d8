//! State dicts as safetensors files, readable by `safetensors.torch.load_file` and `model.load_state_dict` in
//! PyTorch: float tensors as F32, `num_batches_tracked` as I64, names as in PyTorch (`features.0.weight`).
//! Reading also takes F64, F16 and BF16 tensors (converted to f32, exactly for the half types).
//! String metadata (config, step, ...) goes into the safetensors `__metadata__` map.
//! A truncated or corrupt file is a [`NvError::Format`] naming the file.

use crate::state::{StateDict, StateTensor};
use crate::{NvError, Result};
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Serialises a state dict (plus string metadata) to safetensors bytes.
pub fn state_dict_to_bytes(sd: &StateDict, metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(sd.tensors.len());
    for (name, t) in &sd.tensors {
        match t {
            StateTensor::F32(a) => {
                let bytes: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
                bufs.push((name.clone(), Dtype::F32, a.shape().to_vec(), bytes));
            }
            StateTensor::I64(a) => {
                let bytes: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
                bufs.push((name.clone(), Dtype::I64, a.shape().to_vec(), bytes));
            }
        }
    }
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| NvError::State(format!("{n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let md = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    safetensors::serialize(views, &md).map_err(|e| NvError::State(e.to_string()))
}

/// Parses safetensors bytes into a state dict and its metadata. `origin` names the source in errors.
pub fn state_dict_from_bytes(
    bytes: &[u8],
    origin: &str,
) -> Result<(StateDict, HashMap<String, String>)> {
    let fmt = |msg: String| NvError::Format {
        path: origin.to_string(),
        msg,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| fmt(format!("not a valid safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| fmt(format!("not a valid safetensors file: {e}")))?;
    let mut sd = StateDict::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let t = match view.dtype() {
            Dtype::F32 => StateTensor::F32(
                ArrayD::from_shape_vec(
                    IxDyn(&shape),
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
                .map_err(|e| fmt(format!("{name}: {e}")))?,
            ),
            Dtype::F64 => StateTensor::F32(
                ArrayD::from_shape_vec(
                    IxDyn(&shape),
                    data.chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                        .collect(),
                )
                .map_err(|e| fmt(format!("{name}: {e}")))?,
            ),
            Dtype::F16 | Dtype::BF16 => {
                let half: fn(u16) -> f32 = if view.dtype() == Dtype::F16 {
                    f16_to_f32
                } else {
                    |b| f32::from_bits((b as u32) << 16)
                };
                StateTensor::F32(
                    ArrayD::from_shape_vec(
                        IxDyn(&shape),
                        data.chunks_exact(2)
                            .map(|c| half(u16::from_le_bytes([c[0], c[1]])))
                            .collect(),
                    )
                    .map_err(|e| fmt(format!("{name}: {e}")))?,
                )
            }
            Dtype::I64 => StateTensor::I64(
                ArrayD::from_shape_vec(
                    IxDyn(&shape),
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                )
                .map_err(|e| fmt(format!("{name}: {e}")))?,
            ),
            d => {
                return Err(fmt(format!(
                    "{name}: unsupported dtype {d:?} (expected F32, F64, F16, BF16 or I64)"
                )))
            }
        };
        sd.tensors.insert(name.to_string(), t);
    }
    Ok((sd, metadata))
}

/// IEEE half precision to f32, exactly (subnormals, infinities and NaN included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    match exp {
        0 => sign * man as f32 * (1.0 / 16_777_216.0), // man · 2^-24
        31 => f32::from_bits(((h as u32 & 0x8000) << 16) | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(((h as u32 & 0x8000) << 16) | ((exp + 112) << 23) | (man << 13)),
    }
}

/// Writes a state dict atomically.
pub fn save_state_dict(
    path: &Path,
    sd: &StateDict,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    crate::io::write_atomic(path, &state_dict_to_bytes(sd, metadata)?)
}

/// Reads a state dict and its metadata.
pub fn load_state_dict(path: &Path) -> Result<(StateDict, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(crate::error::io_at(path, "read"))?;
    state_dict_from_bytes(&bytes, &path.display().to_string())
}
