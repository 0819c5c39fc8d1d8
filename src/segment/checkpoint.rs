//! Segmentation checkpoints: one safetensors file with the network's state dict under its PyTorch names, the
//! optimizer state (`optim.*`), and metadata: the run configuration, the architecture, the input
//! normalization, the class names and the position. Written atomically after every epoch.

use super::config::{SegData, SegTrainConfig};
use crate::data::Normalization;
use crate::io::{save_state_dict, state_dict_from_bytes};
use crate::model::{Graph, GraphSpec};
use crate::optim::Optimizer;
use crate::state::{StateDict, Stateful};
use crate::{NvError, Result};
use std::collections::HashMap;
use std::path::Path;

/// The metadata `format` of a segmentation checkpoint.
pub const FORMAT: &str = "normvision-seg-checkpoint-1";

/// Where a segmentation run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SegPosition {
    /// Optimizer steps done.
    pub step: u64,
    /// Epochs completed.
    pub epoch: usize,
}

/// What a segmentation checkpoint restores.
pub struct SegCheckpoint {
    pub config: SegTrainConfig,
    pub norm: Normalization,
    pub classes: Vec<String>,
    pub position: SegPosition,
    /// The network with its weights and statistics.
    pub graph: Graph,
    pub optim_state: StateDict,
}

/// Writes the network, the optimizer and the run's metadata atomically.
pub fn save_checkpoint(
    path: &Path,
    cfg: &SegTrainConfig,
    data: &SegData,
    graph: &Graph,
    optim: &dyn Optimizer,
    pos: SegPosition,
) -> Result<()> {
    let mut sd = graph.state_dict();
    for (k, v) in optim.state_dict().tensors {
        sd.tensors.insert(k, v);
    }
    let mut md = HashMap::new();
    md.insert("format".to_string(), FORMAT.to_string());
    md.insert("config".to_string(), js(cfg));
    md.insert("normalization".to_string(), js(&data.norm));
    md.insert("classes".to_string(), js(&data.classes[..]));
    md.insert("position".to_string(), js(&pos));
    md.insert("graph".to_string(), js(&graph.spec()?));
    save_state_dict(path, &sd, &md)
}

fn js<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("serialises")
}

/// Whether the bytes of a safetensors file are a segmentation checkpoint.
pub fn is_seg_checkpoint(metadata: &HashMap<String, String>) -> bool {
    metadata.get("format").map(String::as_str) == Some(FORMAT)
}

/// Reads a checkpoint written by [`save_checkpoint`]: the architecture is rebuilt and loaded strictly.
pub fn load_checkpoint(path: &Path) -> Result<SegCheckpoint> {
    let bytes = std::fs::read(path).map_err(crate::error::io_at(path, "read"))?;
    let (sd, md) = state_dict_from_bytes(&bytes, &path.display().to_string())?;
    let err = |msg: String| NvError::Format {
        path: path.display().to_string(),
        msg,
    };
    if !is_seg_checkpoint(&md) {
        return Err(err(format!(
            "not a segmentation checkpoint (metadata format {:?}, expected {FORMAT:?}; classification \
             checkpoints initialize a backbone with --backbone-from)",
            md.get("format")
        )));
    }
    fn parse<T: serde::de::DeserializeOwned>(
        md: &HashMap<String, String>,
        k: &str,
        err: &dyn Fn(String) -> NvError,
    ) -> Result<T> {
        let s = md
            .get(k)
            .ok_or_else(|| err(format!("metadata key {k:?} missing")))?;
        serde_json::from_str(s).map_err(|e| err(format!("metadata {k}: {e}")))
    }
    let config: SegTrainConfig = parse(&md, "config", &err)?;
    config.validate().map_err(|e| err(format!("config: {e}")))?;
    let norm: Normalization = parse(&md, "normalization", &err)?;
    norm.validate()?;
    let classes: Vec<String> = parse(&md, "classes", &err)?;
    let position: SegPosition = parse(&md, "position", &err)?;
    let spec: GraphSpec = parse(&md, "graph", &err)?;
    if spec.state_elements() > (1 << 31) {
        return Err(err("the architecture claims more than 2^31 values".into()));
    }
    let mut graph = Graph::from_spec(&spec)?;
    let (mut model_sd, mut optim_sd) = (StateDict::new(), StateDict::new());
    for (k, v) in sd.tensors {
        if k.starts_with("optim.") {
            optim_sd.tensors.insert(k, v);
        } else {
            model_sd.tensors.insert(k, v);
        }
    }
    graph
        .load_strict(&model_sd)
        .map_err(|e| err(e.to_string()))?;
    if norm.mean.len() != config.model.in_channels || classes.len() != config.model.num_classes {
        return Err(err(format!(
            "{} normalization channels and {} class names for a network of {} channels and {} classes",
            norm.mean.len(),
            classes.len(),
            config.model.in_channels,
            config.model.num_classes
        )));
    }
    Ok(SegCheckpoint {
        config,
        norm,
        classes,
        position,
        graph,
        optim_state: optim_sd,
    })
}
