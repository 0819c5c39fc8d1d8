//! An ordered container of named layers (PyTorch's `nn.Sequential`): keeps every layer's input for the backward.

use crate::kernels::arena;
use crate::nn::Layer;
use crate::state::{join, StateDict, Stateful};
use crate::{Mode, NvError, Param, Result};
use ndarray::ArrayD;

/// Layers applied in order. Each child has the name it has in the equivalent PyTorch module, so state-dict keys
/// match (`"0"`, `"1"`, ... for an `nn.Sequential`; `conv1`, `bn1`, ... inside a residual block).
#[derive(Default)]
pub struct Sequential {
    pub layers: Vec<(String, Box<dyn Layer<f32>>)>,
    /// outs[i] is the output of layer i in the last forward; layer i's input is outs[i-1], or the block input
    /// (which `backward` receives again, so it is never copied).
    outs: Vec<ArrayD<f32>>,
    /// Per-layer wall-clock seconds (forward, backward) summed since [`Sequential::enable_timing`]; `None` when
    /// timing is off (the default: no clock reads on the hot path).
    times: Option<Vec<[f64; 2]>>,
    /// `moved[i] = Some(input shape)`: in the last forward, child i only reshaped its input (a flatten), and
    /// the input's buffer was moved into `outs[i]` instead of copied (`outs[i - 1]` is an empty placeholder).
    moved: Vec<Option<Vec<usize>>>,
    /// `pooled[i]`: in the last forward, child i ran fused with the 2×2 max pool after it
    /// ([`Layer::forward_maxpool`]); `outs[i]` is then an empty placeholder and child i + 1 did not run.
    pooled: Vec<bool>,
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
    /// Folds every eval-mode BatchNorm (or FrozenBatchNorm) that directly follows a convolution into that
    /// convolution's weights and bias, with its fused ReLU (if any) applied in the convolution's output pass,
    /// and removes the norm layer: an inference-only model that computes the same eval outputs up to f32
    /// rounding with one pass less per block. The remaining children keep their names, so the state dict of the
    /// folded model has the convolutions' new weights and biases under the old keys and no norm keys. Layers
    /// inside residual blocks are not folded. Returns the number of folded pairs.
    pub fn fold_batch_norm(&mut self) -> Result<usize> {
        let mut folded = 0;
        let mut i = 0;
        while i + 1 < self.layers.len() {
            let affine = self.layers[i + 1].1.eval_affine();
            if let (Some((a, b, relu)), Some(conv)) = (affine, self.layers[i].1.as_conv_mut()) {
                if conv.cfg.out_channels == a.len() {
                    conv.fold_affine(&a, &b, relu)?;
                    self.layers.remove(i + 1);
                    folded += 1;
                }
            }
            i += 1;
        }
        self.clear_cache();
        if self.times.is_some() {
            self.enable_timing();
        }
        Ok(folded)
    }

