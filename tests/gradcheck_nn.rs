//! Gradient checks of every `nn` layer (conv, linear, pooling, activations, dropout, loss): the hand-written
//! backward against f64 central finite differences of L = Σ y·r (r fixed random, so dL/dy = r), for dx and every
//! parameter gradient. Also: gradients accumulate, the thread split of Conv2d does not change results, and the
//! typed errors for bad input.
//!
//! Error measure: max_i |fd_i − analytic_i| / max(1, max_i |analytic_i|) per gradient tensor, below [`TOL`]
//! (h = 1e-6: truncation O(h²), round-off ≈ |L|·1e-16/h ≈ 1e-9).

#![allow(clippy::needless_range_loop)]

use crate::common;
use common::ConvWith;
use ndarray::{ArrayD, IxDyn};
use normvision::nn::*;
use normvision::state::Stateful;
use normvision::{Ctx, Isa, KernelOptions, Layer, NvError};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;

const H: f64 = 1e-6;
const TOL: f64 = 1e-6;

fn rng(seed: u64) -> Pcg64 {
    Pcg64::seed_from_u64(seed)
}

fn randn(rng: &mut Pcg64, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.sample::<f64, _>(StandardNormal))
}

/// Standard normal values at least `margin` away from 0 (for kinks at 0).
fn randn_away(rng: &mut Pcg64, shape: &[usize], margin: f64) -> ArrayD<f64> {
    randn(rng, shape).mapv(|v| {
        if v.abs() < margin {
            v.signum() * margin + v
        } else {
            v
        }
    })
}

fn loss<L: Layer<f64>>(l: &mut L, x: &ArrayD<f64>, r: &ArrayD<f64>, mode: Ctx) -> f64 {
    let y = l.forward(x, mode).expect("forward");
    assert_eq!(y.shape(), r.shape());
    y.iter().zip(r.iter()).map(|(a, b)| a * b).sum()
}

