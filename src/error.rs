//! The crate's one error type. Every fallible operation returns [`Result`]; misuse is an error value, never a panic.

use thiserror::Error;

/// Errors raised by normvision. Messages follow PyTorch's wording where PyTorch has one.
#[derive(Debug, Error)]
pub enum NvError {
    /// The input has the wrong number of dimensions for the layer.
    #[error("{layer}: expected {expected} input, got a tensor of shape {got:?}")]
    Rank {
        layer: &'static str,
        expected: String,
        got: Vec<usize>,
    },
    /// The channel dimension does not match the layer's `num_features`.
    #[error("{layer}: expected {expected} channels (dim 1), got {got} (input shape {shape:?})")]
    Channels {
        layer: &'static str,
        expected: usize,
        got: usize,
        shape: Vec<usize>,
    },
    /// Any other shape mismatch (e.g. `dy` not shaped like `x`).
    #[error("{layer}: shape mismatch: {msg}")]
    Shape { layer: &'static str, msg: String },
    /// A training-mode statistic would be computed from a single value.
    #[error(
        "{layer}: Expected more than 1 value per channel when training, got input size {shape:?}"
    )]
    OneValuePerChannel {
        layer: &'static str,
        shape: Vec<usize>,
    },
    /// Instance statistics would be computed from a single spatial element.
    #[error(
        "{layer}: Expected more than 1 spatial element when training, got input size {shape:?}"
    )]
    OneSpatialElement {
        layer: &'static str,
        shape: Vec<usize>,
    },
    /// A configuration value is out of range (eps <= 0, groups not dividing channels, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// `backward` called without the matching `forward` (no saved statistics for that mode).
    #[error("{layer}: backward in {mode:?} mode called without a preceding {mode:?} forward on an input of this shape")]
    NoSavedState {
        layer: &'static str,
        mode: crate::Mode,
    },
    /// A state dict is missing a key or holds a tensor of the wrong shape or type.
    #[error("state dict: {0}")]
    State(String),
    /// A file could not be parsed (IDX, image, safetensors, ONNX, checkpoint).
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
    /// A loss or statistic became NaN or infinite.
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// Training diverged (non-finite loss, or loss stuck at chance level).
    #[error("training diverged: {0}")]
    Diverged(String),
    /// A collective of a [`Communicator`](crate::comm::Communicator) failed, or the ranks disagree (buffer
    /// lengths, configuration).
    #[error("communication: {0}")]
    Comm(String),
    /// An I/O operation on a file or directory failed; `path` names it.
    #[error("{path}: cannot {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl NvError {
    /// The error of I/O operation `op` ("read", "create", ...) on `path`.
    pub fn io(path: &std::path::Path, op: &'static str, source: std::io::Error) -> NvError {
        NvError::Io {
            path: path.display().to_string(),
            op,
            source,
        }
    }
}

/// `.map_err(io_at(path, "read"))`: names the path of a failed I/O operation.
pub(crate) fn io_at<'a>(
    path: &'a std::path::Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> NvError + 'a {
    move |e| NvError::io(path, op, e)
}

/// `Result` with [`NvError`].
pub type Result<T, E = NvError> = std::result::Result<T, E>;
