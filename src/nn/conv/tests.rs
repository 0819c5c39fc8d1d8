use super::*;
use ndarray::IxDyn;

/// Direct (seven nested loops) convolution for cross-checking im2col.
fn direct(
    cfg: &Conv2dConfig,
    x: &ArrayD<f64>,
    w: &ArrayD<f64>,
    b: Option<&ArrayD<f64>>,
) -> ArrayD<f64> {
    let s = x.shape();
    let (n, c, h, wd) = (s[0], s[1], s[2], s[3]);
    let (kh, kw) = cfg.kernel_size;
    let o = cfg.out_channels;
    let (cg, og) = (c / cfg.groups, o / cfg.groups);
    let oh = (h + 2 * cfg.padding.0 - cfg.dilation.0 * (kh - 1) - 1) / cfg.stride.0 + 1;
    let ow = (wd + 2 * cfg.padding.1 - cfg.dilation.1 * (kw - 1) - 1) / cfg.stride.1 + 1;
    let mut y = ArrayD::zeros(IxDyn(&[n, o, oh, ow]));
    for ni in 0..n {
        for oc in 0..o {
            let gi = oc / og;
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[[oc]]);
                    for ci in 0..cg {
                        for ki in 0..kh {
                            for kj in 0..kw {
                                let ih = (i * cfg.stride.0 + ki * cfg.dilation.0) as isize
                                    - cfg.padding.0 as isize;
                                let iw = (j * cfg.stride.1 + kj * cfg.dilation.1) as isize
                                    - cfg.padding.1 as isize;
                                if ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < wd {
                                    acc += w[[oc, ci, ki, kj]]
                                        * x[[ni, gi * cg + ci, ih as usize, iw as usize]];
                                }
                            }
                        }
                    }
                    y[[ni, oc, i, j]] = acc;
                }
            }
        }
    }
    y
}

#[test]
fn matches_direct_convolution() {
    use rand::SeedableRng;
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
    let cfgs = [
        Conv2dConfig::new(3, 4, 3),
        Conv2dConfig::new(4, 6, (3, 2))
            .stride((2, 1))
            .padding((1, 2)),
        Conv2dConfig::new(4, 6, 3).dilation(2).padding(2).groups(2),
        Conv2dConfig::new(4, 4, 1).bias(false),
        Conv2dConfig::new(4, 2, 1).stride(2),
        Conv2dConfig::new(2, 3, 5).stride(3).padding(1),
        // stride 2 along the rows (im2col's pairwise copy, col2im's pairwise add): a tap whose last pair
        // would end past the row, odd and even widths, dilation
        Conv2dConfig::new(3, 4, 3).stride(2).padding(1),
        Conv2dConfig::new(3, 4, 3)
            .stride((1, 2))
            .padding((2, 0))
            .dilation(2),
        Conv2dConfig::new(2, 3, 3).stride(2).padding(2).bias(false),
    ];
    for (cfg, w) in cfgs.iter().flat_map(|c| [(c.clone(), 9), (c.clone(), 8)]) {
        for algo in [ConvAlgo::Gemm, ConvAlgo::GemmThreads] {
            let mut conv = cfg.clone().build::<f64>(&mut rng).unwrap();
            let mut x = ArrayD::zeros(IxDyn(&[3, cfg.in_channels, 7, w]));
            crate::nn::init::normal(&mut x, 0.0, 1.0, &mut rng);
            let y = conv.forward_with(&x, algo, Epilogue::default()).unwrap();
            let want = direct(
                &cfg,
                &x,
                &conv.weight.value,
                conv.bias.as_ref().map(|b| &b.value),
            );
            assert_eq!(y.shape(), want.shape(), "{cfg:?}");
            for (a, b) in y.iter().zip(want.iter()) {
                assert!((a - b).abs() < 1e-12, "{cfg:?}: {a} vs {b}");
            }
            // dx is the reference's adjoint: <conv(x) − bias, g> = <x, dx(g)> (col2im against the seven loops)
            let mut g = ArrayD::zeros(want.raw_dim());
            crate::nn::init::normal(&mut g, 0.0, 1.0, &mut rng);
            let dx = conv.backward(&x, &g, Ctx::train()).unwrap();
            let lin = direct(&cfg, &x, &conv.weight.value, None);
            let lhs: f64 = lin.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(dx.iter()).map(|(a, b)| a * b).sum();
            assert!(
                (lhs - rhs).abs() <= 1e-10 * lhs.abs().max(1.0),
                "{cfg:?} W={w}: <y, g> = {lhs}, <x, dx> = {rhs}"
            );
        }
    }
}

