//! Timing of the `nn` layers on the shapes of the Fashion-MNIST reference CNN (batch 128, f32):
//! the four 3×3/pad-1 convolutions, forward and backward, with every algorithm that applies on this CPU
//! ([`ConvAlgo`]: Winograd, the AVX-512 im2col paths, the `gemm` crate under both thread strategies), plus max
//! pooling.
//!
//!     cargo bench --bench nn_layers                              # release profile
//!
//! Environment: `NV_BENCH_ALGOS` (comma-separated algorithm names; default all) selects the algorithms,
//! `NV_BENCH_REPS` (default 10) the timed repetitions after 2 warm-up calls; the table shows the minimum and the
//! median in milliseconds per call, and GFLOP/s of the minimum (2·MACs of the direct convolution's GEMMs).

#![allow(clippy::needless_range_loop)]

use ndarray::{ArrayD, IxDyn};
use normvision::nn::*;
use normvision::{Ctx, Layer, NvError};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// (in_channels, out_channels, height = width) of the four convolutions.
pub const CONV_SHAPES: [(usize, usize, usize); 4] =
    [(1, 32, 28), (32, 32, 28), (32, 64, 14), (64, 64, 14)];
pub const BATCH: usize = 128;

fn time(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..2 {
        f();
    }
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (t[0], t[t.len() / 2])
}

fn randn(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut r = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || r.gen_range(-1.0f32..1.0))
}

pub fn main() {
    let reps: usize = std::env::var("NV_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let picked: Option<Vec<String>> = std::env::var("NV_BENCH_ALGOS")
        .ok()
        .map(|v| v.split(',').map(|s| s.to_string()).collect());
    println!(
        "rayon threads: {}, batch {BATCH}, {reps} reps",
        rayon::current_num_threads()
    );
    println!(
        "{:<22} {:<12} {:<16} {:>9} {:>9} {:>8}",
        "conv (3x3, pad 1)", "algo", "op", "min ms", "med ms", "GFLOP/s"
    );
    for (ci, co, hw) in CONV_SHAPES {
        let x = randn(&[BATCH, ci, hw, hw], 1);
        let dy = randn(&[BATCH, co, hw, hw], 2);
        let macs = (BATCH * co * hw * hw * ci * 9) as f64;
        for algo in [
            ConvAlgo::Winograd4,
            ConvAlgo::Winograd2,
            ConvAlgo::OneChannel,
            ConvAlgo::Implicit,
            ConvAlgo::Explicit,
            ConvAlgo::Gemm,
            ConvAlgo::GemmThreads,
        ] {
            if picked
                .as_ref()
                .is_some_and(|p| !p.iter().any(|s| s == algo.name()))
            {
                continue;
            }
            let mut conv = Conv2dConfig::new(ci, co, 3)
                .padding(1)
                .build::<f32>(&mut rand_pcg::Pcg64Mcg::seed_from_u64(3))
                .unwrap();
            if let Err(NvError::Config(_)) = conv.forward_with(&x, algo, Epilogue::default()) {
                continue; // not on this CPU or for this shape
            }
            let split = algo.name();
            let mut dx = vec![0f32; x.len()];
            let label = format!("{ci}->{co} {hw}x{hw}");
            let row = |op: &str, gemms: f64, t: (f64, f64)| {
                println!(
                    "{:<22} {:<12} {:<16} {:>9.2} {:>9.2} {:>8.1}",
                    label,
                    split,
                    op,
                    t.0,
                    t.1,
                    2.0 * macs * gemms / t.0 / 1e6
                );
            };
            row(
                "forward",
                1.0,
                time(reps, || {
                    drop(conv.forward_with(&x, algo, Epilogue::default()).unwrap())
                }),
            );
            row(
                "backward",
                2.0,
                time(reps, || {
                    conv.backward_with(&x, &dy, Some(&mut dx), algo).unwrap()
                }),
            );
            row(
                "backward (no dx)",
                1.0,
                time(reps, || conv.backward_with(&x, &dy, None, algo).unwrap()),
            );
        }
    }
    for (c, hw) in [(32, 28), (64, 14)] {
        let x = randn(&[BATCH, c, hw, hw], 4);
        let mut mp = MaxPool2dConfig::new(2).build::<f32>().unwrap();
        let y = mp.forward(&x, Ctx::train()).unwrap();
        let t = time(reps, || drop(mp.forward(&x, Ctx::train()).unwrap()));
        println!(
            "maxpool2 {c}x{hw}x{hw}  forward  min {:.2} ms  median {:.2} ms",
            t.0, t.1
        );
        let t = time(reps, || drop(mp.backward(&x, &y, Ctx::train()).unwrap()));
        println!(
            "maxpool2 {c}x{hw}x{hw}  backward min {:.2} ms  median {:.2} ms",
            t.0, t.1
        );
    }
}
