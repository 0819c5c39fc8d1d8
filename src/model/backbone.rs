//! Residual building blocks shared by the zoo's ResNets and the dense-task models: a graph builder that draws
//! each convolution's weights in order from one generator, the basic block (with dilation), and ResNet-14,
//! the backbone of `deeplabv3` that the zoo also builds as a classifier (`--model resnet14`) so that a
//! classification checkpoint can initialize it (`--backbone-from`).

use super::norm_choice::{build_norm, NormKind, NormParams};
use super::{Graph, ValueId};
use crate::nn::{Conv2d, Conv2dConfig, InitSpec, ReLU};
use crate::state::join;
use crate::Result;

/// Adds layers to a graph, drawing weights from `rng` in the order the layers are made (PyTorch's default
/// initialisation first, then `init`).
pub(crate) struct Builder<'a, R: rand::Rng> {
    pub g: &'a mut Graph,
    pub rng: &'a mut R,
    pub init: InitSpec,
    pub params: NormParams,
}

impl<R: rand::Rng> Builder<'_, R> {
    pub fn conv(&mut self, cfg: Conv2dConfig) -> Result<Conv2d<f32>> {
        let mut c = cfg.build::<f32>(self.rng)?;
        c.reset_parameters(self.init.init, self.init.scale, self.rng)?;
        Ok(c)
    }

    /// The norm of `kind` for `c` channels after a convolution, named `name`, when the kind has one.
    pub fn norm(&mut self, kind: NormKind, name: &str, c: usize, x: ValueId) -> Result<ValueId> {
        match build_norm(kind, c, true, &self.params)? {
            Some(n) => self.g.layer_boxed(name, n, x),
            None => Ok(x),
        }
    }

    /// A convolution, its norm and a ReLU at `nn.Sequential` indices from `*idx` (a norm and its ReLU take
    /// two indices, a lone ReLU one).
    pub fn conv_norm_relu(
        &mut self,
        kind: NormKind,
        prefix: &str,
        idx: &mut usize,
        cfg: Conv2dConfig,
        x: ValueId,
    ) -> Result<ValueId> {
        let c = cfg.out_channels;
        let conv = self.conv(cfg.bias(kind.wants_bias_before()))?;
        let mut cur = self.g.layer(join(prefix, &idx.to_string()), conv, x)?;
        *idx += 1;
        let normed = self.norm(kind, &join(prefix, &idx.to_string()), c, cur)?;
        if normed != cur {
            *idx += 1;
        }
        cur = self
            .g
            .layer(join(prefix, &idx.to_string()), ReLU::new(), normed)?;
        *idx += 1;
        Ok(cur)
    }

    /// out = relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x)): 3×3 convolutions with padding and
    /// dilation `dilation`, the first with stride `stride`; a projection shortcut (1×1 conv, stride, + norm)
    /// when the shape changes, the identity otherwise. Names as in the usual PyTorch CIFAR ResNet (`conv1`,
    /// `bn1`, `conv2`, `bn2`, `shortcut.0`, `shortcut.1`).
    #[allow(clippy::too_many_arguments)]
    pub fn basic_block(
        &mut self,
        kind: NormKind,
        p: &str,
        cin: usize,
        cout: usize,
        stride: usize,
        dilation: usize,
        x: ValueId,
    ) -> Result<ValueId> {
        let bias = kind.wants_bias_before();
        let c1 = self.conv(
            Conv2dConfig::new(cin, cout, 3)
                .stride(stride)
                .padding(dilation)
                .dilation(dilation)
                .bias(bias),
        )?;
        let c2 = self.conv(
            Conv2dConfig::new(cout, cout, 3)
                .padding(dilation)
                .dilation(dilation)
                .bias(bias),
        )?;
        let mut a = self.g.layer(join(p, "conv1"), c1, x)?;
        a = self.norm(kind, &join(p, "bn1"), cout, a)?;
        a = self.g.layer(join(p, "relu1"), ReLU::new(), a)?;
        a = self.g.layer(join(p, "conv2"), c2, a)?;
        a = self.norm(kind, &join(p, "bn2"), cout, a)?;
        let short = if stride != 1 || cin != cout {
            let sc = self.conv(Conv2dConfig::new(cin, cout, 1).stride(stride).bias(bias))?;
            let s = self.g.layer(join(p, "shortcut.0"), sc, x)?;
            self.norm(kind, &join(p, "shortcut.1"), cout, s)?
        } else {
            x
        };
        let sum = self.g.add(join(p, "add"), &[a, short])?;
        self.g.layer(join(p, "relu"), ReLU::new(), sum)
    }

    /// ResNet-14: a 3×3 stem convolution with stride 2 (`conv1`, `bn1`, `relu`), then three stages
    /// (`layer1`-`layer3`) of two basic blocks of `widths` channels, each stage starting with stride 2: output
    /// stride 16. With `dilate_last` (DeepLab's output stride 8), the last stage's stride is replaced by
    /// dilation as torchvision's `replace_stride_with_dilation` does: its first block keeps dilation 1, the
    /// others take 2. The weights are the same either way.
    pub fn resnet14(
        &mut self,
        kind: NormKind,
        prefix: &str,
        in_channels: usize,
        widths: [usize; 3],
        dilate_last: bool,
        x: ValueId,
    ) -> Result<ValueId> {
        let stem = self.conv(
            Conv2dConfig::new(in_channels, widths[0], 3)
                .stride(2)
                .padding(1)
                .bias(kind.wants_bias_before()),
        )?;
        let mut cur = self.g.layer(join(prefix, "conv1"), stem, x)?;
        cur = self.norm(kind, &join(prefix, "bn1"), widths[0], cur)?;
        cur = self.g.layer(join(prefix, "relu"), ReLU::new(), cur)?;
        let mut cin = widths[0];
        for (stage, &cout) in widths.iter().enumerate() {
            let dilated = dilate_last && stage == 2;
            for b in 0..RESNET14_BLOCKS {
                let (stride, dilation) = match (dilated, b) {
                    (false, 0) => (2, 1),
                    (false, _) => (1, 1),
                    (true, 0) => (1, 1),
                    (true, _) => (1, 2),
                };
                let p = join(prefix, &format!("layer{}.{b}", stage + 1));
                cur = self.basic_block(kind, &p, cin, cout, stride, dilation, cur)?;
                cin = cout;
            }
        }
        Ok(cur)
    }
}

/// Basic blocks per stage of ResNet-14.
pub const RESNET14_BLOCKS: usize = 2;
/// ResNet-14's stage widths.
pub const RESNET14_WIDTHS: [usize; 3] = [32, 64, 128];
