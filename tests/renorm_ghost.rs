//! Batch Renormalization and Ghost Batch Norm. PyTorch has neither, so their golden values come from f64
//! references written here from the papers' equations (Ioffe 2017, Algorithm 1 and its backward with r and d as
//! constants; Hoffer et al. 2017, BatchNorm per virtual batch), plus properties (Renorm with r_max = 1, d_max = 0
//! is BatchNorm; Ghost BN with one virtual batch is BatchNorm), the schedule, their errors, and `--norm renorm`
//! and `--norm ghost` through the zoo and the CLI. Gradient checks are in tests/gradcheck_norm.rs.

use crate::common;
use common::cli::{assert_fails, assert_ok, nv, s, write_idx_dir};
use ndarray::{ArrayD, IxDyn};
use normvision::model::{Model, ModelConfig, ModelKind, NormKind};
use normvision::norm::*;
use normvision::state::Stateful;
use normvision::{Ctx, Layer};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;

fn input(seed: u64, shape: &[usize]) -> ArrayD<f64> {
    let mut g = Pcg64::seed_from_u64(seed);
    let c = shape[1];
    let mu: Vec<f64> = (0..c).map(|_| g.gen_range(-3.0..3.0)).collect();
    let sc: Vec<f64> = (0..c).map(|_| g.gen_range(0.5..3.0)).collect();
    let mut x = ArrayD::from_shape_simple_fn(IxDyn(shape), || g.sample::<f64, _>(StandardNormal));
    for (i, v) in x.indexed_iter_mut() {
        *v = mu[i[1]] + sc[i[1]] * *v;
    }
    x
}

fn randn(seed: u64, shape: &[usize]) -> ArrayD<f64> {
    let mut g = Pcg64::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || g.sample::<f64, _>(StandardNormal))
}

/// The values of channel `c` of samples `n0..n1` of an (N, C, *) tensor, in order.
fn channel(x: &ArrayD<f64>, c: usize, n0: usize, n1: usize) -> Vec<f64> {
    x.indexed_iter()
        .filter(|(i, _)| i[1] == c && (n0..n1).contains(&i[0]))
        .map(|(_, v)| *v)
        .collect()
}

/// Writes `vals` (in the order [`channel`] reads) back into channel `c` of samples `n0..n1`.
fn set_channel(y: &mut ArrayD<f64>, c: usize, n0: usize, n1: usize, vals: &[f64]) {
    let mut it = vals.iter();
    for (i, v) in y.indexed_iter_mut() {
        if i[1] == c && (n0..n1).contains(&i[0]) {
            *v = *it.next().unwrap();
        }
    }
}

