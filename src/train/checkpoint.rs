//! Checkpoints: one safetensors file holding the model's state dict under PyTorch names, the optimizer state
//! (`optim.*`), and metadata strings: the run configuration (JSON), the data normalization, the position in the
//! run (step, epoch, batch within the epoch) and the seed that, with that position, fixes every later random
//! draw. Written atomically, so a crash leaves the previous checkpoint intact.

use super::TrainConfig;
use crate::data::Normalization;
use crate::io::{load_state_dict, save_state_dict};
use crate::model::{Graph, GraphSpec, Model};
use crate::optim::Optimizer;
use crate::state::{StateDict, Stateful};
use crate::{NvError, Result};
use std::collections::HashMap;
use std::path::Path;

/// Where a run stands; saved with every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct Position {
    /// Optimizer steps done.
    pub step: u64,
    /// The epoch the next batch belongs to.
    pub epoch: usize,
    /// Index of the next batch within that epoch.
    pub batch: usize,
}

/// What a checkpoint restores.
pub struct Checkpoint {
    pub config: TrainConfig,
    /// The model's architecture (absent from checkpoints written before graphs: the zoo recipe in `config`
    /// rebuilds those).
    pub graph: Option<GraphSpec>,
    /// (C, H, W) of an input image.
    pub input: Option<[usize; 3]>,
    pub norm: Normalization,
    pub position: Position,
    pub model_state: StateDict,
    pub optim_state: StateDict,
    /// Test accuracy at the time of saving, if evaluated.
    pub test_acc: Option<f64>,
}

fn meta_err(path: &Path, msg: String) -> NvError {
    NvError::Format {
        path: path.display().to_string(),
        msg,
    }
}

/// Writes model + optimizer + metadata atomically.
pub fn save(
    path: &Path,
    cfg: &TrainConfig,
    norm: &Normalization,
    pos: Position,
    model: &Model,
    optim: &dyn Optimizer,
    test_acc: Option<f64>,
) -> Result<()> {
    let mut sd = model.state_dict();
    for (k, v) in optim.state_dict().tensors {
        sd.tensors.insert(k, v);
    }
    let mut md = HashMap::new();
    md.insert("format".to_string(), "normvision-checkpoint-1".to_string());
    md.insert(
        "config".to_string(),
        serde_json::to_string(cfg).expect("config serialises"),
    );
    md.insert(
        "normalization".to_string(),
        serde_json::to_string(norm).expect("serialises"),
    );
    md.insert(
        "position".to_string(),
        serde_json::to_string(&pos).expect("serialises"),
    );
    md.insert(
        "graph".to_string(),
        serde_json::to_string(&model.graph().spec()?).expect("serialises"),
    );
    md.insert(
        "input".to_string(),
        serde_json::to_string(&model.input_shape()).expect("serialises"),
    );
    if let Some(a) = test_acc {
        md.insert("test_acc".to_string(), format!("{a}"));
    }
    save_state_dict(path, &sd, &md)
}

/// Reads a checkpoint written by [`save`]; a plain state dict (no normvision metadata) is an error here —
/// use [`crate::io::load_state_dict`] for those.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let (sd, md) = load_state_dict(path)?;
    let get = |k: &str| {
        md.get(k).ok_or_else(|| {
            meta_err(
                path,
                format!("not a normvision checkpoint (metadata key {k:?} missing)"),
            )
        })
    };
    let config: TrainConfig =
        serde_json::from_str(get("config")?).map_err(|e| meta_err(path, format!("config: {e}")))?;
    let norm: Normalization = serde_json::from_str(get("normalization")?)
        .map_err(|e| meta_err(path, format!("normalization: {e}")))?;
    let position: Position = serde_json::from_str(get("position")?)
        .map_err(|e| meta_err(path, format!("position: {e}")))?;
    let test_acc = md.get("test_acc").and_then(|s| s.parse().ok());
    let graph = md
        .get("graph")
        .map(|g| serde_json::from_str(g).map_err(|e| meta_err(path, format!("graph: {e}"))))
        .transpose()?;
    let input = md
        .get("input")
        .map(|g| serde_json::from_str(g).map_err(|e| meta_err(path, format!("input: {e}"))))
        .transpose()?;
    let mut model_state = StateDict::new();
    let mut optim_state = StateDict::new();
    for (k, v) in sd.tensors {
        if k.starts_with("optim.") {
            optim_state.tensors.insert(k, v);
        } else {
            model_state.tensors.insert(k, v);
        }
    }
    Ok(Checkpoint {
        config,
        graph,
        input,
        norm,
        position,
        model_state,
        optim_state,
        test_acc,
    })
}

/// Rebuilds the model of a checkpoint (from its architecture, or from the zoo recipe of checkpoints that predate
/// architectures) with its weights and statistics.
pub fn restore_model(ck: &Checkpoint) -> Result<Model> {
    let mut m = match (&ck.graph, ck.input) {
        (Some(spec), Some(input)) => {
            Model::from_graph(Graph::from_spec(spec)?, input)?.with_recipe(ck.config.model.clone())
        }
        _ => Model::new(ck.config.model.clone())?,
    };
    m.load_state("", &ck.model_state)?;
    Ok(m)
}
