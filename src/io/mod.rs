//! Moving models in and out: PyTorch-named safetensors state dicts and checkpoints.

pub mod atomic;
pub mod safetensors_io;

pub use atomic::write_atomic;
pub use safetensors_io::{
    load_state_dict, save_state_dict, state_dict_from_bytes, state_dict_to_bytes,
};
