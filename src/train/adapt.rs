//! Adapting BatchNorm statistics to shifted data, without labels: AdaBN (Li et al. 2016) and the N/n mix of
//! source and target statistics (Schneider et al. 2020). The weights stay; each BatchNorm's running mean and
//! variance are replaced.
//!
//! **Layer by layer, exact over any number of batches.** The BatchNorms are adapted in the graph's order. For
//! the k-th, the target images are run through the graph in eval mode, with the layers before it already
//! adapted, and the k-th layer's input is reduced per channel to (count, mean, M2) in f64: two passes over
//! each batch, then Chan's parallel merge across batches:
//!
//! ```text
//! d = μ_b − μ;  μ += d·k/(n+k);  M2 += M2_b + d²·n·k/(n+k);  n += k        (count k, mean μ_b, M2_b of a batch)
//! ```
//!
//! The new running variance is the population variance M2/n over all target values of the channel. The result
//! does not depend on how the images are split into batches, up to f64 rounding. A BatchNorm's statistics are then
//! those its input has when every earlier layer is adapted, which is what makes a shift `a·x + b` of the input
//! undone exactly when the first layer is an unpadded convolution (`tests/adapt.rs`).
//!
//! **Mix.** With a prior of N source samples and n target samples (images):
//! μ = N/(N+n)·μ_s + n/(N+n)·μ_t, and σ² likewise (`experiments.md` §4). N = 0 is AdaBN; n = 0 keeps the source.

use crate::data::{Dataset, Normalization};
use crate::model::{Graph, ValueId};
use crate::norm::batch::stats::Moments;
use crate::norm::BatchNorm;
use crate::{NvError, Real, Result};
use ndarray::ArrayD;

/// How to set the new statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdaptMethod {
    /// The target statistics alone.
    AdaBn,
    /// Schneider et al.'s mix with a prior of `prior` source samples.
    Mix { prior: f64 },
}

/// Per-channel (count, mean, M2) of everything added, merged across batches with the kernels' exact
/// parallel-Welford merge ([`Moments::merge`], Chan et al.).
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMoments {
    /// Samples seen (the batch dimension).
    pub samples: f64,
    /// Values per channel seen (samples × positions), their means and M2.
    pub moments: Moments,
}

impl ChannelMoments {
    pub fn new(channels: usize) -> Self {
        ChannelMoments {
            samples: 0.0,
            moments: Moments::empty(channels),
        }
    }

    /// Values per channel seen.
    pub fn count(&self) -> f64 {
        self.moments.count as f64
    }

    /// The per-channel means.
    pub fn mean(&self) -> &[f64] {
        &self.moments.mean
    }

    /// Adds a batch `x` of shape (N, C, *): every value of channel c, over samples and positions (two passes
    /// in f64 for the batch's moments, then the merge).
    pub fn add<T: Real>(&mut self, x: &ArrayD<T>) -> Result<()> {
        let c = self.moments.mean.len();
        if x.ndim() < 2 || x.shape()[1] != c {
            return Err(NvError::Shape {
                layer: "ChannelMoments",
                msg: format!("expected (N, {c}, *), got {:?}", x.shape()),
            });
        }
        let xs = x.as_standard_layout();
        let v = xs.as_slice().expect("standard layout");
        let (n, s) = (x.shape()[0], x.shape()[2..].iter().product::<usize>());
        if n * s == 0 {
            return Ok(());
        }
        let mut batch = Moments::empty(c);
        batch.count = (n * s) as u64;
        let k = (n * s) as f64;
        for ch in 0..c {
            let planes = (0..n).map(|i| &v[(i * c + ch) * s..(i * c + ch + 1) * s]);
            let mb = planes.clone().flatten().map(|t| t.as_f64()).sum::<f64>() / k;
            batch.mean[ch] = mb;
            batch.m2[ch] = planes.flatten().map(|t| (t.as_f64() - mb).powi(2)).sum();
        }
        self.moments = self.moments.merge(&batch);
        self.samples += n as f64;
        Ok(())
    }

    /// The population variance M2/n of each channel.
    pub fn var(&self) -> Vec<f64> {
        self.moments.var_biased()
    }
}

/// A sink for one target batch.
pub type BatchSink<'a, T> = dyn FnMut(&ArrayD<T>) -> Result<()> + 'a;

/// What [`adapt_batch_norms`] changed: for each BatchNorm (by node name), the target samples and values per
/// channel it saw, and the largest change of its running mean and variance.
#[derive(Debug, Clone)]
pub struct AdaptedLayer {
    pub name: String,
    pub samples: f64,
    pub values_per_channel: f64,
    pub max_mean_change: f64,
    pub max_var_change: f64,
}

