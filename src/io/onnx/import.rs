//! ONNX graph → [`Graph`]: each node becomes a layer, an `Add` or a `Concat` of the graph, or is evaluated at
//! load time when all its inputs are constants ([`super::consts`]). The per-sample shape of every runtime value
//! is tracked (the batch dimension is free), so reshapes, pools and reductions are checked when the file is read,
//! not when it runs. BatchNormalization nodes become eval BatchNorm layers, which [`Graph::fold_batch_norm`] then
//! folds into the convolution or linear layer before them.

use super::consts::{self, broadcast_shape};
use super::node::NodeRef;
use super::proto::{tensor_shape_proto::dimension, type_proto, GraphProto};
use super::tensor::{read_tensor, Const, Dim};
use crate::layer::Layer;
use crate::model::{Graph, ValueId};
use crate::nn::{
    AvgPool2dConfig, Clamp, Conv2d, Conv2dConfig, Flatten, GlobalAvgPool, Linear, LinearConfig,
    MaxPool2dConfig, ReLU, Reshape, ScaleShift, Sigmoid, Softmax,
};
use crate::norm::BatchNormConfig;
use crate::state::{StateDict, Stateful};
use ndarray::{ArrayD, IxDyn};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// A value while importing: a runtime tensor of the graph (with its per-sample shape) or a constant.
#[derive(Clone)]
enum V {
    Act { id: ValueId, shape: Vec<usize> },
    Const(Const),
}

/// What [`import_graph`] gives back.
pub(crate) struct Imported {
    pub graph: Graph,
    pub input_name: String,
    pub input_shape: Vec<usize>,
    pub output_names: Vec<String>,
    pub folded: usize,
}

type R<T> = std::result::Result<T, String>;

struct Importer<'a> {
    dir: Option<&'a Path>,
    g: Graph,
    vals: HashMap<String, V>,
    opset: i64,
    readers: HashMap<&'a str, usize>,
    taken: HashSet<String>,
    fixed_batch: Option<usize>,
}

/// The ops whose nodes are evaluated when every input is a constant.
const FOLDABLE: &[&str] = &[
    "Identity",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Cast",
    "CastLike",
    "Expand",
    "Slice",
    "Transpose",
    "ConstantOfShape",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Reshape",
    "Flatten",
    "Sqrt",
    "Neg",
    "Reciprocal",
];

/// The most inputs each op takes (`None`: any number, as Concat).
fn max_inputs(op: &str) -> Option<usize> {
    Some(match op {
        "Constant" => 0,
        "Relu" | "Sigmoid" | "MaxPool" | "AveragePool" | "GlobalAveragePool" | "Flatten"
        | "Softmax" | "Transpose" | "Identity" | "Shape" | "Cast" | "Sqrt" | "Neg"
        | "Reciprocal" | "ConstantOfShape" => 1,
        "MatMul" | "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Reshape" | "Squeeze" | "Unsqueeze"
        | "ReduceMean" | "Gather" | "Expand" | "CastLike" => 2,
        "Conv" | "Gemm" | "Clip" | "InstanceNormalization" | "LayerNormalization" | "Dropout" => 3,
        "BatchNormalization" | "Slice" => 5,
        _ => return None,
    })
}