fn rel_err(fd: &[f64], an: &[f64]) -> f64 {
    assert_eq!(fd.len(), an.len());
    let scale = an.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    fd.iter()
        .zip(an)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

fn params<L: Layer<f64>>(l: &mut L) -> Vec<(String, Vec<f64>, Vec<f64>)> {
    let mut v = vec![];
    l.visit_params("", &mut |n, p| {
        v.push((
            n.to_string(),
            p.value.iter().copied().collect(),
            p.grad.iter().copied().collect(),
        ))
    });
    v
}

/// Checks dx and every parameter gradient of `base` at `x`; the layer must expose exactly `expect_params`.
/// Every loss evaluation runs on a fresh clone (so dropout replays the same mask). Returns the worst error.
fn gradcheck<L: Layer<f64> + Clone>(
    what: &str,
    base: &L,
    x: &ArrayD<f64>,
    mode: Ctx,
    expect_params: &[&str],
    seed: u64,
) -> f64 {
    let mut rg = rng(seed);
    let y = base.clone().forward(x, mode).expect("forward");
    let r = randn(&mut rg, y.shape());

    let mut l = base.clone();
    l.zero_grad();
    l.forward(x, mode).unwrap();
    let dx = l.backward(x, &r, mode).expect("backward");
    assert_eq!(dx.shape(), x.shape(), "{what}: dx shape");
    let an = params(&mut l);
    let names: Vec<&str> = an.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, expect_params, "{what}: parameter names");

    // gradients accumulate: a second backward doubles them
    l.forward(x, mode).unwrap();
    l.backward(x, &r, mode).unwrap();
    for ((n, _, g1), (_, _, g2)) in an.iter().zip(params(&mut l)) {
        for (a, b) in g1.iter().zip(&g2) {
            assert!(
                (2.0 * a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                "{what}: {n} does not accumulate"
            );
        }
    }

    let mut worst = 0.0f64;
    let mut fd = vec![0.0; x.len()];
    for i in 0..x.len() {
        let mut xp = x.clone();
        xp.as_slice_mut().unwrap()[i] += H;
        let mut xm = x.clone();
        xm.as_slice_mut().unwrap()[i] -= H;
        fd[i] = (loss(&mut base.clone(), &xp, &r, mode) - loss(&mut base.clone(), &xm, &r, mode))
            / (2.0 * H);
    }
    let e = rel_err(&fd, dx.as_slice().unwrap());
    assert!(e < TOL, "{what}: dx error {e:e}");
    worst = worst.max(e);

    for (name, vals, grad) in &an {
        let mut fd = vec![0.0; vals.len()];
        for (i, f) in fd.iter_mut().enumerate() {
            let eval = |delta: f64| {
                let mut l = base.clone();
                l.visit_params("", &mut |n, p| {
                    if n == name {
                        p.value.as_slice_mut().unwrap()[i] += delta;
                    }
                });
                loss(&mut l, x, &r, mode)
            };
            *f = (eval(H) - eval(-H)) / (2.0 * H);
        }
        let e = rel_err(&fd, grad);
        assert!(e < TOL, "{what}: d{name} error {e:e}");
        worst = worst.max(e);
    }
    eprintln!("{what}: worst error {worst:.2e}");
    worst
}

fn conv(cfg: Conv2dConfig, seed: u64) -> Conv2d<f64> {
    let mut c = cfg.build::<f64>(&mut rng(seed)).unwrap();
    // make the bias matter as much as the weights
    if let Some(b) = c.bias_mut() {
        b.value.mapv_inplace(|v| v * 5.0);
    }
    c
}

#[test]
fn conv2d_gradients() {
    let cases: Vec<(&str, Conv2dConfig, [usize; 4])> = vec![
        (
            "3x3 pad1",
            Conv2dConfig::new(3, 4, 3).padding(1),
            [2, 3, 5, 6],
        ),
        ("3x3 no pad", Conv2dConfig::new(2, 3, 3), [2, 2, 5, 4]),
        (
            "stride2 pad1 kernel 3x2",
            Conv2dConfig::new(3, 4, (3, 2)).stride(2).padding(1),
            [2, 3, 7, 6],
        ),
        (
            "dilation2 pad2",
            Conv2dConfig::new(2, 3, 3).dilation(2).padding(2),
            [2, 2, 7, 8],
        ),
        (
            "groups2",
            Conv2dConfig::new(4, 6, 3).padding(1).groups(2),
            [2, 4, 5, 5],
        ),
        (
            "depthwise",
            Conv2dConfig::new(3, 3, 3).padding(1).groups(3),
            [2, 3, 4, 5],
        ),
        (
            "no bias",
            Conv2dConfig::new(3, 2, 3).padding(1).bias(false),
            [2, 3, 4, 4],
        ),
        ("1x1 pointwise", Conv2dConfig::new(4, 3, 1), [2, 4, 3, 5]),
        (
            "1x1 pointwise groups2 no bias",
            Conv2dConfig::new(4, 6, 1).groups(2).bias(false),
            [2, 4, 3, 3],
        ),
        (
            "1x1 stride2",
            Conv2dConfig::new(3, 2, 1).stride(2),
            [2, 3, 5, 6],
        ),
        (
            "1x1 pad1",
            Conv2dConfig::new(2, 2, 1).padding(1),
            [1, 2, 3, 4],
        ),
        (
            "non-square everything",
            Conv2dConfig::new(2, 4, (2, 3))
                .stride((2, 1))
                .padding((0, 2))
                .dilation((1, 2))
                .groups(2),
            [3, 2, 6, 5],
        ),
        (
            "kernel = input",
            Conv2dConfig::new(2, 3, (4, 5)),
            [2, 2, 4, 5],
        ),
        (
            "batch 5",
            Conv2dConfig::new(2, 3, 3).stride(2).padding(1),
            [5, 2, 5, 5],
        ),
        (
            "padded input smaller than kernel",
            Conv2dConfig::new(2, 3, 3).padding(1),
            [2, 2, 1, 2],
        ),
        (
            "k5 pad2 on 2x3",
            Conv2dConfig::new(2, 2, 5).padding(2),
            [1, 2, 2, 3],
        ),
        (
            "1x1 input pad1",
            Conv2dConfig::new(1, 2, 3).padding(1),
            [2, 1, 1, 1],
        ),
    ];
    for (i, (what, cfg, shape)) in cases.into_iter().enumerate() {
        let mut bias_names = vec!["weight"];
        if cfg.bias {
            bias_names.push("bias");
        }
        for algo in [ConvAlgo::Gemm, ConvAlgo::GemmThreads] {
            let c = ConvWith(conv(cfg.clone(), 100 + i as u64), algo);
            let x = randn(&mut rng(200 + i as u64), &shape);
            gradcheck(
                &format!("conv {what} {algo:?}"),
                &c,
                &x,
                Ctx::train(),
                &bias_names,
                300 + i as u64,
            );
        }
    }
}

/// The batch split must not depend on the number of threads: 1, 2 and 3 rayon threads, both strategies,
/// batch sizes that do not divide evenly.
#[test]
fn conv2d_thread_split_is_exact() {
    let cfg = Conv2dConfig::new(3, 4, 3).padding(1).stride((1, 2));
    for n in [1, 4, 5, 7] {
        let x = randn(&mut rng(n as u64), &[n, 3, 6, 7]);
        let base = conv(cfg.clone(), 9);
        let dy = randn(
            &mut rng(50 + n as u64),
            &base.output_shape(x.shape()).unwrap(),
        );
        let mut results = vec![];
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for algo in [ConvAlgo::Gemm, ConvAlgo::GemmThreads] {
                let mut c = ConvWith(base.clone(), algo);
                let (y, dx) = pool.install(|| {
                    let y = c.forward(&x, Ctx::train()).unwrap();
                    (y, c.backward(&x, &dy, Ctx::train()).unwrap())
                });
                results.push((
                    y,
                    dx,
                    c.0.weight().grad.clone(),
                    c.0.bias().unwrap().grad.clone(),
                ));
            }
        }
        let (y0, dx0, dw0, db0) = &results[0];
        for (y, dx, dw, db) in &results[1..] {
            for (a, b) in [(y, y0), (dx, dx0), (dw, dw0), (db, db0)] {
                let e = a
                    .iter()
                    .zip(b.iter())
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f64::max);
                assert!(e < 1e-12, "batch {n}: results differ by {e}");
            }
        }
        // backward_params gives the same parameter gradients without dx
        let mut c = base.clone();
        c.backward_params(&x, &dy, Ctx::train()).unwrap();
        let e = c
            .weight()
            .grad
            .iter()
            .zip(dw0.iter())
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(e < 1e-12);
    }
}

