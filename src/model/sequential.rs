//! An ordered container of named layers (PyTorch's `nn.Sequential`): keeps every layer's input for the backward.

use crate::nn::Layer;
use crate::state::{join, StateDict, Stateful};
use crate::{Mode, NvError, Param, Result};
use ndarray::ArrayD;

/// Layers applied in order. Each child has the name it has in the equivalent PyTorch module, so state-dict keys
/// match (`"0"`, `"1"`, ... for an `nn.Sequential`; `conv1`, `bn1`, ... inside a residual block).
#[derive(Default)]
pub struct Sequential {
    pub layers: Vec<(String, Box<dyn Layer<f32>>)>,
    /// acts[i] is the input of layer i in the last forward (acts[0] the block input).
    acts: Vec<ArrayD<f32>>,
}

impl Sequential {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, name: impl Into<String>, layer: Box<dyn Layer<f32>>) {
        self.layers.push((name.into(), layer));
    }
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    /// Drops the saved activations (to free memory after an eval pass).
    pub fn clear_cache(&mut self) {
        self.acts.clear();
    }
}

impl Layer<f32> for Sequential {
    fn forward(&mut self, x: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        self.acts.clear();
        let mut cur = x.clone();
        for (name, l) in self.layers.iter_mut() {
            let y = l.forward(&cur, mode).map_err(|e| annotate(name, e))?;
            self.acts.push(std::mem::replace(&mut cur, y));
        }
        Ok(cur)
    }
    fn backward(&mut self, _x: &ArrayD<f32>, dy: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        if self.acts.len() != self.layers.len() {
            return Err(NvError::NoSavedState {
                layer: "Sequential",
                mode,
            });
        }
        let mut g = dy.clone();
        for (i, (name, l)) in self.layers.iter_mut().enumerate().rev() {
            g = l
                .backward(&self.acts[i], &g, mode)
                .map_err(|e| annotate(name, e))?;
        }
        Ok(g)
    }
    fn name(&self) -> String {
        "Sequential".into()
    }
}

fn annotate(name: &str, e: NvError) -> NvError {
    match e {
        NvError::Shape { layer, msg } => NvError::Shape {
            layer,
            msg: format!("{msg} (in child {name})"),
        },
        other => other,
    }
}

impl Stateful<f32> for Sequential {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        for (name, l) in &self.layers {
            l.save_state(&join(prefix, name), sd);
        }
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        for (name, l) in self.layers.iter_mut() {
            l.load_state(&join(prefix, name), sd)?;
        }
        Ok(())
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<f32>)) {
        for (name, l) in self.layers.iter_mut() {
            l.visit_params(&join(prefix, name), f);
        }
    }
}
