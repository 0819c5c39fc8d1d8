//! `train --distributed`: data-parallel training under `mpirun`, one process per rank (MPI through the cargo
//! feature `mpi`). Any error on a rank ends the whole job with `MPI_Abort` and the message, so no rank waits
//! for one that has stopped.

use crate::args::{DataArgs, TrainArgs};
use crate::resume::RunPaths;
use normvision::model::PlanOptions;
use normvision::train::Distributed;
use normvision::Result;

/// `train --distributed` (classification): this process is one rank of an MPI job.
#[allow(clippy::too_many_arguments)]
pub fn train(
    args: &TrainArgs,
    data: &DataArgs,
    paths: RunPaths,
    explicit: &[String],
    json_out: bool,
    quiet: bool,
    plan: &PlanOptions,
    threads: Option<usize>,
    shard_sizes: Option<Vec<usize>>,
) -> Result<()> {
    as_rank(threads, quiet, shard_sizes, |dist| {
        crate::commands::train(
            args,
            data,
            paths,
            explicit,
            json_out,
            quiet,
            plan,
            Some(dist),
        )
        .map(|_| ())
    })
}

/// Runs `f` as one rank of an MPI job, with this rank's compute threads set; without the `mpi` feature, an
/// error saying how to build with it.
pub fn as_rank(
    threads: Option<usize>,
    quiet: bool,
    shard_sizes: Option<Vec<usize>>,
    f: impl FnOnce(Distributed) -> Result<()>,
) -> Result<()> {
    #[cfg(feature = "mpi")]
    {
        use normvision::comm::Communicator;
        use normvision::dist::MpiComm;
        use std::sync::Arc;

        let comm = Arc::new(MpiComm::init()?);
        let result = (|| {
            let bound = normvision::dist::bound_cores();
            let t = threads.unwrap_or_else(normvision::dist::threads_per_rank);
            crate::args::set_threads(Some(t), false)?;
            if comm.rank() == 0 && !quiet && bound.is_some_and(|b| t > b) {
                eprintln!(
                    "note: each rank is bound to {} core(s) and runs {t} threads on them; give mpirun \
                     `--bind-to none` or `--map-by slot:PE={t}`",
                    bound.unwrap_or(1)
                );
            }
            let mut dist = Distributed::new(comm.clone());
            if let Some(s) = shard_sizes {
                dist = dist.with_shard_sizes(s);
            }
            f(dist)
        })();
        match result {
            Ok(()) => Ok(()),
            // every rank sees a divergence at the same step (it is decided on all-reduced values) and stops
            Err(e @ normvision::NvError::Diverged(_)) => Err(e),
            Err(e) => comm.abort(&format!("error: {e}"), 1),
        }
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (threads, quiet, shard_sizes, f);
        Err(normvision::NvError::Config(
            "--distributed: this normvision was built without MPI; build it with `cargo build --release \
             --features mpi` (scripts/setup.sh installs Open MPI and libclang) and launch it with mpirun"
                .into(),
        ))
    }
}