pub(crate) fn import_graph(gp: &GraphProto, opset: i64, dir: Option<&Path>) -> R<Imported> {
    let mut im = Importer {
        dir,
        g: Graph::new(),
        vals: HashMap::new(),
        opset,
        readers: HashMap::new(),
        taken: HashSet::new(),
        fixed_batch: None,
    };
    for t in &gp.initializer {
        let name = t.name.clone().unwrap_or_default();
        let c = read_tensor(t, dir).map_err(|e| format!("initializer {name:?}: {e}"))?;
        im.vals.insert(name, V::Const(c));
    }
    for n in &gp.node {
        for i in n.input.iter().filter(|s| !s.is_empty()) {
            *im.readers.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &gp.output {
        *im.readers
            .entry(o.name.as_deref().unwrap_or(""))
            .or_default() += 1;
    }
    let runtime: Vec<_> = gp
        .input
        .iter()
        .filter(|i| !im.vals.contains_key(i.name.as_deref().unwrap_or("")))
        .collect();
    if runtime.len() != 1 {
        return Err(format!(
            "the graph has {} runtime inputs ({:?}); one image input is supported",
            runtime.len(),
            runtime
                .iter()
                .map(|i| i.name.as_deref().unwrap_or(""))
                .collect::<Vec<_>>()
        ));
    }
    let input = runtime[0];
    let input_name = input.name.clone().unwrap_or_default();
    let input_shape = im.input_shape(input, &input_name)?;
    let id = im.g.input(input_name.clone());
    im.taken.insert(input_name.clone());
    im.vals.insert(
        input_name.clone(),
        V::Act {
            id,
            shape: input_shape.clone(),
        },
    );
    for (i, p) in gp.node.iter().enumerate() {
        let n = NodeRef::new(p, i);
        im.node(&n)
            .map_err(|e| format!("node {:?} ({}): {e}", n.name, n.op))?;
    }
    let mut outs = vec![];
    let mut output_names = vec![];
    for o in &gp.output {
        let name = o.name.clone().unwrap_or_default();
        match im.vals.get(&name) {
            Some(V::Act { id, .. }) => outs.push(*id),
            Some(V::Const(_)) => return Err(format!("output {name:?} is a constant")),
            None => return Err(format!("output {name:?} is not computed by any node")),
        }
        output_names.push(name);
    }
    if outs.is_empty() {
        return Err("the graph has no outputs".into());
    }
    im.g.set_outputs(&outs).map_err(|e| e.to_string())?;
    let folded = im.g.fold_batch_norm().map_err(|e| e.to_string())?;
    Ok(Imported {
        graph: im.g,
        input_name,
        input_shape,
        output_names,
        folded,
    })
}

impl<'a> Importer<'a> {
    fn input_shape(&mut self, v: &super::proto::ValueInfoProto, name: &str) -> R<Vec<usize>> {
        let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(format!("input {name:?} is not a tensor"));
        };
        if t.elem_type != Some(1) {
            return Err(format!(
                "input {name:?} has element type {:?}; float32 (1) is supported",
                t.elem_type
            ));
        }
        let dims = &t
            .shape
            .as_ref()
            .ok_or(format!("input {name:?} has no shape"))?
            .dim;
        if dims.len() < 2 {
            return Err(format!(
                "input {name:?} has rank {}; (N, ...) of rank >= 2 is supported",
                dims.len()
            ));
        }
        if let Some(dimension::Value::DimValue(b)) = dims[0].value {
            self.fixed_batch = usize::try_from(b).ok();
        }
        let per = dims[1..]
            .iter()
            .enumerate()
            .map(|(i, d)| match d.value {
                Some(dimension::Value::DimValue(v)) if v > 0 => Ok(v as usize),
                _ => Err(format!(
                    "dimension {} of input {name:?} is dynamic or invalid; only the batch dimension may be dynamic",
                    i + 1
                )),
            })
            .collect::<R<Vec<usize>>>()?;
        if consts::numel(&per).is_none_or(|n| n as u128 > super::tensor::MAX_ELEMENTS) {
            return Err(format!(
                "input {name:?} of per-sample shape {per:?} is too large"
            ));
        }
        Ok(per)
    }

    fn get(&self, n: &NodeRef, i: usize) -> R<&V> {
        let name = n.input(i).ok_or_else(|| format!("input {i} is missing"))?;
        self.vals
            .get(name)
            .ok_or_else(|| format!("input {name:?} is not defined before this node"))
    }

    fn opt_const(&self, n: &NodeRef, i: usize) -> R<Option<&Const>> {
        if n.input(i).is_none() {
            return Ok(None);
        }
        match self.get(n, i)? {
            V::Const(c) => Ok(Some(c)),
            V::Act { .. } => Err(format!(
                "input {i} ({:?}) must be a constant (an initializer or a folded value)",
                n.input(i).unwrap_or("")
            )),
        }
    }

    fn konst(&self, n: &NodeRef, i: usize) -> R<&Const> {
        self.opt_const(n, i)?
            .ok_or_else(|| format!("input {i} is missing"))
    }

    fn act(&self, n: &NodeRef, i: usize) -> R<(ValueId, Vec<usize>)> {
        match self.get(n, i)? {
            V::Act { id, shape } => Ok((*id, shape.clone())),
            V::Const(_) => Err(format!(
                "input {i} is a constant; a runtime tensor is expected"
            )),
        }
    }

    fn set(&mut self, n: &NodeRef, v: V) -> R<()> {
        let out = n.p.output.first().ok_or("the node has no output")?;
        for (k, extra) in n.p.output.iter().enumerate().skip(1) {
            if !extra.is_empty() && self.readers.get(extra.as_str()).copied().unwrap_or(0) > 0 {
                return Err(format!(
                    "output {k} ({extra:?}) is read, and only output 0 is supported"
                ));
            }
        }
        self.vals.insert(out.clone(), v);
        Ok(())
    }

    fn unique(&mut self, base: &str) -> String {
        let mut name = if base.is_empty() {
            "node".to_string()
        } else {
            base.to_string()
        };
        let mut k = 1;
        while self.taken.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.taken.insert(name.clone());
        name
    }

    /// Adds `layer` reading `x` (per-sample shape `shape`) under a name made from `name`.
    fn layer(
        &mut self,
        name: &str,
        layer: Box<dyn Layer<f32>>,
        x: ValueId,
        shape: &[usize],
    ) -> R<V> {
        let mut full = vec![2];
        full.extend_from_slice(shape);
        let out = layer.output_shape(&full).map_err(|e| e.to_string())?;
        let name = self.unique(name);
        let id = self
            .g
            .layer_boxed(name, layer, x)
            .map_err(|e| e.to_string())?;
        Ok(V::Act {
            id,
            shape: out[1..].to_vec(),
        })
    }

    /// `x` reshaped to the per-sample shape `to` (no node when it already has it).
    fn reshape(&mut self, name: &str, x: ValueId, from: &[usize], to: Vec<usize>) -> R<V> {
        if from == to.as_slice() {
            return Ok(V::Act { id: x, shape: to });
        }
        if to.len() == 1 {
            return self.layer(name, Box::new(Flatten::<f32>::new()), x, from);
        }
        self.layer(name, Box::new(Reshape::<f32>::new(to)), x, from)
    }

    fn load(layer: &mut dyn Layer<f32>, tensors: &[(&str, ArrayD<f32>)]) -> R<()> {
        let mut sd = StateDict::new();
        for (k, a) in tensors {
            sd.insert_float(k.to_string(), a);
        }
        layer.load_state("", &sd).map_err(|e| e.to_string())
    }

    fn node(&mut self, n: &NodeRef) -> R<()> {
        if !matches!(n.p.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
            return Err(format!(
                "custom domain {:?} is not supported",
                n.p.domain.as_deref().unwrap_or("")
            ));
        }
        if let Some(max) = max_inputs(n.op) {
            if n.p.input.len() > max {
                return Err(format!(
                    "{} inputs; {} takes at most {max}",
                    n.p.input.len(),
                    n.op
                ));
            }
        }
        if n.op == "Constant" {
            return self.constant(n);
        }
        if n.op == "Dropout" || n.op == "Identity" {
            n.check_attrs(&["seed", "ratio", "is_test"])?;
            let v = self.get(n, 0)?.clone();
            return self.set(n, v);
        }
        let all_const = (0..n.p.input.len())
            .filter(|&i| n.input(i).is_some())
            .all(|i| matches!(self.vals.get(n.input(i).unwrap_or("")), Some(V::Const(_))));
        if n.op == "Shape" {
            n.check_attrs(&["start", "end"])?;
            let dims: Vec<Dim> = match self.get(n, 0)? {
                V::Act { shape, .. } => std::iter::once(Dim::Batch)
                    .chain(shape.iter().map(|&d| Dim::K(d as i64)))
                    .collect(),
                V::Const(c) => c.dims.iter().map(|&d| Dim::K(d as i64)).collect(),
            };
            let r = dims.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (s, e) = (clampi(n.int("start", 0)), clampi(n.int("end", r)));
            let v = dims[s..e.max(s)].to_vec();
            return self.set(n, V::Const(Const::ints(vec![v.len()], v)));
        }
        // CastLike reads only the type of its second input, which may be a runtime tensor
        let casts_const = n.op == "CastLike" && matches!(self.get(n, 0)?, V::Const(_));
        if (all_const || casts_const) && FOLDABLE.contains(&n.op) {
            let c = self.fold(n)?;
            return self.set(n, V::Const(c));
        }
        let v = self.runtime(n)?;
        self.set(n, v)
    }

    fn constant(&mut self, n: &NodeRef) -> R<()> {
        n.check_attrs(&[
            "value",
            "value_float",
            "value_floats",
            "value_int",
            "value_ints",
        ])?;
        let c = if let Some(t) = n.attribute("value").and_then(|a| a.t.as_ref()) {
            read_tensor(t, self.dir)?
        } else if let Some(a) = n.attribute("value_float") {
            Const::floats(vec![], vec![a.f.unwrap_or(0.0) as f64])
        } else if let Some(a) = n.attribute("value_floats") {
            Const::floats(
                vec![a.floats.len()],
                a.floats.iter().map(|&v| v as f64).collect(),
            )
        } else if let Some(a) = n.attribute("value_int") {
            Const::ints(vec![], vec![Dim::K(a.i.unwrap_or(0))])
        } else if let Some(a) = n.attribute("value_ints") {
            Const::ints(
                vec![a.ints.len()],
                a.ints.iter().map(|&v| Dim::K(v)).collect(),
            )
        } else {
            return Err("Constant without a supported value attribute".into());
        };
        self.set(n, V::Const(c))
    }

    /// Axes from the attribute (older opsets) or from input 1 (opset 13+, 18+ for reductions).
    fn axes(&self, n: &NodeRef) -> R<Option<Vec<i64>>> {
        if let Some(a) = n.ints("axes") {
            return Ok(Some(a));
        }
        Ok(match self.opt_const(n, 1)? {
            Some(c) => Some(c.to_i64()?),
            None => None,
        })
    }

    fn fold(&self, n: &NodeRef) -> R<Const> {
        let c0 = self.konst(n, 0)?;
        Ok(match n.op {
            "Identity" => c0.clone(),
            "Gather" => {
                n.check_attrs(&["axis"])?;
                consts::gather(c0, self.konst(n, 1)?, n.int("axis", 0))?
            }
            "Unsqueeze" => {
                n.check_attrs(&["axes"])?;
                consts::unsqueeze(c0, &self.axes(n)?.ok_or("Unsqueeze without axes")?)?
            }
            "Squeeze" => {
                n.check_attrs(&["axes"])?;
                consts::squeeze(c0, self.axes(n)?.as_deref())?
            }
            "Concat" => {
                n.check_attrs(&["axis"])?;
                let cs = (0..n.p.input.len())
                    .map(|i| self.konst(n, i))
                    .collect::<R<Vec<_>>>()?;
                consts::concat(&cs, n.int("axis", 0))?
            }
            "Cast" => {
                n.check_attrs(&["to", "saturate", "round_mode"])?;
                consts::cast(c0, n.int("to", 1))?
            }
            "CastLike" => {
                n.check_attrs(&["saturate", "round_mode"])?;
                let like = self.get(n, 1)?;
                match like {
                    V::Act { .. } => consts::cast(c0, 1)?,
                    V::Const(c) => match c.data {
                        super::tensor::Data::F(_) => consts::cast(c0, 1)?,
                        super::tensor::Data::I(_) => consts::cast(c0, 7)?,
                    },
                }
            }
            "Expand" => consts::expand(c0, &self.konst(n, 1)?.to_i64()?)?,
            "Slice" => {
                let ints = |i| -> R<Option<Vec<i64>>> {
                    Ok(match self.opt_const(n, i)? {
                        Some(c) => Some(c.to_i64()?),
                        None => None,
                    })
                };
                let (starts, ends) = if self.opset >= 10 {
                    (
                        ints(1)?.ok_or("Slice without starts")?,
                        ints(2)?.ok_or("Slice without ends")?,
                    )
                } else {
                    (
                        n.ints("starts").unwrap_or_default(),
                        n.ints("ends").unwrap_or_default(),
                    )
                };
                let axes = if self.opset >= 10 {
                    ints(3)?
                } else {
                    n.ints("axes")
                };
                consts::slice(c0, &starts, &ends, axes.as_deref(), ints(4)?.as_deref())?
            }
            "Transpose" => {
                n.check_attrs(&["perm"])?;
                consts::transpose(c0, n.ints("perm").as_deref())?
            }
            "ConstantOfShape" => {
                n.check_attrs(&["value"])?;
                let v = match n.attribute("value").and_then(|a| a.t.as_ref()) {
                    Some(t) => read_tensor(t, self.dir)?,
                    None => Const::floats(vec![1], vec![0.0]),
                };
                consts::expand(
                    &Const {
                        dims: vec![],
                        data: v.data,
                    },
                    &c0.to_i64()?,
                )?
            }
            "Add" | "Sub" | "Mul" | "Div" | "Pow" => consts::binary(n.op, c0, self.konst(n, 1)?)?,
            "Sqrt" | "Neg" | "Reciprocal" => {
                let f = match n.op {
                    "Sqrt" => f64::sqrt,
                    "Neg" => |v: f64| -v,
                    _ => |v: f64| 1.0 / v,
                };
                Const::floats(c0.dims.clone(), c0.to_f64()?.into_iter().map(f).collect())
            }
            "Reshape" => {
                n.check_attrs(&["allowzero"])?;
                let t = consts::reshape_target(
                    &c0.dims,
                    &self.konst(n, 1)?.to_i64()?,
                    n.int("allowzero", 0) != 0,
                )?;
                Const {
                    dims: t,
                    data: c0.data.clone(),
                }
            }
            "Flatten" => {
                n.check_attrs(&["axis"])?;
                let a = consts::axis(n.int("axis", 1), c0.dims.len() + 1)?;
                let dims = vec![c0.dims[..a].iter().product(), c0.dims[a..].iter().product()];
                Const {
                    dims,
                    data: c0.data.clone(),
                }
            }
            other => return Err(format!("unsupported op {other} on constants")),
        })
    }

    fn runtime(&mut self, n: &NodeRef) -> R<V> {
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

    /// Symmetric 2-D padding from `pads` [top, left, bottom, right] and `auto_pad`.
    fn pads(
        n: &NodeRef,
        s: &[usize],
        k: (usize, usize),
        st: (usize, usize),
        d: (usize, usize),
    ) -> R<(usize, usize)> {
        let auto = n.string("auto_pad").unwrap_or_default();
        match auto.as_str() {
            "" | "NOTSET" => {
                let p = n.ints("pads").unwrap_or_else(|| vec![0; 4]);
                if p.len() != 4 || p.iter().any(|&v| v < 0) {
                    return Err(format!("pads {p:?}: four non-negative values are expected"));
                }
                if p[0] != p[2] || p[1] != p[3] {
                    return Err(format!("asymmetric pads {p:?} are not supported"));
                }
                Ok((p[0] as usize, p[1] as usize))
            }
            "VALID" => Ok((0, 0)),
            "SAME_UPPER" | "SAME_LOWER" => {
                let total = |i: usize, k: usize, st: usize, d: usize| {
                    let out = s[i].div_ceil(st);
                    ((out - 1) * st + (k - 1) * d + 1).saturating_sub(s[i])
                };
                let (th, tw) = (total(1, k.0, st.0, d.0), total(2, k.1, st.1, d.1));
                if th % 2 == 1 || tw % 2 == 1 {
                    return Err(format!("auto_pad {auto} needs asymmetric padding here ({th}, {tw}), which is not supported"));
                }
                Ok((th / 2, tw / 2))
            }
            other => Err(format!("auto_pad {other:?} is not supported")),
        }
    }

    fn pair(n: &NodeRef, name: &str, default: usize) -> R<(usize, usize)> {
        match n.ints(name) {
            None => Ok((default, default)),
            Some(v) if v.len() == 2 && v.iter().all(|&x| x > 0) => {
                Ok((v[0] as usize, v[1] as usize))
            }
            Some(v) => Err(format!(
                "{name} {v:?}: two positive values are expected (2-D only)"
            )),
        }
    }

    fn conv(&mut self, n: &NodeRef) -> R<V> {
        n.check_attrs(&[
            "kernel_shape",
            "strides",
            "pads",
            "dilations",
            "group",
            "auto_pad",
        ])?;
        let (x, s) = self.act(n, 0)?;
        if s.len() != 3 {
            return Err(format!(
                "Conv of per-sample shape {s:?}; only 2-D convolutions of (C, H, W) are supported"
            ));
        }
        let w = self
            .konst(n, 1)
            .map_err(|e| format!("{e} (the weight)"))?
            .clone();
        let b = self.opt_const(n, 2)?.cloned();
        if w.dims.len() != 4 {
            return Err(format!(
                "weight of shape {:?}; (O, C/group, kH, kW) is expected",
                w.dims
            ));
        }
        let k = (w.dims[2], w.dims[3]);
        if let Some(ks) = n.ints("kernel_shape") {
            if ks != [k.0 as i64, k.1 as i64] {
                return Err(format!(
                    "kernel_shape {ks:?} disagrees with the weight's shape {:?}",
                    w.dims
                ));
            }
        }
        let group = usize::try_from(n.int("group", 1)).map_err(|_| "negative group".to_string())?;
        let st = Self::pair(n, "strides", 1)?;
        let d = Self::pair(n, "dilations", 1)?;
        let p = Self::pads(n, &s, k, st, d)?;
        if group == 0 || w.dims[1] * group != s[0] {
            return Err(format!(
                "input has {} channels, the weight {:?} with group {group} expects {}",
                s[0],
                w.dims,
                w.dims[1] * group
            ));
        }
        let cfg = Conv2dConfig::new(s[0], w.dims[0], k)
            .stride(st)
            .padding(p)
            .dilation(d)
            .groups(group)
            .bias(b.is_some());
        cfg.validate().map_err(|e| e.to_string())?;
        let mut conv = Conv2d::<f32>::new(cfg).map_err(|e| e.to_string())?;
        let mut ts = vec![("weight", w.to_array()?)];
        if let Some(b) = b {
            if b.len() != w.dims[0] {
                return Err(format!(
                    "bias of shape {:?} for {} output channels",
                    b.dims, w.dims[0]
                ));
            }
            ts.push((
                "bias",
                Const {
                    dims: vec![w.dims[0]],
                    ..b
                }
                .to_array()?,
            ));
        }
        Self::load(&mut conv, &ts)?;
        let name = n.name.clone();
        self.layer(&name, Box::new(conv), x, &s)
    }

    fn batch_norm(&mut self, n: &NodeRef) -> R<V> {
        n.check_attrs(&["epsilon", "momentum", "training_mode", "spatial"])?;
        if n.int("training_mode", 0) != 0 {
            return Err("training_mode 1 is not supported (inference only)".into());
        }
        if n.int("spatial", 1) != 1 {
            return Err("spatial 0 is not supported".into());
        }
        let (x, s) = self.act(n, 0)?;
        let c = *s.first().ok_or("BatchNormalization of a rank-1 tensor")?;
        let mut ts = vec![];
        for (i, key) in [
            (1, "weight"),
            (2, "bias"),
            (3, "running_mean"),
            (4, "running_var"),
        ] {
            let t = self.konst(n, i)?;
            if t.len() != c {
                return Err(format!(
                    "{key} (input {i}) has shape {:?}; {c} channels expected",
                    t.dims
                ));
            }
            ts.push((
                key,
                Const {
                    dims: vec![c],
                    ..t.clone()
                }
                .to_array()?,
            ));
        }
        let eps = n.float("epsilon", 1e-5) as f64;
        let cfg = if s.len() == 3 {
            BatchNormConfig::d2(c)
        } else {
            BatchNormConfig::new(c)
        }
        .eps(eps);
        let mut bn = cfg.build::<f32>().map_err(|e| e.to_string())?;
        let mut sd = StateDict::new();
        for (k, a) in &ts {
            sd.insert_float(k.to_string(), a);
        }
        sd.insert_i64("num_batches_tracked".into(), 0);
        bn.load_state("", &sd).map_err(|e| e.to_string())?;
        let name = n.name.clone();
        self.layer(&name, Box::new(bn), x, &s)
    }

    /// InstanceNormalization (instance statistics, per-channel affine) and LayerNormalization (over the axes
    /// from `axis` on, affine of that shape).
    fn other_norm(&mut self, n: &NodeRef) -> R<V> {
        let (x, s) = self.act(n, 0)?;
        let name = n.name.clone();
        let eps = n.float("epsilon", 1e-5) as f64;
        let affine_of = |t: &Const, dims: &[usize], what: &str| -> R<ArrayD<f32>> {
            if Some(t.len()) != consts::numel(dims) {
                return Err(format!("{what} has shape {:?}; {dims:?} expected", t.dims));
            }
            Const {
                dims: dims.to_vec(),
                ..t.clone()
            }
            .to_array()
        };
        if n.op == "InstanceNormalization" {
            n.check_attrs(&["epsilon"])?;
            if s.len() < 2 || s.len() > 4 {
                return Err(format!("InstanceNormalization of per-sample shape {s:?}; (C, L), (C, H, W) or (C, D, H, W) expected"));
            }
            let c = s[0];
            let w = affine_of(self.konst(n, 1)?, &[c], "scale")?;
            let b = affine_of(self.konst(n, 2)?, &[c], "B")?;
            let cfg = crate::norm::InstanceNormConfig::new(c, s.len() - 1)
                .eps(eps)
                .affine(true);
            let mut layer = cfg.build::<f32>().map_err(|e| e.to_string())?;
            Self::load(&mut layer, &[("weight", w), ("bias", b)])?;
            return self.layer(&name, Box::new(layer), x, &s);
        }
        n.check_attrs(&["axis", "epsilon", "stash_type"])?;
        let rank = s.len() + 1;
        let a = consts::axis(n.int("axis", -1), rank)?;
        if a == 0 {
            return Err("LayerNormalization over the batch dimension is not supported".into());
        }
        let shape = s[a - 1..].to_vec();
        let w = affine_of(self.konst(n, 1)?, &shape, "Scale")?;
        let b = match self.opt_const(n, 2)? {
            Some(t) => Some(affine_of(t, &shape, "B")?),
            None => None,
        };
        let cfg = crate::norm::LayerNormConfig::new(&shape)
            .eps(eps)
            .bias(b.is_some());
        let mut layer = cfg.build::<f32>().map_err(|e| e.to_string())?;
        let mut ts = vec![("weight", w)];
        ts.extend(b.map(|b| ("bias", b)));
        Self::load(&mut layer, &ts)?;
        self.layer(&name, Box::new(layer), x, &s)
    }

    fn pool(&mut self, n: &NodeRef) -> R<V> {
        let max = n.op == "MaxPool";
        if max {
            n.check_attrs(&[
                "kernel_shape",
                "strides",
                "pads",
                "dilations",
                "ceil_mode",
                "auto_pad",
                "storage_order",
            ])?;
        } else {
            n.check_attrs(&[
                "kernel_shape",
                "strides",
                "pads",
                "dilations",
                "ceil_mode",
                "auto_pad",
                "count_include_pad",
            ])?;
        }
        let (x, s) = self.act(n, 0)?;
        if s.len() != 3 {
            return Err(format!(
                "{} of per-sample shape {s:?}; (C, H, W) is expected",
                n.op
            ));
        }
        let k = Self::pair(n, "kernel_shape", 0)?;
        if k.0 == 0 {
            return Err("kernel_shape is required".into());
        }
        let st = Self::pair(n, "strides", 1)?;
        let d = Self::pair(n, "dilations", 1)?;
        let p = Self::pads(n, &s, k, st, d)?;
        if n.int("ceil_mode", 0) != 0 {
            return Err("ceil_mode 1 is not supported".into());
        }
        if n.int("storage_order", 0) != 0 {
            return Err("storage_order 1 is not supported".into());
        }
        let layer: Box<dyn Layer<f32>> = if max {
            Box::new(
                MaxPool2dConfig::new(k)
                    .stride(st)
                    .padding(p)
                    .dilation(d)
                    .build::<f32>()
                    .map_err(|e| e.to_string())?,
            )
        } else {
            if d != (1, 1) {
                return Err(format!("AveragePool with dilations {d:?} is not supported"));
            }
            let cfg = AvgPool2dConfig::new(k)
                .stride(st)
                .padding(p)
                .count_include_pad(n.int("count_include_pad", 0) != 0);
            Box::new(cfg.build::<f32>().map_err(|e| e.to_string())?)
        };
        let name = n.name.clone();
        self.layer(&name, layer, x, &s)
    }

    fn gemm(&mut self, n: &NodeRef) -> R<V> {
        n.check_attrs(&["alpha", "beta", "transA", "transB"])?;
        let (x, s) = self.act(n, 0)?;
        if n.int("transA", 0) != 0 {
            return Err("transA 1 on the runtime input is not supported".into());
        }
        if s.len() != 1 {
            return Err(format!(
                "Gemm input of per-sample shape {s:?}; (N, K) is expected"
            ));
        }
        let b = self.konst(n, 1).map_err(|e| format!("{e} (the weight)"))?;
        if b.dims.len() != 2 {
            return Err(format!(
                "weight of shape {:?}; a matrix is expected",
                b.dims
            ));
        }
        let w = if n.int("transB", 0) != 0 {
            b.clone()
        } else {
            consts::transpose(b, None)?
        };
        let (fout, fin) = (w.dims[0], w.dims[1]);
        if fin != s[0] {
            return Err(format!(
                "input has {} features, the weight {:?} expects {fin}",
                s[0], b.dims
            ));
        }
        let alpha = n.float("alpha", 1.0) as f64;
        let beta = n.float("beta", 1.0) as f64;
        let scale = |c: &Const, f: f64| -> R<Const> {
            Ok(Const::floats(
                c.dims.clone(),
                c.to_f64()?.into_iter().map(|v| v * f).collect(),
            ))
        };
        let wt = if alpha == 1.0 { w } else { scale(&w, alpha)? };
        let c = self.opt_const(n, 2)?.cloned();
        let mut ts = vec![("weight", wt.to_array()?)];
        if let Some(c) = &c {
            if broadcast_shape(&c.dims, &[1, fout]).as_deref() != Some(&[1, fout][..]) {
                return Err(format!(
                    "bias C of shape {:?} does not broadcast to one row of {fout}",
                    c.dims
                ));
            }
            let row = consts::expand(c, &[1, fout as i64])?;
            let row = if beta == 1.0 { row } else { scale(&row, beta)? };
            ts.push((
                "bias",
                Const {
                    dims: vec![fout],
                    ..row
                }
                .to_array()?,
            ));
        }
        let mut lin = Linear::<f32>::new(LinearConfig::new(fin, fout).bias(c.is_some()))
            .map_err(|e| e.to_string())?;
        Self::load(&mut lin, &ts)?;
        let name = n.name.clone();
        self.layer(&name, Box::new(lin), x, &s)
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
