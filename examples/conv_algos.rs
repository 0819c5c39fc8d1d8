//! Times the direct (implicit im2col) and the Winograd F(2×2, 3×3) convolution, forward and backward, on the
//! reference CNN's 3×3 layers at batch 128 (median of 12): `cargo run --release --example conv_algos -- [threads] [direct|winograd]`.
//! "GFLOP/s direct-equiv" counts the direct convolution's 2·N·K·C·9·H·W flops for both algorithms.
use ndarray::{ArrayD, IxDyn};
use normvision::nn::Conv2dConfig;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
        for &(c, k, hw) in &[(32usize, 32usize, 28usize), (32, 64, 14), (64, 64, 14)] {
            let n = 128;
            let x = ArrayD::from_shape_fn(IxDyn(&[n, c, hw, hw]), |_| rng.gen::<f32>() - 0.5);
            let dy = ArrayD::from_shape_fn(IxDyn(&[n, k, hw, hw]), |_| rng.gen::<f32>() - 0.5);
            let flop = 2.0 * (n * k * c * 9 * hw * hw) as f64;
            let algos: Vec<bool> = match std::env::args().nth(2).as_deref() {
                Some("direct") => vec![false],
                Some("winograd") => vec![true],
                _ => vec![false, true],
            };
            for wino in algos {
                let mut conv = Conv2dConfig::new(c, k, 3).padding(1).bias(false).build::<f32>(&mut rng).unwrap();
                conv.winograd = wino;
                let (mut tf, mut tb) = (vec![], vec![]);
                for _ in 0..12 {
                    let t = Instant::now();
                    let y = conv.forward(&x).unwrap();
                    tf.push(t.elapsed().as_secs_f64());
                    drop(y);
                    let t = Instant::now();
                    let dx = conv.backward(&x, &dy).unwrap();
                    tb.push(t.elapsed().as_secs_f64());
                    drop(dx);
                }
                tf.sort_by(|a, b| a.partial_cmp(b).unwrap());
                tb.sort_by(|a, b| a.partial_cmp(b).unwrap());
                println!(
                    "{c:>3}->{k:<3} {hw}x{hw} {:<9} fwd {:7.2} ms ({:5.0} GFLOP/s direct-equiv)  bwd {:7.2} ms ({:5.0})",
                    if wino { "winograd" } else { "direct" },
                    tf[6] * 1e3,
                    flop / tf[6] / 1e9,
                    tb[6] * 1e3,
                    2.0 * flop / tb[6] / 1e9
                );
            }
        }
    });
}
