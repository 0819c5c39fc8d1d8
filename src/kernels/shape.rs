//! The shape checks every layer shares, each returning the typed error PyTorch's message corresponds to, and
//! the contiguous view of an input.

use crate::{NvError, Real, Result};
use ndarray::{ArrayBase, Data, IxDyn};
use std::borrow::Cow;

/// Errors unless `shape` has exactly `rank` dimensions.
pub fn check_rank(layer: &'static str, shape: &[usize], rank: usize, expected: &str) -> Result<()> {
    if shape.len() != rank {
        return Err(NvError::Rank {
            layer,
            expected: expected.to_string(),
            got: shape.to_vec(),
        });
    }
    Ok(())
}

/// Errors if any dimension after the batch dimension is zero (PyTorch rejects such inputs too).
pub fn check_nonempty(layer: &'static str, shape: &[usize]) -> Result<()> {
    if shape[1..].contains(&0) {
        return Err(NvError::Shape {
            layer,
            msg: format!("expected non-zero sizes in every dimension but the batch, got {shape:?}"),
        });
    }
    Ok(())
}

/// Errors unless dimension 1 (channels) is `expected`.
pub fn check_channels(layer: &'static str, shape: &[usize], expected: usize) -> Result<()> {
    if shape[1] != expected {
        return Err(NvError::Channels {
            layer,
            expected,
            got: shape[1],
            shape: shape.to_vec(),
        });
    }
    Ok(())
}

/// Errors unless dy has x's shape.
pub fn check_same_shape(layer: &'static str, x: &[usize], dy: &[usize]) -> Result<()> {
    if x != dy {
        return Err(NvError::Shape {
            layer,
            msg: format!("dy has shape {dy:?} but x has shape {x:?}"),
        });
    }
    Ok(())
}

/// Errors unless dy has the layer's output shape `out`.
pub fn check_output_grad(layer: &'static str, dy: &[usize], out: &[usize]) -> Result<()> {
    if dy != out {
        return Err(NvError::Shape {
            layer,
            msg: format!("dy has shape {dy:?}, the output has shape {out:?}"),
        });
    }
    Ok(())
}

/// The caller-owned dx buffer of a `backward_into` must have x's number of elements.
pub fn check_dx_len(layer: &'static str, dx_len: usize, x_shape: &[usize]) -> Result<()> {
    let numel: usize = x_shape.iter().product();
    if dx_len != numel {
        return Err(NvError::Shape {
            layer,
            msg: format!("dx buffer has {dx_len} elements, input {numel}"),
        });
    }
    Ok(())
}

/// An array's elements as a row-major slice, copied only when it is not already one (an owned array or a view).
pub fn contiguous<T: Real, S: Data<Elem = T>>(a: &ArrayBase<S, IxDyn>) -> Cow<'_, [T]> {
    match a.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(a.iter().copied().collect()),
    }
}