fn max_rel(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    let scale = b.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// One channel of Batch Renorm by the paper: forward, then the backward of Algorithm 1 with r and d held
/// constant (dL/dσ_B and dL/dμ_B through x̂ only). Returns (y, dx, dγ, dβ, μ_B, σ²_B unbiased, r, d).
#[allow(clippy::type_complexity)]
fn renorm_channel(
    x: &[f64],
    dy: &[f64],
    (gamma, beta, eps): (f64, f64, f64),
    (mu, var): (f64, f64),
    (r_max, d_max): (f64, f64),
) -> (Vec<f64>, Vec<f64>, f64, f64, f64, f64, f64, f64) {
    let m = x.len() as f64;
    let mu_b = x.iter().sum::<f64>() / m;
    let var_b = x.iter().map(|v| (v - mu_b).powi(2)).sum::<f64>() / m;
    let sigma_b = (var_b + eps).sqrt();
    let sigma = (var + eps).sqrt();
    let r = (sigma_b / sigma).clamp(1.0 / r_max, r_max);
    let d = ((mu_b - mu) / sigma).clamp(-d_max, d_max);
    let xhat: Vec<f64> = x.iter().map(|v| (v - mu_b) / sigma_b * r + d).collect();
    let y = xhat.iter().map(|h| gamma * h + beta).collect();
    let dxhat: Vec<f64> = dy.iter().map(|g| g * gamma).collect();
    let dsigma: f64 = dxhat
        .iter()
        .zip(x)
        .map(|(g, v)| g * (v - mu_b) * (-r / (sigma_b * sigma_b)))
        .sum();
    let dmu: f64 = dxhat.iter().map(|g| g * (-r / sigma_b)).sum();
    let dx = dxhat
        .iter()
        .zip(x)
        .map(|(g, v)| g * r / sigma_b + dsigma * (v - mu_b) / (m * sigma_b) + dmu / m)
        .collect();
    let dgamma = dy.iter().zip(&xhat).map(|(g, h)| g * h).sum();
    let dbeta = dy.iter().sum();
    (y, dx, dgamma, dbeta, mu_b, var_b * m / (m - 1.0), r, d)
}

#[test]
fn batch_renorm_matches_the_paper_over_a_schedule() {
    let shape = [6usize, 3, 4, 2];
    let (c, eps, alpha) = (3usize, 1e-5, 0.05);
    // ramps over steps 2..6 (r_max) and 2..4 (d_max): steps 0-8 cover warm-up, both ramps and the full limits
    let sched = RenormSchedule::Steps {
        warmup: 2,
        d_full: 4,
        r_full: 6,
    };
    let mut rn: BatchRenorm<f64> = BatchRenormConfig::d2(c)
        .limits(1.5, 0.4)
        .momentum(alpha)
        .schedule(sched)
        .build()
        .unwrap();
    let mut g = Pcg64::seed_from_u64(3);
    for p in ["weight", "bias"] {
        rn.visit_params("", &mut |n, q| {
            if n == p {
                q.value.iter_mut().for_each(|v| *v = g.gen_range(0.5..1.5));
            }
        });
    }
    let gamma: Vec<f64> = rn.batch_norm().weight().unwrap().values().to_vec();
    let beta: Vec<f64> = rn.batch_norm().bias().unwrap().values().to_vec();
    let (mut mu, mut var) = (vec![0.0; c], vec![1.0; c]);
    let (mut saw_interior_r, mut saw_clipped_d) = (false, false);
    for step in 0..9u64 {
        // each batch drifts, so that the batch statistics differ from the running ones
        let x =
            input(100 + step, &shape).mapv(|v| v * (1.0 + 0.2 * step as f64) + step as f64 * 0.3);
        let dy = randn(200 + step, &shape);
        let ctx = Ctx::train().with_step(step);
        let (r_max, d_max) = rn.limits_at(step);
        let ramp = |w: u64, f: u64| ((step.max(w) - w) as f64 / (f - w) as f64).min(1.0);
        assert!(
            (r_max - (1.0 + 0.5 * ramp(2, 6))).abs() < 1e-15,
            "r_max at {step}"
        );
        assert!((d_max - 0.4 * ramp(2, 4)).abs() < 1e-15, "d_max at {step}");
        rn.zero_grad();
        let y = rn.forward(&x, ctx).unwrap();
        let dx = rn.backward(&x, &dy, ctx).unwrap();
        let (mut ry, mut rdx) = (y.clone(), dx.clone());
        for ch in 0..c {
            let (yc, dxc, dgam, dbet, mu_b, var_u, r, d) = renorm_channel(
                &channel(&x, ch, 0, shape[0]),
                &channel(&dy, ch, 0, shape[0]),
                (gamma[ch], beta[ch], eps),
                (mu[ch], var[ch]),
                (r_max, d_max),
            );
            set_channel(&mut ry, ch, 0, shape[0], &yc);
            set_channel(&mut rdx, ch, 0, shape[0], &dxc);
            let (lr, ld) = rn.last_correction().unwrap();
            assert!(
                (lr[ch] - r).abs() < 1e-14 && (ld[ch] - d).abs() < 1e-14,
                "r, d at {step}"
            );
            saw_interior_r |= r > 1.0 / r_max + 1e-6 && r < r_max - 1e-6 && r_max > 1.0;
            saw_clipped_d |= d_max > 0.0 && (d.abs() - d_max).abs() < 1e-15;
            let gw = rn.batch_norm().weight().unwrap().grads()[ch];
            let gb = rn.batch_norm().bias().unwrap().grads()[ch];
            assert!(
                (gw - dgam).abs() < 1e-11 * (1.0 + dgam.abs()),
                "dγ at {step}: {gw} vs {dgam}"
            );
            assert!(
                (gb - dbet).abs() < 1e-11 * (1.0 + dbet.abs()),
                "dβ at {step}"
            );
            mu[ch] += alpha * (mu_b - mu[ch]);
            var[ch] += alpha * (var_u - var[ch]);
        }
        assert!(
            max_rel(&y, &ry) < 1e-13,
            "y at step {step}: {:e}",
            max_rel(&y, &ry)
        );
        assert!(
            max_rel(&dx, &rdx) < 1e-12,
            "dx at step {step}: {:e}",
            max_rel(&dx, &rdx)
        );
        let (rm, rv) = rn.batch_norm().running_stats_ref();
        for ch in 0..c {
            assert!(
                (rm[ch] - mu[ch]).abs() < 1e-13 && (rv[ch] - var[ch]).abs() < 1e-12,
                "running stats at {step}"
            );
        }
    }
    assert!(saw_interior_r, "no step had r strictly inside its limits");
    assert!(saw_clipped_d, "no step clipped d");
}

/// Small accessor: the running statistics as slices.
trait RunningRef {
    fn running_stats_ref(&self) -> (Vec<f64>, Vec<f64>);
}
impl RunningRef for BatchNorm<f64> {
    fn running_stats_ref(&self) -> (Vec<f64>, Vec<f64>) {
        (
            self.running_mean().unwrap().iter().copied().collect(),
            self.running_var().unwrap().iter().copied().collect(),
        )
    }
}

#[test]
fn ghost_batch_norm_matches_batch_norm_per_virtual_batch() {
    // 11 samples in virtual batches of 4: 4 + 4 + 3
    let shape = [11usize, 3, 5];
    let (c, eps, mom) = (3usize, 1e-5, 0.1);
    let mut gb: GhostBatchNorm<f64> = GhostBatchNormConfig::d1(c, 4).build().unwrap();
    gb.visit_params("", &mut |_, q| {
        q.value
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 0.7 + 0.2 * i as f64)
    });
    let w: Vec<f64> = gb.batch_norm().weight().unwrap().values().to_vec();
    let b: Vec<f64> = gb.batch_norm().bias().unwrap().values().to_vec();
    let x = input(5, &shape);
    let dy = randn(6, &shape);
    let y = gb.forward(&x, Ctx::train()).unwrap();
    let dx = gb.backward(&x, &dy, Ctx::train()).unwrap();
    assert_eq!(gb.batch_norm().num_batches_tracked(), 3);
    let (mut ry, mut rdx) = (y.clone(), dx.clone());
    let (mut mu, mut var) = (vec![0.0; c], vec![1.0; c]);
    let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
    for (n0, n1) in [(0, 4), (4, 8), (8, 11)] {
        for ch in 0..c {
            let xs = channel(&x, ch, n0, n1);
            let gs = channel(&dy, ch, n0, n1);
            let m = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / m;
            let v = xs.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / m;
            let inv = 1.0 / (v + eps).sqrt();
            let xh: Vec<f64> = xs.iter().map(|t| (t - mean) * inv).collect();
            set_channel(
                &mut ry,
                ch,
                n0,
                n1,
                &xh.iter().map(|h| w[ch] * h + b[ch]).collect::<Vec<_>>(),
            );
            let sg = gs.iter().sum::<f64>();
            let sgx = gs.iter().zip(&xh).map(|(g, h)| g * h).sum::<f64>();
            let d: Vec<f64> = gs
                .iter()
                .zip(&xh)
                .map(|(g, h)| w[ch] * inv * (g - sg / m - h * sgx / m))
                .collect();
            set_channel(&mut rdx, ch, n0, n1, &d);
            dw[ch] += sgx;
            db[ch] += sg;
            mu[ch] = (1.0 - mom) * mu[ch] + mom * mean;
            var[ch] = (1.0 - mom) * var[ch] + mom * v * m / (m - 1.0);
        }
    }
    assert!(max_rel(&y, &ry) < 1e-13, "y: {:e}", max_rel(&y, &ry));
    assert!(max_rel(&dx, &rdx) < 1e-12, "dx: {:e}", max_rel(&dx, &rdx));
    let (rm, rv) = gb.batch_norm().running_stats_ref();
    for ch in 0..c {
        assert!((rm[ch] - mu[ch]).abs() < 1e-13 && (rv[ch] - var[ch]).abs() < 1e-13);
        let gw = gb.batch_norm().weight().unwrap().grads()[ch];
        let gbb = gb.batch_norm().bias().unwrap().grads()[ch];
        assert!((gw - dw[ch]).abs() < 1e-11 && (gbb - db[ch]).abs() < 1e-11);
    }
    // eval: the BatchNorm of the running statistics
    let mut bn: BatchNorm<f64> = BatchNormConfig::d1(c).build().unwrap();
    let sd = gb.state_dict(); // (state dicts hold f32)
    bn.load_strict(&sd).unwrap();
    gb.load_strict(&sd).unwrap();
    assert_eq!(
        gb.forward(&x, Ctx::eval()).unwrap(),
        bn.forward(&x, Ctx::eval()).unwrap()
    );
}

