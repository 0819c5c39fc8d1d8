//! Batches over a [`Dataset`], prepared on a background thread while the training step runs.
//!
//! Determinism: the order of epoch `e` is a Fisher–Yates shuffle driven by a `Pcg64Mcg` whose state is derived
//! from `(seed, e)` only, and the augmentation of the sample at position `i` of that order uses a `Pcg64Mcg`
//! derived from `(seed, e, i)` only. So any batch is a pure function of `(seed, epoch, batch index)` and a run
//! resumed with [`DataLoader::epoch_from`] sees exactly the batches the uninterrupted run would have seen.
//! The shuffle draws raw `u64`s (no `rand` range-sampling algorithm), so the order does not change with `rand`.
//!
//! Data-parallel training: with a [`Shard`], each batch is this rank's contiguous slice of the global batch
//! (the same order and augmentation draws as one process would use), so any split of a global batch over ranks
//! sees exactly its samples.
//!
//! Prefetch: each epoch iterator owns one producer thread feeding a bounded `sync_channel` of depth
//! [`LoaderConfig::prefetch`]. Dropping the iterator mid-epoch disconnects the channel and joins the thread,
//! which exits at its next send (or before building the next batch), so nothing hangs or leaks.

use super::augment::Augment;
use super::dataset::{Dataset, Normalization};
use crate::{NvError, Result};
use ndarray::Array4;
use rand::RngCore;
use rand_pcg::Pcg64Mcg;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A batch: `(B, C, H, W)` normalized images and their labels.
pub type Batch = (Array4<f32>, Vec<usize>);

/// How batches are formed.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Reshuffle every epoch (training); `false` keeps dataset order (evaluation).
    pub shuffle: bool,
    /// Drop the last batch when it is smaller than `batch_size`.
    pub drop_last: bool,
    pub seed: u64,
    /// Applied to every sample before normalization; `None` (or an identity) for evaluation.
    pub augment: Option<Augment>,
    /// Batches prepared ahead (channel depth), at least 1.
    pub prefetch: usize,
    /// Data-parallel training: each batch is this rank's slice of the global batch of `batch_size` samples.
    pub shard: Option<Shard>,
}

/// One rank's part of every global batch: a contiguous slice, as even as possible (the first `len % ranks`
/// ranks take one sample more), or of fixed sizes (a test option, to produce splits such as 17/15 or 32/0).
/// Which samples a global batch holds, and how each is augmented, does not depend on the split.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
    /// Fixed slice sizes, one per rank, summing to the batch size; a shorter last batch is cut from the
    /// front (rank r takes what is left of its slice).
    pub sizes: Option<Vec<usize>>,
}

impl Shard {
    /// An even split over `ranks` ranks.
    pub fn even(rank: usize, ranks: usize) -> Shard {
        Shard {
            rank,
            ranks,
            sizes: None,
        }
    }

    /// Checks the rank and the fixed sizes against a global batch size.
    pub fn validate(&self, batch_size: usize) -> Result<()> {
        if self.ranks == 0 || self.rank >= self.ranks {
            return Err(NvError::Config(format!(
                "loader: rank {} of a group of {}",
                self.rank, self.ranks
            )));
        }
        if let Some(s) = &self.sizes {
            if s.len() != self.ranks || s.iter().sum::<usize>() != batch_size {
                return Err(NvError::Config(format!(
                    "shard sizes {s:?} (--shard-sizes) must give one size per rank ({}) summing to the batch size {batch_size}",
                    self.ranks
                )));
            }
        }
        Ok(())
    }

    /// This rank's range within a global batch of `len` samples.
    pub fn range(&self, len: usize) -> std::ops::Range<usize> {
        self.range_of(self.rank, len)
    }

    /// Rank `r`'s range within a global batch of `len` samples.
    pub fn range_of(&self, r: usize, len: usize) -> std::ops::Range<usize> {
        match &self.sizes {
            Some(s) => {
                let start: usize = s[..r].iter().sum();
                start.min(len)..(start + s[r]).min(len)
            }
            None => {
                let (base, extra) = (len / self.ranks, len % self.ranks);
                let start = r * base + r.min(extra);
                start..start + base + usize::from(r < extra)
            }
        }
    }
}

