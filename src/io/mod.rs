//! Moving models in and out: PyTorch-named safetensors state dicts, and graph files (a state dict with its
//! architecture).

pub mod atomic;
pub mod graph_file;
pub mod lock;
pub mod onnx;
pub mod safetensors_io;
pub mod scene_files;
pub mod torch;

pub use atomic::{remove_stale_temps, write_atomic};
pub use graph_file::{load_graph, save_graph, GRAPH_FORMAT};
pub use lock::RunLock;
pub use safetensors_io::{
    load_state_dict, save_state_dict, state_dict_from_bytes, state_dict_to_bytes,
};
