//! [`Graph`] → ONNX, in eval mode: each node becomes the ONNX op that computes it (BatchNorm kept as
//! BatchNormalization, or folded into the convolution first with [`ExportOptions::fold_bn`]). Norms without an op
//! in the opset are written as their decomposition: GroupNorm as Reshape → InstanceNormalization over the groups
//! → Reshape → Mul/Add of the affine, as PyTorch's own exporter writes it. The batch dimension is dynamic.

use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::model::spec::{LayerSpec, OpSpec};
use crate::model::Graph;
use crate::state::{StateDict, StateTensor, Stateful};
use crate::{NvError, Result};
use prost::Message;
use std::path::Path;

/// How to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The default-domain opset (13-21; 17 by default, the TorchScript exporter's newest).
    pub opset: i64,
    /// Fold each eval BatchNorm into the convolution or linear layer before it first.
    pub fold_bn: bool,
    /// The input normalization, written to the metadata (`normvision.mean`, `normvision.std`), where
    /// [`super::load_onnx`] finds it again.
    pub normalization: Option<crate::data::Normalization>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            opset: 17,
            fold_bn: false,
            normalization: None,
        }
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}
fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    }
}
fn i64_tensor(name: &str, v: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn value_info(name: &str, per_sample: &[usize]) -> ValueInfoProto {
    let mut dim = vec![tensor_shape_proto::Dimension {
        value: Some(tensor_shape_proto::dimension::Value::DimParam(
            "batch".into(),
        )),
        ..Default::default()
    }];
    dim.extend(per_sample.iter().map(|&d| tensor_shape_proto::Dimension {
        value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
        ..Default::default()
    }));
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Writer<'a> {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    sd: &'a StateDict,
    opset: i64,
}

impl Writer<'_> {
    fn node(&mut self, op: &str, name: &str, ins: &[&str], out: &str, attrs: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            attribute: attrs,
            ..Default::default()
        });
    }
    /// Initializer `key` from the state dict (optionally reshaped), under its own name.
    fn weight(&mut self, key: &str, dims: Option<&[usize]>) -> Result<String> {
        let Some(StateTensor::F32(a)) = self.sd.get(key) else {
            return Err(NvError::Config(format!(
                "ONNX export: no tensor {key:?} in the state dict"
            )));
        };
        let v: Vec<f32> = a.iter().copied().collect();
        self.inits
            .push(f32_tensor(key, dims.unwrap_or(a.shape()), &v));
        Ok(key.to_string())
    }
    fn constant(&mut self, name: &str, dims: &[usize], v: &[f32]) -> String {
        self.inits.push(f32_tensor(name, dims, v));
        name.to_string()
    }
    fn ints(&mut self, name: &str, v: &[i64]) -> String {
        self.inits.push(i64_tensor(name, v));
        name.to_string()
    }
    fn ones_or(
        &mut self,
        key: &str,
        c: usize,
        fill: f32,
        dims: Option<&[usize]>,
    ) -> Result<String> {
        if self.sd.get(key).is_some() {
            self.weight(key, dims)
        } else {
            Ok(self.constant(key, dims.unwrap_or(&[c]), &vec![fill; c]))
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &mut self,
        name: &str,
        spec: &LayerSpec,
        x: &str,
        out: &str,
        in_shape: &[usize],
    ) -> Result<()> {
        let k = |s: &str| format!("{name}.{s}");
        let pair = |p: (usize, usize)| vec![p.0 as i64, p.1 as i64];
        let pads = |p: (usize, usize)| vec![p.0 as i64, p.1 as i64, p.0 as i64, p.1 as i64];
        let unsupported = |what: &str| {
            Err(NvError::Config(format!(
                "ONNX export: node {name:?}: {what} has no ONNX form here"
            )))
        };
        let eval_spec = spec.eval_equivalent();
        match eval_spec.as_ref() {
            LayerSpec::BatchRenorm(_) | LayerSpec::GhostBatchNorm(_) => {
                unreachable!("eval_equivalent maps them to BatchNorm")
            }
            LayerSpec::Conv2d(c) => {
                let mut ins = vec![x.to_string(), self.weight(&k("weight"), None)?];
                if c.bias {
                    ins.push(self.weight(&k("bias"), None)?);
                }
                let ins: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
                let attrs = vec![
                    attr_ints("kernel_shape", &pair(c.kernel_size)),
                    attr_ints("strides", &pair(c.stride)),
                    attr_ints("pads", &pads(c.padding)),
                    attr_ints("dilations", &pair(c.dilation)),
                    attr_int("group", c.groups as i64),
                ];
                self.node("Conv", name, &ins, out, attrs);
            }
            LayerSpec::Linear(c) => {
                if in_shape.len() == 2 {
                    let mut ins = vec![x.to_string(), self.weight(&k("weight"), None)?];
                    if c.bias {
                        ins.push(self.weight(&k("bias"), None)?);
                    }
                    let ins: Vec<&str> = ins.iter().map(|s| s.as_str()).collect();
                    self.node("Gemm", name, &ins, out, vec![attr_int("transB", 1)]);
                } else {
                    let Some(StateTensor::F32(w)) = self.sd.get(&k("weight")) else {
                        return Err(NvError::Config(format!("ONNX export: no {}", k("weight"))));
                    };
                    let wt: Vec<f32> = w.t().iter().copied().collect();
                    let wname =
                        self.constant(&k("weight_t"), &[c.in_features, c.out_features], &wt);
                    if c.bias {
                        let mm = format!("{name}.matmul");
                        self.node("MatMul", &mm, &[x, &wname], &mm, vec![]);
                        let b = self.weight(&k("bias"), None)?;
                        self.node("Add", name, &[&mm, &b], out, vec![]);
                    } else {
                        self.node("MatMul", name, &[x, &wname], out, vec![]);
                    }
                }
            }
            LayerSpec::BatchNorm(c) => {
                if !c.track_running_stats {
                    return unsupported("BatchNorm without running statistics (it normalises with batch statistics in eval)");
                }
                let ch = c.num_features;
                let ins = [
                    self.ones_or(&k("weight"), ch, 1.0, None)?,
                    self.ones_or(&k("bias"), ch, 0.0, None)?,
                    self.weight(&k("running_mean"), None)?,
                    self.weight(&k("running_var"), None)?,
                ];
                self.node(
                    "BatchNormalization",
                    name,
                    &[x, &ins[0], &ins[1], &ins[2], &ins[3]],
                    out,
                    vec![attr_float("epsilon", c.eps as f32)],
                );
            }
            LayerSpec::FrozenBatchNorm(c) => {
                let ins = [
                    self.weight(&k("weight"), None)?,
                    self.weight(&k("bias"), None)?,
                    self.weight(&k("running_mean"), None)?,
                    self.weight(&k("running_var"), None)?,
                ];
                self.node(
                    "BatchNormalization",
                    name,
                    &[x, &ins[0], &ins[1], &ins[2], &ins[3]],
                    out,
                    vec![attr_float("epsilon", c.eps as f32)],
                );
            }
            LayerSpec::GroupNorm(c) => {
                let g = c.num_groups;
                let shape_g = self.ints(&k("shape_groups"), &[0, g as i64, -1]);
                let r1 = format!("{name}.grouped");
                self.node("Reshape", &r1, &[x, &shape_g], &r1, vec![]);
                let ones = self.constant(&k("ones"), &[g], &vec![1.0; g]);
                let zeros = self.constant(&k("zeros"), &[g], &vec![0.0; g]);
                let inorm = format!("{name}.normalized");
                self.node(
                    "InstanceNormalization",
                    &inorm,
                    &[&r1, &ones, &zeros],
                    &inorm,
                    vec![attr_float("epsilon", c.eps as f32)],
                );
                let mut back: Vec<i64> = vec![0];
                back.extend(in_shape[1..].iter().map(|&d| d as i64));
                let shape_back = self.ints(&k("shape_back"), &back);
                let r2 = format!("{name}.ungrouped");
                let affine_dims: Vec<usize> = std::iter::once(c.num_channels)
                    .chain(in_shape[2..].iter().map(|_| 1))
                    .collect();
                if !c.affine {
                    self.node("Reshape", &r2, &[&inorm, &shape_back], out, vec![]);
                    return Ok(());
                }
                self.node("Reshape", &r2, &[&inorm, &shape_back], &r2, vec![]);
                let w = self.weight(&k("weight"), Some(&affine_dims))?;
                let b = self.weight(&k("bias"), Some(&affine_dims))?;
                let m = format!("{name}.scaled");
                self.node("Mul", &m, &[&r2, &w], &m, vec![]);
                self.node("Add", name, &[&m, &b], out, vec![]);
            }
            LayerSpec::LayerNorm(c) => {
                if self.opset < 17 {
                    return unsupported("LayerNorm below opset 17");
                }
                let d: usize = c.normalized_shape.iter().product();
                let w = self.ones_or(&k("weight"), d, 1.0, Some(&c.normalized_shape))?;
                let b = self.ones_or(&k("bias"), d, 0.0, Some(&c.normalized_shape))?;
                let axis = -(c.normalized_shape.len() as i64);
                self.node(
                    "LayerNormalization",
                    name,
                    &[x, &w, &b],
                    out,
                    vec![attr_int("axis", axis), attr_float("epsilon", c.eps as f32)],
                );
            }
            LayerSpec::InstanceNorm(c) => {
                if c.track_running_stats {
                    return unsupported("InstanceNorm with running statistics");
                }
                let ch = c.num_features;
                let w = self.ones_or(&k("weight"), ch, 1.0, None)?;
                let b = self.ones_or(&k("bias"), ch, 0.0, None)?;
                self.node(
                    "InstanceNormalization",
                    name,
                    &[x, &w, &b],
                    out,
                    vec![attr_float("epsilon", c.eps as f32)],
                );
            }
            LayerSpec::BatchChannelNorm(_) => return unsupported("Batch-Channel Norm"),
            LayerSpec::UpsampleBilinear { .. } => {
                return unsupported("bilinear up-sampling (ONNX Resize)")
            }
            LayerSpec::Relu => self.node("Relu", name, &[x], out, vec![]),
            LayerSpec::Sigmoid => self.node("Sigmoid", name, &[x], out, vec![]),
            LayerSpec::Softmax => self.node("Softmax", name, &[x], out, vec![attr_int("axis", -1)]),
            LayerSpec::Clamp { lo, hi } => {
                let lo_n = lo
                    .map(|v| self.constant(&k("min"), &[], &[v as f32]))
                    .unwrap_or_default();
                let hi_n = hi
                    .map(|v| self.constant(&k("max"), &[], &[v as f32]))
                    .unwrap_or_default();
                self.node("Clip", name, &[x, &lo_n, &hi_n], out, vec![]);
            }
            LayerSpec::Flatten => self.node("Flatten", name, &[x], out, vec![attr_int("axis", 1)]),
            LayerSpec::Reshape { shape } => {
                let mut t = vec![0i64];
                t.extend(shape.iter().map(|&d| d as i64));
                let s = self.ints(&k("shape"), &t);
                self.node("Reshape", name, &[x, &s], out, vec![]);
            }
            LayerSpec::MaxPool2d(c) => {
                let attrs = vec![
                    attr_ints("kernel_shape", &pair(c.kernel_size)),
                    attr_ints("strides", &pair(c.stride.unwrap_or(c.kernel_size))),
                    attr_ints("pads", &pads(c.padding)),
                    attr_ints("dilations", &pair(c.dilation)),
                    attr_int("ceil_mode", c.ceil_mode as i64),
                ];
                self.node("MaxPool", name, &[x], out, attrs);
            }
            LayerSpec::AvgPool2d(c) => {
                if c.divisor_override.is_some() {
                    return unsupported("AvgPool2d with divisor_override");
                }
                let attrs = vec![
                    attr_ints("kernel_shape", &pair(c.kernel_size)),
                    attr_ints("strides", &pair(c.stride.unwrap_or(c.kernel_size))),
                    attr_ints("pads", &pads(c.padding)),
                    attr_int("ceil_mode", c.ceil_mode as i64),
                    attr_int("count_include_pad", c.count_include_pad as i64),
                ];
                self.node("AveragePool", name, &[x], out, attrs);
            }
            LayerSpec::GlobalAvgPool => {
                let p = format!("{name}.pooled");
                self.node("GlobalAveragePool", &p, &[x], &p, vec![]);
                self.node("Flatten", name, &[&p], out, vec![attr_int("axis", 1)]);
            }
            LayerSpec::Dropout { .. } => self.node("Identity", name, &[x], out, vec![]),
            LayerSpec::ScaleShift { scale, shift } => {
                let mut cur = x.to_string();
                if scale.is_some() {
                    let s = self.weight(&k("scale"), None)?;
                    let o = if shift.is_some() {
                        format!("{name}.scaled")
                    } else {
                        out.to_string()
                    };
                    self.node("Mul", &format!("{name}.mul"), &[&cur, &s], &o, vec![]);
                    cur = o;
                }
                if shift.is_some() {
                    let s = self.weight(&k("shift"), None)?;
                    self.node("Add", name, &[&cur, &s], out, vec![]);
                }
                if scale.is_none() && shift.is_none() {
                    self.node("Identity", name, &[x], out, vec![]);
                }
            }
        }
        Ok(())
    }
}

