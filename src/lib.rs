//! normvision: batch normalization and its alternatives, with fused hand-written kernels that match PyTorch,
//! and a vision training system around them.
//!
//! See `docs/ARCHITECTURE.md` for the module map and how a batch flows through it.

pub mod error;
pub mod mode;
pub mod norm;
pub mod param;
pub mod real;
pub mod state;

pub use error::{NvError, Result};
pub use mode::Mode;
pub use param::Param;
pub use real::Real;
