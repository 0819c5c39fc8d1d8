//! `x·scale + shift` with constant tensors broadcast over each sample: what an imported graph's `Mul`, `Add`,
//! `Sub` and `Div` by a constant become (input normalisation inside a graph, a bias added after a `MatMul`).
//!
//! The constants have the per-sample shape or any shape that broadcasts to it from the right (NumPy rules);
//! they are buffers (`scale`, `shift`), not trained parameters. Backward: dx = dy·scale.

use super::{Layer, StateDict};
use crate::state::{join, StateTensor, Stateful};
use crate::{Ctx, NvError, Param, Real, Result};
use ndarray::{ArrayD, IxDyn};

/// `x·scale + shift`, either part optional. See the module docs.
#[derive(Debug, Clone)]
pub struct ScaleShift<T: Real = f32> {
    scale: Option<ArrayD<T>>,
    shift: Option<ArrayD<T>>,
}

impl<T: Real> ScaleShift<T> {
    /// `scale` and `shift` broadcast to each sample's shape (checked at the first forward).
    pub fn new(scale: Option<ArrayD<T>>, shift: Option<ArrayD<T>>) -> Self {
        ScaleShift { scale, shift }
    }
    pub fn scale(&self) -> Option<&ArrayD<T>> {
        self.scale.as_ref()
    }
    pub fn shift(&self) -> Option<&ArrayD<T>> {
        self.shift.as_ref()
    }

    /// The constant `c` broadcast to a batch of `shape`, or an error naming the shapes.
    fn broadcast<'a>(c: &'a ArrayD<T>, shape: &[usize]) -> Result<ndarray::ArrayViewD<'a, T>> {
        if shape.is_empty() || c.ndim() > shape.len() - 1 {
            return Err(NvError::Shape {
                layer: "ScaleShift",
                msg: format!(
                    "a constant of shape {:?} does not broadcast over samples of an input of shape {shape:?}",
                    c.shape()
                ),
            });
        }
        c.broadcast(IxDyn(shape)).ok_or_else(|| NvError::Shape {
            layer: "ScaleShift",
            msg: format!(
                "a constant of shape {:?} does not broadcast to {shape:?}",
                c.shape()
            ),
        })
    }
}

impl<T: Real> Layer<T> for ScaleShift<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        let mut y = x.as_standard_layout().into_owned();
        if let Some(s) = &self.scale {
            y.zip_mut_with(&Self::broadcast(s, x.shape())?, |a, &b| *a = *a * b);
        }
        if let Some(s) = &self.shift {
            y.zip_mut_with(&Self::broadcast(s, x.shape())?, |a, &b| *a = *a + b);
        }
        Ok(y)
    }
    fn backward(&mut self, x: &ArrayD<T>, dy: &ArrayD<T>, _ctx: Ctx) -> Result<ArrayD<T>> {
        crate::kernels::shape::check_same_shape("ScaleShift", x.shape(), dy.shape())?;
        let mut dx = dy.as_standard_layout().into_owned();
        if let Some(s) = &self.scale {
            dx.zip_mut_with(&Self::broadcast(s, x.shape())?, |a, &b| *a = *a * b);
        }
        Ok(dx)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        for c in self.scale.iter().chain(self.shift.iter()) {
            Self::broadcast(c, input)?;
        }
        Ok(input.to_vec())
    }
    fn name(&self) -> String {
        let shape = |c: &Option<ArrayD<T>>| c.as_ref().map(|a| format!("{:?}", a.shape()));
        format!(
            "ScaleShift(scale={}, shift={})",
            shape(&self.scale).unwrap_or_else(|| "None".into()),
            shape(&self.shift).unwrap_or_else(|| "None".into())
        )
    }
}

impl<T: Real> Stateful<T> for ScaleShift<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        if let Some(s) = &self.scale {
            sd.insert_float(join(prefix, "scale"), s);
        }
        if let Some(s) = &self.shift {
            sd.insert_float(join(prefix, "shift"), s);
        }
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        for (name, slot) in [("scale", &mut self.scale), ("shift", &mut self.shift)] {
            let Some(cur) = slot.as_mut() else { continue };
            let key = join(prefix, name);
            match sd.get(&key) {
                Some(StateTensor::F32(a)) if a.shape() == cur.shape() => {
                    *cur = a.mapv(|v| T::of_f64(v as f64));
                }
                Some(t) => {
                    return Err(NvError::Config(format!(
                        "{key}: expected an f32 tensor of shape {:?}, got shape {:?}",
                        cur.shape(),
                        t.shape()
                    )))
                }
                None => return Err(NvError::Config(format!("{key}: missing"))),
            }
        }
        Ok(())
    }
    fn visit_params(&mut self, _prefix: &str, _f: &mut dyn FnMut(&str, &mut Param<T>)) {}
}