#[test]
fn errors_name_the_problem() {
    let mut gb: GhostBatchNorm<f32> = GhostBatchNormConfig::d2(2, 8).build().unwrap();
    let e = gb
        .forward(&ArrayD::zeros(IxDyn(&[4, 2, 3, 3])), Ctx::train())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("virtual batch size 8") && e.contains("larger than the batch"),
        "{e}"
    );
    // a ragged last virtual batch of one sample on (N, C) has one value per channel
    let mut gb: GhostBatchNorm<f32> = GhostBatchNormConfig::d1(2, 4).build().unwrap();
    let e = gb
        .forward(&ArrayD::zeros(IxDyn(&[5, 2])), Ctx::train())
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than 1 value per channel"), "{e}");
    // eval mode takes any batch
    gb.forward(&ArrayD::zeros(IxDyn(&[1, 2])), Ctx::eval())
        .unwrap();
    assert!(GhostBatchNormConfig::d1(2, 0).build::<f32>().is_err());
    let e = BatchRenormConfig::d2(2)
        .limits(0.5, 1.0)
        .build::<f32>()
        .unwrap_err()
        .to_string();
    assert!(e.contains("r_max"), "{e}");
    let bad = RenormSchedule::Steps {
        warmup: 10,
        d_full: 5,
        r_full: 20,
    };
    assert!(BatchRenormConfig::d2(2)
        .schedule(bad)
        .build::<f32>()
        .is_err());
    let mut rn: BatchRenorm<f32> = BatchRenormConfig::d1(2).build().unwrap();
    let e = rn
        .forward(&ArrayD::zeros(IxDyn(&[1, 2])), Ctx::train())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("BatchRenorm") && e.contains("more than 1 value per channel"),
        "{e}"
    );
}