#[test]
fn linear_gradients() {
    let mut r = rng(1);
    let l = LinearConfig::new(5, 3).build::<f64>(&mut r).unwrap();
    gradcheck(
        "linear",
        &l,
        &randn(&mut r, &[4, 5]),
        Ctx::train(),
        &["weight", "bias"],
        2,
    );
    gradcheck(
        "linear rank 3",
        &l,
        &randn(&mut r, &[2, 3, 5]),
        Ctx::train(),
        &["weight", "bias"],
        3,
    );
    let l = LinearConfig::new(6, 4)
        .bias(false)
        .build::<f64>(&mut r)
        .unwrap();
    gradcheck(
        "linear no bias",
        &l,
        &randn(&mut r, &[3, 6]),
        Ctx::eval(),
        &["weight"],
        4,
    );
    // large enough for the multi-threaded GEMM path
    let l = LinearConfig::new(64, 40).build::<f64>(&mut r).unwrap();
    let x = randn(&mut r, &[128, 64]);
    let mut a = l.clone();
    let y = a.forward(&x, Ctx::train()).unwrap();
    for i in [0usize, 77, 127] {
        for o in [0usize, 13, 39] {
            let want: f64 = (0..64)
                .map(|k| x[[i, k]] * l.weight().value[[o, k]])
                .sum::<f64>()
                + l.bias().unwrap().value[[o]];
            assert!((y[[i, o]] - want).abs() < 1e-12);
        }
    }
}

#[test]
fn pooling_gradients() {
    let mut r = rng(7);
    let x = randn(&mut r, &[2, 3, 6, 5]);
    let cases: Vec<(&str, MaxPool2dConfig)> = vec![
        ("max k2", MaxPool2dConfig::new(2)),
        ("max k3 s2 p1", MaxPool2dConfig::new(3).stride(2).padding(1)),
        (
            "max k(3,2) s(1,2) p(1,0)",
            MaxPool2dConfig::new((3, 2)).stride((1, 2)).padding((1, 0)),
        ),
        (
            "max k2 dilation2",
            MaxPool2dConfig::new(2).stride(1).dilation(2),
        ),
        ("max k2 ceil", MaxPool2dConfig::new(2).ceil_mode(true)),
        (
            "max k3 s2 p1 ceil",
            MaxPool2dConfig::new(3).stride(2).padding(1).ceil_mode(true),
        ),
    ];
    for (what, cfg) in cases {
        let p = cfg.build::<f64>().unwrap();
        gradcheck(what, &p, &x, Ctx::train(), &[], 1);
    }
    let cases: Vec<(&str, AvgPool2dConfig)> = vec![
        ("avg k2", AvgPool2dConfig::new(2)),
        ("avg k3 s2 p1", AvgPool2dConfig::new(3).stride(2).padding(1)),
        (
            "avg k3 s2 p1 exclude pad",
            AvgPool2dConfig::new(3)
                .stride(2)
                .padding(1)
                .count_include_pad(false),
        ),
        ("avg k2 ceil", AvgPool2dConfig::new(2).ceil_mode(true)),
        (
            "avg k3 s2 p1 ceil",
            AvgPool2dConfig::new(3).stride(2).padding(1).ceil_mode(true),
        ),
        (
            "avg k(2,3) divisor 4",
            AvgPool2dConfig::new((2, 3))
                .stride(1)
                .divisor_override(Some(4)),
        ),
    ];
    for (what, cfg) in cases {
        let p = cfg.build::<f64>().unwrap();
        gradcheck(what, &p, &x, Ctx::train(), &[], 2);
    }
    gradcheck(
        "global avg",
        &GlobalAvgPool::<f64>::new(),
        &x,
        Ctx::train(),
        &[],
        3,
    );
}

#[test]
fn upsample_bilinear_gradients() {
    let mut rg = rng(41);
    let x = randn(&mut rg, &[2, 3, 4, 5]);
    for (what, size, align) in [
        ("x2", UpsampleSize::Size(8, 10), false),
        ("odd, aligned", UpsampleSize::Size(7, 9), true),
        ("scale 2.5", UpsampleSize::Scale(2.5, 2.5), false),
        ("down", UpsampleSize::Size(3, 2), false),
        ("down, aligned", UpsampleSize::Size(3, 3), true),
        ("to one pixel", UpsampleSize::Size(1, 1), true),
    ] {
        let l = UpsampleBilinear::<f64>::new(size, align).unwrap();
        gradcheck(&format!("upsample {what}"), &l, &x, Ctx::train(), &[], 5);
    }
}

#[test]
fn maxpool_backward_without_matching_forward_recomputes_argmax() {
    let mut r = rng(8);
    let x = randn(&mut r, &[2, 2, 4, 4]);
    let other = randn(&mut r, &[1, 2, 6, 6]);
    let mut a = MaxPool2dConfig::new(2).build::<f64>().unwrap();
    let y = a.forward(&x, Ctx::train()).unwrap();
    let dy = randn(&mut r, y.shape());
    let want = a.backward(&x, &dy, Ctx::train()).unwrap();
    let mut b = MaxPool2dConfig::new(2).build::<f64>().unwrap();
    b.forward(&other, Ctx::train()).unwrap(); // a different shape: indices are recomputed from x
    assert_eq!(b.backward(&x, &dy, Ctx::train()).unwrap(), want);
    let mut c = MaxPool2dConfig::new(2).build::<f64>().unwrap();
    assert_eq!(c.backward(&x, &dy, Ctx::train()).unwrap(), want);
    // every dy lands on exactly one element, the window maximum
    assert!((want.sum() - dy.sum()).abs() < 1e-12);
}

