//! Communicators: what data-parallel training and [`SyncBatchNorm`](crate::norm::SyncBatchNorm) need from a group
//! of workers (ranks): sums over all ranks, a broadcast from one rank, and a gather of small statistics.
//!
//! Every collective gives **bitwise the same result on every rank**, never one that depends on timing, so
//! replicas that start equal stay equal: the small f64 sums (SyncBN's) are formed in rank order from the
//! gathered contributions; the large f32 gradient sum is either that or, over MPI, each element summed once on
//! one rank and copied to the others.
//!
//! Implementations:
//! - [`SingleProcess`]: one rank; every collective is the identity. A model that holds it trains exactly as
//!   without a group.
//! - [`LocalGroup`]: N ranks as threads of one process (shared memory, a barrier per collective): SyncBN's
//!   semantics without a launcher, for tests and for splitting a batch over thread workers.
//! - over MPI, behind the cargo feature `mpi` (`normvision::dist`).

use crate::{NvError, Result};
use std::sync::{Arc, Barrier, Mutex};

/// A group of ranks that exchange buffers. All ranks must call the same collectives in the same order with
/// buffers of the same length (the gather's contributions may differ in length); a mismatch is an error on
/// the ranks that can see it, never a silent wrong result.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This process's rank, in `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` (the lengths may differ), in rank order.
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<Vec<f64>>>;
    /// Replaces `buf` on every rank by rank `root`'s `buf` (the lengths must agree).
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Replaces `buf` on every rank by rank `root`'s bytes (the length may differ: the buffer is resized).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// `buf` ← the sum of every rank's `buf`, added in rank order in f64 (the same bits on every rank).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let all = self.all_gather_f64(buf)?;
        sum_in_rank_order(&all, buf)
    }
    /// Every rank's bytes `local` (the lengths may differ), in rank order.
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let wide: Vec<f64> = local.iter().map(|&b| b as f64).collect();
        Ok(self
            .all_gather_f64(&wide)?
            .into_iter()
            .map(|v| v.into_iter().map(|b| b as u8).collect())
            .collect())
    }
    /// `buf` ← the sum of every rank's `buf` (the data-parallel trainer's gradient all-reduce), the same bits
    /// on every rank. The default accumulates in f64 in rank order and rounds once; an implementation may sum
    /// in another order fixed by the group (MPI: a reduce-scatter, each element summed on one rank, then an
    /// all-gather of the sums).
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let wide: Vec<f64> = buf.iter().map(|&v| v as f64).collect();
        let all = self.all_gather_f64(&wide)?;
        let mut out = vec![0.0; buf.len()];
        sum_in_rank_order(&all, &mut out)?;
        for (b, o) in buf.iter_mut().zip(out) {
            *b = o as f32;
        }
        Ok(())
    }
}

/// `out` ← Σ over ranks of `all[r]`, rank 0 first.
pub fn sum_in_rank_order(all: &[Vec<f64>], out: &mut [f64]) -> Result<()> {
    for (r, v) in all.iter().enumerate() {
        if v.len() != out.len() {
            return Err(NvError::Comm(format!(
                "all-reduce: rank {r} sent {} values, this rank {}",
                v.len(),
                out.len()
            )));
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        let mut s = 0.0;
        for v in all {
            s += v[i];
        }
        *o = s;
    }
    Ok(())
}

/// One rank: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<Vec<f64>>> {
        Ok(vec![local.to_vec()])
    }
    fn broadcast_f32(&self, _buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, 1)
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(root, 1)
    }
}

/// An error unless `root` is a rank of a group of `size`.
pub(crate) fn check_root(root: usize, size: usize) -> Result<()> {
    if root >= size {
        return Err(NvError::Comm(format!(
            "broadcast from rank {root} in a group of {size}"
        )));
    }
    Ok(())
}

/// What the ranks of a [`LocalGroup`] share: one slot per rank and a barrier.
#[derive(Debug)]
struct Shared {
    slots: Mutex<Vec<Vec<f64>>>,
    bytes: Mutex<Vec<u8>>,
    barrier: Barrier,
}

