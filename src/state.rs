//! State dicts under PyTorch's names (`weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`).
//!
//! A [`StateDict`] maps dotted names (`features.0.weight`) to tensors. Floats are stored as `f32` whatever the
//! layer's element type, integers (`num_batches_tracked`) as `i64`, as in a PyTorch `state_dict()`.

use crate::{NvError, Param, Real, Result};
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;

/// One tensor of a state dict.
#[derive(Debug, Clone, PartialEq)]
pub enum StateTensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

impl StateTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            StateTensor::F32(a) => a.shape(),
            StateTensor::I64(a) => a.shape(),
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            StateTensor::F32(a) => a.len(),
            StateTensor::I64(a) => a.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Ordered name → tensor map.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateDict {
    pub tensors: BTreeMap<String, StateTensor>,
}

/// Joins a prefix and a name the way PyTorch does (`""` + `weight` = `weight`, `bn1` + `weight` = `bn1.weight`).
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl StateDict {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert_float<T: Real>(&mut self, name: String, a: &ArrayD<T>) {
        self.tensors
            .insert(name, StateTensor::F32(a.mapv(|v| v.as_f64() as f32)));
    }
    pub fn insert_i64(&mut self, name: String, v: i64) {
        self.tensors
            .insert(name, StateTensor::I64(ArrayD::from_elem(IxDyn(&[]), v)));
    }
    pub fn get(&self, name: &str) -> Option<&StateTensor> {
        self.tensors.get(name)
    }
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
    /// PyTorch's `consume_prefix_in_state_dict_if_present`: strips `prefix` (e.g. `"module."` from
    /// DistributedDataParallel, `"model."` from Lightning) from every key that starts with it.
    pub fn consume_prefix(&mut self, prefix: &str) {
        let tensors = std::mem::take(&mut self.tensors);
        self.tensors = tensors
            .into_iter()
            .map(|(k, v)| match k.strip_prefix(prefix) {
                Some(rest) => (rest.to_string(), v),
                None => (k, v),
            })
            .collect();
    }
    /// Copies a float tensor into `dst`, checking its shape.
    pub fn load_float<T: Real>(&self, name: &str, dst: &mut ArrayD<T>) -> Result<()> {
        match self.tensors.get(name) {
            Some(StateTensor::F32(a)) => {
                if a.shape() != dst.shape() {
                    return Err(NvError::State(format!(
                        "{name}: expected shape {:?}, found {:?}",
                        dst.shape(),
                        a.shape()
                    )));
                }
                dst.zip_mut_with(a, |d, s| *d = T::of_f64(*s as f64));
                Ok(())
            }
            Some(StateTensor::I64(_)) => Err(NvError::State(format!(
                "{name}: expected a float tensor, found int64"
            ))),
            None => Err(NvError::State(format!("missing key {name}"))),
        }
    }
    /// Reads a scalar int64 (`num_batches_tracked`); a float scalar is accepted too.
    pub fn load_i64(&self, name: &str) -> Result<i64> {
        match self.tensors.get(name) {
            Some(StateTensor::I64(a)) if a.len() == 1 => Ok(*a.iter().next().unwrap()),
            Some(StateTensor::F32(a)) if a.len() == 1 => Ok(*a.iter().next().unwrap() as i64),
            Some(t) => Err(NvError::State(format!(
                "{name}: expected a scalar, found shape {:?}",
                t.shape()
            ))),
            None => Err(NvError::State(format!("missing key {name}"))),
        }
    }
}

/// Anything with named parameters and buffers.
pub trait Stateful<T: Real> {
    /// Appends this module's tensors under `prefix` (PyTorch names).
    fn save_state(&self, prefix: &str, sd: &mut StateDict);
    /// Loads this module's tensors from `prefix`; a missing key or a wrong shape is an error.
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()>;
    /// Visits every trainable parameter with its full name.
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<T>));
    /// Zeroes every gradient.
    fn zero_grad(&mut self) {
        self.visit_params("", &mut |_, p| p.zero_grad());
    }
    /// Convenience: the whole state dict.
    fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        self.save_state("", &mut sd);
        sd
    }
    /// PyTorch's `load_state_dict(sd, strict=True)`: `sd` must hold exactly this module's keys, with their
    /// shapes. The error lists the missing and the unexpected keys, as PyTorch's does; nothing is loaded then.
    fn load_strict(&mut self, sd: &StateDict) -> Result<()> {
        let own = self.state_dict();
        let missing: Vec<&String> = own.keys().filter(|k| sd.get(k).is_none()).collect();
        let unexpected: Vec<&String> = sd.keys().filter(|k| own.get(k).is_none()).collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(NvError::State(format!(
                "Error(s) in loading state_dict: missing keys {missing:?}, unexpected keys {unexpected:?}"
            )));
        }
        for (k, t) in &own.tensors {
            let got = sd.get(k).map_or(t.shape(), StateTensor::shape);
            if got != t.shape() {
                return Err(NvError::State(format!(
                    "size mismatch for {k}: the checkpoint has shape {got:?}, the model {:?}",
                    t.shape()
                )));
            }
        }
        for (k, t) in &own.tensors {
            let (want, got) = (is_int(t), sd.get(k).map(is_int));
            if got.is_some_and(|g| g != want) {
                return Err(NvError::State(format!(
                    "dtype mismatch for {k}: the model holds {}, the file {}",
                    if want { "an integer" } else { "a float" },
                    if want { "a float" } else { "an integer" }
                )));
            }
        }
        self.load_state("", sd)
    }

    /// PyTorch's `load_state_dict(sd, strict=False)`: loads the tensors whose names the module has (a wrong
    /// shape or dtype is still an error), leaves the others as they are, and reports both lists.
    fn load_non_strict(&mut self, sd: &StateDict) -> Result<LoadReport> {
        let own = self.state_dict();
        let mut merged = StateDict::new();
        let mut report = LoadReport::default();
        for (k, t) in &own.tensors {
            match sd.get(k) {
                Some(v) => {
                    merged.tensors.insert(k.clone(), v.clone());
                }
                None => {
                    report.missing.push(k.clone());
                    merged.tensors.insert(k.clone(), t.clone());
                }
            }
        }
        report.unexpected = sd
            .keys()
            .filter(|k| own.get(k).is_none())
            .cloned()
            .collect();
        self.load_strict(&merged)?;
        Ok(report)
    }
}

fn is_int(t: &StateTensor) -> bool {
    matches!(t, StateTensor::I64(_))
}

/// What [`Stateful::load_non_strict`] left aside.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// The module's tensors the state dict lacked (left at their current values).
    pub missing: Vec<String>,
    /// The state dict's tensors the module has no slot for (ignored).
    pub unexpected: Vec<String>,
}

impl StateDict {
    /// Adds `num_batches_tracked = 0` for every BatchNorm-like module of `own` (a module's state dict) whose
    /// other buffers are here but whose counter is not, as PyTorch does for state dicts without version metadata
    /// (every safetensors file a user saves with `safetensors.torch.save_file` may lack it). Returns the keys
    /// added.
    pub fn fill_num_batches_tracked(&mut self, own: &StateDict) -> Vec<String> {
        let mut added = vec![];
        for k in own.keys() {
            if let Some(prefix) = k.strip_suffix("num_batches_tracked") {
                if self.get(k).is_none() && self.get(&format!("{prefix}running_mean")).is_some() {
                    added.push(k.clone());
                }
            }
        }
        for k in &added {
            self.insert_i64(k.clone(), 0);
        }
        added
    }
}