#[test]
fn activation_gradients() {
    let mut r = rng(11);
    let x = randn_away(&mut r, &[3, 4, 5], 1e-3);
    gradcheck("relu", &ReLU::<f64>::new(), &x, Ctx::train(), &[], 1);
    gradcheck(
        "sigmoid",
        &Sigmoid::<f64>::new(),
        &(x.clone() * 4.0),
        Ctx::train(),
        &[],
        2,
    );
    gradcheck(
        "flatten",
        &Flatten::<f64>::new(),
        &randn(&mut r, &[2, 3, 2, 2]),
        Ctx::train(),
        &[],
        3,
    );
    // a large input uses the parallel element-wise path
    let big = randn_away(&mut r, &[4, 8, 32, 33], 1e-3);
    let mut relu = ReLU::<f64>::new();
    let y = relu.forward(&big, Ctx::train()).unwrap();
    assert!(y.iter().zip(big.iter()).all(|(a, b)| *a == b.max(0.0)));
    let mut s = Sigmoid::<f64>::new();
    let y = s
        .forward(
            &ArrayD::from_shape_vec(IxDyn(&[3]), vec![-800.0, 0.0, 800.0]).unwrap(),
            Ctx::eval(),
        )
        .unwrap();
    assert_eq!(y.as_slice().unwrap(), &[0.0, 0.5, 1.0]);
    let y = relu
        .forward(&ArrayD::from_elem(IxDyn(&[2]), f64::NAN), Ctx::train())
        .unwrap();
    assert!(
        y.iter().all(|v| v.is_nan()),
        "relu(NaN) is NaN as in PyTorch"
    );
}

#[test]
fn dropout_gradients_and_modes() {
    let mut r = rng(12);
    let x = randn(&mut r, &[4, 6]);
    let d = Dropout::<f64>::new(0.4, 99).unwrap();
    gradcheck("dropout train", &d, &x, Ctx::train(), &[], 1);
    gradcheck("dropout eval", &d, &x, Ctx::eval(), &[], 2);
    // backward in train mode needs the mask of a train forward on x's shape
    let mut d = Dropout::<f64>::new(0.4, 99).unwrap();
    assert!(matches!(
        d.backward(&x, &x, Ctx::train()),
        Err(NvError::NoSavedState { .. })
    ));
    d.forward(&x, Ctx::train()).unwrap();
    let dx = d
        .backward(&x, &ArrayD::ones(x.raw_dim()), Ctx::train())
        .unwrap();
    let y = {
        let mut d2 = Dropout::<f64>::new(0.4, 99).unwrap();
        d2.forward(&ArrayD::ones(x.raw_dim()), Ctx::train())
            .unwrap()
    };
    assert_eq!(dx, y, "dx is dy times the mask");
}

/// d loss / d x by central differences of step `H`, one element at a time.
fn central_differences(x: &ArrayD<f64>, loss: impl Fn(&ArrayD<f64>) -> f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| {
            let (mut p, mut m) = (x.clone(), x.clone());
            p.as_slice_mut().unwrap()[i] += H;
            m.as_slice_mut().unwrap()[i] -= H;
            (loss(&p) - loss(&m)) / (2.0 * H)
        })
        .collect()
}

#[test]
fn pixel_cross_entropy_gradients_and_errors() {
    let mut r = rng(17);
    let logits = randn(&mut r, &[2, 4, 3, 5]) * 3.0;
    let targets: Vec<usize> = (0..30)
        .map(|i| if i % 7 == 3 { 255 } else { (i * 5 + i / 4) % 4 })
        .collect();
    let plain = PixelCrossEntropy::ignoring(255);
    let weighted = plain
        .clone()
        .with_weights(vec![0.5, 2.0, 1.0, 0.0])
        .unwrap();
    for (what, loss) in [("plain", &plain), ("weighted", &weighted)] {
        let (_, g) = loss.forward(&logits, &targets).unwrap();
        let fd = central_differences(&logits, |x| loss.forward(x, &targets).unwrap().0);
        let e = rel_err(&fd, g.as_slice().unwrap());
        assert!(e < TOL, "pixel cross entropy {what}: error {e:e}");
        // ignored pixels get no gradient
        for (p, &t) in targets.iter().enumerate() {
            if t == 255 {
                let (i, q) = (p / 15, p % 15);
                assert!((0..4).all(|c| g[[i, c, q / 5, q % 5]] == 0.0));
            }
        }
    }
    // every pixel ignored: nothing to learn, a zero loss and gradient
    let (l, g) = plain.forward(&logits, &[255; 30]).unwrap();
    assert_eq!(l, 0.0);
    assert!(g.iter().all(|&v| v == 0.0));
    // a label outside the classes that is not the ignore value is an error naming it
    let mut bad = targets.clone();
    bad[17] = 9;
    let e = plain.forward(&logits, &bad).unwrap_err().to_string();
    assert!(
        e.contains("target 9") && e.contains("image 1") && e.contains("ignore value 255"),
        "{e}"
    );
    assert!(plain.forward(&logits, &targets[..29]).is_err());
    assert!(plain
        .clone()
        .with_weights(vec![1.0, -1.0, 1.0, 1.0])
        .is_err());
    assert!(
        weighted
            .forward(&randn(&mut r, &[2, 3, 3, 5]), &targets)
            .is_err(),
        "4 weights, 3 classes"
    );
}

