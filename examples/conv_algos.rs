//! Times the direct (implicit im2col) convolution and the Winograd F(2×2, 3×3) and F(4×4, 3×3) kernels, forward
//! and backward (data and weight gradients), on the reference CNN's 3×3 layers at batch 128 (median of 12):
//! `cargo run --release --example conv_algos -- [threads] [direct|winograd2|winograd4]`.
//! "GFLOP/s direct-equiv" counts the direct convolution's 2·N·K·C·9·H·W flops for every algorithm.
use ndarray::{ArrayD, IxDyn};
use normvision::nn::winograd::{self, WinoShape};
use normvision::nn::{winograd4, Conv2dConfig};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let all = ["direct", "winograd2", "winograd4"];
    let pick = std::env::args().nth(2);
    let algos: Vec<&str> = match all.iter().find(|a| Some(**a) == pick.as_deref()) {
        Some(a) => vec![*a],
        None => all.to_vec(),
    };
    pool.install(|| {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
        for &(c, k, hw) in &[(32usize, 32usize, 28usize), (32, 64, 14), (64, 64, 14)] {
            let n = 128;
            let x = ArrayD::from_shape_fn(IxDyn(&[n, c, hw, hw]), |_| rng.gen::<f32>() - 0.5);
            let dy = ArrayD::from_shape_fn(IxDyn(&[n, k, hw, hw]), |_| rng.gen::<f32>() - 0.5);
            let flop = 2.0 * (n * k * c * 9 * hw * hw) as f64;
            let mut conv = Conv2dConfig::new(c, k, 3)
                .padding(1)
                .bias(false)
                .build::<f32>(&mut rng)
                .unwrap();
            conv.winograd = false;
            let s = WinoShape { n, c, k, h: hw, w: hw };
            let (xs, gs) = (x.as_slice().unwrap(), dy.as_slice().unwrap());
            let w = conv.weight.values().to_vec();
            let mut y = vec![0f32; gs.len()];
            let mut dx = vec![0f32; xs.len()];
            let mut dw = vec![0f32; w.len()];
            for algo in &algos {
                let (mut tf, mut tb) = (vec![], vec![]);
                for _ in 0..12 {
                    let t = Instant::now();
                    match *algo {
                        "direct" => drop(conv.forward(&x).unwrap()),
                        "winograd2" => winograd::forward(s, xs, &w, None, false, &mut y),
                        _ => winograd4::forward(s, xs, &w, None, false, None, &mut y),
                    }
                    tf.push(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    match *algo {
                        "direct" => drop(conv.backward(&x, &dy).unwrap()),
                        "winograd2" => winograd::backward(s, xs, gs, &w, Some(&mut dx), &mut dw, None),
                        _ => winograd4::backward(s, xs, gs, &w, Some(&mut dx), &mut dw, None),
                    }
                    tb.push(t.elapsed().as_secs_f64());
                }
                let (f, b) = (median(tf), median(tb));
                println!(
                    "{c:>3}->{k:<3} {hw}x{hw} {algo:<9} fwd {:7.2} ms ({:5.0} GFLOP/s direct-equiv)  bwd {:7.2} ms ({:5.0})",
                    f * 1e3,
                    flop / f / 1e9,
                    b * 1e3,
                    2.0 * flop / b / 1e9
                );
            }
        }
    });
}
