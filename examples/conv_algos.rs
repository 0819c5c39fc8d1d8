//! Times every convolution algorithm that applies on this CPU ([`ConvAlgo`]: Winograd F(4×4, 3×3) and F(2×2, 3×3),
//! the implicit and explicit AVX-512 im2col paths, the `gemm` crate), forward and backward (data and weight
//! gradients), on the reference CNN's 3×3 layers at batch 128 (median of 12):
//! `cargo run --release --example conv_algos -- [threads] [algorithm] [seg]`. With `seg`, on DeepLabV3's 3×3
//! layers instead: the 8×8 maps of its dilated last stage and ASPP at batch 8 (64×64 images, output stride 8).
//! With `b1` instead of `seg`, the reference CNN's layers at batch 1, forward only (inference; median of 500).
//! "GFLOP/s direct-equiv" counts the direct convolution's 2·N·K·C·9·H·W flops for every algorithm.

use normvision::ndarray::{ArrayD, IxDyn};
use normvision::nn::{Conv2dConfig, ConvAlgo, Epilogue};
use normvision::NvError;
use rand::{Rng, SeedableRng};
use std::time::Instant;

const ALGOS: [ConvAlgo; 7] = [
    ConvAlgo::Winograd2Batch,
    ConvAlgo::Winograd4,
    ConvAlgo::Winograd2,
    ConvAlgo::Implicit,
    ConvAlgo::Explicit,
    ConvAlgo::Gemm,
    ConvAlgo::GemmThreads,
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let pick = std::env::args().nth(2).filter(|p| p != "all");
    let seg = std::env::args().nth(3).is_some_and(|s| s == "seg");
    let b1 = std::env::args().nth(3).is_some_and(|s| s == "b1");
    // (input channels, output channels, input side, dilation, batch, stride[, kernel 1×1 when 1])
    let one_by_one = std::env::args().nth(4).is_some_and(|s| s == "1x1");
    let shapes: Vec<(usize, usize, usize, usize, usize, usize)> = if one_by_one {
        vec![
            (320, 64, 8, 1, 8, 1),
            (128, 64, 8, 1, 8, 1),
            (64, 128, 8, 1, 8, 1),
        ]
    } else if seg {
        vec![
            (32, 32, 32, 1, 8, 2),
            (32, 32, 16, 1, 8, 1),
            (32, 64, 16, 1, 8, 2),
            (64, 64, 8, 1, 8, 1),
            (64, 128, 8, 1, 8, 1),
            (128, 128, 8, 1, 8, 1),
            (128, 128, 8, 2, 8, 1),
            (128, 64, 8, 3, 8, 1),
            (128, 64, 8, 4, 8, 1),
        ]
    } else {
        vec![
            (32, 32, 28, 1, 128, 1),
            (32, 64, 14, 1, 128, 1),
            (64, 64, 14, 1, 128, 1),
        ]
    };
    let shapes: Vec<_> = if b1 {
        shapes
            .into_iter()
            .map(|(c, k, hw, d, _, st)| (c, k, hw, d, 1, st))
            .collect()
    } else {
        shapes
    };
    let reps = if b1 { 500 } else { 12 };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
        for &(c, k, hw, d, n, st) in &shapes {
            let ks = if one_by_one { 1 } else { 3 };
            let pad = if one_by_one { 0 } else { d };
            let ohw = (hw + 2 * pad - d * (ks - 1) - 1) / st + 1;
            let x = ArrayD::from_shape_fn(IxDyn(&[n, c, hw, hw]), |_| rng.gen::<f32>() - 0.5);
            let dy = ArrayD::from_shape_fn(IxDyn(&[n, k, ohw, ohw]), |_| rng.gen::<f32>() - 0.5);
            let flop = 2.0 * (n * k * c * ks * ks * ohw * ohw) as f64;
            let mut conv = Conv2dConfig::new(c, k, ks)
                .padding(pad)
                .dilation(d)
                .stride(st)
                .bias(false)
                .build::<f32>(&mut rng)
                .unwrap();
            let mut dx = vec![0f32; x.len()];
            for algo in ALGOS {
                if pick.as_deref().is_some_and(|p| p != algo.name()) {
                    continue;
                }
                match conv.forward_with(&x, algo, Epilogue::default()) {
                    Err(NvError::Config(_)) => continue, // not on this CPU or for this shape
                    r => drop(r.unwrap()),
                }
                let (mut tf, mut tb) = (vec![], vec![]);
                for _ in 0..reps {
                    let t = Instant::now();
                    drop(conv.forward_with(&x, algo, Epilogue::default()).unwrap());
                    tf.push(t.elapsed().as_secs_f64());
                    if b1 {
                        tb.push(0.0); // forward only
                        continue;
                    }
                    let t = Instant::now();
                    conv.backward_with(&x, &dy, Some(&mut dx), algo).unwrap();
                    tb.push(t.elapsed().as_secs_f64());
                }
                let (f, b) = (median(tf), median(tb));
                println!(
                    "{c:>3}->{k:<3} {hw}x{hw} s{st} d{d} n{n} {:<12} fwd {:7.2} ms ({:5.0} GFLOP/s direct-equiv)  bwd {:7.2} ms ({:5.0})",
                    algo.name(),
                    f * 1e3,
                    flop / f / 1e9,
                    b * 1e3,
                    2.0 * flop / b / 1e9
                );
            }
        }
    });
}