/// One rank of a group of threads in this process (see [`LocalGroup::new`]). Each rank must run on its own
/// thread: a collective waits until every rank has entered it.
#[derive(Debug, Clone)]
pub struct LocalGroup {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// The `size` ranks of a new group, rank 0 first; hand each to its own thread.
    pub fn new(size: usize) -> Result<Vec<LocalGroup>> {
        if size == 0 {
            return Err(NvError::Config("a group needs at least one rank".into()));
        }
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![vec![]; size]),
            bytes: Mutex::new(vec![]),
            barrier: Barrier::new(size),
        });
        Ok((0..size)
            .map(|rank| LocalGroup {
                rank,
                size,
                shared: shared.clone(),
            })
            .collect())
    }
}

fn poisoned() -> NvError {
    NvError::Comm("a rank of the local group panicked".into())
}

impl Communicator for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<Vec<f64>>> {
        self.shared.slots.lock().map_err(|_| poisoned())?[self.rank] = local.to_vec();
        self.shared.barrier.wait(); // every rank has written
        let all = self.shared.slots.lock().map_err(|_| poisoned())?.clone();
        self.shared.barrier.wait(); // every rank has read: the slots may be reused
        Ok(all)
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        let wide: Vec<f64> = if self.rank == root {
            buf.iter().map(|&v| v as f64).collect()
        } else {
            vec![]
        };
        let all = self.all_gather_f64(&wide)?;
        if all[root].len() != buf.len() {
            return Err(NvError::Comm(format!(
                "broadcast: rank {root} sent {} values, rank {} expects {}",
                all[root].len(),
                self.rank,
                buf.len()
            )));
        }
        for (b, &v) in buf.iter_mut().zip(&all[root]) {
            *b = v as f32; // exact: the values were f32
        }
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(root, self.size)?;
        if self.rank == root {
            *self.shared.bytes.lock().map_err(|_| poisoned())? = buf.clone();
        }
        self.shared.barrier.wait();
        if self.rank != root {
            *buf = self.shared.bytes.lock().map_err(|_| poisoned())?.clone();
        }
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ranks<F, R>(size: usize, f: F) -> Vec<R>
    where
        F: Fn(LocalGroup) -> R + Send + Sync,
        R: Send,
    {
        let group = LocalGroup::new(size).unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|g| {
                    let f = &f;
                    s.spawn(move || f(g))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sums_are_the_same_bits_on_every_rank_and_in_rank_order() {
        let out = on_ranks(3, |g| {
            let mut v = [1e16, 1.0, -1e16][g.rank()];
            let mut b = [v; 2];
            g.all_reduce_sum_f64(&mut b).unwrap();
            v = b[0];
            v
        });
        // (1e16 + 1) - 1e16 in rank order is 0 in f64 (1 is lost against 1e16): every rank gets that same 0
        assert_eq!(out, vec![0.0; 3]);
    }

    #[test]
    fn gathers_broadcasts_and_length_mismatches() {
        let out = on_ranks(2, |g| {
            let all = g
                .all_gather_f64(&vec![g.rank() as f64; g.rank() + 1])
                .unwrap();
            let mut f = [g.rank() as f32 + 0.5; 3];
            g.broadcast_f32(&mut f, 1).unwrap();
            let mut bytes = if g.rank() == 0 {
                b"cfg".to_vec()
            } else {
                vec![]
            };
            g.broadcast_bytes(&mut bytes, 0).unwrap();
            let mut bad = vec![0.0; 1 + g.rank()];
            let err = g.all_reduce_sum_f64(&mut bad).unwrap_err().to_string();
            (all, f, bytes, err)
        });
        for (all, f, bytes, err) in out {
            assert_eq!(all, vec![vec![0.0], vec![1.0, 1.0]]);
            assert_eq!(f, [1.5; 3]);
            assert_eq!(bytes, b"cfg");
            assert!(err.starts_with("communication: all-reduce: rank"), "{err}");
        }
        assert!(SingleProcess.broadcast_f32(&mut [0.0], 1).is_err());
        assert!(LocalGroup::new(0).is_err());
    }
}