#[test]
fn schedule_scales_the_papers_to_the_run() {
    // the paper: warm-up 5k, d_max full at 25k, r_max full at 40k (of an 80k-step first half, see the docs)
    assert_eq!(
        RenormSchedule::paper(),
        RenormSchedule::Steps {
            warmup: 5000,
            d_full: 25000,
            r_full: 40000
        }
    );
    assert_eq!(
        RenormSchedule::scaled_to(1600),
        RenormSchedule::Steps {
            warmup: 100,
            d_full: 500,
            r_full: 800
        }
    );
    let mut rn: BatchRenorm<f32> = BatchRenormConfig::d2(2).build().unwrap();
    assert_eq!(rn.effective_schedule(), RenormSchedule::paper());
    rn.set_run_length(1600);
    assert_eq!(rn.limits_at(100), (1.0, 0.0));
    assert_eq!(rn.limits_at(300), (1.0 + 2.0 * 200.0 / 700.0, 2.5));
    assert_eq!(rn.limits_at(800), (3.0, 5.0));
    assert_eq!(rn.limits_at(100_000), (3.0, 5.0));
}

fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        (2usize..9, 1usize..5).prop_map(|(n, c)| vec![n, c]),
        (2usize..7, 1usize..4, 1usize..5, 1usize..5).prop_map(|(n, c, h, w)| vec![n, c, h, w]),
    ]
    .prop_filter("more than one value per channel", |s| {
        s[0] * s[2..].iter().product::<usize>() > 1
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// With r_max = 1 and d_max = 0 (its warm-up), Batch Renorm is BatchNorm: output, dx, parameter gradients
    /// and running statistics, over several steps.
    #[test]
    fn renorm_without_correction_is_batch_norm(shape in shape_strategy(), seed in any::<u64>()) {
        let c = shape[1];
        let mut rn: BatchRenorm<f64> = BatchRenormConfig::new(c).limits(1.0, 0.0).momentum(0.1).build().unwrap();
        let mut bn: BatchNorm<f64> = BatchNormConfig::new(c).build().unwrap();
        for step in 0..3u64 {
            let x = input(seed.wrapping_add(step), &shape);
            let dy = randn(seed ^ 0xabc ^ step, &shape);
            let ctx = Ctx::train().with_step(step);
            rn.zero_grad();
            bn.zero_grad();
            let (y1, y2) = (rn.forward(&x, ctx).unwrap(), bn.forward(&x, ctx).unwrap());
            prop_assert!(max_rel(&y1, &y2) < 1e-14, "y {:e}", max_rel(&y1, &y2));
            let (d1, d2) = (rn.backward(&x, &dy, ctx).unwrap(), bn.backward(&x, &dy, ctx).unwrap());
            // absolute: with two values per channel dx is ~0 (±1 outputs whatever x is), so relative is noise
            let ddx = d1.iter().zip(d2.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            prop_assert!(ddx < 1e-11, "dx {:e}", ddx);
            let (g1, g2) = (rn.batch_norm().weight().unwrap().grads().to_vec(), bn.weight().unwrap().grads().to_vec());
            for (a, b) in g1.iter().zip(&g2) {
                prop_assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()));
            }
        }
        let sd1 = rn.state_dict();
        let sd2 = bn.state_dict();
        prop_assert_eq!(sd1.keys().collect::<Vec<_>>(), sd2.keys().collect::<Vec<_>>());
        let (m1, v1) = rn.batch_norm().running_stats_ref();
        let (m2, v2) = bn.running_stats_ref();
        for i in 0..c {
            prop_assert!((m1[i] - m2[i]).abs() < 1e-14 && (v1[i] - v2[i]).abs() < 1e-12);
        }
    }

    /// Ghost BN with one virtual batch is BatchNorm bitwise (the same kernels), in f32.
    #[test]
    fn ghost_with_one_virtual_batch_is_batch_norm(shape in shape_strategy(), seed in any::<u64>()) {
        let c = shape[1];
        let mut gb: GhostBatchNorm<f32> = GhostBatchNormConfig::new(c, shape[0]).build().unwrap();
        let mut bn: BatchNorm<f32> = BatchNormConfig::new(c).build().unwrap();
        let x = input(seed, &shape).mapv(|v| v as f32);
        let dy = randn(seed ^ 1, &shape).mapv(|v| v as f32);
        let (y1, y2) = (gb.forward(&x, Ctx::train()).unwrap(), bn.forward(&x, Ctx::train()).unwrap());
        prop_assert_eq!(&y1, &y2);
        prop_assert_eq!(gb.backward(&x, &dy, Ctx::train()).unwrap(), bn.backward(&x, &dy, Ctx::train()).unwrap());
        prop_assert_eq!(gb.batch_norm().weight().unwrap().grads(), bn.weight().unwrap().grads());
        prop_assert_eq!(gb.batch_norm().running_var(), bn.running_var());
    }

    /// Each virtual batch of Ghost BN's training output is standardised on its own (mean 0, variance ≈ 1 per
    /// channel, with γ = 1 and β = 0).
    #[test]
    fn ghost_standardises_each_virtual_batch(k in 2usize..5, ghost in 2usize..4, c in 1usize..4, seed in any::<u64>()) {
        let shape = [k * ghost, c, 3, 2];
        let mut gb: GhostBatchNorm<f64> = GhostBatchNormConfig::d2(c, ghost).build().unwrap();
        let x = input(seed, &shape);
        let y = gb.forward(&x, Ctx::train()).unwrap();
        for v in 0..k {
            for ch in 0..c {
                let ys = channel(&y, ch, v * ghost, (v + 1) * ghost);
                let m = ys.iter().sum::<f64>() / ys.len() as f64;
                let var = ys.iter().map(|t| (t - m).powi(2)).sum::<f64>() / ys.len() as f64;
                prop_assert!(m.abs() < 1e-12);
                let xs = channel(&x, ch, v * ghost, (v + 1) * ghost);
                let mx = xs.iter().sum::<f64>() / xs.len() as f64;
                let vx = xs.iter().map(|t| (t - mx).powi(2)).sum::<f64>() / xs.len() as f64;
                prop_assert!((var - vx / (vx + 1e-5)).abs() < 1e-10);
            }
        }
    }
}

