//! ONNX graph → [`Graph`]: each node becomes a layer, an `Add` or a `Concat` of the graph, or is evaluated at
//! load time when all its inputs are constants ([`super::consts`]). The per-sample shape of every runtime value
//! is tracked (the batch dimension is free), so reshapes, pools and reductions are checked when the file is read,
//! not when it runs. BatchNormalization nodes become eval BatchNorm layers, which [`Graph::fold_batch_norm`] then
//! folds into the convolution or linear layer before them.

use super::consts::{self};
use super::node::NodeRef;
use super::proto::{tensor_shape_proto::dimension, type_proto, GraphProto};
use super::tensor::{read_tensor, Const, Dim};
use crate::layer::Layer;
use crate::model::{Graph, ValueId};
use crate::nn::{Flatten, Reshape};
use crate::state::StateDict;
use ndarray::ArrayD;
use std::collections::{HashMap, HashSet};
use std::path::Path;

mod layers;
mod lower;

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
}
