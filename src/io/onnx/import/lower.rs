//! Lowering of the runtime ops that are not layers with weights: activations, reshapes, pooling over the whole
//! map, reductions, concatenation and elementwise arithmetic (the layers with weights are in `layers.rs`).

use super::{Importer, R, V};
use crate::io::onnx::consts::{self, broadcast_shape};
use crate::io::onnx::node::NodeRef;
use crate::io::onnx::tensor::{Const, Dim};
use crate::layer::Layer;
use crate::model::ValueId;
use crate::nn::{Clamp, GlobalAvgPool, Linear, LinearConfig, ReLU, ScaleShift, Sigmoid, Softmax};
use ndarray::{ArrayD, IxDyn};

impl Importer<'_> {
    pub(super) fn runtime(&mut self, n: &NodeRef) -> R<V> {
        let name = n.name.clone();
        match n.op {
            "Conv" => self.conv(n),
            "BatchNormalization" => self.batch_norm(n),
            "InstanceNormalization" | "LayerNormalization" => self.other_norm(n),
            "Relu" => {
                n.check_attrs(&[])?;
                let (x, s) = self.act(n, 0)?;
                self.layer(&name, Box::new(ReLU::<f32>::new()), x, &s)
            }
            "Sigmoid" => {
                n.check_attrs(&[])?;
                let (x, s) = self.act(n, 0)?;
                self.layer(&name, Box::new(Sigmoid::<f32>::new()), x, &s)
            }
            "Clip" => {
                n.check_attrs(&["min", "max"])?;
                let (x, s) = self.act(n, 0)?;
                let scalar = |c: Option<&Const>, attr: Option<f32>, def: f64| -> R<f64> {
                    match c {
                        Some(c) if c.len() == 1 => Ok(c.to_f64()?[0]),
                        Some(c) => Err(format!(
                            "Clip bound of shape {:?}; a scalar is expected",
                            c.dims
                        )),
                        None => Ok(attr.map_or(def, |v| v as f64)),
                    }
                };
                let attr = |k: &str| n.attribute(k).and_then(|a| a.f);
                let lo = scalar(self.opt_const(n, 1)?, attr("min"), f64::NEG_INFINITY)?;
                let hi = scalar(self.opt_const(n, 2)?, attr("max"), f64::INFINITY)?;
                let layer: Box<dyn Layer<f32>> = if lo == 0.0 && hi == f64::INFINITY {
                    Box::new(ReLU::<f32>::new())
                } else {
                    Box::new(Clamp::<f32>::new(lo, hi).map_err(|e| e.to_string())?)
                };
                self.layer(&name, layer, x, &s)
            }
            "MaxPool" | "AveragePool" => self.pool(n),
            "GlobalAveragePool" => {
                n.check_attrs(&[])?;
                let (x, s) = self.act(n, 0)?;
                self.global_pool(&name, x, &s, true)
            }
            "ReduceMean" => {
                n.check_attrs(&["axes", "keepdims", "noop_with_empty_axes"])?;
                let (x, s) = self.act(n, 0)?;
                let rank = s.len() + 1;
                let mut axes = self
                    .axes(n)?
                    .ok_or("ReduceMean over all axes (no axes) is not supported")?
                    .iter()
                    .map(|&a| consts::axis(a, rank))
                    .collect::<R<Vec<_>>>()?;
                axes.sort_unstable();
                if rank != 4 || axes != [2, 3] {
                    return Err(format!(
                        "ReduceMean over axes {axes:?} of a rank-{rank} tensor; only the spatial axes [2, 3] of (N, C, H, W) are supported"
                    ));
                }
                self.global_pool(&name, x, &s, n.int("keepdims", 1) != 0)
            }
            "Gemm" => self.gemm(n),
            "MatMul" => {
                n.check_attrs(&[])?;
                let (x, s) = self.act(n, 0)?;
                let w = self.konst(n, 1).map_err(|e| {
                    format!("{e} (a product of two runtime tensors is not supported)")
                })?;
                if w.dims.len() != 2 || s.last() != Some(&w.dims[0]) {
                    return Err(format!(
                        "MatMul of {s:?} (per sample) by a constant of shape {:?}",
                        w.dims
                    ));
                }
                let (fin, fout) = (w.dims[0], w.dims[1]);
                let wt = consts::transpose(w, None)?.to_array()?;
                let mut lin = Linear::<f32>::new(LinearConfig::new(fin, fout).bias(false))
                    .map_err(|e| e.to_string())?;
                Self::load(&mut lin, &[("weight", wt)])?;
                self.layer(&name, Box::new(lin), x, &s)
            }
            "Add" | "Sub" | "Mul" | "Div" => self.arith(n),
            "Flatten" => {
                n.check_attrs(&["axis"])?;
                let (x, s) = self.act(n, 0)?;
                let a = consts::axis(n.int("axis", 1), s.len() + 1)?;
                if a != 1 {
                    return Err(format!(
                        "Flatten at axis {a}; only axis 1 (keeping the batch) is supported"
                    ));
                }
                let to = vec![s.iter().product()];
                self.reshape(&name, x, &s, to)
            }
            "Reshape" => {
                n.check_attrs(&["allowzero"])?;
                let (x, s) = self.act(n, 0)?;
                let t = self.konst(n, 1)?.to_dims();
                let to = self.reshape_target(&s, &t, n.int("allowzero", 0) != 0)?;
                self.reshape(&name, x, &s, to)
            }
            "Squeeze" | "Unsqueeze" => {
                n.check_attrs(&["axes"])?;
                let (x, s) = self.act(n, 0)?;
                let c = Const::ints(
                    std::iter::once(1).chain(s.iter().copied()).collect(),
                    vec![],
                );
                let axes = self.axes(n)?;
                let (out, rank) = if n.op == "Squeeze" {
                    (
                        consts::squeeze(&c, axes.as_deref().or(Some(&[])))?,
                        s.len() + 1,
                    )
                } else {
                    let a = axes.clone().ok_or("Unsqueeze without axes")?;
                    (consts::unsqueeze(&c, &a)?, s.len() + 1 + a.len())
                };
                let touches_batch = axes
                    .as_deref()
                    .unwrap_or(&[])
                    .iter()
                    .any(|&v| consts::axis(v, rank).is_ok_and(|v| v == 0));
                if touches_batch || (n.op == "Squeeze" && axes.is_none()) {
                    return Err(format!(
                        "{} with axes {axes:?} (the batch dimension must stay; give the axes)",
                        n.op
                    ));
                }
                self.reshape(&name, x, &s, out.dims[1..].to_vec())
            }
            "Softmax" => {
                n.check_attrs(&["axis"])?;
                let (x, s) = self.act(n, 0)?;
                let rank = s.len() + 1;
                let a = consts::axis(n.int("axis", if self.opset >= 13 { -1 } else { 1 }), rank)?;
                if a != rank - 1 {
                    return Err(format!("Softmax over axis {a} of a rank-{rank} tensor; only the last axis is supported"));
                }
                self.layer(&name, Box::new(Softmax::<f32>::new()), x, &s)
            }
            "Concat" => {
                n.check_attrs(&["axis"])?;
                let ins = (0..n.p.input.len())
                    .map(|i| self.act(n, i))
                    .collect::<R<Vec<_>>>()?;
                let rank = ins[0].1.len() + 1;
                let a = consts::axis(n.int("axis", 1), rank)?;
                if a == 0 {
                    return Err("Concat along the batch dimension is not supported".into());
                }
                let mut shape = ins[0].1.clone();
                shape[a - 1] = 0;
                for (_, s) in &ins {
                    if s.len() + 1 != rank
                        || s.iter()
                            .enumerate()
                            .any(|(k, &d)| k != a - 1 && d != ins[0].1[k])
                    {
                        return Err(format!(
                            "Concat of per-sample shapes {:?} and {s:?} on axis {a}",
                            ins[0].1
                        ));
                    }
                    shape[a - 1] += s[a - 1];
                }
                let nm = self.unique(&name);
                let ids: Vec<ValueId> = ins.iter().map(|(id, _)| *id).collect();
                let id = self.g.concat(nm, &ids, a).map_err(|e| e.to_string())?;
                Ok(V::Act { id, shape })
            }
            "Transpose" => {
                n.check_attrs(&["perm"])?;
                let (x, s) = self.act(n, 0)?;
                let perm = n
                    .ints("perm")
                    .unwrap_or_else(|| (0..=s.len() as i64).rev().collect());
                if perm.iter().enumerate().any(|(i, &p)| p != i as i64) {
                    return Err(format!("Transpose {perm:?} of a runtime tensor; only transposes of constants are supported"));
                }
                Ok(V::Act { id: x, shape: s })
            }
            other => Err(format!("unsupported op {other}")),
        }
    }

    /// Reshape target `t` (with the batch as a symbol) for a value of per-sample shape `s`: the per-sample
    /// output shape, or an error when the batch dimension would change.
    fn reshape_target(&self, s: &[usize], t: &[Dim], allowzero: bool) -> R<Vec<usize>> {
        let per: usize = s.iter().product();
        let first = t.first().ok_or("Reshape to a scalar")?;
        let keeps_batch = match first {
            Dim::Batch => true,
            Dim::K(0) => !allowzero,
            Dim::K(-1) => true,
            Dim::K(k) => self.fixed_batch == Some(*k as usize),
        };
        if !keeps_batch {
            return Err(format!("Reshape to {t:?} changes the batch dimension"));
        }
        let rest = t[1..]
            .iter()
            .map(|d| match d {
                Dim::K(k) => Ok(*k),
                Dim::Batch => Err(format!(
                    "Reshape to {t:?} moves the batch size into dimension > 0"
                )),
            })
            .collect::<R<Vec<i64>>>()?;
        if *first == Dim::K(-1) && rest.contains(&-1) {
            return Err(format!("Reshape to {t:?}: two inferred dimensions"));
        }
        // dimension i of the target (i >= 1) copies input dimension i on 0
        let mut full_in = vec![1usize];
        full_in.extend_from_slice(s);
        let mut target = vec![1i64];
        target.extend_from_slice(&rest);
        let out = consts::reshape_target(&full_in, &target, allowzero)?;
        if consts::numel(&out) != Some(per) {
            return Err(format!("Reshape of per-sample shape {s:?} to {t:?}"));
        }
        Ok(out[1..].to_vec())
    }

    fn global_pool(&mut self, name: &str, x: ValueId, s: &[usize], keepdims: bool) -> R<V> {
        if s.len() != 3 {
            return Err(format!(
                "global average pooling of per-sample shape {s:?}; (C, H, W) is expected"
            ));
        }
        let v = self.layer(name, Box::new(GlobalAvgPool::<f32>::new()), x, s)?;
        if !keepdims {
            return Ok(v);
        }
        let V::Act { id, shape } = v else {
            unreachable!()
        };
        self.reshape(&format!("{name}.keepdims"), id, &shape, vec![s[0], 1, 1])
    }
    fn arith(&mut self, n: &NodeRef) -> R<V> {
        n.check_attrs(&[])?;
        let name = n.name.clone();
        let (a, b) = (self.get(n, 0)?.clone(), self.get(n, 1)?.clone());
        match (a, b) {
            (V::Act { id: x, shape: sx }, V::Act { id: y, shape: sy }) => {
                if n.op != "Add" {
                    return Err(format!("{} of two runtime tensors is not supported", n.op));
                }
                if sx != sy {
                    return Err(format!("Add of per-sample shapes {sx:?} and {sy:?} (broadcasting between runtime tensors is not supported)"));
                }
                let nm = self.unique(&name);
                let id = self.g.add(nm, &[x, y]).map_err(|e| e.to_string())?;
                Ok(V::Act { id, shape: sx })
            }
            (V::Act { id, shape }, V::Const(c)) | (V::Const(c), V::Act { id, shape }) => {
                let act_first = matches!(self.get(n, 0)?, V::Act { .. });
                let rank = shape.len() + 1;
                let mut dims = c.dims.clone();
                if dims.len() > rank || (dims.len() == rank && dims[0] != 1) {
                    return Err(format!(
                        "a constant of shape {:?} does not broadcast over the samples of {shape:?}",
                        c.dims
                    ));
                }
                if dims.len() == rank {
                    dims.remove(0);
                }
                if broadcast_shape(&dims, &shape).as_deref() != Some(&shape[..]) {
                    return Err(format!(
                        "a constant of shape {:?} does not broadcast to per-sample shape {shape:?}",
                        c.dims
                    ));
                }
                let v = c.to_f64()?;
                let arr = |v: Vec<f64>| {
                    ArrayD::from_shape_vec(IxDyn(&dims), v.into_iter().map(|x| x as f32).collect())
                        .map_err(|e| e.to_string())
                };
                let (scale, shift) = match (n.op, act_first) {
                    ("Add", _) => (None, Some(arr(v)?)),
                    ("Mul", _) => (Some(arr(v)?), None),
                    ("Sub", true) => (None, Some(arr(v.iter().map(|x| -x).collect())?)),
                    ("Sub", false) => (Some(arr(vec![-1.0; v.len()])?), Some(arr(v)?)),
                    ("Div", true) => (Some(arr(v.iter().map(|x| 1.0 / x).collect())?), None),
                    _ => {
                        return Err("a constant divided by a runtime tensor is not supported".into())
                    }
                };
                self.layer(
                    &name,
                    Box::new(ScaleShift::<f32>::new(scale, shift)),
                    id,
                    &shape,
                )
            }
            (V::Const(_), V::Const(_)) => Err("two constants that were not folded".into()),
        }
    }
}
