//! Checkpoints: one safetensors file holding the model's state dict under PyTorch names, the optimizer state
//! (`optim.*`), and metadata strings: the run configuration (JSON), the data normalization, the position in the
//! run (step, epoch, batch within the epoch) and the seed that, with that position, fixes every later random
//! draw. Written atomically, so a crash leaves the previous checkpoint intact.

use super::TrainConfig;
use crate::data::Normalization;
use crate::io::save_state_dict;
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
    /// Whether the architecture is `config.model`'s zoo recipe (checked against the stored graph on restore).
    pub zoo_recipe: bool,
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
    if model.config().is_some() {
        // the architecture is the zoo recipe in `config`; restore_model checks that they agree
        md.insert("recipe".to_string(), "zoo".to_string());
    }
    save_state_dict(path, &sd, &md)
}

/// Reads a checkpoint written by [`save`]; a plain state dict (no normvision metadata) is an error here —
/// use [`crate::io::load_state_dict`] for those.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(crate::error::io_at(path, "read"))?;
    from_bytes(&bytes, path)
}

/// [`load`] on the bytes of a checkpoint file; `path` names it in errors.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
    let (sd, md) = crate::io::state_dict_from_bytes(bytes, &path.display().to_string())?;
    let get = |k: &str| {
        md.get(k).ok_or_else(|| {
            meta_err(
                path,
                format!("not a normvision checkpoint (metadata key {k:?} missing)"),
            )
        })
    };
    if let Some(f) = md.get("format").filter(|f| f.starts_with("normvision-seg")) {
        return Err(meta_err(
            path,
            format!(
                "a segmentation checkpoint ({f}), not a classifier's: give the command --task segment"
            ),
        ));
    }
    let config: TrainConfig =
        serde_json::from_str(get("config")?).map_err(|e| meta_err(path, format!("config: {e}")))?;
    let norm: Normalization = serde_json::from_str(get("normalization")?)
        .map_err(|e| meta_err(path, format!("normalization: {e}")))?;
    let position: Position = serde_json::from_str(get("position")?)
        .map_err(|e| meta_err(path, format!("position: {e}")))?;
    let test_acc = md.get("test_acc").and_then(|s| s.parse().ok());
    let graph: Option<GraphSpec> = md
        .get("graph")
        .map(|g| serde_json::from_str(g).map_err(|e| meta_err(path, format!("graph: {e}"))))
        .transpose()?;
    let input: Option<[usize; 3]> = md
        .get("input")
        .map(|g| serde_json::from_str(g).map_err(|e| meta_err(path, format!("input: {e}"))))
        .transpose()?;
    config
        .validate()
        .map_err(|e| meta_err(path, format!("config: {e}")))?;
    if let Some([c, h, w]) = input {
        let max = crate::model::ModelConfig::MAX_SIDE;
        if !(1..=crate::model::ModelConfig::MAX_CHANNELS).contains(&c)
            || !(1..=max).contains(&h)
            || !(1..=max).contains(&w)
        {
            return Err(meta_err(
                path,
                format!(
                    "input: {c}x{h}x{w} is outside 1..=64 channels and 1..={max} pixels a side"
                ),
            ));
        }
    }
    norm.validate()
        .map_err(|e| meta_err(path, format!("normalization: {e}")))?;
    let zoo_recipe = md.get("recipe").is_some_and(|r| r == "zoo");
    let mut model_state = StateDict::new();
    let mut optim_state = StateDict::new();
    for (k, v) in sd.tensors {
        if k.starts_with("optim.") {
            optim_state.tensors.insert(k, v);
        } else {
            model_state.tensors.insert(k, v);
        }
    }
    if let Some(g) = &graph {
        let held: u128 = model_state.tensors.values().map(|t| t.len() as u128).sum();
        let claimed = g.state_elements();
        if claimed > 2 * held + 4096 {
            return Err(meta_err(
                path,
                format!(
                    "graph: the architecture claims about {claimed} parameter values, the file holds {held}; \
                     refused before building it"
                ),
            ));
        }
    }
    validate_state(&model_state).map_err(|e| meta_err(path, e))?;
    Ok(Checkpoint {
        config,
        zoo_recipe,
        graph,
        input,
        norm,
        position,
        model_state,
        optim_state,
        test_acc,
    })
}

/// Values a model must not be loaded with: NaN or infinite weights and statistics, negative running
/// variances. Each yields plausible-looking but meaningless outputs, so a file holding one is refused.
fn validate_state(sd: &StateDict) -> std::result::Result<(), String> {
    for (k, t) in &sd.tensors {
        if let crate::state::StateTensor::F32(a) = t {
            if let Some(v) = a.iter().find(|v| !v.is_finite()) {
                return Err(format!("tensor {k} holds a non-finite value ({v})"));
            }
            if k.ends_with("running_var") {
                if let Some(v) = a.iter().find(|v| **v < 0.0) {
                    return Err(format!(
                        "tensor {k} holds a negative variance ({v}); a variance is never negative"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Rebuilds the model of a checkpoint (from its architecture, or from the zoo recipe of checkpoints that predate
/// architectures) with its weights and statistics. Loading is strict: every tensor of the model must be in
/// the file and every tensor of the file must belong to the model (a BatchNorm checkpoint relabelled as
/// GroupNorm, say, is refused instead of losing its running statistics).
pub fn restore_model(ck: &Checkpoint) -> Result<Model> {
    let mut m = match (&ck.graph, ck.input) {
        (Some(spec), Some(input)) => {
            if ck.zoo_recipe {
                let recipe = ck.config.model.build_graph()?.spec()?;
                if &recipe != spec {
                    return Err(NvError::State(format!(
                        "the checkpoint's config (model {}, norm {}) does not describe the architecture stored \
                         beside it; was its config edited?",
                        ck.config.model.kind.as_str(),
                        ck.config.model.norm.as_str()
                    )));
                }
            }
            let m = Model::from_graph(Graph::from_spec(spec)?, input)?;
            // a model built through the API has no zoo recipe (its config's model section is the default's):
            // claiming one would make its next checkpoint unreadable
            if ck.zoo_recipe {
                m.with_recipe(ck.config.model.clone())
            } else {
                m
            }
        }
        _ => Model::new(ck.config.model.clone())?,
    };
    m.load_strict(&ck.model_state)?;
    Ok(m)
}
