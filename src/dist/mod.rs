//! Data-parallel training across processes. The [`Communicator`](crate::comm::Communicator) of a group of
//! ranks is MPI's here: `MpiComm`, behind the cargo feature `mpi` (Open MPI through the `mpi` crate; launch
//! with `mpirun`). A build without the feature has the one-process and thread-group communicators of
//! [`crate::comm`] only.

#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiComm;

/// The cores this process may run on when a launcher bound it to fewer than the machine has (`mpirun` binds
/// each rank to a core by default for up to 2 ranks); `None` when it may use them all.
pub fn bound_cores() -> Option<usize> {
    let avail = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    (online > 0 && avail < online as usize).then_some(avail)
}

/// The default compute threads of one rank: the cores it is bound to, or else the machine's cores divided by
/// the ranks on this machine (Open MPI's `OMPI_COMM_WORLD_LOCAL_SIZE`; 1 without it), at least 1.
pub fn threads_per_rank() -> usize {
    if let Some(b) = bound_cores() {
        return b.max(1);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local = std::env::var("OMPI_COMM_WORLD_LOCAL_SIZE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    (cores / local).max(1)
}
