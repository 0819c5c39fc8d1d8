//! A graph in one file: its state dict under PyTorch names, with its architecture ([`GraphSpec`], JSON) in the
//! safetensors metadata, so a graph built through the API (branches, multiple outputs) is rebuilt from the file
//! alone. The tensors are those of [`crate::io::save_state_dict`]: PyTorch's `load_state_dict` reads them.

use crate::io::{load_state_dict, save_state_dict};
use crate::model::{Graph, GraphSpec};
use crate::state::Stateful;
use crate::{NvError, Result};
use std::collections::HashMap;
use std::path::Path;

/// The metadata value of `format` in a graph file.
pub const GRAPH_FORMAT: &str = "normvision-graph-v1";

/// Writes the graph's architecture and state atomically. Errors name a node whose layer type has no
/// architecture description (a user's own layer type); save its state dict alone for those.
///
/// ```
/// use normvision::io::{load_graph, save_graph};
/// use normvision::model::Sequential;
/// use normvision::nn::{LinearConfig, ReLU};
/// use normvision::ndarray::{ArrayD, IxDyn};
/// let mut seq = Sequential::new();
/// seq.push("0", LinearConfig::new(3, 2).build::<f32>(&mut rand::thread_rng()).unwrap())
///     .push("1", ReLU::new());
/// let mut g = seq.into_graph().unwrap();
/// let dir = tempfile::tempdir().unwrap();
/// save_graph(&dir.path().join("g.safetensors"), &g).unwrap();
/// let mut back = load_graph(&dir.path().join("g.safetensors")).unwrap();
/// let x = ArrayD::ones(IxDyn(&[4, 3]));
/// assert_eq!(back.infer(&[&x]).unwrap(), g.infer(&[&x]).unwrap());
/// ```
pub fn save_graph(path: &Path, graph: &Graph) -> Result<()> {
    let spec = graph.spec()?;
    let mut md = HashMap::new();
    md.insert("format".to_string(), GRAPH_FORMAT.to_string());
    md.insert(
        "graph".to_string(),
        serde_json::to_string(&spec).map_err(|e| NvError::Config(format!("graph: {e}")))?,
    );
    save_state_dict(path, &graph.state_dict(), &md)
}

/// Reads a graph file written by [`save_graph`] (or a training checkpoint, which also stores its graph).
pub fn load_graph(path: &Path) -> Result<Graph> {
    let (sd, md) = load_state_dict(path)?;
    let bad = |msg: String| NvError::Format {
        path: path.display().to_string(),
        msg,
    };
    let text = md.get("graph").ok_or_else(|| {
        bad("no architecture (metadata key \"graph\"): a plain state dict; build the model in code and load_state it".into())
    })?;
    let spec: GraphSpec = serde_json::from_str(text).map_err(|e| bad(format!("graph: {e}")))?;
    let mut g = Graph::from_spec(&spec).map_err(|e| bad(e.to_string()))?;
    g.load_state("", &sd).map_err(|e| bad(e.to_string()))?;
    Ok(g)
}
