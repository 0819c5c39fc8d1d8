//! ONNX in and out. [`load_onnx`] reads a CNN exported by `torch.onnx.export` (the TorchScript exporter, opsets
//! 13-17, and the `torch.export`-based one, opset 20 with its weights in an external `.onnx.data` file), or
//! written by other tools, into a [`Graph`] that runs on the project's inference kernels; [`save_onnx`] writes a
//! graph back.
//!
//! | ONNX | here |
//! |---|---|
//! | Conv (pads, strides, dilations, group, auto_pad) | [`crate::nn::Conv2d`] |
//! | BatchNormalization | eval BatchNorm, folded into the conv or linear layer before it when that is its only reader |
//! | InstanceNormalization, LayerNormalization | InstanceNorm (affine, instance statistics), LayerNorm |
//! | Relu, Clip, Sigmoid, Softmax (last axis) | ReLU (Clip to [0, ∞)), [`crate::nn::Clamp`], Sigmoid, [`crate::nn::Softmax`] |
//! | MaxPool, AveragePool (ceil_mode 0), GlobalAveragePool, ReduceMean over (H, W) | the pooling layers |
//! | Gemm, MatMul by a constant | [`crate::nn::Linear`] |
//! | Add of two runtime tensors; Add/Sub/Mul/Div by a constant | a graph `Add`; [`crate::nn::ScaleShift`] |
//! | Concat of runtime tensors (axis ≥ 1) | a graph `Concat` |
//! | Flatten, Reshape, Squeeze, Unsqueeze (batch kept) | Flatten or [`crate::nn::Reshape`] |
//! | Identity, Dropout | nothing |
//! | Constant, and any node whose inputs are all constant (Shape, Gather, Concat, Cast, Expand, Transpose, …) | evaluated at load, with the batch size as a symbol |
//!
//! Anything else is an error naming the node and the op (or the attribute). The batch dimension of the input
//! may be dynamic; the others must be fixed.

mod consts;
mod export;
mod import;
mod node;
#[allow(clippy::all, missing_docs)]
pub mod proto;
mod tensor;

pub use export::{save_onnx, to_onnx_bytes, ExportOptions};

use crate::model::{Graph, Model};
use crate::{NvError, Result};
use prost::Message;
use std::path::Path;

/// An imported ONNX model.
pub struct OnnxModel {
    /// The graph, BatchNorm already folded where it could be.
    pub graph: Graph,
    /// The name of the model's input.
    pub input_name: String,
    /// The input's shape without the batch dimension.
    pub input_shape: Vec<usize>,
    /// The names of the model's outputs, in order.
    pub output_names: Vec<String>,
    /// The default-domain opset the file declares.
    pub opset: i64,
    /// `producer_name producer_version` from the file.
    pub producer: String,
    /// How many BatchNormalization nodes were folded into a convolution or linear layer.
    pub folded_batch_norms: usize,
    /// The input normalization, when the file carries normvision's metadata (`export --onnx` writes it).
    pub normalization: Option<crate::data::Normalization>,
}

impl OnnxModel {
    /// The model as a classifier (one (N, C, H, W) input, one (N, classes) output) for `eval` and `predict`.
    pub fn into_classifier(self) -> Result<Model> {
        let [c, h, w] = self.input_shape[..] else {
            return Err(NvError::Config(format!(
                "an image classifier takes (N, C, H, W); this model's input {:?} has per-sample shape {:?}",
                self.input_name, self.input_shape
            )));
        };
        Model::from_graph(self.graph, [c, h, w])
    }
}

/// ONNX files larger than this are refused (protobuf's own limit).
pub const MAX_FILE_BYTES: u64 = 2 << 30;

/// Reads an ONNX model; external data is read from files beside it (and only there).
pub fn load_onnx(path: &Path) -> Result<OnnxModel> {
    let bad = |msg: String| NvError::Format {
        path: path.display().to_string(),
        msg,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(bad(format!(
            "{len} bytes: more than the {MAX_FILE_BYTES} an ONNX file may hold"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let dir = path.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    });
    parse_onnx(&bytes, dir, &path.display().to_string())
}

/// Parses an ONNX model from bytes; `dir` is where external data may be read (`None`: refused). `label` names
/// the source in errors.
pub fn parse_onnx(bytes: &[u8], dir: Option<&Path>, label: &str) -> Result<OnnxModel> {
    let bad = |msg: String| NvError::Format {
        path: label.to_string(),
        msg,
    };
    let m = proto::ModelProto::decode(bytes).map_err(|e| bad(format!("not an ONNX model: {e}")))?;
    let opset = m
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .ok_or_else(|| bad("no default-domain opset in opset_import".into()))?;
    if !(7..=23).contains(&opset) {
        return Err(bad(format!("opset {opset} is not supported (7-23)")));
    }
    let g = m.graph.as_ref().ok_or_else(|| bad("no graph".into()))?;
    let im = import::import_graph(g, opset, dir).map_err(bad)?;
    Ok(OnnxModel {
        graph: im.graph,
        input_name: im.input_name,
        input_shape: im.input_shape,
        output_names: im.output_names,
        opset,
        producer: format!(
            "{} {}",
            m.producer_name.as_deref().unwrap_or(""),
            m.producer_version.as_deref().unwrap_or("")
        )
        .trim()
        .to_string(),
        folded_batch_norms: im.folded,
        normalization: normalization_of(&m, label)?,
    })
}

/// `normvision.mean` and `normvision.std` from the metadata, when both are there.
fn normalization_of(
    m: &proto::ModelProto,
    label: &str,
) -> Result<Option<crate::data::Normalization>> {
    let get = |k: &str| {
        m.metadata_props
            .iter()
            .find(|p| p.key.as_deref() == Some(k))
            .and_then(|p| p.value.as_deref())
    };
    let (Some(mean), Some(std)) = (get("normvision.mean"), get("normvision.std")) else {
        return Ok(None);
    };
    let bad = |msg: String| NvError::Format {
        path: label.to_string(),
        msg: format!("metadata normvision.mean/std: {msg}"),
    };
    let parse = |s: &str| serde_json::from_str::<Vec<f32>>(s).map_err(|e| bad(e.to_string()));
    crate::data::Normalization::new(parse(mean)?, parse(std)?)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}
