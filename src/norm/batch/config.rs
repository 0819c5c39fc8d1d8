//! BatchNorm's configuration, with PyTorch's defaults (and Keras' convention on request).

use super::BatchNorm;
use crate::{Real, Result};

/// Which running-statistics rule the layer follows (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Convention {
    PyTorch,
    Keras,
}

/// Configuration with PyTorch's defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchNormConfig {
    pub num_features: usize,
    pub eps: f64,
    /// `None`: cumulative moving average (factor 1/num_batches_tracked).
    pub momentum: Option<f64>,
    pub affine: bool,
    pub track_running_stats: bool,
    pub convention: Convention,
    /// Accepted input ranks; empty = any rank >= 2 (BatchNorm1d is `[2, 3]`, BatchNorm2d `[4]`, BatchNorm3d `[5]`).
    pub ranks: Vec<usize>,
}

impl BatchNormConfig {
    /// PyTorch defaults: eps 1e-5, momentum 0.1, affine, track_running_stats; any (N, C, *) input.
    pub fn new(num_features: usize) -> Self {
        BatchNormConfig {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
            convention: Convention::PyTorch,
            ranks: vec![],
        }
    }
    /// `nn.BatchNorm1d`: (N, C) or (N, C, L).
    pub fn d1(num_features: usize) -> Self {
        BatchNormConfig {
            ranks: vec![2, 3],
            ..Self::new(num_features)
        }
    }
    /// `nn.BatchNorm2d`: (N, C, H, W).
    pub fn d2(num_features: usize) -> Self {
        BatchNormConfig {
            ranks: vec![4],
            ..Self::new(num_features)
        }
    }
    /// `nn.BatchNorm3d`: (N, C, D, H, W).
    pub fn d3(num_features: usize) -> Self {
        BatchNormConfig {
            ranks: vec![5],
            ..Self::new(num_features)
        }
    }
    /// Keras' `BatchNormalization` defaults: momentum 0.99 in the Keras sense, epsilon 1e-3, biased moving variance.
    pub fn keras(num_features: usize) -> Self {
        BatchNormConfig {
            eps: 1e-3,
            momentum: Some(0.99),
            convention: Convention::Keras,
            ..Self::new(num_features)
        }
    }
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    pub fn momentum(mut self, m: Option<f64>) -> Self {
        self.momentum = m;
        self
    }
    pub fn affine(mut self, a: bool) -> Self {
        self.affine = a;
        self
    }
    pub fn track_running_stats(mut self, t: bool) -> Self {
        self.track_running_stats = t;
        self
    }
    pub fn build<T: Real>(self) -> Result<BatchNorm<T>> {
        BatchNorm::new(self)
    }
}