#[test]
fn cross_entropy_gradients() {
    let mut r = rng(13);
    let logits = randn(&mut r, &[5, 7]) * 3.0;
    let targets = [0usize, 6, 3, 3, 1];
    for eps in [0.0, 0.1, 1.0] {
        let (l0, g) = cross_entropy(&logits, &targets, eps).unwrap();
        assert!(l0 > 0.0);
        let fd = central_differences(&logits, |x| cross_entropy(x, &targets, eps).unwrap().0);
        let e = rel_err(&fd, g.as_slice().unwrap());
        assert!(e < TOL, "cross entropy eps {eps}: error {e:e}");
        // each row of the gradient sums to zero
        for row in g.as_slice().unwrap().chunks(7) {
            assert!(row.iter().sum::<f64>().abs() < 1e-12);
        }
    }
    // reference value: one sample, logits [0, ln 2, ln 3] → p = [1/6, 2/6, 3/6]
    let x = ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![0.0, 2f64.ln(), 3f64.ln()]).unwrap();
    let (l, _) = cross_entropy(&x, &[2], 0.0).unwrap();
    assert!((l - 2f64.ln()).abs() < 1e-12);
    let (l, _) = CrossEntropyLoss::label_smoothing(0.3)
        .unwrap()
        .forward(&x, &[2])
        .unwrap();
    let logp = [(1.0f64 / 6.0).ln(), (2.0f64 / 6.0).ln(), 0.5f64.ln()];
    let want = -0.7 * logp[2] - 0.1 * logp.iter().sum::<f64>();
    assert!((l - want).abs() < 1e-12);
}

fn assert_rank<T>(r: normvision::Result<T>) {
    assert!(
        matches!(r, Err(NvError::Rank { .. })),
        "expected a Rank error"
    );
}
fn assert_shape<T>(r: normvision::Result<T>) {
    assert!(
        matches!(r, Err(NvError::Shape { .. })),
        "expected a Shape error"
    );
}
fn assert_config<T>(r: normvision::Result<T>) {
    assert!(
        matches!(r, Err(NvError::Config(_))),
        "expected a Config error"
    );
}