impl LoaderConfig {
    /// Training defaults: shuffle, keep the last partial batch, prefetch 2, no augmentation.
    pub fn train(batch_size: usize, seed: u64) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: false,
            seed,
            augment: None,
            prefetch: 2,
            shard: None,
        }
    }
    /// Evaluation: dataset order, every sample, no augmentation.
    pub fn eval(batch_size: usize) -> LoaderConfig {
        LoaderConfig {
            shuffle: false,
            ..Self::train(batch_size, 0)
        }
    }
}

pub use crate::rng::derive_rng;

/// Uniform-ish integer in `0..n` from one `u64` (Lemire's multiply-shift; bias < n / 2^64).
fn below(rng: &mut Pcg64Mcg, n: usize) -> usize {
    ((rng.next_u64() as u128 * n as u128) >> 64) as usize
}

/// Iterates a dataset in batches.
#[derive(Debug, Clone)]
pub struct DataLoader {
    dataset: Arc<Dataset>,
    norm: Normalization,
    cfg: LoaderConfig,
    /// The loader's own decoding threads, for a streaming dataset: images are decoded there while the model
    /// computes on the global pool.
    decoders: Option<Arc<rayon::ThreadPool>>,
}

impl DataLoader {
    /// Checks the batch size, the normalization's channel count and the augmentation ranges.
    pub fn new(
        dataset: Arc<Dataset>,
        norm: Normalization,
        cfg: LoaderConfig,
    ) -> Result<DataLoader> {
        if cfg.batch_size == 0 {
            return Err(NvError::Config(
                "loader: batch_size must be positive".into(),
            ));
        }
        norm.validate()?;
        if norm.channels() != dataset.channels() {
            return Err(NvError::Config(format!(
                "loader: normalization has {} channels, dataset images have {}",
                norm.channels(),
                dataset.channels()
            )));
        }
        if let Some(a) = &cfg.augment {
            a.validate()?;
        }
        if let Some(sh) = &cfg.shard {
            sh.validate(cfg.batch_size)?;
        }
        let decoders = if dataset.is_streaming() {
            let n = std::thread::available_parallelism().map_or(2, |n| n.get());
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .thread_name(|i| format!("loader-decode-{i}"))
                .build()
                .map_err(|e| {
                    NvError::Config(format!("loader: cannot start decoding threads: {e}"))
                })?;
            Some(Arc::new(pool))
        } else {
            None
        };
        Ok(DataLoader {
            dataset,
            norm,
            cfg,
            decoders,
        })
    }
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }
    pub fn normalization(&self) -> &Normalization {
        &self.norm
    }
    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }
    /// Sample indices of epoch `epoch` in visiting order (a pure function of `(seed, epoch)`).
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        epoch_order(self.dataset.len(), self.cfg.shuffle, self.cfg.seed, epoch)
    }
    /// All batches of `epoch`.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        self.epoch_from(epoch, 0)
            .expect("batch 0 is always a valid start")
    }
    /// The batches of `epoch` from batch `start_batch` on (resume). `start_batch == num_batches()` gives an
    /// empty iterator; beyond that is an error.
    pub fn epoch_from(&self, epoch: usize, start_batch: usize) -> Result<EpochIter> {
        let nb = self.num_batches();
        if start_batch > nb {
            return Err(NvError::Config(format!(
                "loader: cannot resume at batch {start_batch}: an epoch has {nb} batches"
            )));
        }
        let depth = self.cfg.prefetch.max(1);
        let (tx, rx) = sync_channel::<Result<Batch>>(depth);
        let decoders = self.decoders.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let job = BatchMaker {
            dataset: Arc::clone(&self.dataset),
            norm: self.norm.clone(),
            cfg: self.cfg.clone(),
            order: self.epoch_order(epoch),
            epoch,
        };
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name(format!("loader-epoch-{epoch}"))
            .spawn(move || {
                let mut scratch = Vec::new();
                for b in start_batch..nb {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch = match &decoders {
                        Some(pool) => pool.install(|| job.make(b, &mut scratch)),
                        None => job.make(b, &mut scratch),
                    };
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break; // receiver dropped, or nothing more to make
                    }
                }
            })
            .map_err(|e| NvError::io(std::path::Path::new("data loader thread"), "spawn", e))?;
        Ok(EpochIter {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            epoch,
            next: start_batch,
            num_batches: nb,
            error: None,
        })
    }
    /// Builds batch `index` of `epoch` synchronously (same result as the iterator's).
    pub fn batch_at(&self, epoch: usize, index: usize) -> Result<Batch> {
        if index >= self.num_batches() {
            return Err(NvError::Config(format!(
                "loader: batch {index} out of range ({} per epoch)",
                self.num_batches()
            )));
        }
        let job = BatchMaker {
            dataset: Arc::clone(&self.dataset),
            norm: self.norm.clone(),
            cfg: self.cfg.clone(),
            order: self.epoch_order(epoch),
            epoch,
        };
        job.make(index, &mut Vec::new())
    }
}

