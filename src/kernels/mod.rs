//! The kernel floor: the hand-written SIMD and streaming building blocks that the layers of `norm` and `nn`
//! share, the activation arena and the shape helpers. Nothing here knows about layers, models or modes; `norm`
//! and `nn` both build on it and never import each other.
//!
//! | module | what it holds |
//! |---|---|
//! | [`arena`] | recycled activation buffers |
//! | [`cast`] | `T` slices as `f32` when `T` is `f32` |
//! | [`elementwise`] | parallel elementwise loops, `SyncPtr` |
//! | [`exp`] | a branch-free f64 `exp` on lanes of 8, for loops that vectorise |
//! | [`gemm`] | the `gemm` crate behind a bounds-checked front end |
//! | [`gemm_avx512`] | AVX-512 GEMM microkernels for the convolution shapes, lane masks |
//! | [`isa`] | kernels compiled per instruction set and chosen at run time ([`isa::isa_fn`]) |
//! | [`lanes`] | lane-wise reductions and elementwise passes of the normalizations (generic, flushed to f64) |
//! | [`lanes_x86`] | their AVX2/FMA reductions and AVX-512 streaming-store passes |
//! | [`moments`] | (mean, M2) of contiguous planes |
//! | [`pool2x2`] | the AVX-512 2×2 max pool of one plane, forward and backward |
//! | [`shape`] | shape checks with PyTorch's errors, contiguous views |
//! | [`transpose`] | AVX-512 16×16 transposes between planar and channel-last layouts |

pub mod arena;
pub mod cast;
pub mod elementwise;
pub mod exp;
pub mod gemm;
pub mod gemm_avx512;
pub mod isa;
pub mod lanes;
pub mod lanes_x86;
pub mod moments;
pub mod pool2x2;
pub mod shape;
pub mod transpose;