#[test]
fn errors_are_typed_never_panics() {
    let mut r = rng(14);
    // Conv2d
    assert_config(Conv2d::<f32>::new(Conv2dConfig::new(3, 4, 3).groups(2)));
    assert_config(Conv2d::<f32>::new(Conv2dConfig::new(4, 3, 3).groups(2)));
    assert_config(Conv2d::<f32>::new(Conv2dConfig::new(4, 4, 3).groups(0)));
    assert_config(Conv2d::<f32>::new(Conv2dConfig::new(4, 4, 3).stride(0)));
    assert_config(Conv2d::<f32>::new(Conv2dConfig::new(4, 4, (3, 0))));
    assert_config(Conv2d::<f32>::new(Conv2dConfig::new(0, 4, 3)));
    let mut c = Conv2dConfig::new(3, 4, 3).build::<f64>(&mut r).unwrap();
    assert_rank(c.forward(&randn(&mut r, &[3, 5, 5]), Ctx::train()));
    assert_rank(c.forward(&randn(&mut r, &[1, 3, 5, 5, 1]), Ctx::train()));
    assert!(matches!(
        c.forward(&randn(&mut r, &[2, 4, 5, 5]), Ctx::train()),
        Err(NvError::Channels {
            expected: 3,
            got: 4,
            ..
        })
    ));
    assert_shape(c.forward(&randn(&mut r, &[2, 3, 2, 5]), Ctx::train()));
    assert_shape(c.forward(&randn(&mut r, &[2, 3, 0, 5]), Ctx::train()));
    let mut c2 = Conv2dConfig::new(3, 4, 3)
        .dilation(2)
        .build::<f64>(&mut r)
        .unwrap();
    assert_shape(c2.forward(&randn(&mut r, &[1, 3, 4, 9]), Ctx::train())); // dilated kernel is 5 tall
    let mut c3 = Conv2dConfig::new(3, 4, 3)
        .padding(1)
        .build::<f64>(&mut r)
        .unwrap();
    assert_eq!(
        c3.forward(&randn(&mut r, &[1, 3, 1, 1]), Ctx::train())
            .unwrap()
            .shape(),
        &[1, 4, 1, 1]
    );
    let x = randn(&mut r, &[2, 3, 5, 5]);
    assert_shape(c.backward(&x, &randn(&mut r, &[2, 4, 4, 3]), Ctx::train()));
    assert_eq!(
        c.forward(&randn(&mut r, &[0, 3, 5, 5]), Ctx::train())
            .unwrap()
            .shape(),
        &[0, 4, 3, 3]
    );
    let mut buf = vec![0.0; 7];
    assert_shape(c.backward_with(
        &x,
        &randn(&mut r, &[2, 4, 3, 3]),
        Some(&mut buf),
        ConvAlgo::Gemm,
    ));
    assert!(
        c.weight().grad.iter().all(|v| *v == 0.0),
        "failed calls leave gradients alone"
    );

    // Linear
    let mut l = LinearConfig::new(5, 3).build::<f64>(&mut r).unwrap();
    assert_shape(l.forward(&randn(&mut r, &[4, 6]), Ctx::train()));
    assert_rank(l.forward(&ArrayD::from_elem(IxDyn(&[]), 1.0), Ctx::train()));
    assert_shape(l.backward(
        &randn(&mut r, &[4, 5]),
        &randn(&mut r, &[4, 4]),
        Ctx::train(),
    ));
    assert_config(Linear::<f32>::new(LinearConfig::new(0, 3)));

    // Pooling
    let mut mp = MaxPool2dConfig::new(2).build::<f64>().unwrap();
    assert_rank(mp.forward(&randn(&mut r, &[3, 4, 4]), Ctx::train()));
    assert_shape(mp.forward(&randn(&mut r, &[1, 3, 1, 4]), Ctx::train()));
    assert_shape(mp.backward(
        &randn(&mut r, &[1, 3, 4, 4]),
        &randn(&mut r, &[1, 3, 3, 2]),
        Ctx::train(),
    ));
    assert_config(MaxPool2dConfig::new(2).padding(2).build::<f32>());
    assert_config(MaxPool2dConfig::new(2).stride(0).build::<f32>());
    assert_config(AvgPool2dConfig::new(3).padding(2).build::<f32>());
    assert_config(
        AvgPool2dConfig::new(3)
            .divisor_override(Some(0))
            .build::<f32>(),
    );
    let mut ap = AvgPool2dConfig::new(3).build::<f64>().unwrap();
    assert_shape(ap.forward(&randn(&mut r, &[1, 1, 2, 2]), Ctx::train()));
    assert_rank(ap.forward(&randn(&mut r, &[4, 4]), Ctx::train()));
    let mut gp = GlobalAvgPool::<f64>::new();
    assert_rank(gp.forward(&randn(&mut r, &[2, 3]), Ctx::train()));
    assert_shape(gp.backward(
        &randn(&mut r, &[2, 3, 2, 2]),
        &randn(&mut r, &[2, 4]),
        Ctx::train(),
    ));

    // Activations
    assert_rank(Flatten::<f64>::new().forward(&randn(&mut r, &[5]), Ctx::train()));
    assert_shape(Flatten::<f64>::new().backward(
        &randn(&mut r, &[2, 3, 2]),
        &randn(&mut r, &[2, 5]),
        Ctx::train(),
    ));
    assert_shape(ReLU::<f64>::new().backward(
        &randn(&mut r, &[2, 3]),
        &randn(&mut r, &[3, 2]),
        Ctx::train(),
    ));

    // Loss
    let logits = randn(&mut r, &[3, 4]);
    assert_shape(cross_entropy(&logits, &[0, 4, 1], 0.0));
    assert_shape(cross_entropy(&logits, &[0, 1], 0.0));
    assert_rank(cross_entropy(&randn(&mut r, &[3, 4, 1]), &[0, 1, 2], 0.0));
    assert_config(cross_entropy(&logits, &[0, 1, 2], 1.5));
    assert_config(CrossEntropyLoss::label_smoothing(-0.1));
    let mut bad = logits.clone();
    bad[[1, 2]] = f64::NAN;
    assert!(matches!(
        cross_entropy(&bad, &[0, 1, 2], 0.0),
        Err(NvError::NonFinite(_))
    ));
    bad[[1, 2]] = f64::INFINITY;
    assert!(matches!(
        cross_entropy(&bad, &[0, 1, 2], 0.1),
        Err(NvError::NonFinite(_))
    ));
    assert_rank(argmax(&randn(&mut r, &[4])));
    assert_shape(accuracy(&logits, &[0, 1]));
}

#[test]
fn state_dicts_use_pytorch_names() {
    let mut r = rng(15);
    let c = Conv2dConfig::new(3, 4, 3).build::<f32>(&mut r).unwrap();
    let sd = c.state_dict();
    assert_eq!(sd.keys().cloned().collect::<Vec<_>>(), ["bias", "weight"]);
    assert_eq!(sd.get("weight").unwrap().shape(), &[4, 3, 3, 3]);
    let mut c2 = Conv2d::<f32>::new(Conv2dConfig::new(3, 4, 3)).unwrap();
    c2.load_state("", &sd).unwrap();
    assert_eq!(c2.weight().value, c.weight().value);
    let mut wrong = Conv2d::<f32>::new(Conv2dConfig::new(3, 5, 3)).unwrap();
    assert!(matches!(wrong.load_state("", &sd), Err(NvError::State(_))));
    let nb = Conv2d::<f32>::new(Conv2dConfig::new(3, 4, 3).bias(false)).unwrap();
    assert_eq!(
        nb.state_dict().keys().cloned().collect::<Vec<_>>(),
        ["weight"]
    );

    let l = LinearConfig::new(5, 2).build::<f32>(&mut r).unwrap();
    let mut sd = normvision::state::StateDict::new();
    l.save_state("fc", &mut sd);
    assert_eq!(
        sd.keys().cloned().collect::<Vec<_>>(),
        ["fc.bias", "fc.weight"]
    );
    assert_eq!(sd.get("fc.weight").unwrap().shape(), &[2, 5]);
    assert!(MaxPool2dConfig::new(2)
        .build::<f32>()
        .unwrap()
        .state_dict()
        .tensors
        .is_empty());
    // PyTorch's default init bound 1/sqrt(fan_in)
    let bound = 1.0 / 27f32.sqrt();
    assert!(c.weight().value.iter().all(|v| v.abs() <= bound));
    assert!(c.bias().unwrap().value.iter().all(|v| v.abs() <= bound));
}

