//! Training-time fusions across layers, which `Sequential` applies on its own:
//! - a BatchNorm(+ReLU) followed by a 2×2 max pool runs as one kernel (`BatchNorm::forward_maxpool` /
//!   `backward_maxpool`). Its pooled output, dx, parameter gradients and running statistics must be bitwise
//!   those of the two layers run one after the other, including ties inside windows, NaN, odd sizes (floor
//!   mode) and any thread count;
//! - a convolution before a training BatchNorm reduces its output planes to (mean, M2) as it writes them
//!   (`Conv2d::forward_with_plane_moments`), and the BatchNorm merges them instead of making its own statistics
//!   pass (`BatchNorm::forward_from_plane_moments`). The convolution's output is bitwise the same; the
//!   BatchNorm's statistics agree with its own to rounding, also on data whose mean dwarfs its spread.

use ndarray::{ArrayD, IxDyn};
use normvision::kernels::moments::plane_moments;
use normvision::nn::{Conv2dConfig, MaxPool2d, MaxPool2dConfig};
use normvision::norm::{BatchNorm, BatchNormConfig};
use normvision::{Mode, NvError};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn bits(a: &ArrayD<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

fn grads(bn: &BatchNorm<f32>) -> (Vec<u32>, Vec<u32>) {
    let g = |p: &Option<normvision::Param<f32>>| {
        p.as_ref()
            .map(|p| p.grad.iter().map(|v| v.to_bits()).collect())
            .unwrap_or_default()
    };
    (g(&bn.weight), g(&bn.bias))
}

fn running(bn: &BatchNorm<f32>) -> Vec<u32> {
    let mut v: Vec<u32> = vec![];
    for a in [&bn.running_mean, &bn.running_var].into_iter().flatten() {
        v.extend(a.iter().map(|x| x.to_bits()));
    }
    v.push(bn.num_batches_tracked as u32);
    v
}

/// One fused and one unfused training step on the same data; asserts every result is bitwise equal.
fn check(shape: [usize; 4], relu: bool, affine: bool, seed: u64, quantize: bool, nan: bool) {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let mut x = ArrayD::from_shape_simple_fn(IxDyn(&shape), || rng.gen_range(-2.0f32..3.0));
    if quantize {
        x.mapv_inplace(|v| v.round()); // many exact ties inside the pooling windows
    }
    let cfg = BatchNormConfig::d2(shape[1]).fuse_relu(relu).affine(affine);
    let mut fused: BatchNorm<f32> = cfg.clone().build().unwrap();
    if affine {
        let w = fused.weight.as_mut().unwrap();
        for (i, v) in w.value.iter_mut().enumerate() {
            *v = [1.3, -0.6, 0.0, 2.0][i % 4];
        }
        let b = fused.bias.as_mut().unwrap();
        for (i, v) in b.value.iter_mut().enumerate() {
            *v = 0.1 * i as f32 - 0.2;
        }
    }
    let mut plain = fused.clone();
    let mut pool: MaxPool2d<f32> = MaxPool2d::new(MaxPool2dConfig::new(2)).unwrap();

    let Some(yf) = fused.forward_maxpool(&x, Mode::Train).unwrap() else {
        eprintln!("skipped: the fused kernel is not available here (no AVX-512F)");
        return;
    };
    let yb = plain.forward(&x, Mode::Train).unwrap();
    let yp = pool.forward(&yb).unwrap();
    assert_eq!(yf.shape(), yp.shape());
    if nan {
        // A NaN input makes its channel's statistics NaN: every value of that channel is NaN either way.
        assert!(yf.iter().any(|v| v.is_nan()) || relu);
    }
    assert_eq!(bits(&yf), bits(&yp), "pooled output {shape:?}");
    assert_eq!(running(&fused), running(&plain), "running statistics");

    let dy = ArrayD::from_shape_simple_fn(IxDyn(yp.shape()), || rng.gen_range(-1.0f32..1.0));
    let dxf = fused.backward_maxpool(&x, &dy, Mode::Train).unwrap();
    let dpool = pool.backward(&yb, &dy).unwrap();
    let dxb = plain.backward(&x, &dpool, Mode::Train).unwrap();
    assert_eq!(bits(&dxf), bits(&dxb), "dx {shape:?}");
    assert_eq!(grads(&fused), grads(&plain), "parameter gradients");
}

#[test]
fn fused_batch_norm_max_pool_is_bitwise_the_two_layers() {
    for threads in [1, 2, 3] {
        let tp = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        tp.install(|| {
            // the reference CNN's shapes, odd planes (floor mode drops the last row/column), wide rows
            check([8, 32, 28, 28], true, true, 1, false, false);
            check([4, 64, 14, 14], true, true, 2, false, false);
            check([3, 5, 7, 9], true, true, 3, false, false);
            check([2, 3, 2, 40], false, true, 4, false, false);
            check([5, 4, 6, 6], true, false, 5, true, false);
            check([5, 4, 6, 6], false, true, 6, true, false);
        });
    }
}

#[test]
fn nan_input_propagates_as_in_the_two_layers() {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
    let shape = [2, 3, 4, 4];
    let mut x = ArrayD::from_shape_simple_fn(IxDyn(&shape), || rng.gen_range(-1.0f32..1.0));
    x[[1, 1, 2, 3]] = f32::NAN;
    for relu in [false, true] {
        let mut fused: BatchNorm<f32> = BatchNormConfig::d2(3).fuse_relu(relu).build().unwrap();
        let mut plain = fused.clone();
        let mut pool: MaxPool2d<f32> = MaxPool2d::new(MaxPool2dConfig::new(2)).unwrap();
        let Some(yf) = fused.forward_maxpool(&x, Mode::Train).unwrap() else {
            return;
        };
        let yp = pool
            .forward(&plain.forward(&x, Mode::Train).unwrap())
            .unwrap();
        assert_eq!(bits(&yf), bits(&yp), "relu {relu}");
        if !relu {
            assert!(
                yf.iter().any(|v| v.is_nan()),
                "NaN propagates through the pool"
            );
        }
    }
}

#[test]
fn fused_path_keeps_the_batch_norm_errors() {
    let mut bn: BatchNorm<f32> = BatchNormConfig::d2(3).build().unwrap();
    let one = ArrayD::zeros(IxDyn(&[1, 3, 1, 1]));
    let x = ArrayD::zeros(IxDyn(&[2, 4, 4, 4]));
    assert!(matches!(
        bn.forward_maxpool(&x, Mode::Train),
        Err(NvError::Channels { .. }) | Err(NvError::Shape { .. })
    ));
    // 1×1 planes: no 2×2 window, so the fused kernel declines and the plain path reports the error
    assert!(bn.forward_maxpool(&one, Mode::Train).unwrap().is_none());
    // a backward without a fused forward is a typed error, not garbage
    let x = ArrayD::zeros(IxDyn(&[2, 3, 4, 4]));
    let dy = ArrayD::zeros(IxDyn(&[2, 3, 2, 2]));
    assert!(matches!(
        bn.backward_maxpool(&x, &dy, Mode::Train),
        Err(NvError::NoSavedState { .. })
    ));
    // eval with running statistics is not fused (the inference path fuses it into the convolution instead)
    assert!(bn.forward_maxpool(&x, Mode::Eval).unwrap().is_none());
    // a dy of the wrong shape is rejected
    if bn.forward_maxpool(&x, Mode::Train).unwrap().is_some() {
        let bad = ArrayD::zeros(IxDyn(&[2, 3, 4, 4]));
        assert!(matches!(
            bn.backward_maxpool(&x, &bad, Mode::Train),
            Err(NvError::Shape { .. })
        ));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn fused_equals_unfused_on_random_shapes(
        n in 1usize..5,
        c in 1usize..6,
        h in 2usize..19,
        w in 2usize..37,
        relu in any::<bool>(),
        affine in any::<bool>(),
        quantize in any::<bool>(),
        seed in 0u64..1000,
    ) {
        prop_assume!(n * h * w > 1);
        check([n, c, h, w], relu, affine, seed, quantize, false);
    }
}

/// Per-plane (mean, M2) of an (N, C, H, W) array, as a convolution hands them over.
fn planes(x: &ArrayD<f32>) -> Vec<(f64, f64)> {
    let s = x.shape()[2] * x.shape()[3];
    x.as_slice().unwrap().chunks(s).map(plane_moments).collect()
}

#[test]
fn convolution_moments_are_those_of_its_output_planes() {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(11);
    // the Winograd path (8+ input channels; F(4×4) on a 24-wide plane), the single-channel path, and a shape
    // with neither (declined)
    for (cin, cout, h, w, expect) in [
        (16, 8, 10, 12, true),
        (8, 8, 9, 24, true),
        (1, 32, 28, 28, true),
        (3, 4, 6, 6, false),
    ] {
        let mut conv = Conv2dConfig::new(cin, cout, 3)
            .padding(1)
            .bias(false)
            .build::<f32>(&mut rng)
            .unwrap();
        let x =
            ArrayD::from_shape_simple_fn(IxDyn(&[3, cin, h, w]), || rng.gen_range(-1.0f32..1.0));
        let plain = conv.forward_train(&x).unwrap();
        match conv.forward_with_plane_moments(&x).unwrap() {
            Some((y, pm)) => {
                assert!(expect || !normvision::nn::winograd::available());
                assert_eq!(
                    bits(&y),
                    bits(&plain),
                    "output differs from the plain training forward"
                );
                assert_eq!(pm, planes(&y), "moments of the output planes");
            }
            None => assert!(!expect || !normvision::nn::winograd::available()),
        }
    }
}

#[test]
fn batch_norm_from_plane_moments_matches_its_own_statistics() {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(12);
    // ordinary data, and data with mean 1e4 and standard deviation 0.1 (E[x²] - E[x]² would lose it all)
    for (shape, offset, scale) in [([6, 5, 7, 9], 0.0f32, 1.0f32), ([4, 3, 8, 8], 1e4, 0.1)] {
        let x = ArrayD::from_shape_simple_fn(IxDyn(&shape), || {
            offset + scale * rng.gen_range(-1.7f32..1.7)
        });
        for (relu, pool) in [(false, false), (true, false), (true, true)] {
            let cfg = BatchNormConfig::d2(shape[1]).fuse_relu(relu);
            let mut own: BatchNorm<f32> = cfg.clone().build().unwrap();
            let mut merged: BatchNorm<f32> = cfg.build().unwrap();
            let want = own.forward(&x, Mode::Train).unwrap();
            let Some((got, pooled)) = merged
                .forward_from_plane_moments(&x, &planes(&x), Mode::Train, pool)
                .unwrap()
            else {
                panic!("a training BatchNorm takes plane moments");
            };
            let want = if pooled {
                MaxPool2d::new(MaxPool2dConfig::new(2))
                    .unwrap()
                    .forward(&want)
                    .unwrap()
            } else {
                assert!(!pool || !normvision::nn::winograd::available());
                want
            };
            assert_eq!(got.shape(), want.shape());
            for (a, b) in got.iter().zip(want.iter()) {
                assert!(
                    (a - b).abs() <= 2e-5 * (1.0 + b.abs()),
                    "{a} vs {b} ({shape:?})"
                );
            }
            for (ra, rb) in [
                (&merged.running_mean, &own.running_mean),
                (&merged.running_var, &own.running_var),
            ] {
                for (a, b) in ra.as_ref().unwrap().iter().zip(rb.as_ref().unwrap().iter()) {
                    assert!(
                        (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                        "running {a} vs {b}"
                    );
                }
            }
            assert_eq!(merged.num_batches_tracked, 1);
            // the backward through the saved statistics works as after a plain forward
            let dy =
                ArrayD::from_shape_simple_fn(IxDyn(got.shape()), || rng.gen_range(-1.0f32..1.0));
            let dx = if pooled {
                merged.backward_maxpool(&x, &dy, Mode::Train).unwrap()
            } else {
                merged.backward(&x, &dy, Mode::Train).unwrap()
            };
            assert_eq!(dx.shape(), x.shape());
            assert!(dx.iter().all(|v| v.is_finite()));
        }
    }
    // eval with running statistics declines; one value per channel is the usual error
    let mut bn: BatchNorm<f32> = BatchNormConfig::d2(2).build().unwrap();
    let x = ArrayD::zeros(IxDyn(&[2, 2, 3, 3]));
    assert!(!bn.takes_plane_moments(Mode::Eval));
    assert!(bn
        .forward_from_plane_moments(&x, &planes(&x), Mode::Eval, false)
        .unwrap()
        .is_none());
    let one = ArrayD::zeros(IxDyn(&[1, 2, 1, 1]));
    assert!(bn
        .forward_from_plane_moments(&one, &planes(&one), Mode::Train, false)
        .unwrap()
        .is_none());
}
