//! The cost of the collectives data-parallel training calls, over MPI, without training around them (so
//! without the wait for a slower rank that the trainer's timings include): the gradient all-reduce of the
//! reference CNN (468138 f32 values) and of other sizes, and SyncBN's per-layer exchange (an all-gather of
//! 2C+1 f64 per rank). Min and median over repetitions, after a barrier-like warm-up, printed by rank 0.
//!
//! ```text
//! cargo build --release --features mpi --example mpi_collectives
//! OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
//!   mpirun -np 2 --mca btl_vader_single_copy_mechanism none target/release/examples/mpi_collectives
//! ```

use normvision::comm::Communicator;
use normvision::dist::MpiComm;
use std::time::Instant;

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[0], v[v.len() / 2])
}

fn main() {
    let comm = MpiComm::init().expect("MPI initializes");
    let reps = 50;
    let root = comm.rank() == 0;
    if root {
        println!(
            "{} ranks; {:<38} {:>10} {:>10} {:>9}",
            comm.size(),
            "collective",
            "min ms",
            "median ms",
            "GB/s"
        );
    }
    for n in [4096usize, 65536, 468_138, 4 << 20] {
        let mut buf = vec![1.0f32; n];
        let mut times = vec![];
        for r in 0..reps + 5 {
            comm.all_gather_f64(&[0.0]).unwrap(); // line the ranks up
            let t = Instant::now();
            comm.all_reduce_sum_f32(&mut buf).unwrap();
            if r >= 5 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let (min, med) = stats(times);
        if root {
            // a ring all-reduce moves 2(P-1)/P of the buffer through each rank
            let p = comm.size() as f64;
            let bytes = 2.0 * (p - 1.0) / p * 4.0 * n as f64;
            println!(
                "{:<48} {:>10.3} {:>10.3} {:>9.2}",
                format!(
                    "all-reduce f32, {n} values ({:.2} MB)",
                    4.0 * n as f64 / 1e6
                ),
                1e3 * min,
                1e3 * med,
                bytes / min / 1e9
            );
        }
    }
    for c in [32usize, 128, 512] {
        let local = vec![0.5f64; 2 * c + 1];
        let mut times = vec![];
        for r in 0..reps + 5 {
            comm.all_gather_f64(&[0.0]).unwrap();
            let t = Instant::now();
            comm.all_gather_f64(&local).unwrap();
            if r >= 5 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let (min, med) = stats(times);
        if root {
            println!(
                "{:<48} {:>10.4} {:>10.4} {:>9}",
                format!("SyncBN all-gather, C = {c}"),
                1e3 * min,
                1e3 * med,
                "-"
            );
        }
    }
}
