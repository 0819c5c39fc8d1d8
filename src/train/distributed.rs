//! Data-parallel training over the ranks of a [`Communicator`] (PyTorch's `DistributedDataParallel`; launched
//! with `mpirun` over [`crate::dist`]'s MPI communicator, or as threads of one process with
//! [`crate::comm::LocalGroup`]).
//!
//! ```text
//! start : every rank describes its run ──► all-gather ──► any difference from rank 0 is an error on every rank
//!         rank 0's model (and optimizer) state ──► broadcast ──► every replica starts equal
//! step  : rank r's contiguous slice of the global batch ──► forward (SyncBN: statistics of the global batch)
//!         ──► loss sum, correct, count all-reduced (every rank sees the global loss before the backward)
//!         ──► backward of the global mean loss (dlogits · n_r / B) ──► gradients summed over ranks in buckets
//!         ──► the same optimizer step on every rank
//! eval  : replicas checked equal, rank 0's buffers broadcast (BN's running statistics, as DDP does), each rank
//!         evaluates its slice of the test set, sums all-reduced
//! ```
//!
//! Every decision that ends or changes the run (a non-finite loss, divergence, a target accuracy) is taken on
//! all-reduced values, so all ranks take it together and none waits in a collective that another has left.
//! Rank 0 alone writes the log, the progress and the checkpoints. The global batch and its order do not depend
//! on the number of ranks, so a checkpoint resumes on any number of them.

use super::TrainConfig;
use crate::comm::Communicator;
use crate::data::{Dataset, Shard};
use crate::model::Model;
use crate::nn::loss::{count_correct, cross_entropy};
use crate::optim::Optimizer;
use crate::rng::fnv1a;
use crate::state::Stateful;
use crate::Ctx;
use crate::{NvError, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// The group a run trains over (see the module documentation).
#[derive(Debug, Clone)]
pub struct Distributed {
    pub comm: Arc<dyn Communicator>,
    /// A test option: the size of each rank's slice of a full global batch (summing to the batch size), to
    /// produce uneven splits such as 17/15 or 32/0; `None` splits as evenly as possible.
    pub shard_sizes: Option<Vec<usize>>,
    /// Gradients all-reduced per bucket of at most this many values.
    pub bucket_len: usize,
}

impl Distributed {
    /// Data-parallel training over `comm`'s ranks, split evenly, in buckets of 1 Mi values (4 MiB).
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Distributed {
            comm,
            shard_sizes: None,
            bucket_len: 1 << 20,
        }
    }
    /// Fixed slice sizes (a test option; see [`Distributed::shard_sizes`]).
    pub fn with_shard_sizes(mut self, sizes: Vec<usize>) -> Self {
        self.shard_sizes = Some(sizes);
        self
    }
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn size(&self) -> usize {
        self.comm.size()
    }
    /// This rank's part of every global batch.
    pub fn shard(&self) -> Shard {
        Shard {
            rank: self.rank(),
            ranks: self.size(),
            sizes: self.shard_sizes.clone(),
        }
    }
}

/// A short fingerprint of a dataset: its size, image shape and labels (FNV-1a), so that ranks reading
/// different files are caught at start-up.
pub(crate) fn fingerprint(ds: &Dataset) -> serde_json::Value {
    let h = fnv1a(ds.labels.iter().flat_map(|&l| (l as u64).to_le_bytes()));
    serde_json::json!({"samples": ds.len(), "shape": ds.shape, "labels_fnv1a": format!("{h:016x}")})
}

/// Flattens a JSON value into (path, value) leaves, in order.
fn leaves(v: &serde_json::Value, path: String, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                leaves(x, p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                leaves(x, format!("{path}[{i}]"), out);
            }
        }
        _ => out.push((path, v.to_string())),
    }
}