    /// An eval-mode forward for inference (no backward may follow it): a convolution followed by a BatchNorm
    /// whose eval forward is a per-channel affine ([`Layer::eval_affine_exact`]) runs as one layer, the affine
    /// (and the fused ReLU) applied in the convolution's output pass; when a 2×2 max pool follows the ReLU
    /// and the convolution takes the Winograd path, the pool is applied in that pass too. The result is bitwise that of
    /// `forward(x, Mode::Eval)`; it saves one pass over each such activation. Only top-level pairs are fused.
    pub fn forward_inference(&mut self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        for a in self.outs.drain(..) {
            arena::recycle(a);
        }
        self.pooled.clear();
        // Only the latest activation is kept: each goes back to the buffer pool as soon as the next layer has
        // consumed it, so the next layer of its size reuses a buffer that is still warm in cache. No
        // activations stay behind, so a backward after this reports that it has no saved state.
        let mut cur: Option<ArrayD<f32>> = None;
        let mut i = 0;
        while i < self.layers.len() {
            let start = self.times.as_ref().map(|_| std::time::Instant::now());
            let exact = self
                .layers
                .get(i + 1)
                .and_then(|(_, next)| next.eval_affine_exact());
            if let Some(out_shape) = self.layers[i]
                .1
                .reshapes_to(cur.as_ref().unwrap_or(x).shape())
            {
                if let Some(owned) = cur.take() {
                    // a flatten of an activation we own: move its buffer instead of copying it
                    cur = Some(reshape_owned(owned, &out_shape));
                    self.add_time(i, 0, start);
                    i += 1;
                    continue;
                }
            }
            let input = cur.as_ref().unwrap_or(x);
            let pool_next = self
                .layers
                .get(i + 2)
                .is_some_and(|(_, next)| next.is_max_pool_2x2());
            let mut step = 1;
            let mut fused = None;
            let (name, layer) = &mut self.layers[i];
            if let (Some((a, b, relu)), Some(conv)) = (exact, layer.as_conv_mut()) {
                // conv + BN + ReLU + 2×2 max pool in one pass where the convolution can, else conv + BN(+ReLU)
                if relu && pool_next {
                    fused = conv
                        .forward_affine_relu_maxpool(input, &a, &b)
                        .map_err(|e| annotate(name, e))?
                        .map(|y| (y, 3));
                }
                if fused.is_none() {
                    fused = conv
                        .forward_affine(input, &a, &b, relu)
                        .map_err(|e| annotate(name, e))?
                        .map(|y| (y, 2));
                }
            }
            let y = match fused {
                Some((y, n)) => {
                    step = n;
                    y
                }
                None => {
                    let (name, l) = &mut self.layers[i];
                    l.forward(input, Mode::Eval)
                        .map_err(|e| annotate(name, e))?
                }
            };
            if let Some(old) = cur.replace(y) {
                arena::recycle(old);
            }
            self.add_time(i, 0, start);
            i += step;
        }
        Ok(cur.expect("non-empty"))
    }

    /// Starts (or restarts) summing each child's forward and backward wall-clock time.
    pub fn enable_timing(&mut self) {
        self.times = Some(vec![[0.0; 2]; self.layers.len()]);
    }
    /// `(name, layer description, forward seconds, backward seconds)` per child, summed since
    /// [`Sequential::enable_timing`]; empty when timing is off.
    pub fn layer_times(&self) -> Vec<(String, String, f64, f64)> {
        match &self.times {
            None => vec![],
            Some(t) => self
                .layers
                .iter()
                .zip(t)
                .map(|((n, l), t)| (n.clone(), l.name(), t[0], t[1]))
                .collect(),
        }
    }
    fn add_time(&mut self, i: usize, pass: usize, start: Option<std::time::Instant>) {
        add_time_in(&mut self.times, i, pass, start)
    }