/// The visiting order of `n` samples in `epoch`: identity without shuffle, otherwise Fisher–Yates with
/// [`derive_rng`]`(seed, epoch, 0)`.
pub fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = derive_rng(seed, epoch as u64, 0);
        for i in (1..n).rev() {
            let j = below(&mut rng, i + 1);
            order.swap(i, j);
        }
    }
    order
}

struct BatchMaker {
    dataset: Arc<Dataset>,
    norm: Normalization,
    cfg: LoaderConfig,
    order: Vec<usize>,
    epoch: usize,
}

impl BatchMaker {
    fn make(&self, b: usize, scratch: &mut Vec<f32>) -> Result<Batch> {
        let bs = self.cfg.batch_size;
        let mut start = b * bs;
        let mut end = (start + bs).min(self.order.len());
        if let Some(sh) = &self.cfg.shard {
            let r = sh.range(end - start);
            (start, end) = (start + r.start, start + r.end);
        }
        let idx = &self.order[start..end];
        let mut x = self.dataset.batch_unit(idx)?;
        if let Some(aug) = self.cfg.augment.as_ref().filter(|a| !a.is_identity()) {
            let shape = self.dataset.shape;
            let s = self.dataset.sample_len();
            let data = x.as_slice_mut().expect("fresh array");
            for (k, img) in data.chunks_exact_mut(s).enumerate() {
                // stream 1 + position in the epoch order: independent of batch size and thread timing
                let mut rng = derive_rng(self.cfg.seed, self.epoch as u64, 1 + (start + k) as u64);
                aug.apply(img, shape, &mut rng, scratch);
            }
        }
        self.norm
            .normalize(&mut x)
            .expect("channel count checked in DataLoader::new");
        Ok((x, idx.iter().map(|&i| self.dataset.labels[i]).collect()))
    }
}

/// The batches of one epoch, produced on a background thread. Yields [`Batch`]es in order. A batch that cannot
/// be made (a streamed image file that no longer decodes) ends the iteration early; [`EpochIter::error`] then
/// holds why.
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch>>>,
    error: Option<NvError>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    epoch: usize,
    next: usize,
    num_batches: usize,
}

impl EpochIter {
    /// The epoch being iterated.
    pub fn epoch(&self) -> usize {
        self.epoch
    }
    /// Index (within the epoch) of the batch the next call to `next` returns.
    pub fn next_index(&self) -> usize {
        self.next
    }
    pub fn num_batches(&self) -> usize {
        self.num_batches
    }
    /// Why the iteration ended before its last batch, if it did (taken: a second call returns `Ok`).
    pub fn error(&mut self) -> Result<()> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Iterator for EpochIter {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.num_batches {
            return None;
        }
        match self.rx.as_ref()?.recv() {
            Ok(Ok(b)) => {
                self.next += 1;
                Some(b)
            }
            Ok(Err(e)) => {
                self.error = Some(e);
                self.next = self.num_batches;
                None
            }
            // The producer died (a panic while building a batch): surface it instead of ending quietly.
            Err(_) => {
                let h = self.handle.take();
                if let Some(Err(p)) = h.map(JoinHandle::join) {
                    std::panic::resume_unwind(p);
                }
                None
            }
        }
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let r = self.num_batches - self.next;
        (r, Some(r))
    }
}

impl ExactSizeIterator for EpochIter {}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.rx.take()); // a producer blocked in send() now gets Err and exits
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
