//! The normalization layers with every elementwise output written by streaming stores.
//!
//! Streaming stores are used only for passes whose arrays exceed the kernel options' threshold (40 MiB by default),
//! which no other test reaches. This test runs the layers under a context whose threshold is one byte
//! ([`KernelOptions::stream_bytes`]) and checks LayerNorm's, GroupNorm's and BatchNorm's training forward and
//! backward against an f64 computation on the same inputs.

use ndarray::{ArrayD, IxDyn};
use normvision::norm::*;
use normvision::{Ctx, KernelOptions, Layer};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rand_pcg::Pcg64;

const EPS: f64 = 1e-5;

fn randn(seed: u64, shape: &[usize]) -> ArrayD<f32> {
    let mut g = Pcg64::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let z: f64 = StandardNormal.sample(&mut g);
        z as f32
    })
}

/// f64 (y, dx) of a normalisation over contiguous blocks of `block` values of `x`, with per-value scale
/// `w(i)` and shift `b(i)` (i = flat index), given dy.
fn reference(
    x: &[f32],
    dy: &[f32],
    block: usize,
    w: impl Fn(usize) -> f64,
    b: impl Fn(usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    for (k, xb) in x.chunks(block).enumerate() {
        let o = k * block;
        let n = block as f64;
        let mean = xb.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = xb.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let r = 1.0 / (var + EPS).sqrt();
        let xh: Vec<f64> = xb.iter().map(|&v| (v as f64 - mean) * r).collect();
        let u: Vec<f64> = (0..block).map(|i| dy[o + i] as f64 * w(o + i)).collect();
        let su = u.iter().sum::<f64>() / n;
        let sux = u.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / n;
        for i in 0..block {
            y[o + i] = xh[i] * w(o + i) + b(o + i);
            dx[o + i] = r * (u[i] - su - xh[i] * sux);
        }
    }
    (y, dx)
}

fn max_rel_err(got: &ArrayD<f32>, want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Asserts a layer's training (y, dx) for (x, dy) against [`reference`] over blocks of `block` values: y within
/// 1e-6 and dx within 1e-5 of the largest reference value.
fn assert_matches(
    what: &str,
    (x, dy): (&ArrayD<f32>, &ArrayD<f32>),
    (y, dx): (&ArrayD<f32>, &ArrayD<f32>),
    block: usize,
    w: impl Fn(usize) -> f64,
    b: impl Fn(usize) -> f64,
) {
    let (y_ref, dx_ref) = reference(x.as_slice().unwrap(), dy.as_slice().unwrap(), block, w, b);
    let (ey, edx) = (max_rel_err(y, &y_ref), max_rel_err(dx, &dx_ref));
    assert!(ey < 1e-6 && edx < 1e-5, "{what}: y {ey:e}, dx {edx:e}");
}

#[test]
fn streamed_outputs_match_the_f64_reference() {
    let ko = KernelOptions {
        stream_bytes: 1,
        ..KernelOptions::default()
    };
    if !ko.streams(4, 1) {
        eprintln!(
            "skipped: streaming stores need AVX-512 (in the build and the CPU; this one has none)"
        );
        return;
    }
    let train = Ctx::train().with_kernels(ko);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        // LayerNorm: rows of 4551 values (per-row backward, partial last chunk) and of 72000 (column backward).
        for (shape, d) in [
            ([4usize, 3, 37, 41], 3 * 37 * 41),
            ([2, 3, 150, 160], 72000),
        ] {
            let x = randn(1, &shape).mapv(|v| 3.0 + 2.0 * v);
            let dy = randn(2, &shape);
            let wv = randn(3, &[d]).mapv(|v| 1.0 + 0.3 * v);
            let bv = randn(4, &[d]);
            let (y, dx) = pool.install(|| {
                let mut ln: LayerNorm<f32> = LayerNormConfig::new(&shape[1..]).build().unwrap();
                ln.weight_mut().unwrap().value =
                    wv.clone().into_shape_with_order(&shape[1..]).unwrap();
                ln.bias_mut().unwrap().value =
                    bv.clone().into_shape_with_order(&shape[1..]).unwrap();
                let y = ln.forward(&x, train).unwrap();
                (y, ln.backward(&x, &dy, train).unwrap())
            });
            let (ws, bs) = (wv.as_slice().unwrap(), bv.as_slice().unwrap());
            assert_matches(
                &format!("LayerNorm {shape:?} T={threads}"),
                (&x, &dy),
                (&y, &dx),
                d,
                |i| ws[i % d] as f64,
                |i| bs[i % d] as f64,
            );
        }
        // GroupNorm(4) without affine parameters: its blocks (sample, group) are contiguous.
        let shape = [3usize, 8, 30, 30];
        let x = randn(5, &shape).mapv(|v| 1.0 + v);
        let dy = randn(6, &shape);
        let (y, dx) = pool.install(|| {
            let mut gn: GroupNorm<f32> = GroupNormConfig::new(4, 8).affine(false).build().unwrap();
            let y = gn.forward(&x, train).unwrap();
            (y, gn.backward(&x, &dy, train).unwrap())
        });
        let what = format!("GroupNorm T={threads}");
        assert_matches(&what, (&x, &dy), (&y, &dx), 2 * 30 * 30, |_| 1.0, |_| 0.0);
        // BatchNorm2d with one image: its blocks are the channels' planes, contiguous as in GroupNorm(C).
        let one = x.slice(ndarray::s![0..1, .., .., ..]).to_owned().into_dyn();
        let dy1 = dy
            .slice(ndarray::s![0..1, .., .., ..])
            .to_owned()
            .into_dyn();
        let (y, dx) = pool.install(|| {
            let mut bn: BatchNorm<f32> = BatchNormConfig::new(8).affine(false).build().unwrap();
            let y = bn.forward(&one, train).unwrap();
            (y, bn.backward(&one, &dy1, train).unwrap())
        });
        let what = format!("BatchNorm2d T={threads}");
        assert_matches(&what, (&one, &dy1), (&y, &dx), 30 * 30, |_| 1.0, |_| 0.0);
    }
}
