//! The convolution's configuration, with PyTorch's defaults and constructor checks.

use super::Conv2d;
use crate::nn::init::Init;
use crate::nn::IntoPair;
use crate::{NvError, Real, Result};

/// Configuration with PyTorch's defaults.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conv2dConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel_size: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
    pub bias: bool,
}

impl Conv2dConfig {
    /// PyTorch defaults: stride 1, padding 0, dilation 1, groups 1, bias.
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: impl IntoPair) -> Self {
        Conv2dConfig {
            in_channels,
            out_channels,
            kernel_size: kernel_size.pair(),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
            bias: true,
        }
    }
    pub fn stride(mut self, s: impl IntoPair) -> Self {
        self.stride = s.pair();
        self
    }
    pub fn padding(mut self, p: impl IntoPair) -> Self {
        self.padding = p.pair();
        self
    }
    pub fn dilation(mut self, d: impl IntoPair) -> Self {
        self.dilation = d.pair();
        self
    }
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
    /// Checks the configuration (PyTorch's constructor errors).
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(NvError::Config(format!("Conv2d: {m}")));
        if self.in_channels == 0 || self.out_channels == 0 {
            return err(format!(
                "in_channels and out_channels must be > 0, got {} and {}",
                self.in_channels, self.out_channels
            ));
        }
        if self.groups == 0 {
            return err("groups must be a positive integer".into());
        }
        if !self.in_channels.is_multiple_of(self.groups) {
            return err(format!(
                "in_channels ({}) must be divisible by groups ({})",
                self.in_channels, self.groups
            ));
        }
        if !self.out_channels.is_multiple_of(self.groups) {
            return err(format!(
                "out_channels ({}) must be divisible by groups ({})",
                self.out_channels, self.groups
            ));
        }
        for (what, (a, b)) in [
            ("kernel_size", self.kernel_size),
            ("stride", self.stride),
            ("dilation", self.dilation),
        ] {
            if a == 0 || b == 0 {
                return err(format!("{what} must be > 0, got ({a}, {b})"));
            }
        }
        Ok(())
    }
    /// Builds the layer with PyTorch's default initialisation drawn from `rng`.
    pub fn build<T: Real>(self, rng: &mut impl rand::Rng) -> Result<Conv2d<T>> {
        let mut c = Conv2d::new(self)?;
        c.reset_parameters(Init::Default, 1.0, rng)?;
        Ok(c)
    }
}
