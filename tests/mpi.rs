//! SyncBatchNorm over MPI (the `mpi` feature): this test binary runs itself under `mpirun -np N`, and each rank
//! (`NV_MPI_CHILD` set) trains a SyncBatchNorm on its slice of the global batches over [`MpiComm`], against one
//! BatchNorm on the whole batch: outputs, dx, parameter gradients summed over the ranks and the running
//! statistics agree to 1e-12 in f64 for even, uneven (17/15) and empty (32/0, 10/0/22) slices. A rank that fails
//! calls `MPI_Abort`, and each `mpirun` runs under a timeout, so a fault fails the test instead of hanging it.
//!
//! `cargo test --features mpi --test mpi` (scripts/test.sh runs it; Open MPI from scripts/setup.sh).
#![cfg(feature = "mpi")]

use ndarray::{ArrayD, Axis, IxDyn};
use normvision::comm::Communicator;
use normvision::dist::MpiComm;
use normvision::norm::{BatchNorm, BatchNormConfig, SyncBatchNorm};
use normvision::{Ctx, Layer, Param};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;
use std::process::Command;
use std::sync::Arc;

const SHAPE: [usize; 4] = [32, 3, 5, 4];
const CHILD: &str = "NV_MPI_CHILD";

fn randn(seed: u64, mu: f64, sc: f64) -> ArrayD<f64> {
    let mut g = Pcg64::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(&SHAPE), || {
        mu + sc * g.sample::<f64, _>(StandardNormal)
    })
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn grads(l: &mut dyn Layer<f64>) -> Vec<f64> {
    let mut out = vec![];
    l.visit_params("", &mut |_, p: &mut Param<f64>| {
        out.extend_from_slice(p.grads())
    });
    out
}

fn running(bn: &BatchNorm<f64>) -> Vec<f64> {
    let (m, v) = (bn.running_mean().unwrap(), bn.running_var().unwrap());
    m.iter().chain(v.iter()).copied().collect()
}

/// One rank's part (under mpirun): the slice sizes come from `NV_MPI_SPLIT`.
fn child() {
    let comm = Arc::new(MpiComm::init().expect("MPI initializes"));
    let split: Vec<usize> = std::env::var("NV_MPI_SPLIT")
        .expect("NV_MPI_SPLIT")
        .split(',')
        .map(|v| v.parse().expect("a slice size"))
        .collect();
    let (rank, size) = (comm.rank(), comm.size());
    if split.len() != size || split.iter().sum::<usize>() != SHAPE[0] {
        comm.abort(&format!("split {split:?} does not fit {size} ranks"), 2);
    }
    let (a, b) = (
        split[..rank].iter().sum::<usize>(),
        split[..=rank].iter().sum::<usize>(),
    );
    let cfg = BatchNormConfig::d2(SHAPE[1]);
    let mut reference = cfg.clone().build::<f64>().unwrap();
    let mut sync = SyncBatchNorm::<f64>::new(cfg, comm.clone()).unwrap();
    let mut worst: f64 = 0.0;
    for k in 0..3 {
        let (x, dy) = (randn(100 + k, 2.0, 3.0), randn(200 + k, 0.0, 1.0));
        let ctx = Ctx::train().with_step(k);
        let y1 = reference.forward(&x, ctx).unwrap();
        let dx1 = reference.backward(&x, &dy, ctx).unwrap();
        let part = |t: &ArrayD<f64>| t.slice_axis(Axis(0), (a..b).into()).to_owned();
        let y = sync
            .forward(&part(&x), ctx)
            .unwrap_or_else(|e| comm.abort(&e.to_string(), 1));
        let dx = sync
            .backward(&part(&x), &part(&dy), ctx)
            .unwrap_or_else(|e| comm.abort(&e.to_string(), 1));
        worst = worst
            .max(rel(y.as_slice().unwrap(), part(&y1).as_slice().unwrap()))
            .max(rel(dx.as_slice().unwrap(), part(&dx1).as_slice().unwrap()));
    }
    let mut g = grads(&mut sync);
    comm.all_reduce_sum_f64(&mut g).unwrap();
    worst = worst
        .max(rel(&g, &grads(&mut reference)))
        .max(rel(&running(sync.batch_norm()), &running(&reference)));
    // the running statistics are the same bits on every rank
    let all = comm.all_gather_f64(&running(sync.batch_norm())).unwrap();
    if all.iter().any(|r| *r != all[0]) {
        comm.abort("running statistics differ between ranks", 1);
    }
    println!(
        "rank {rank}: {} samples, largest relative difference {worst:.3e}",
        b - a
    );
    if worst.is_nan() || worst >= 1e-12 {
        comm.abort(
            &format!("SyncBatchNorm differs from BatchNorm: {worst:e}"),
            1,
        );
    }
}

/// Runs this test binary's `sync_bn_matches_batch_norm_on_the_whole_batch` on `split.len()` ranks.
fn mpirun(split: &[usize]) -> (bool, String) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("timeout")
        .arg("120")
        .arg("mpirun")
        .args(["-np", &split.len().to_string(), "--oversubscribe"])
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"])
        .arg(exe)
        .args([
            "--exact",
            "sync_bn_matches_batch_norm_on_the_whole_batch",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD, "1")
        .env(
            "NV_MPI_SPLIT",
            split
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(","),
        )
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun runs (Open MPI is installed by scripts/setup.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn sync_bn_matches_batch_norm_on_the_whole_batch() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    for split in [&[16, 16][..], &[17, 15], &[32, 0], &[10, 0, 22]] {
        let (ok, text) = mpirun(split);
        assert!(ok, "split {split:?}:\n{text}");
        assert_eq!(
            text.matches("largest relative difference").count(),
            split.len(),
            "every rank reports: {text}"
        );
    }
}

#[test]
fn a_failing_rank_ends_the_job_instead_of_hanging_it() {
    if std::env::var_os(CHILD).is_some() {
        return; // only the parent runs this one
    }
    // slice sizes that do not add up to the batch: rank 0 aborts, mpirun ends every rank and fails
    let (ok, text) = mpirun(&[10, 10]);
    assert!(!ok, "{text}");
    assert!(text.contains("does not fit 2 ranks"), "{text}");
}