/// The f32 AVX-512 path (when the CPU has it) against the f64 reference path of the same layer, on every
/// configuration shape the kernels special-case: groups, pointwise, stride, dilation, tails of 8 rows / 16 columns.
#[test]
fn conv2d_f32_fast_path_matches_f64() {
    let cases: Vec<(Conv2dConfig, [usize; 4])> = vec![
        (Conv2dConfig::new(1, 32, 3).padding(1), [3, 1, 28, 28]),
        (Conv2dConfig::new(5, 13, 3).padding(1), [2, 5, 9, 11]),
        (
            Conv2dConfig::new(6, 9, (3, 2)).stride(2).padding(1),
            [3, 6, 7, 6],
        ),
        (
            Conv2dConfig::new(4, 6, 3).dilation(2).padding(2).groups(2),
            [2, 4, 7, 8],
        ),
        (
            Conv2dConfig::new(8, 12, 1).groups(4).bias(false),
            [2, 8, 5, 7],
        ),
        (Conv2dConfig::new(3, 17, 1), [2, 3, 4, 5]),
        (
            Conv2dConfig::new(16, 16, 3).padding(1).groups(16),
            [2, 16, 6, 6],
        ),
        (Conv2dConfig::new(3, 9, 5).padding(2), [2, 3, 2, 3]),
        (
            Conv2dConfig::new(3, 9, 3).padding((1, 2)).dilation((1, 2)),
            [2, 3, 5, 4],
        ),
        // 8 or more channels per group: dx through the implicit full convolution too
        (Conv2dConfig::new(12, 10, 3).padding(1), [3, 12, 7, 9]),
        (
            Conv2dConfig::new(16, 6, 3).padding(2).dilation(2).groups(2),
            [2, 16, 6, 5],
        ),
        (
            Conv2dConfig::new(9, 20, (5, 3)).padding((2, 1)).bias(false),
            [2, 9, 4, 6],
        ),
    ];
    for (i, (cfg, shape)) in cases.into_iter().enumerate() {
        let c64 = conv(cfg.clone(), 500 + i as u64);
        let mut c32 = Conv2d::<f32>::new(cfg.clone()).unwrap();
        c32.load_state("", &c64.state_dict()).unwrap();
        let mut c64 = Conv2d::<f64>::new(cfg.clone()).unwrap();
        c64.load_state("", &c32.state_dict()).unwrap();
        let x64 = randn(&mut rng(600 + i as u64), &shape).mapv(|v| v as f32 as f64);
        let x32 = x64.mapv(|v| v as f32);
        let y64 = c64.forward(&x64, Ctx::train()).unwrap();
        let dy64 = randn(&mut rng(700 + i as u64), y64.shape()).mapv(|v| v as f32 as f64);
        let dy32 = dy64.mapv(|v| v as f32);
        let dx64 = c64.backward(&x64, &dy64, Ctx::train()).unwrap();
        for simd in [true, false] {
            let mut c = c32.clone();
            let isa = if simd { Isa::detect() } else { Isa::Portable };
            let ctx = Ctx::train().with_kernels(KernelOptions {
                isa,
                ..KernelOptions::default()
            });
            let y = c.forward(&x32, ctx).unwrap();
            let dx = c.backward(&x32, &dy32, ctx).unwrap();
            let pairs = [
                ("y", y.mapv(|v| v as f64), &y64),
                ("dx", dx.mapv(|v| v as f64), &dx64),
                ("dw", c.weight().grad.mapv(|v| v as f64), &c64.weight().grad),
            ];
            for (what, got, want) in pairs {
                let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                let e = got
                    .iter()
                    .zip(want.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max)
                    / scale;
                assert!(e < 1e-5, "case {i} {cfg:?} simd={simd}: {what} error {e:e}");
            }
            if let (Some(b), Some(b64)) = (c.bias(), c64.bias()) {
                for (a, w) in b.grad.iter().zip(b64.grad.iter()) {
                    assert!(
                        (*a as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "case {i}: db"
                    );
                }
            }
        }
    }
}

/// The layers ONNX import maps Clip, Softmax, Reshape and Mul/Add by a constant to.
#[test]
fn onnx_layer_gradients() {
    let mut r = rng(12);
    // clamp: inputs kept away from both kinks
    let x = randn(&mut r, &[3, 4, 5]).mapv(|v| {
        let v = v * 1.5;
        if (v + 0.7).abs() < 1e-3 || (v - 0.9).abs() < 1e-3 {
            v + 3e-3
        } else {
            v
        }
    });
    gradcheck(
        "clamp",
        &Clamp::<f64>::new(-0.7, 0.9).unwrap(),
        &x,
        Ctx::train(),
        &[],
        4,
    );
    gradcheck(
        "softmax",
        &Softmax::<f64>::new(),
        &(randn(&mut r, &[3, 2, 6]) * 3.0),
        Ctx::train(),
        &[],
        5,
    );
    gradcheck(
        "reshape",
        &Reshape::<f64>::new(vec![3, 4]),
        &randn(&mut r, &[2, 12]),
        Ctx::train(),
        &[],
        6,
    );
    let scale = randn(&mut r, &[3, 1, 1]);
    let shift = randn(&mut r, &[4]);
    gradcheck(
        "scale_shift",
        &ScaleShift::<f64>::new(Some(scale), Some(shift)),
        &randn(&mut r, &[2, 3, 5, 4]),
        Ctx::train(),
        &[],
        7,
    );
    // constants that do not broadcast over a sample are shape errors, not panics
    let mut bad = ScaleShift::<f64>::new(Some(randn(&mut r, &[5])), None);
    assert!(bad
        .forward(&randn(&mut r, &[2, 3, 4]), Ctx::train())
        .is_err());
    assert!(Reshape::<f64>::new(vec![5])
        .forward(&randn(&mut r, &[2, 4]), Ctx::train())
        .is_err());
    assert!(Clamp::<f64>::new(1.0, -1.0).is_err());
}

#[test]
fn roi_align_gradients() {
    // RoIAlign is linear in the features, so central differences are exact up to round-off; regions inside,
    // across the border, degenerate and tiny, aligned or not, fixed and adaptive sampling
    let mut r = rng(91);
    let x = randn(&mut r, &[2, 3, 9, 11]);
    let rois = ndarray::arr2(&[
        [0.0, 1.3, 2.2, 15.1, 12.7],
        [1.0, -6.0, -3.0, 8.0, 9.0],
        [1.0, 14.0, 10.0, 30.0, 26.0],
        [0.0, 5.0, 5.0, 5.0, 5.0],
        [0.0, 3.1, 4.2, 3.6, 4.4],
        [1.0, 0.0, 0.0, 22.0, 18.0],
    ]);
    for (aligned, sampling) in [(false, 2), (true, 2), (false, 0), (true, -1)] {
        let l = RoiAlign::new((3, 4), 0.5, sampling, aligned).unwrap();
        let y = l.forward(&x.view(), &rois.view()).unwrap();
        let dy = randn(&mut r, y.shape());
        let dx = l.backward(&dy.view(), &rois.view(), x.shape()).unwrap();
        let loss = |x: &ArrayD<f64>| (&l.forward(&x.view(), &rois.view()).unwrap() * &dy).sum();
        let mut worst: f64 = 0.0;
        let scale = dx.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp.as_slice_mut().unwrap()[i] += H;
            xm.as_slice_mut().unwrap()[i] -= H;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * H);
            worst = worst.max((fd - dx.as_slice().unwrap()[i]).abs() / scale);
        }
        assert!(
            worst < TOL,
            "aligned {aligned}, sampling {sampling}: error {worst:e}"
        );
    }
}