/// The f32 AVX-512 paths (implicit im2col for stride-1 "same" convolutions, with weight gradients summed
/// over groups of samples; explicit im2col otherwise) against the generic f64 path: y, dx, dw and db, for
/// batch sizes that leave partial sample groups, on 1 and 2 threads.
#[test]
fn simd_backward_matches_the_f64_path() {
    use rand::SeedableRng;
    if !simd::available() {
        return;
    }
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(11);
    let cfgs = [
        Conv2dConfig::new(16, 8, 3).padding(1),
        Conv2dConfig::new(16, 16, 3)
            .padding(1)
            .groups(2)
            .bias(false),
        Conv2dConfig::new(1, 8, 3).padding(1),
        Conv2dConfig::new(8, 8, 3).stride(2).padding(1),
    ];
    for cfg in cfgs {
        for n in [1usize, 3, 5, 9] {
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c64 = cfg.clone().build::<f64>(&mut rng).unwrap();
                let mut c32 = cfg.clone().build::<f32>(&mut rng).unwrap();
                c32.weight.value = c64.weight.value.mapv(|v| v as f32);
                if let (Some(b32), Some(b64)) = (c32.bias.as_mut(), c64.bias.as_ref()) {
                    b32.value = b64.value.mapv(|v| v as f32);
                }
                let mut x = ArrayD::zeros(IxDyn(&[n, cfg.in_channels, 10, 12]));
                crate::nn::init::normal(&mut x, 0.0, 1.0, &mut rng);
                let x32 = x.mapv(|v: f64| v as f32);
                let x = x32.mapv(|v| v as f64);
                let y64 = c64.forward(&x, Ctx::train()).unwrap();
                let mut dy = ArrayD::zeros(y64.raw_dim());
                crate::nn::init::normal(&mut dy, 0.0, 1.0, &mut rng);
                let dy32 = dy.mapv(|v: f64| v as f32);
                let dy = dy32.mapv(|v| v as f64);
                let dx64 = c64.backward(&x, &dy, Ctx::train()).unwrap();
                let (y32, dx32) = pool.install(|| {
                    let y = c32.forward(&x32, Ctx::train()).unwrap();
                    (y, c32.backward(&x32, &dy32, Ctx::train()).unwrap())
                });
                let close = |what: &str, a: &ArrayD<f32>, b: &ArrayD<f64>| {
                    let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                    for (p, q) in a.iter().zip(b.iter()) {
                        assert!(
                            (*p as f64 - q).abs() <= 1e-5 * scale,
                            "{cfg:?} n={n} T={threads} {what}: {p} vs {q}"
                        );
                    }
                };
                close("y", &y32, &y64);
                close("dx", &dx32, &dx64);
                close("dw", &c32.weight.grad, &c64.weight.grad);
                if let (Some(b32), Some(b64)) = (c32.bias.as_ref(), c64.bias.as_ref()) {
                    close("db", &b32.grad, &b64.grad);
                }
            }
        }
    }
}

/// The kept Winograd transforms are not compared with the weights while the layer vouches for them, so every
/// way of changing the weights must make the next forward use the new ones: `weight_mut`, `visit_params` (the
/// optimizers), `load_state`, `fold_affine` and `reset_parameters`. Each change is checked against a fresh layer
/// with the same weights, bitwise, on the planar and the channel-last forward.
#[test]
fn kept_transforms_follow_every_change_of_the_weights() {
    use rand::SeedableRng;
    if !winograd::channel_last::supports(16, 16) {
        return;
    }
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(17);
    let cfg = Conv2dConfig::new(16, 16, 3).padding(1);
    let mut x = ArrayD::zeros(IxDyn(&[1, 16, 6, 6]));
    crate::nn::init::normal(&mut x, 0.0, 1.0, &mut rng);
    let x: ArrayD<f32> = x.mapv(|v: f64| v as f32);
    let cl = winograd::channel_last::Layouts::default();
    let run = |conv: &mut Conv2d<f32>| {
        let a = conv
            .forward_with(&x, ConvAlgo::Winograd2, Epilogue::default())
            .unwrap();
        let b = conv
            .forward_channel_last(&x, ConvAlgo::Winograd2, Epilogue::default(), cl)
            .unwrap();
        (a, b)
    };
    let fresh = |conv: &Conv2d<f32>| {
        let mut sd = crate::state::StateDict::new();
        conv.save_state("", &mut sd);
        let mut other = cfg
            .clone()
            .build::<f32>(&mut rand_pcg::Pcg64Mcg::seed_from_u64(1))
            .unwrap();
        other.load_state("", &sd).unwrap();
        other
    };
    let mut conv = cfg.clone().build::<f32>(&mut rng).unwrap();
    type Change = Box<dyn Fn(&mut Conv2d<f32>)>;
    let changes: Vec<(&str, Change)> = vec![
        (
            "weight_mut",
            Box::new(|c| c.weight_mut().value.mapv_inplace(|v| v * 2.0)),
        ),
        (
            "visit_params",
            Box::new(|c| c.visit_params("", &mut |_, p| p.value.mapv_inplace(|v| v - 0.25))),
        ),
        (
            "load_state",
            Box::new(|c| {
                let mut sd = crate::state::StateDict::new();
                c.save_state("", &mut sd);
                let other = Conv2dConfig::new(16, 16, 3)
                    .padding(1)
                    .build::<f32>(&mut rand_pcg::Pcg64Mcg::seed_from_u64(2))
                    .unwrap();
                other.save_state("", &mut sd);
                c.load_state("", &sd).unwrap();
            }),
        ),
        (
            "fold_affine",
            Box::new(|c| c.fold_affine(&[1.5; 16], &[0.5; 16]).unwrap()),
        ),
        (
            "reset_parameters",
            Box::new(|c| {
                c.reset_parameters(
                    crate::nn::Init::Default,
                    1.0,
                    &mut rand_pcg::Pcg64Mcg::seed_from_u64(3),
                )
                .unwrap()
            }),
        ),
    ];
    let mut before = run(&mut conv);
    for (what, change) in changes {
        change(&mut conv);
        let got = run(&mut conv);
        let want = run(&mut fresh(&conv));
        assert_ne!(got.0, before.0, "{what} changed nothing");
        assert_eq!(
            got.0, want.0,
            "{what}: the planar forward used stale transforms"
        );
        assert_eq!(
            got.1, want.1,
            "{what}: the channel-last forward used stale transforms"
        );
        before = got;
    }
}