/// The first difference between two descriptions: (path, rank 0's value, the other's value).
fn first_difference(
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> Option<(String, String, String)> {
    let (mut la, mut lb) = (vec![], vec![]);
    leaves(a, String::new(), &mut la);
    leaves(b, String::new(), &mut lb);
    let mb: HashMap<_, _> = lb.iter().cloned().collect();
    for (p, va) in &la {
        match mb.get(p) {
            Some(vb) if vb == va => {}
            Some(vb) => return Some((p.clone(), va.clone(), vb.clone())),
            None => return Some((p.clone(), va.clone(), "(absent)".into())),
        }
    }
    let ma: HashMap<_, _> = la.into_iter().collect();
    lb.into_iter()
        .find(|(p, _)| !ma.contains_key(p))
        .map(|(p, v)| (p, "(absent)".into(), v))
}

/// Every rank's `description` of its run must equal rank 0's. On a difference every rank returns the same
/// error, naming the ranks and the first field that differs, so all of them stop at start-up.
pub(crate) fn check_agreement(
    comm: &dyn Communicator,
    description: &serde_json::Value,
) -> Result<()> {
    let mine = serde_json::to_vec(description).expect("a JSON value serialises");
    let all = comm.all_gather_bytes(&mine)?;
    let parse = |r: usize, b: &[u8]| -> Result<serde_json::Value> {
        serde_json::from_slice(b)
            .map_err(|e| NvError::Comm(format!("rank {r} sent an unreadable run description: {e}")))
    };
    let root = parse(0, &all[0])?;
    let mut diffs = vec![];
    for (r, b) in all.iter().enumerate().skip(1) {
        if let Some((path, a, b)) = first_difference(&root, &parse(r, b)?) {
            diffs.push(format!("rank {r} has {path} = {b} where rank 0 has {a}"));
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(NvError::Config(format!(
        "the ranks do not run the same configuration (every rank must be given the same command, data and \
         checkpoint): {}",
        diffs.join("; ")
    )))
}

/// Replaces every rank's model state (parameters and buffers) and, with `optim`, optimizer state by rank 0's.
pub(crate) fn broadcast_state<S: Stateful<f32> + ?Sized>(
    comm: &dyn Communicator,
    model: &mut S,
    optim: Option<&mut dyn Optimizer>,
) -> Result<()> {
    let mut bytes = vec![];
    if comm.rank() == 0 {
        let mut sd = model.state_dict();
        if let Some(o) = &optim {
            sd.tensors.extend(o.state_dict().tensors);
        }
        bytes = crate::io::state_dict_to_bytes(&sd, &HashMap::new())?;
    }
    comm.broadcast_bytes(&mut bytes, 0)?;
    if comm.rank() != 0 {
        let (sd, _) = crate::io::state_dict_from_bytes(&bytes, "rank 0's model state")?;
        model.load_state("", &sd)?;
        if let Some(o) = optim {
            o.load_state_dict(&sd)?;
        }
    }
    Ok(())
}

/// An error on every rank unless every replica holds the same parameters, bit for bit (they must: each step
/// applies the same all-reduced gradients).
pub(crate) fn check_replicas<S: Stateful<f32> + ?Sized>(
    comm: &dyn Communicator,
    model: &mut S,
) -> Result<()> {
    let mut bits = vec![];
    model.visit_params("", &mut |_, p| {
        bits.extend(p.values().iter().map(|v| v.to_bits()))
    });
    let h = fnv1a(bits.iter().flat_map(|b| b.to_le_bytes()));
    let all = comm.all_gather_f64(&[(h >> 32) as f64, (h & 0xffff_ffff) as f64])?;
    let bad: Vec<usize> = (1..all.len()).filter(|&r| all[r] != all[0]).collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(NvError::Comm(format!(
        "the parameters of rank(s) {bad:?} differ from rank 0's: the replicas have diverged"
    )))
}

/// Sums every trainable parameter's gradient over the ranks, in buckets, and times it.
#[derive(Debug, Default)]
pub(crate) struct GradReducer {
    flat: Vec<f32>,
    /// Seconds spent in the all-reduces, values summed, buckets and steps, over the run.
    pub secs: f64,
    pub values: u64,
    pub buckets: u64,
    pub steps: u64,
}

impl GradReducer {
    pub fn all_reduce<S: Stateful<f32> + ?Sized>(
        &mut self,
        comm: &dyn Communicator,
        model: &mut S,
        bucket: usize,
    ) -> Result<()> {
        self.all_reduce_scaled(comm, model, bucket, 1.0)
    }

    /// [`GradReducer::all_reduce`], each sum multiplied by `scale` as it is copied back (1/ranks: the mean
    /// over the ranks, as DDP averages).
    pub fn all_reduce_scaled<S: Stateful<f32> + ?Sized>(
        &mut self,
        comm: &dyn Communicator,
        model: &mut S,
        bucket: usize,
        scale: f32,
    ) -> Result<()> {
        self.flat.clear();
        let flat = &mut self.flat;
        model.visit_params("", &mut |_, p| flat.extend_from_slice(p.grads()));
        let t = Instant::now();
        for chunk in self.flat.chunks_mut(bucket.max(1)) {
            comm.all_reduce_sum_f32(chunk)?;
            self.buckets += 1;
        }
        self.steps += 1;
        self.secs += t.elapsed().as_secs_f64();
        self.values += self.flat.len() as u64;
        let mut off = 0;
        let flat = &self.flat;
        model.visit_params("", &mut |_, p| {
            let g = p.grads_mut();
            let src = &flat[off..off + g.len()];
            if scale == 1.0 {
                g.copy_from_slice(src);
            } else {
                g.iter_mut().zip(src).for_each(|(d, &v)| *d = v * scale);
            }
            off += g.len();
        });
        Ok(())
    }
}

/// A communicator that counts the seconds spent in its collectives (the trainer reports them).
#[derive(Debug)]
pub(crate) struct TimedComm {
    inner: Arc<dyn Communicator>,
    nanos: std::sync::atomic::AtomicU64,
}

impl TimedComm {
    pub fn new(inner: Arc<dyn Communicator>) -> Self {
        TimedComm {
            inner,
            nanos: Default::default(),
        }
    }
    /// Seconds spent in collectives so far.
    pub fn secs(&self) -> f64 {
        self.nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }
    fn timed<R>(&self, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        self.nanos.fetch_add(
            t.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        r
    }
}

impl Communicator for TimedComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<Vec<f64>>> {
        self.timed(|| self.inner.all_gather_f64(local))
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.timed(|| self.inner.broadcast_f32(buf, root))
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        self.timed(|| self.inner.broadcast_bytes(buf, root))
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.timed(|| self.inner.all_reduce_sum_f64(buf))
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.timed(|| self.inner.all_reduce_sum_f32(buf))
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.timed(|| self.inner.all_gather_bytes(local))
    }
}

/// Sums `vals` over the ranks (f64, rank order); the identity without a group.
pub(crate) fn sum_over(dist: Option<&Distributed>, vals: &mut [f64]) -> Result<()> {
    match dist {
        Some(d) => d.comm.all_reduce_sum_f64(vals),
        None => Ok(()),
    }
}

/// One data-parallel step on this rank's slice of the global batch (possibly empty): the forward, the global
/// loss (all-reduced before the backward, so that a non-finite loss stops every rank alike), the backward of
/// the global mean loss and the gradient all-reduce. Returns the global loss, correct count and batch size.
pub(crate) fn step(
    model: &mut Model,
    x: &ndarray::ArrayD<f32>,
    y: &[usize],
    cfg: &TrainConfig,
    ctx: Ctx,
    d: &Distributed,
    reducer: &mut GradReducer,
) -> Result<(f64, usize, usize)> {
    let logits = model.forward(x, ctx)?;
    let k = logits.shape()[1];
    let (mut local, mut dlogits, why) = if y.is_empty() {
        (
            [0.0; 4],
            ndarray::ArrayD::zeros(ndarray::IxDyn(&[0, k])),
            None,
        )
    } else {
        match cross_entropy(&logits, y, cfg.label_smoothing) {
            Ok((loss, g)) if loss.is_finite() => {
                let c = count_correct(&logits, y)?;
                (
                    [loss * y.len() as f64, c as f64, y.len() as f64, 0.0],
                    g,
                    None,
                )
            }
            Ok((loss, g)) => (
                [0.0, 0.0, y.len() as f64, 1.0],
                g,
                Some(format!("loss {loss}")),
            ),
            Err(NvError::NonFinite(msg)) => {
                let g = ndarray::ArrayD::zeros(logits.raw_dim());
                ([0.0, 0.0, y.len() as f64, 1.0], g, Some(msg))
            }
            Err(e) => return Err(e),
        }
    };
    d.comm.all_reduce_sum_f64(&mut local)?;
    let [loss_sum, correct, n, bad] = local;
    if bad > 0.0 {
        model.graph_mut().clear_saved();
        return Err(NvError::NonFinite(
            why.unwrap_or_else(|| "a non-finite loss on another rank".into()),
        ));
    }
    // the local mean's gradient, scaled to this rank's share of the global mean
    dlogits *= y.len() as f32 / n as f32;
    model.backward_params(x, &dlogits, ctx)?;
    reducer.all_reduce(d.comm.as_ref(), model, d.bucket_len)?;
    Ok((loss_sum / n, correct as usize, n as usize))
}
