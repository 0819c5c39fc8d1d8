//! Detection checkpoints: one safetensors file with both networks' state dicts under torchvision's
//! `FasterRCNN` names, and metadata: the run configuration (which rebuilds the networks), the input
//! normalization, the class names and the epochs done. Written atomically.

use super::config::DetTrainConfig;
use super::detector::Detector;
use crate::data::Normalization;
use crate::io::{save_state_dict, state_dict_from_bytes};
use crate::state::{StateDict, Stateful};
use crate::{NvError, Result};
use std::collections::HashMap;
use std::path::Path;

/// The metadata `format` of a detection checkpoint.
pub const FORMAT: &str = "normvision-det-checkpoint-1";

/// What a detection checkpoint restores.
pub struct DetCheckpoint {
    pub config: DetTrainConfig,
    pub norm: Normalization,
    pub classes: Vec<String>,
    pub epoch: usize,
    pub detector: Detector,
}

/// Both networks' tensors in one state dict.
pub fn detector_state(det: &Detector) -> StateDict {
    let mut sd = det.trunk.state_dict();
    for (k, v) in det.head.state_dict().tensors {
        sd.tensors.insert(k, v);
    }
    sd
}

/// Writes the networks and the run's metadata atomically.
pub fn save_checkpoint(
    path: &Path,
    cfg: &DetTrainConfig,
    norm: &Normalization,
    classes: &[String],
    det: &Detector,
    epoch: usize,
) -> Result<()> {
    let mut md = HashMap::new();
    md.insert("format".to_string(), FORMAT.to_string());
    md.insert("config".to_string(), js(cfg));
    md.insert("normalization".to_string(), js(norm));
    md.insert("classes".to_string(), js(classes));
    md.insert("epoch".to_string(), epoch.to_string());
    save_state_dict(path, &detector_state(det), &md)
}

fn js<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("serialises")
}

/// Reads a checkpoint written by [`save_checkpoint`]; the networks are rebuilt from its configuration and
/// loaded strictly.
pub fn load_checkpoint(path: &Path) -> Result<DetCheckpoint> {
    let bytes = std::fs::read(path).map_err(|e| NvError::io(path, "read", e))?;
    let (sd, md) = state_dict_from_bytes(&bytes, &path.display().to_string())?;
    let err = |msg: String| NvError::Format {
        path: path.display().to_string(),
        msg,
    };
    if md.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(err(format!(
            "not a detection checkpoint (metadata format {:?}, expected {FORMAT:?})",
            md.get("format")
        )));
    }
    let get = |k: &str| {
        md.get(k)
            .ok_or_else(|| err(format!("metadata key {k:?} missing")))
    };
    let config: DetTrainConfig =
        serde_json::from_str(get("config")?).map_err(|e| err(format!("metadata config: {e}")))?;
    config.validate().map_err(|e| err(format!("config: {e}")))?;
    let norm: Normalization = serde_json::from_str(get("normalization")?)
        .map_err(|e| err(format!("metadata normalization: {e}")))?;
    norm.validate()?;
    let classes: Vec<String> =
        serde_json::from_str(get("classes")?).map_err(|e| err(format!("metadata classes: {e}")))?;
    let epoch: usize = get("epoch")?
        .parse()
        .map_err(|e| err(format!("metadata epoch: {e}")))?;
    if classes.len() + 1 != config.detector.net.num_classes
        || norm.mean.len() != config.detector.net.in_channels
    {
        return Err(err(format!(
            "{} class names and {} normalization channels for a detector of {} classes (with background) \
             and {} channels",
            classes.len(),
            norm.mean.len(),
            config.detector.net.num_classes,
            config.detector.net.in_channels
        )));
    }
    let mut det = Detector::new(config.detector.clone())?;
    let (mut trunk_sd, mut head_sd) = (StateDict::new(), StateDict::new());
    for (k, v) in sd.tensors {
        if k.starts_with("roi_heads.") {
            head_sd.tensors.insert(k, v);
        } else {
            trunk_sd.tensors.insert(k, v);
        }
    }
    det.trunk
        .load_strict(&trunk_sd)
        .map_err(|e| err(e.to_string()))?;
    det.head
        .load_strict(&head_sd)
        .map_err(|e| err(e.to_string()))?;
    Ok(DetCheckpoint {
        config,
        norm,
        classes,
        epoch,
        detector: det,
    })
}