#[test]
fn roi_align_rejects_bad_input() {
    let l = RoiAlign::new((7, 7), 0.125, 2, false).unwrap();
    let x = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 8, 8]));
    let err = |rois: ndarray::Array2<f32>, x: &ArrayD<f32>| {
        l.forward(&x.view(), &rois.view()).unwrap_err().to_string()
    };
    let e = err(ndarray::arr2(&[[2.0, 0.0, 0.0, 4.0, 4.0]]), &x);
    assert!(e.contains("RoIAlign") && e.contains("batch index 2"), "{e}");
    let e = err(ndarray::arr2(&[[0.5, 0.0, 0.0, 4.0, 4.0]]), &x);
    assert!(e.contains("batch index 0.5"), "{e}");
    let e = err(ndarray::arr2(&[[0.0, f32::NAN, 0.0, 4.0, 4.0]]), &x);
    assert!(e.contains("non-finite"), "{e}");
    let e = err(ndarray::arr2(&[[0.0, 0.0, 4.0, 4.0]]), &x);
    assert!(e.contains("(K, 5)"), "{e}");
    let e = err(
        ndarray::arr2(&[[0.0, 0.0, 0.0, 4.0, 4.0]]),
        &ArrayD::zeros(IxDyn(&[3, 8, 8])),
    );
    assert!(e.contains("4-D"), "{e}");
    let rois = ndarray::arr2(&[[0.0f32, 0.0, 0.0, 4.0, 4.0]]);
    let e = l
        .backward(
            &ArrayD::zeros(IxDyn(&[1, 3, 6, 7])).view(),
            &rois.view(),
            x.shape(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("output gradient"), "{e}");
    assert!(RoiAlign::new((0, 7), 1.0, 2, false).is_err());
    assert!(RoiAlign::new((7, 7), 0.0, 2, false).is_err());
    // no regions: an empty output, and a zero gradient
    let none = ndarray::Array2::<f32>::zeros((0, 5));
    assert_eq!(
        l.forward(&x.view(), &none.view()).unwrap().shape(),
        &[0, 3, 7, 7]
    );
}
