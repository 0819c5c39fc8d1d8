//! normvision: batch normalization and its alternatives, with fused hand-written kernels that match PyTorch,
//! and a vision training system around them.
//!
//! See `docs/ARCHITECTURE.md` for the module map and how a batch flows through it.

// `!(a > b)` is deliberate throughout the kernels: unlike `a <= b` it is true for NaN, which is how the
// fused ReLU masks and the max-pool comparisons treat NaN exactly as PyTorch does.
#![allow(clippy::neg_cmp_op_on_partial_ord)]
// Without the x86-64 kernels (another architecture, or `--cfg nv_portable_only`) their call sites' arguments and
// helpers go unused.
#![cfg_attr(not(nv_x86), allow(dead_code, unused_variables, unused_imports))]

pub mod comm;
pub mod ctx;
pub mod data;
pub mod detect;
pub mod dist;
pub mod error;
pub mod experiment;
#[doc(hidden)]
pub mod internals;
pub mod io;
mod kernels;
pub mod layer;
pub mod mode;
pub mod model;
pub mod nn;
pub mod norm;
pub mod optim;
pub mod param;
pub mod real;
pub mod rng;
pub mod runtime;
pub mod segment;
pub mod state;
pub mod train;

pub use ctx::{Ctx, Isa, KernelOptions};
pub use error::{NvError, Result};
pub use layer::Layer;
pub use mode::Mode;
pub use param::Param;
pub use param::ParamRole;
pub use real::Real;

/// The tensor crate normvision computes with, re-exported so that users need no version of their own.
pub use ndarray;
