//! The statistics of a BatchNorm over an (N, C, S) tensor (S = product of the spatial dims): the dimensions, the
//! per-channel moments and their exact parallel merge (Chan et al.), what the forward saves for the backward,
//! and the backward's sums. These are the stages SyncBN, Ghost BN and statistics re-estimation build on:
//!
//! ```text
//! forward : planes::local_moments ──► Moments::merge (exact parallel Welford; across workers) ──► BatchStats ──► normalize
//! backward: backward_sums ──► BackwardSums::add (across workers) ──► backward_dx
//! ```

use crate::Real;

/// Dimensions of an (N, C, S) view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ncs {
    pub n: usize,
    pub c: usize,
    pub s: usize,
}

impl Ncs {
    /// Values per channel.
    pub fn m(&self) -> usize {
        self.n * self.s
    }
    pub fn numel(&self) -> usize {
        self.n * self.c * self.s
    }
}

/// Per-channel count, mean and M2 = Σ(x-mean)²: the exact, mergeable summary of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub count: u64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

impl Moments {
    pub fn empty(c: usize) -> Self {
        Moments {
            count: 0,
            mean: vec![0.0; c],
            m2: vec![0.0; c],
        }
    }
    /// Exact parallel-Welford merge (Chan et al.): the result summarises the union of both batches.
    /// Either side may be empty.
    pub fn merge(&self, other: &Moments) -> Moments {
        assert_eq!(
            self.mean.len(),
            other.mean.len(),
            "merging moments of different channel counts"
        );
        if other.count == 0 {
            return self.clone();
        }
        if self.count == 0 {
            return other.clone();
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        let mut out = Moments::empty(self.mean.len());
        out.count = self.count + other.count;
        for c in 0..self.mean.len() {
            let delta = other.mean[c] - self.mean[c];
            out.mean[c] = self.mean[c] + delta * nb / n;
            out.m2[c] = self.m2[c] + other.m2[c] + delta * delta * na * nb / n;
        }
        out
    }
    /// Biased variance Σ(x-mean)²/n.
    pub fn var_biased(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.m2.iter().map(|m| m / n).collect()
    }
    /// Unbiased variance Σ(x-mean)²/(n-1) (NaN-free: n=1 gives +inf as in PyTorch's formula m/(m-1)).
    pub fn var_unbiased(&self) -> Vec<f64> {
        let n = self.count as f64;
        self.m2.iter().map(|m| m / (n - 1.0)).collect()
    }
}

/// What the forward saved for the backward: per channel the shift used inside the kernels (the mean rounded to T),
/// the exact mean, the biased variance, and 1/sqrt(var+eps); `count` values per channel.
#[derive(Debug, Clone)]
pub struct BatchStats<T> {
    pub shift: Vec<T>,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub invstd: Vec<f64>,
    pub count: u64,
}

impl<T: Real> BatchStats<T> {
    pub fn from_moments(m: &Moments, eps: f64) -> Self {
        let var = m.var_biased();
        let invstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        BatchStats {
            shift: m.mean.iter().map(|&v| T::of_f64(v)).collect(),
            mean: m.mean.clone(),
            var,
            invstd,
            count: m.count,
        }
    }
    /// (s, b', shift) of every channel: the normalising pass in memory order looks them up per plane.
    pub fn channel_affines(&self, weight: Option<&[T]>, bias: Option<&[T]>) -> Vec<(T, T, T)> {
        (0..self.shift.len())
            .map(|c| {
                let (s, b) = self.channel_affine(c, weight, bias);
                (s, b, self.shift[c])
            })
            .collect()
    }
    /// The per-channel affine (s, b') of the normalising pass: y = (x - shift)·s + b'.
    /// Backward recomputes it identically, so a fused ReLU's mask matches the forward bit for bit.
    #[inline]
    pub fn channel_affine(&self, c: usize, weight: Option<&[T]>, bias: Option<&[T]>) -> (T, T) {
        let w = weight.map_or(1.0, |w| w[c].as_f64());
        let b = bias.map_or(0.0, |b| b[c].as_f64());
        let s = w * self.invstd[c];
        let delta = self.mean[c] - self.shift[c].as_f64();
        (T::of_f64(s), T::of_f64(b - delta * s))
    }
}

/// Per-channel (Σdy, Σdy·(x-mean)) of the backward.
#[derive(Debug, Clone, PartialEq)]
pub struct BackwardSums {
    pub sum_dy: Vec<f64>,
    pub dot: Vec<f64>,
}

impl BackwardSums {
    /// Element-wise sum (the all-reduce of SyncBN's backward).
    pub fn add(&self, o: &BackwardSums) -> BackwardSums {
        BackwardSums {
            sum_dy: self
                .sum_dy
                .iter()
                .zip(&o.sum_dy)
                .map(|(a, b)| a + b)
                .collect(),
            dot: self.dot.iter().zip(&o.dot).map(|(a, b)| a + b).collect(),
        }
    }
}

/// Per-channel [`Moments`] of an (N, C, S) tensor from the (mean, M2) of each of its N·C planes (n-major, as
/// the tensor), merged exactly (Chan et al.) in image order: the local-statistics stage of the forward, computed
/// by the layer that produced the planes.
pub fn moments_from_planes(pm: &[(f64, f64)], d: Ncs) -> Moments {
    assert_eq!(pm.len(), d.n * d.c, "one (mean, M2) per plane");
    let mut out = Moments::empty(d.c);
    out.count = d.m() as u64;
    let s = d.s as f64;
    for c in 0..d.c {
        let (mut n_acc, mut mean, mut m2) = (0.0f64, 0.0f64, 0.0f64);
        for n in 0..d.n {
            let (pmean, pm2) = pm[n * d.c + c];
            if n_acc == 0.0 {
                (n_acc, mean, m2) = (s, pmean, pm2);
                continue;
            }
            let tot = n_acc + s;
            let delta = pmean - mean;
            mean += delta * s / tot;
            m2 += pm2 + delta * delta * n_acc * s / tot;
            n_acc = tot;
        }
        out.mean[c] = mean;
        out.m2[c] = m2;
    }
    out
}

/// The per-channel constants (k1, k2, k3) of dx = dy·k1 + (x-shift)·k2 + k3, from channel `c`'s Σdy and
/// Σdy·(x-mean) over `count` values.
#[inline]
pub(super) fn dx_coefficients<T: Real>(
    st: &BatchStats<T>,
    c: usize,
    sum_dy: f64,
    dot: f64,
    count: f64,
    weight: Option<&[T]>,
) -> (T, T, T) {
    let w = weight.map_or(1.0, |w| w[c].as_f64());
    let inv = st.invstd[c];
    let k1 = inv * w;
    let k2 = -dot * inv * inv / count * k1;
    let delta = st.mean[c] - st.shift[c].as_f64();
    let k3 = -sum_dy / count * k1 - delta * k2;
    (T::of_f64(k1), T::of_f64(k2), T::of_f64(k3))
}

/// The per-channel (k1, k2, k3) of the dx pass.
pub(super) fn all_dx_coefficients<T: Real>(
    st: &BatchStats<T>,
    sums: &BackwardSums,
    d: Ncs,
    count: f64,
    weight: Option<&[T]>,
) -> Vec<(T, T, T)> {
    (0..d.c)
        .map(|c| dx_coefficients(st, c, sums.sum_dy[c], sums.dot[c], count, weight))
        .collect()
}