    /// Backward through the children in reverse. Without `input_grad` (the network's input needs no gradient),
    /// the first child with parameters accumulates its parameter gradients only (a first convolution skips its
    /// dx), and parameter-free children before it are skipped.
    fn backward_inner(
        &mut self,
        x: &ArrayD<f32>,
        dy: &ArrayD<f32>,
        mode: Mode,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>> {
        if self.layers.is_empty() {
            return Ok(input_grad.then(|| dy.clone()));
        }
        if self.outs.len() + 1 != self.layers.len() {
            return Err(NvError::NoSavedState {
                layer: "Sequential",
                mode,
            });
        }
        // Without an input gradient, layers before the first one with parameters (a Flatten in front of the
        // MLP) have nothing to contribute, and that first one needs no input gradient either.
        let first = if input_grad {
            0
        } else {
            match self.layers.iter_mut().position(|(_, l)| {
                let mut n = 0;
                l.visit_params("", &mut |_, _| n += 1);
                n > 0
            }) {
                Some(i) => i,
                None => return Ok(None),
            }
        };
        let mut g: Option<ArrayD<f32>> = None;
        for i in (first..self.layers.len()).rev() {
            if i > 0 && self.pooled.get(i - 1) == Some(&true) {
                continue; // this max pool ran inside child i - 1, whose backward takes the pooled gradient
            }
            // Right after a first layer that needs no input gradient (the first convolution), a BatchNorm can
            // hand over its dx plane by plane: the convolution's weight gradient consumes each image's planes
            // from a buffer in cache, and the full dx tensor is never written and read back.
            if !input_grad && i == first + 1 && self.pooled.get(i) != Some(&true) {
                let start = self.times.as_ref().map(|_| std::time::Instant::now());
                let xin = &self.outs[i - 1];
                let dyi = g.as_ref().unwrap_or(dy);
                let (name, l) = &mut self.layers[i];
                if let Some(planes) = l
                    .backward_deferred(xin, dyi, mode)
                    .map_err(|e| annotate(name, e))?
                {
                    add_time_in(&mut self.times, i, 1, start);
                    let start = self.times.as_ref().map(|_| std::time::Instant::now());
                    let x0 = if first == 0 { x } else { &self.outs[first - 1] };
                    let (name0, l0) = &mut self.layers[first];
                    if !l0
                        .backward_params_from_planes(x0, &planes, mode)
                        .map_err(|e| annotate(name0, e))?
                    {
                        let dx = ArrayD::from_shape_vec(xin.raw_dim(), planes.to_vec())
                            .expect("dx of the norm's input shape");
                        l0.backward_params(x0, &dx, mode)
                            .map_err(|e| annotate(name0, e))?;
                    }
                    add_time_in(&mut self.times, first, 1, start);
                    return Ok(None);
                }
            }
            let start = self.times.as_ref().map(|_| std::time::Instant::now());
            if let Some(Some(in_shape)) = self.moved.get(i) {
                // the reshape's backward: dy reshaped back (moved, not copied, when it is ours)
                let d = match g.take() {
                    Some(d) => d,
                    None => dy.clone(),
                };
                let out_len: usize = in_shape.iter().product();
                if d.len() != out_len || d.shape().first() != in_shape.first() {
                    return Err(annotate(
                        &self.layers[i].0,
                        NvError::Shape {
                            layer: "Flatten",
                            msg: format!(
                                "dy has shape {:?}, the input had shape {in_shape:?}",
                                d.shape()
                            ),
                        },
                    ));
                }
                g = Some(reshape_owned(d, in_shape));
                self.add_time(i, 1, start);
                continue;
            }
            let input = if i == 0 { x } else { &self.outs[i - 1] };
            let (name, l) = &mut self.layers[i];
            let dyi = g.as_ref().unwrap_or(dy);
            if self.pooled.get(i) == Some(&true) {
                let dx = l
                    .backward_maxpool(input, dyi, mode)
                    .map_err(|e| annotate(name, e))?;
                g = (i != first || input_grad).then_some(dx);
            } else if i == first && !input_grad {
                l.backward_params(input, dyi, mode)
                    .map_err(|e| annotate(name, e))?;
                g = None;
            } else {
                g = Some(
                    l.backward(input, dyi, mode)
                        .map_err(|e| annotate(name, e))?,
                );
            }
            self.add_time(i, 1, start);
        }
        Ok(g)
    }

    /// Drops the saved activations (to free memory after an eval pass).
    pub fn clear_cache(&mut self) {
        self.outs.clear();
        self.pooled.clear();
        self.moved.clear();
    }
}

impl Layer<f32> for Sequential {
    fn forward(&mut self, x: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        // In eval, the last batch's activations go back to the buffer pool for this batch's layers to reuse.
        // Training does not recycle: on this project's machine, buffers kept across a training step took
        // write-protect faults with TLB-shootdown IPIs (perf: do_wp_page → flush_tlb_mm_range, 35% of the
        // step; 690 against 860 img/s), while eval got faster (3800 against 2500 img/s).
        let recycle = !mode.is_train();
        for a in self.outs.drain(..) {
            if recycle {
                arena::recycle(a);
            }
        }
        self.pooled.clear();
        self.pooled.resize(self.layers.len(), false);
        self.moved.clear();
        self.moved.resize(self.layers.len(), None);
        if self.layers.is_empty() {
            return Ok(x.clone());
        }
        let mut i = 0;
        while i < self.layers.len() {
            let start = self.times.as_ref().map(|_| std::time::Instant::now());
            // A flatten moves the previous output (which no backward needs but its own, for the shape) into
            // its output instead of copying it.
            if i > 0 {
                if let Some(out_shape) = self.layers[i].1.reshapes_to(self.outs[i - 1].shape()) {
                    let in_shape = self.outs[i - 1].shape().to_vec();
                    let data = std::mem::replace(&mut self.outs[i - 1], placeholder());
                    self.outs.push(reshape_owned(data, &out_shape));
                    self.moved[i] = Some(in_shape);
                    self.add_time(i, 0, start);
                    i += 1;
                    continue;
                }
            }
            let input = if i == 0 { x } else { &self.outs[i - 1] };
            // A layer followed by a training BatchNorm reduces each output plane to (mean, M2) as it writes it
            // (the convolutions can), and the BatchNorm merges those instead of reading its input for
            // statistics: its only pass over the input is the normalizing one (with the max pool after it
            // applied in that pass too, when there is one).
            if self
                .layers
                .get(i + 1)
                .is_some_and(|(_, next)| next.takes_plane_moments(mode))
            {
                let (name, l) = &mut self.layers[i];
                if let Some((y, pm)) = l
                    .forward_with_plane_moments(input, mode)
                    .map_err(|e| annotate(name, e))?
                {
                    self.outs.push(y);
                    self.add_time(i, 0, start);
                    let start = self.times.as_ref().map(|_| std::time::Instant::now());
                    let pool_after = self
                        .layers
                        .get(i + 2)
                        .is_some_and(|(_, p)| p.is_max_pool_2x2());
                    let (name, bn) = &mut self.layers[i + 1];
                    let done = bn
                        .forward_from_plane_moments(&self.outs[i], &pm, mode, pool_after)
                        .map_err(|e| annotate(name, e))?;
                    i += 1;
                    if let Some((z, pooled)) = done {
                        if pooled {
                            self.outs.push(placeholder());
                            self.pooled[i] = true;
                        }
                        self.outs.push(z);
                        self.add_time(i, 0, start);
                        i += if pooled { 2 } else { 1 };
                    }
                    continue;
                }
            }
            // A BatchNorm(+ReLU) followed by a 2×2 max pool runs as one kernel that never writes the unpooled
            // activation (the pool's backward only needs the argmax indices, which the norm keeps).
            let pool_next = self
                .layers
                .get(i + 1)
                .is_some_and(|(_, next)| next.is_max_pool_2x2());
            let (name, l) = &mut self.layers[i];
            if pool_next {
                if let Some(y) = l
                    .forward_maxpool(input, mode)
                    .map_err(|e| annotate(name, e))?
                {
                    self.outs.push(placeholder());
                    self.outs.push(y);
                    self.pooled[i] = true;
                    self.add_time(i, 0, start);
                    i += 2;
                    continue;
                }
            }
            let y = l.forward(input, mode).map_err(|e| annotate(name, e))?;
            self.outs.push(y);
            self.add_time(i, 0, start);
            i += 1;
        }
        // The caller gets a copy; the saved output of the last layer stays for layers that need it (none of the
        // current ones do, so release it instead of copying).
        Ok(self.outs.pop().expect("non-empty"))
    }
    fn backward(&mut self, x: &ArrayD<f32>, dy: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        Ok(self
            .backward_inner(x, dy, mode, true)?
            .expect("input gradient requested"))
    }
    fn backward_params(&mut self, x: &ArrayD<f32>, dy: &ArrayD<f32>, mode: Mode) -> Result<()> {
        self.backward_inner(x, dy, mode, false).map(|_| ())
    }
    fn name(&self) -> String {
        "Sequential".into()
    }
}

/// `a` with `shape` (the same number of elements, row-major): its buffer moved when `a` is in standard layout,
/// copied in logical order otherwise.
fn reshape_owned(a: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    if a.is_standard_layout() {
        if let Ok(y) = a.into_shape_with_order(ndarray::IxDyn(shape)) {
            return y;
        }
        unreachable!("a standard-layout array reshapes to any shape of the same size");
    }
    ArrayD::from_shape_vec(ndarray::IxDyn(shape), a.iter().copied().collect())
        .expect("the same number of elements")
}

/// An empty stand-in for an activation no backward reads (its data moved or never written).
fn placeholder() -> ArrayD<f32> {
    ArrayD::zeros(ndarray::IxDyn(&[0]))
}

fn add_time_in(
    times: &mut Option<Vec<[f64; 2]>>,
    i: usize,
    pass: usize,
    start: Option<std::time::Instant>,
) {
    if let (Some(t), Some(s)) = (times.as_mut(), start) {
        if let Some(slot) = t.get_mut(i) {
            slot[pass] += s.elapsed().as_secs_f64();
        }
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
