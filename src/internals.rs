//! The internal kernels, re-exported for the project's own benchmarks, examples and tests (the staged BatchNorm
//! kernels that SyncBN and statistics re-estimation build on, the Winograd transforms, the plane moments). Not
//! part of the API: no stability or documentation promise.

pub use crate::kernels::{arena, lanes, moments};
pub use crate::nn::conv::{one_channel, winograd};
pub use crate::norm::batch::{maxpool, planes, rows, stats};

/// The parsers' fuzz targets (here, above every floor, because they span `train`, `io` and `detect`).
pub mod fuzz;
