//! The ResNet basic block: out = relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x)), with a projection
//! shortcut (1x1 conv, stride s, + norm) when the shape changes and the identity otherwise.
//! State-dict names follow the usual PyTorch CIFAR ResNet: `conv1`, `bn1`, `conv2`, `bn2`, `shortcut.0`, `shortcut.1`.

use super::init_conv;
use super::norm_layer::{build_norm, push_norm_relu, NormKind};
use super::Sequential;
use crate::nn::conv::Conv2dConfig;
use crate::nn::init::InitSpec;
use crate::nn::Layer;
use crate::state::{join, StateDict, Stateful};
use crate::{Mode, NvError, Param, Result};
use ndarray::{ArrayD, Zip};

pub struct BasicBlock {
    pub main: Sequential,
    pub shortcut: Sequential,
    out: Option<ArrayD<f32>>,
}

impl BasicBlock {
    pub fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        norm: NormKind,
        groups: usize,
        init: InitSpec,
        rng: &mut impl rand::Rng,
    ) -> Result<Self> {
        let bias = norm.wants_bias_before();
        let mut main = Sequential::new();
        let c1 = init_conv(
            Conv2dConfig::new(cin, cout, 3)
                .stride(stride)
                .padding(1)
                .bias(bias),
            init,
            rng,
        )?;
        main.push("conv1", Box::new(c1));
        push_norm_relu(&mut main, "bn1", "relu1", norm, cout, true, groups)?;
        let c2 = init_conv(
            Conv2dConfig::new(cout, cout, 3).padding(1).bias(bias),
            init,
            rng,
        )?;
        main.push("conv2", Box::new(c2));
        if let Some((n, _)) = build_norm(norm, cout, true, false, groups)? {
            main.push("bn2", n);
        }
        let mut shortcut = Sequential::new();
        if stride != 1 || cin != cout {
            let sc = init_conv(
                Conv2dConfig::new(cin, cout, 1).stride(stride).bias(bias),
                init,
                rng,
            )?;
            shortcut.push("0", Box::new(sc));
            if let Some((n, _)) = build_norm(norm, cout, true, false, groups)? {
                shortcut.push("1", n);
            }
        }
        Ok(BasicBlock {
            main,
            shortcut,
            out: None,
        })
    }
}

impl Layer<f32> for BasicBlock {
    fn forward(&mut self, x: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        let mut y = self.main.forward(x, mode)?;
        if self.shortcut.is_empty() {
            if y.shape() != x.shape() {
                return Err(NvError::Shape {
                    layer: "BasicBlock",
                    msg: format!("identity shortcut: {:?} vs {:?}", y.shape(), x.shape()),
                });
            }
            Zip::from(&mut y)
                .and(x)
                .for_each(|a, &b| *a = (*a + b).max(0.0));
        } else {
            let s = self.shortcut.forward(x, mode)?;
            Zip::from(&mut y)
                .and(&s)
                .for_each(|a, &b| *a = (*a + b).max(0.0));
        }
        self.out = Some(y.clone());
        Ok(y)
    }
    fn backward(&mut self, x: &ArrayD<f32>, dy: &ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        let out = self.out.as_ref().ok_or(NvError::NoSavedState {
            layer: "BasicBlock",
            mode,
        })?;
        let mut g = dy.clone();
        Zip::from(&mut g).and(out).for_each(|g, &o| {
            if o <= 0.0 {
                *g = 0.0
            }
        });
        let mut dx = self.main.backward(x, &g, mode)?;
        if self.shortcut.is_empty() {
            dx += &g;
        } else {
            dx += &self.shortcut.backward(x, &g, mode)?;
        }
        Ok(dx)
    }
    fn name(&self) -> String {
        "BasicBlock".into()
    }
}

impl Stateful<f32> for BasicBlock {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.main.save_state(prefix, sd);
        self.shortcut.save_state(&join(prefix, "shortcut"), sd);
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> Result<()> {
        self.main.load_state(prefix, sd)?;
        self.shortcut.load_state(&join(prefix, "shortcut"), sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Param<f32>)) {
        self.main.visit_params(prefix, f);
        self.shortcut.visit_params(&join(prefix, "shortcut"), f);
    }
}
