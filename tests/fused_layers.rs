//! The training-time fused kernels that a model's plan applies across layers (`model::plan::fusions`):
//! - a BatchNorm(+ReLU) followed by a 2×2 max pool runs as one kernel (`BatchNorm::forward_fused` with
//!   `BnFusion::pool2x2`, and its backward). Its pooled output, dx, parameter gradients and running statistics
//!   must be bitwise those of the two layers run one after the other, including ties inside windows, NaN, odd
//!   sizes (floor mode) and any thread count;
//! - a convolution before a training BatchNorm reduces its output planes to (mean, M2) as it writes them
//!   (`Conv2d::forward_with_moments`), and the BatchNorm merges them instead of making its own statistics
//!   pass (`BnFusion::plane_moments`). The convolution's output is bitwise the same; the BatchNorm's statistics
//!   agree with its own to rounding, also on data whose mean dwarfs its spread.

use ndarray::{ArrayD, IxDyn};
use normvision::internals::moments::plane_moments;
use normvision::nn::{Conv2dConfig, ConvChoice, Epilogue, MaxPool2d, MaxPool2dConfig};
use normvision::norm::{BatchNorm, BatchNormConfig, BnFusion};
use normvision::{Ctx, Isa, Layer, Mode, NvError};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn bits(a: &ArrayD<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

fn grads(bn: &BatchNorm<f32>) -> (Vec<u32>, Vec<u32>) {
    let g = |p: Option<&normvision::Param<f32>>| {
        p.map(|p| p.grad.iter().map(|v| v.to_bits()).collect())
            .unwrap_or_default()
    };
    (g(bn.weight()), g(bn.bias()))
}

fn running(bn: &BatchNorm<f32>) -> Vec<u32> {
    let mut v: Vec<u32> = vec![];
    for a in [bn.running_mean(), bn.running_var()].into_iter().flatten() {
        v.extend(a.iter().map(|x| x.to_bits()));
    }
    v.push(bn.num_batches_tracked() as u32);
    v
}

/// One fused and one unfused training step on the same data; asserts every result is bitwise equal.
fn check(shape: [usize; 4], relu: bool, affine: bool, seed: u64, quantize: bool, nan: bool) {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let mut x = ArrayD::from_shape_simple_fn(IxDyn(&shape), || rng.gen_range(-2.0f32..3.0));
    if quantize {
        x.mapv_inplace(|v| v.round()); // many exact ties inside the pooling windows
    }
    let cfg = BatchNormConfig::d2(shape[1]).affine(affine);
    let mut fused: BatchNorm<f32> = cfg.clone().build().unwrap();
    if affine {
        let w = fused.weight_mut().unwrap();
        for (i, v) in w.value.iter_mut().enumerate() {
            *v = [1.3, -0.6, 0.0, 2.0][i % 4];
        }
        let b = fused.bias_mut().unwrap();
        for (i, v) in b.value.iter_mut().enumerate() {
            *v = 0.1 * i as f32 - 0.2;
        }
    }
    let mut plain = fused.clone();
    let mut pool: MaxPool2d<f32> = MaxPool2d::new(MaxPool2dConfig::new(2)).unwrap();

    let train = Ctx::train();
    if !fused.can_pool2x2(&shape, train) {
        eprintln!("skipped: the fused kernel is not available here (no AVX-512F)");
        return;
    }
    let f = BnFusion {
        relu,
        pool2x2: true,
        plane_moments: None,
    };
    let yf = fused.forward_fused(&x, train, f).unwrap();
    let plain_f = BnFusion {
        relu,
        ..Default::default()
    };
    let yb = plain.forward_fused(&x, train, plain_f).unwrap();
    let yp = pool.forward(&yb, train).unwrap();
    assert_eq!(yf.shape(), yp.shape());
    if nan {
        // A NaN input makes its channel's statistics NaN: every value of that channel is NaN either way.
        assert!(yf.iter().any(|v| v.is_nan()) || relu);
    }
    assert_eq!(bits(&yf), bits(&yp), "pooled output {shape:?}");
    assert_eq!(running(&fused), running(&plain), "running statistics");

    let dy = ArrayD::from_shape_simple_fn(IxDyn(yp.shape()), || rng.gen_range(-1.0f32..1.0));
    let dxf = fused.backward(&x, &dy, Ctx::train()).unwrap();
    let dpool = pool.backward(&yb, &dy, Ctx::train()).unwrap();
    let dxb = plain.backward(&x, &dpool, Ctx::train()).unwrap();
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
        let mut fused: BatchNorm<f32> = BatchNormConfig::d2(3).build().unwrap();
        let mut plain = fused.clone();
        let mut pool: MaxPool2d<f32> = MaxPool2d::new(MaxPool2dConfig::new(2)).unwrap();
        let train = Ctx::train();
        if !fused.can_pool2x2(&shape, train) {
            return;
        }
        let f = BnFusion {
            relu,
            ..Default::default()
        };
        let yf = fused
            .forward_fused(&x, train, BnFusion { pool2x2: true, ..f })
            .unwrap();
        let yp = pool
            .forward(&plain.forward_fused(&x, train, f).unwrap(), train)
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
    let pool = BnFusion {
        pool2x2: true,
        ..Default::default()
    };
    let x = ArrayD::zeros(IxDyn(&[2, 4, 4, 4]));
    assert!(matches!(
        bn.forward_fused(&x, Ctx::train(), pool),
        Err(NvError::Channels { .. }) | Err(NvError::Shape { .. })
    ));
    // 1×1 planes: no 2×2 window, so the fused kernel does not apply (a plan leaves the pool on its own) and a
    // request for it is an error
    assert!(!bn.can_pool2x2(&[1, 3, 1, 1], Ctx::train()));
    let one = ArrayD::zeros(IxDyn(&[1, 3, 1, 1]));
    assert!(matches!(
        bn.forward_fused(&one, Ctx::train(), pool),
        Err(NvError::Config(_))
    ));
    // a backward without a forward is a typed error, not garbage
    let x = ArrayD::zeros(IxDyn(&[2, 3, 4, 4]));
    let dy = ArrayD::zeros(IxDyn(&[2, 3, 2, 2]));
    assert!(matches!(
        bn.backward(&x, &dy, Ctx::train()),
        Err(NvError::NoSavedState { .. })
    ));
    // eval with running statistics is not fused (the inference plan fuses it into the convolution instead)
    assert!(!bn.can_pool2x2(x.shape(), Ctx::eval()));
    // a dy of the wrong shape is rejected
    if bn.can_pool2x2(x.shape(), Ctx::train()) {
        bn.forward_fused(&x, Ctx::train(), pool).unwrap();
        let bad = ArrayD::zeros(IxDyn(&[2, 3, 4, 4]));
        assert!(matches!(
            bn.backward(&x, &bad, Ctx::train()),
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
    x.as_slice()
        .unwrap()
        .chunks(s)
        .map(|p| plane_moments(normvision::Isa::Avx512, p))
        .collect()
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
        let algo = conv
            .algorithm(x.shape(), Mode::Train, ConvChoice::Winograd, Isa::detect())
            .unwrap();
        let plain = conv.forward_with(&x, algo, Epilogue::default()).unwrap();
        let avx512 = Isa::detect().avx512();
        if algo.emits_moments() {
            assert!(expect || !avx512);
            let (y, pm) = conv.forward_with_moments(&x, algo).unwrap();
            assert_eq!(
                bits(&y),
                bits(&plain),
                "output differs from the plain training forward"
            );
            assert_eq!(pm, planes(&y), "moments of the output planes");
        } else {
            assert!(!expect || !avx512);
            assert!(conv.forward_with_moments(&x, algo).is_err());
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
            let cfg = BatchNormConfig::d2(shape[1]);
            let mut own: BatchNorm<f32> = cfg.clone().build().unwrap();
            let mut merged: BatchNorm<f32> = cfg.build().unwrap();
            let f = BnFusion {
                relu,
                ..Default::default()
            };
            let want = own.forward_fused(&x, Ctx::train(), f).unwrap();
            assert!(merged.takes_plane_moments(&shape, Mode::Train));
            let pooled = pool && merged.can_pool2x2(&shape, Ctx::train());
            let pm = planes(&x);
            let f = BnFusion {
                relu,
                pool2x2: pooled,
                plane_moments: Some(&pm),
            };
            let got = merged.forward_fused(&x, Ctx::train(), f).unwrap();
            let want = if pooled {
                MaxPool2d::new(MaxPool2dConfig::new(2))
                    .unwrap()
                    .forward(&want, Ctx::train())
                    .unwrap()
            } else {
                assert!(!pool || !Isa::detect().avx512());
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
                (merged.running_mean(), own.running_mean()),
                (merged.running_var(), own.running_var()),
            ] {
                for (a, b) in ra.unwrap().iter().zip(rb.unwrap().iter()) {
                    assert!(
                        (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                        "running {a} vs {b}"
                    );
                }
            }
            assert_eq!(merged.num_batches_tracked(), 1);
            // the backward through the saved statistics works as after a plain forward
            let dy =
                ArrayD::from_shape_simple_fn(IxDyn(got.shape()), || rng.gen_range(-1.0f32..1.0));
            let dx = merged.backward(&x, &dy, Ctx::train()).unwrap();
            assert_eq!(dx.shape(), x.shape());
            assert!(dx.iter().all(|v| v.is_finite()));
        }
    }
    // eval with running statistics and planes of one value do not take plane moments (a plan does not fuse
    // them; a request is an error)
    let mut bn: BatchNorm<f32> = BatchNormConfig::d2(2).build().unwrap();
    let x = ArrayD::zeros(IxDyn(&[2, 2, 3, 3]));
    assert!(!bn.takes_plane_moments(x.shape(), Mode::Eval));
    let pm = planes(&x);
    let f = BnFusion {
        plane_moments: Some(&pm),
        ..Default::default()
    };
    assert!(matches!(
        bn.forward_fused(&x, Ctx::eval(), f),
        Err(NvError::Config(_))
    ));
    let one = ArrayD::zeros(IxDyn(&[1, 2, 1, 1]));
    assert!(!bn.takes_plane_moments(one.shape(), Mode::Train));
    let pm = planes(&one);
    let f = BnFusion {
        plane_moments: Some(&pm),
        ..Default::default()
    };
    assert!(matches!(
        bn.forward_fused(&one, Ctx::train(), f),
        Err(NvError::Config(_))
    ));
}
