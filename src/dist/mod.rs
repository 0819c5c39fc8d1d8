//! Data-parallel training across processes. The [`Communicator`](crate::comm::Communicator) of a group of
//! ranks is MPI's here: `MpiComm`, behind the cargo feature `mpi` (Open MPI through the `mpi` crate; launch
//! with `mpirun`). A build without the feature has the one-process and thread-group communicators of
//! [`crate::comm`] only.

#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiComm;
