//! [`Communicator`](crate::comm::Communicator) over MPI's world communicator (rsmpi). The MPI library is initialized once per process, with
//! `MPI_THREAD_SERIALIZED`: the collectives are called from whichever thread runs the step, never two at a
//! time (a lock serializes them). Any MPI error is fatal to the whole job (MPI's default error handler), and
//! [`MpiComm::abort`] ends every rank with a message, so no rank waits forever for one that failed.

use crate::comm::{check_root, Communicator as NvCommunicator};
use crate::{NvError, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;
use std::sync::Mutex;

/// Each rank's offset in a gather of `counts`, and the total.
fn displacements(counts: &[Count]) -> Result<(Vec<Count>, usize)> {
    let mut displs = Vec::with_capacity(counts.len());
    let mut total: usize = 0;
    for &c in counts {
        displs.push(
            Count::try_from(total).map_err(|_| NvError::Comm("gather too large for MPI".into()))?,
        );
        total += c as usize;
    }
    Ok((displs, total))
}

/// A gathered buffer cut into each rank's part.
fn split<T: Clone>(buf: &[T], counts: &[Count], displs: &[Count]) -> Vec<Vec<T>> {
    counts
        .iter()
        .zip(displs)
        .map(|(&c, &d)| buf[d as usize..(d + c) as usize].to_vec())
        .collect()
}

/// The MPI world as a [`Communicator`](crate::comm::Communicator). Create one per process, before any other MPI use; dropping it
/// finalizes MPI.
pub struct MpiComm {
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    // dropped last: MPI_Finalize
    _universe: Universe,
}

// SAFETY: MPI is initialized with MPI_THREAD_SERIALIZED (or better), and every call on the communicator goes
// through the mutex, so no two threads are ever inside MPI at once.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiComm(rank {} of {})", self.rank, self.size)
    }
}

fn lock_err() -> NvError {
    NvError::Comm(
        "the MPI communicator's lock is poisoned (a thread panicked inside a collective)".into(),
    )
}

impl MpiComm {
    /// Initializes MPI (once per process). An error if MPI was already initialized or cannot give
    /// serialized threading.
    pub fn init() -> Result<MpiComm> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| NvError::Comm("MPI is already initialized in this process".into()))?;
        if threading < mpi::Threading::Serialized {
            return Err(NvError::Comm(format!(
                "the MPI library gives thread level {threading:?}; normvision needs Serialized"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiComm {
            world: Mutex::new(world),
            rank,
            size,
            _universe: universe,
        })
    }

    /// Ends every rank of the job (`MPI_Abort`) after printing `msg` on this rank's standard error.
    pub fn abort(&self, msg: &str, code: i32) -> ! {
        // One write: `eprintln!` writes the pieces of its format one by one to the
        // unbuffered stderr, and mpirun's own abort banner can land between them.
        let line = format!("normvision: rank {} of {}: {msg}\n", self.rank, self.size);
        {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(line.as_bytes());
            let _ = err.flush();
        }
        match self.world.lock() {
            Ok(w) => w.abort(code),
            Err(p) => p.into_inner().abort(code),
        }
    }
}

impl NvCommunicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather_f64(&self, local: &[f64]) -> Result<Vec<Vec<f64>>> {
        let w = self.world.lock().map_err(|_| lock_err())?;
        let n = Count::try_from(local.len()).map_err(|_| {
            NvError::Comm(format!(
                "gather of {} values: too many for MPI",
                local.len()
            ))
        })?;
        let mut counts = vec![0 as Count; self.size];
        w.all_gather_into(&n, &mut counts[..]);
        let (displs, total) = displacements(&counts)?;
        let mut buf = vec![0f64; total];
        {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            w.all_gather_varcount_into(local, &mut part);
        }
        Ok(split(&buf, &counts, &displs))
    }
    fn broadcast_f32(&self, buf: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        let w = self.world.lock().map_err(|_| lock_err())?;
        let r = w.process_at_rank(root as i32);
        // the lengths first, so that a mismatch is an error on every rank rather than a truncated message
        let mut n = buf.len() as u64;
        r.broadcast_into(&mut n);
        // every rank learns whether any rank's length differs, so that none (the root included) goes on to a
        // data broadcast that another rank has left
        let mismatch = (n != buf.len() as u64) as i32;
        let mut any = 0i32;
        w.all_reduce_into(&mismatch, &mut any, SystemOperation::max());
        if any != 0 {
            return Err(NvError::Comm(format!(
                "broadcast: rank {root} sends {n} values; {}",
                if mismatch != 0 {
                    format!("rank {} expects {}", self.rank, buf.len())
                } else {
                    "another rank expects a different length".into()
                }
            )));
        }
        r.broadcast_into(buf);
        Ok(())
    }
    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let w = self.world.lock().map_err(|_| lock_err())?;
        let n = Count::try_from(local.len()).map_err(|_| {
            NvError::Comm(format!("gather of {} bytes: too many for MPI", local.len()))
        })?;
        let mut counts = vec![0 as Count; self.size];
        w.all_gather_into(&n, &mut counts[..]);
        let (displs, total) = displacements(&counts)?;
        let mut buf = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            w.all_gather_varcount_into(local, &mut part);
        }
        Ok(split(&buf, &counts, &displs))
    }
    /// A reduce-scatter (each element summed once, on one rank, in MPI's order for this group) then an
    /// all-gather of the sums: the same bits on every rank by construction, with the traffic of a ring
    /// all-reduce (about 2·(P−1)/P of the buffer per rank).
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        if self.size == 1 || buf.is_empty() {
            return Ok(());
        }
        let w = self.world.lock().map_err(|_| lock_err())?;
        let block = buf.len().div_ceil(self.size);
        let mut padded = vec![0f32; block * self.size];
        padded[..buf.len()].copy_from_slice(buf);
        let mut mine = vec![0f32; block];
        w.reduce_scatter_block_into(&padded[..], &mut mine[..], SystemOperation::sum());
        w.all_gather_into(&mine[..], &mut padded[..]);
        buf.copy_from_slice(&padded[..buf.len()]);
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        check_root(root, self.size)?;
        let w = self.world.lock().map_err(|_| lock_err())?;
        let r = w.process_at_rank(root as i32);
        let mut n = buf.len() as u64;
        r.broadcast_into(&mut n);
        buf.resize(n as usize, 0);
        r.broadcast_into(&mut buf[..]);
        Ok(())
    }
}
