//! A builder of chains (PyTorch's `nn.Sequential`): named layers applied in order, turned into a [`Graph`] or
//! appended to one ([`Graph::chain`]).

use super::Graph;
use crate::layer::Layer;
use crate::{Real, Result};

/// Layers applied in order. Each child has the name it has in the equivalent PyTorch module, so state-dict keys
/// match (`"0"`, `"1"`, ... for an `nn.Sequential`).
///
/// ```
/// use normvision::model::Sequential;
/// use normvision::nn::{Flatten, LinearConfig, ReLU};
/// use normvision::ndarray::{ArrayD, IxDyn};
/// use normvision::Ctx;
/// let mut rng = rand::thread_rng();
/// let mut seq = Sequential::new();
/// seq.push("0", Flatten::new())
///     .push("1", LinearConfig::new(12, 4).build::<f32>(&mut rng).unwrap())
///     .push("2", ReLU::new());
/// let mut g = seq.into_graph().unwrap();
/// let y = g.forward(&[&ArrayD::ones(IxDyn(&[2, 3, 2, 2]))], Ctx::eval()).unwrap();
/// assert_eq!(y[0].shape(), &[2, 4]);
/// ```
pub struct Sequential<T: Real = f32> {
    layers: Vec<(String, Box<dyn Layer<T>>)>,
}

impl<T: Real> Default for Sequential<T> {
    fn default() -> Self {
        Sequential { layers: vec![] }
    }
}

impl<T: Real> Sequential<T> {
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a layer named `name`.
    pub fn push(&mut self, name: impl Into<String>, layer: impl Layer<T>) -> &mut Self {
        self.push_boxed(name, Box::new(layer))
    }
    /// Appends a boxed layer named `name`.
    pub fn push_boxed(&mut self, name: impl Into<String>, layer: Box<dyn Layer<T>>) -> &mut Self {
        self.layers.push((name.into(), layer));
        self
    }
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
    /// The layers with their names, in order.
    pub fn into_layers(self) -> Vec<(String, Box<dyn Layer<T>>)> {
        self.layers
    }
    /// The chain as a graph of one input (`input`) and one output.
    pub fn into_graph(self) -> Result<Graph<T>> {
        let mut g = Graph::new();
        let x = g.input("input");
        let y = g.chain("", self, x)?;
        g.set_outputs(&[y])?;
        Ok(g)
    }
}
