//! The `nn_layers` benchmark as an ignored test, to time the layers without a release build:
//! `cargo test --test nn_timing -- --ignored --nocapture`.

#[allow(dead_code)]
#[path = "../benches/nn_layers.rs"]
mod nn_layers;

#[test]
#[ignore = "timing, not a check: run with --ignored --nocapture"]
fn nn_layer_timings() {
    nn_layers::main();
}

/// Throughput of the GEMM shapes the convolutions produce, single-threaded, to separate GEMM from im2col time.
#[test]
#[ignore = "timing"]
fn gemm_shapes() {
    use normvision::nn::matmul::{matmul, Op, Par};
    use std::time::Instant;
    for (m, n, k, ta, tb, what) in [
        (512usize, 512usize, 512usize, Op::N, Op::N, "big 512"),
        (32, 784 * 4, 288, Op::N, Op::N, "fwd 32->32 x4"),
        (32, 784, 288, Op::N, Op::N, "fwd 32->32 28"),
        (32, 288, 784, Op::N, Op::T, "dW 32->32 28"),
        (288, 784, 32, Op::T, Op::N, "dcol 32->32 28"),
        (64, 196, 576, Op::N, Op::N, "fwd 64->64 14"),
        (64, 576, 196, Op::N, Op::T, "dW 64->64 14"),
        (576, 196, 64, Op::T, Op::N, "dcol 64->64 14"),
    ] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        for par in [Par::Seq] {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t0 = cpu_ns();
                let t = Instant::now();
                for _ in 0..64 {
                    matmul(m, n, k, &a, ta, &b, tb, &mut c, true, par);
                }
                let _ = t;
                best = best.min((cpu_ns() - t0) as f64 * 1e-9);
            }
            println!(
                "{what:<16} {par:?}: {:.3} ms per call, {:.1} GFLOP/s",
                best / 64.0 * 1e3,
                2.0 * (m * n * k) as f64 * 64.0 / best / 1e9
            );
        }
    }
}

/// CPU time of the calling thread in ns (robust to other processes sharing the cores).
pub fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The AVX-512 kernels on the same shapes (thread CPU time).
#[test]
#[ignore = "timing"]
fn simd_shapes() {
    use normvision::nn::simd;
    if !simd::available() {
        println!("no AVX-512F");
        return;
    }
    for (m, n, k, what) in [
        (32usize, 784usize, 288usize, "fwd 32->32 28"),
        (64, 196, 576, "fwd 64->64 14"),
        (288, 784, 32, "dcol 32->32 28"),
        (576, 196, 64, "dcol 64->64 14"),
    ] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        let mut ap = Vec::new();
        simd::pack_a(m, k, &a, k, 1, &mut ap);
        let reps = 400;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = cpu_ns();
            for _ in 0..reps {
                simd::gemm_nn(m, n, k, &ap, &b, n, &mut c, n, true);
            }
            best = best.min((cpu_ns() - t0) as f64 * 1e-9);
        }
        println!(
            "nn {what:<16}: {:.3} ms per call, {:.1} GFLOP/s",
            best / reps as f64 * 1e3,
            2.0 * (m * n * k) as f64 * reps as f64 / best / 1e9
        );
    }
    for (m, n, len, what) in [
        (32usize, 288usize, 784usize, "dW 32->32 28"),
        (64, 576, 196, "dW 64->64 14"),
    ] {
        let a = vec![0.5f32; m * len];
        let b = vec![0.25f32; n * len];
        let mut c = vec![0f32; m * n];
        let reps = 400;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = cpu_ns();
            for _ in 0..reps {
                simd::gemm_nt(m, n, len, &a, len, &b, len, &mut c, n, true);
            }
            best = best.min((cpu_ns() - t0) as f64 * 1e-9);
        }
        println!(
            "nt {what:<16}: {:.3} ms per call, {:.1} GFLOP/s",
            best / reps as f64 * 1e3,
            2.0 * (m * n * len) as f64 * reps as f64 / best / 1e9
        );
    }
}

/// Single-thread CPU time per sample of each conv phase (AVX-512 path), to see what im2col/col2im cost.
#[test]
#[ignore = "timing"]
fn conv_profile() {
    use ndarray::{ArrayD, IxDyn};
    use normvision::nn::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        for (ci, co, hw) in [(1usize, 32usize, 28usize), (32, 32, 28), (32, 64, 14), (64, 64, 14)] {
            let n = 32;
            let x = ArrayD::from_shape_fn(IxDyn(&[n, ci, hw, hw]), |i| ((i[1] * 7 + i[2] * 3 + i[3]) % 11) as f32 - 5.0);
            let dy = ArrayD::from_shape_fn(IxDyn(&[n, co, hw, hw]), |i| ((i[1] * 5 + i[2] + i[3] * 3) % 7) as f32 - 3.0);
            let mut c = Conv2dConfig::new(ci, co, 3).padding(1).build::<f32>(&mut <rand_pcg::Pcg64Mcg as rand::SeedableRng>::seed_from_u64(1)).unwrap();
            let mut y = vec![0f32; dy.len()];
            let mut dx = vec![0f32; x.len()];
            let mut t = |f: &mut dyn FnMut()| {
                f();
                let mut best = f64::MAX;
                for _ in 0..3 {
                    let t0 = cpu_ns();
                    for _ in 0..10 {
                        f();
                    }
                    best = best.min((cpu_ns() - t0) as f64 / 10.0 / n as f64 / 1e3);
                }
                best
            };
            let f = t(&mut || c.forward_into(x.view(), &mut y).unwrap());
            let bp = t(&mut || c.backward_into(x.view(), dy.view(), None).unwrap());
            let b = t(&mut || c.backward_into(x.view(), dy.view(), Some(&mut dx)).unwrap());
            println!("{ci}->{co} {hw}: per sample fwd {f:.1} us, bwd params {bp:.1} us, bwd full {b:.1} us");
        }
    });
}