/// Adapts every BatchNorm of `graph` (tracked running statistics) to the target images that `for_each_batch`
/// yields: it is called once per BatchNorm and must call its argument with every target batch, the same ones
/// each time. An error when the graph has no BatchNorm to adapt.
pub fn adapt_batch_norms<T: Real>(
    graph: &mut Graph<T>,
    method: AdaptMethod,
    for_each_batch: &mut dyn FnMut(&mut BatchSink<'_, T>) -> Result<()>,
) -> Result<Vec<AdaptedLayer>> {
    if let AdaptMethod::Mix { prior } = method {
        if !(prior >= 0.0 && prior.is_finite()) {
            return Err(NvError::Config(format!(
                "the prior N must be a finite number >= 0, got {prior}"
            )));
        }
    }
    let targets: Vec<(String, ValueId)> = graph
        .nodes()
        .iter()
        .filter(|n| {
            n.layer_as::<BatchNorm<T>>()
                .is_some_and(|b| b.running_mean().is_some())
        })
        .map(|n| (n.name().to_string(), n.inputs()[0]))
        .collect();
    if targets.is_empty() {
        return Err(NvError::Config(
            "the model has no BatchNorm with running statistics to adapt".into(),
        ));
    }
    let outputs = graph.outputs().to_vec();
    let mut report = vec![];
    for (name, input) in targets {
        graph.set_outputs(&[input])?;
        let c = graph
            .node(&name)
            .and_then(|n| n.layer_as::<BatchNorm<T>>())
            .expect("found above")
            .config()
            .num_features;
        let mut m = ChannelMoments::new(c);
        let run = for_each_batch(&mut |x: &ArrayD<T>| {
            let y = graph.infer(&[x])?.remove(0);
            m.add(&y)
        });
        if let Err(e) = run {
            graph.set_outputs(&outputs)?;
            return Err(e);
        }
        if m.count() == 0.0 && method == AdaptMethod::AdaBn {
            graph.set_outputs(&outputs)?;
            return Err(NvError::Config("no target images to adapt to".into()));
        }
        let var_t = m.var();
        let bn = graph
            .node_mut(&name)
            .and_then(|n| n.layer_as_mut::<BatchNorm<T>>())
            .expect("found above");
        let (rm, rv) = bn.running_stats_mut().expect("tracked");
        let (mut dm, mut dv) = (0.0f64, 0.0f64);
        let w = match method {
            AdaptMethod::AdaBn => 1.0,
            AdaptMethod::Mix { .. } if m.samples == 0.0 => 0.0,
            AdaptMethod::Mix { prior } => m.samples / (prior + m.samples),
        };
        for ch in 0..c {
            let (ms, vs) = (rm[ch].as_f64(), rv[ch].as_f64());
            // no target samples (n = 0): the source, exactly (the target moments are 0/0)
            let (mean, var) = if w == 0.0 {
                (ms, vs)
            } else {
                (
                    (1.0 - w) * ms + w * m.mean()[ch],
                    (1.0 - w) * vs + w * var_t[ch],
                )
            };
            dm = dm.max((mean - ms).abs());
            dv = dv.max((var - vs).abs());
            rm[ch] = T::of_f64(mean);
            rv[ch] = T::of_f64(var);
        }
        report.push(AdaptedLayer {
            name,
            samples: m.samples,
            values_per_channel: m.count(),
            max_mean_change: dm,
            max_var_change: dv,
        });
    }
    graph.set_outputs(&outputs)?;
    Ok(report)
}

/// [`adapt_batch_norms`] on the first `limit` images of `ds` (all when `None`), normalized by `norm`, in batches
/// of `batch_size`.
pub fn adapt_to_dataset(
    graph: &mut Graph<f32>,
    method: AdaptMethod,
    ds: &Dataset,
    norm: &Normalization,
    limit: Option<usize>,
    batch_size: usize,
) -> Result<Vec<AdaptedLayer>> {
    if batch_size == 0 {
        return Err(NvError::Config("the batch size must be at least 1".into()));
    }
    let n = limit.unwrap_or(ds.len()).min(ds.len());
    adapt_batch_norms(graph, method, &mut |f| {
        for s in (0..n).step_by(batch_size) {
            let idx: Vec<usize> = (s..(s + batch_size).min(n)).collect();
            f(&ds.batch(&idx, norm)?.0.into_dyn())?;
        }
        Ok(())
    })
}

/// The running statistics of every tracked BatchNorm, by node name.
type StatsSnapshot<T> = Vec<(String, ArrayD<T>, ArrayD<T>)>;

fn snapshot<T: Real>(graph: &Graph<T>) -> StatsSnapshot<T> {
    graph
        .nodes()
        .iter()
        .filter_map(|n| {
            let bn = n.layer_as::<BatchNorm<T>>()?;
            Some((
                n.name().to_string(),
                bn.running_mean()?.clone(),
                bn.running_var()?.clone(),
            ))
        })
        .collect()
}

fn restore<T: Real>(graph: &mut Graph<T>, snap: &StatsSnapshot<T>) {
    for (name, m, v) in snap {
        if let Some((rm, rv)) = graph
            .node_mut(name)
            .and_then(|n| n.layer_as_mut::<BatchNorm<T>>())
            .and_then(|b| b.running_stats_mut())
        {
            rm.assign(m);
            rv.assign(v);
        }
    }
}

/// Online adaptation (Schneider et al.'s test-time setting): the graph's outputs for the batch `x`, with every
/// BatchNorm normalizing by the N/n mix (`prior` = N, n = this batch's samples) of its source statistics and
/// this batch's own, layer by layer as in [`adapt_batch_norms`]. The source statistics are restored before it
/// returns, even on an error, so each batch is adapted independently of the others.
pub fn infer_adapted<T: Real>(
    graph: &mut Graph<T>,
    prior: f64,
    x: &ArrayD<T>,
) -> Result<Vec<ArrayD<T>>> {
    let snap = snapshot(graph);
    let out = adapt_batch_norms(graph, AdaptMethod::Mix { prior }, &mut |f| f(x))
        .and_then(|_| graph.infer(&[x]));
    restore(graph, &snap);
    out
}
