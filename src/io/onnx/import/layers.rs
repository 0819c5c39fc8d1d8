//! Lowering of the ops that carry weights or windows: Conv, BatchNormalization, InstanceNormalization and
//! LayerNormalization, MaxPool/AveragePool and Gemm/MatMul, with their attributes (pads, strides, dilations,
//! groups, auto_pad) checked against what the layers support.

use super::{Importer, R, V};
use crate::io::onnx::consts::{self, broadcast_shape};
use crate::io::onnx::node::NodeRef;
use crate::io::onnx::tensor::Const;
use crate::layer::Layer;
use crate::nn::{AvgPool2dConfig, Conv2d, Conv2dConfig, Linear, LinearConfig, MaxPool2dConfig};
use crate::norm::BatchNormConfig;
use crate::state::{StateDict, Stateful};
use ndarray::ArrayD;

impl Importer<'_> {
    /// Symmetric 2-D padding from `pads` [top, left, bottom, right] and `auto_pad`.
    pub(super) fn pads(
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

    pub(super) fn pair(n: &NodeRef, name: &str, default: usize) -> R<(usize, usize)> {
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

    pub(super) fn conv(&mut self, n: &NodeRef) -> R<V> {
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

    pub(super) fn batch_norm(&mut self, n: &NodeRef) -> R<V> {
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
    pub(super) fn other_norm(&mut self, n: &NodeRef) -> R<V> {
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

    pub(super) fn pool(&mut self, n: &NodeRef) -> R<V> {
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

    pub(super) fn gemm(&mut self, n: &NodeRef) -> R<V> {
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
}