#[test]
fn zoo_models_take_renorm_and_ghost() {
    for kind in [ModelKind::Cnn, ModelKind::Mlp, ModelKind::Resnet] {
        for norm in [NormKind::Renorm, NormKind::Ghost] {
            let mut cfg = ModelConfig::fashion(kind, norm);
            cfg.ghost_batch = 2;
            let mut m = Model::new(cfg.clone()).unwrap();
            let x = ArrayD::from_shape_fn(IxDyn(&[4, 1, 28, 28]), |i| {
                ((i[0] * 7 + i[2] * 3 + i[3]) % 11) as f32
            });
            m.set_run_length(100);
            let y = m.forward(&x, Ctx::train().with_step(60)).unwrap();
            assert_eq!(y.shape(), &[4, 10]);
            m.backward_params(
                &x,
                &ArrayD::ones(IxDyn(&[4, 10])),
                Ctx::train().with_step(60),
            )
            .unwrap();
            // the architecture round-trips through a checkpoint's spec, under BatchNorm's state-dict names
            let spec = m.graph().spec().unwrap();
            let mut g2: normvision::model::Graph =
                normvision::model::Graph::from_spec(&spec).unwrap();
            g2.load_strict(&m.state_dict()).unwrap();
            let mut bn = Model::new(ModelConfig {
                norm: NormKind::Batch,
                ..cfg.clone()
            })
            .unwrap();
            let k1: Vec<String> = m.state_dict().keys().cloned().collect();
            let k2: Vec<String> = bn.state_dict().keys().cloned().collect();
            assert_eq!(k1, k2, "{kind:?} {norm:?}: state-dict names");
            // eval mode is BatchNorm's
            bn.load_strict(&m.state_dict()).unwrap();
            assert_eq!(
                m.forward(&x, Ctx::eval()).unwrap(),
                bn.forward(&x, Ctx::eval()).unwrap()
            );
            // a ghost size above the batch is refused before training
            if norm == NormKind::Ghost {
                assert!(m.one_value_per_channel(1).unwrap().is_some());
                assert!(m.one_value_per_channel(4).unwrap().is_none());
            }
        }
    }
}

#[test]
fn cli_trains_with_renorm_and_ghost() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_idx_dir(&data, 96, 40);
    let out = dir.path().join("m.safetensors");
    for (norm, extra) in [("renorm", vec![]), ("ghost", vec!["--ghost-batch", "8"])] {
        let mut args = vec![
            "train",
            "--data",
            s(&data),
            "--model",
            "mlp",
            "--norm",
            norm,
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--out",
            s(&out),
            "-q",
        ];
        args.extend(extra);
        assert_ok(norm, &nv(&args));
        assert_ok(
            "eval",
            &nv(&["eval", "--checkpoint", s(&out), "--data", s(&data)]),
        );
    }
    let o = nv(&[
        "train",
        "--data",
        s(&data),
        "--model",
        "mlp",
        "--norm",
        "ghost",
        "--ghost-batch",
        "64",
        "--batch-size",
        "32",
        "--out",
        s(&out),
    ]);
    assert_fails(
        "ghost > batch",
        &o,
        &["virtual batch size 64", "--ghost-batch"],
    );
}
