//! PyTorch state dicts in and out: the safetensors files `safetensors.torch.save_file(model.state_dict(), f)`
//! writes and `model.load_state_dict(safetensors.torch.load_file(f))` reads, for a model whose architecture the
//! caller builds (the PyTorch twins of the zoo: `tools/gen_zoo_twins.py`).
//!
//! Loading is strict by default, as `load_state_dict(strict=True)`: a missing or unexpected key, a wrong shape
//! or a wrong dtype is an error naming the key. A missing `num_batches_tracked` is filled with 0, as PyTorch does
//! for state dicts without version metadata (every safetensors file). F16, BF16 and F64 tensors are converted to
//! f32.

use super::{load_state_dict, save_state_dict};
use crate::model::Model;
use crate::state::{LoadReport, Stateful};
use crate::{NvError, Result};
use std::collections::HashMap;
use std::path::Path;

/// What [`load_into`] did besides loading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TorchLoad {
    /// `num_batches_tracked` counters the file lacked, set to 0.
    pub filled: Vec<String>,
    /// Non-strict loading only: what was left aside.
    pub skipped: LoadReport,
}

/// Loads the PyTorch state dict at `path` into `model` (strictly unless `strict` is false).
pub fn load_into(model: &mut Model, path: &Path, strict: bool) -> Result<TorchLoad> {
    let (mut sd, _) = load_state_dict(path)?;
    let own = model.state_dict();
    let filled = sd.fill_num_batches_tracked(&own);
    let in_file = |e: NvError| match e {
        NvError::State(m) => NvError::Format {
            path: path.display().to_string(),
            msg: m,
        },
        e => e,
    };
    let skipped = if strict {
        model.load_strict(&sd).map_err(in_file)?;
        LoadReport::default()
    } else {
        model.load_non_strict(&sd).map_err(in_file)?
    };
    Ok(TorchLoad { filled, skipped })
}

/// Writes `model`'s state dict as PyTorch saves one: PyTorch names, F32 floats, I64 counters, no metadata.
pub fn save(model: &Model, path: &Path) -> Result<()> {
    save_state_dict(path, &model.state_dict(), &HashMap::new())
}