/// The ONNX model of `graph` (one input of per-sample shape `input_shape`), as bytes.
pub fn to_onnx_bytes(
    graph: &Graph,
    input_shape: &[usize],
    opts: &ExportOptions,
) -> Result<Vec<u8>> {
    if !(13..=21).contains(&opts.opset) {
        return Err(NvError::Config(format!(
            "ONNX export: opset {} (13-21 are written)",
            opts.opset
        )));
    }
    let spec = graph.spec()?;
    let mut sd = graph.state_dict();
    let folded;
    let (spec, shapes) = if opts.fold_bn {
        let mut g = Graph::<f32>::from_spec(&spec)?;
        g.load_state("", &sd)?;
        g.fold_batch_norm()?;
        sd = g.state_dict();
        folded = g.spec()?;
        let mut full = vec![1];
        full.extend_from_slice(input_shape);
        (&folded, g.value_shapes(&[&full])?)
    } else {
        let mut full = vec![1];
        full.extend_from_slice(input_shape);
        (&spec, graph.value_shapes(&[&full])?)
    };
    if spec.inputs.len() != 1 {
        return Err(NvError::Config(
            "ONNX export: graphs of one input are written".into(),
        ));
    }
    // value index: inputs first, then one per node, in order (as the graph numbers them)
    let names: Vec<&str> = spec
        .inputs
        .iter()
        .map(|s| s.as_str())
        .chain(spec.nodes.iter().map(|n| n.name.as_str()))
        .collect();
    let shape_of = |v: &str| -> &[usize] {
        &shapes[names
            .iter()
            .position(|n| *n == v)
            .expect("a value of the graph")]
    };
    let mut w = Writer {
        nodes: vec![],
        inits: vec![],
        sd: &sd,
        opset: opts.opset,
    };
    for n in &spec.nodes {
        match &n.op {
            OpSpec::Layer(l) => {
                w.layer(&n.name, l, &n.inputs[0], &n.name, shape_of(&n.inputs[0]))?
            }
            OpSpec::Add => {
                let mut acc = n.inputs[0].clone();
                for (i, v) in n.inputs.iter().enumerate().skip(1) {
                    let out = if i + 1 == n.inputs.len() {
                        n.name.clone()
                    } else {
                        format!("{}.sum{i}", n.name)
                    };
                    w.node("Add", &out, &[&acc, v], &out, vec![]);
                    acc = out;
                }
            }
            OpSpec::Concat { axis } => {
                let ins: Vec<&str> = n.inputs.iter().map(|s| s.as_str()).collect();
                w.node(
                    "Concat",
                    &n.name,
                    &ins,
                    &n.name,
                    vec![attr_int("axis", *axis as i64)],
                );
            }
            OpSpec::ResizeAs { .. } => {
                return Err(NvError::Config(format!(
                    "ONNX export: node {:?}: bilinear resizing to another value's size (ONNX Resize) has \
                     no ONNX form here",
                    n.name
                )))
            }
        }
    }
    let graph_proto = GraphProto {
        name: Some("normvision".into()),
        node: w.nodes,
        initializer: w.inits,
        input: vec![value_info(&spec.inputs[0], input_shape)],
        output: spec
            .outputs
            .iter()
            .map(|o| value_info(o, &shape_of(o)[1..]))
            .collect(),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: Some(if opts.opset >= 21 { 10 } else { 8 }),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opts.opset),
        }],
        producer_name: Some("normvision".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph_proto),
        metadata_props: opts
            .normalization
            .iter()
            .flat_map(|n| {
                [("normvision.mean", &n.mean), ("normvision.std", &n.std)].map(|(k, v)| {
                    super::proto::StringStringEntryProto {
                        key: Some(k.into()),
                        value: Some(serde_json::to_string(v).expect("floats serialize")),
                    }
                })
            })
            .collect(),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// Writes the ONNX model of `graph` to `path`, atomically.
pub fn save_onnx(
    path: &Path,
    graph: &Graph,
    input_shape: &[usize],
    opts: &ExportOptions,
) -> Result<()> {
    let bytes = to_onnx_bytes(graph, input_shape, opts)?;
    crate::io::write_atomic(path, &bytes)
}
