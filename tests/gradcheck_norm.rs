//! Gradient checks: every normalization layer's hand-written backward against f64 central finite differences of
//! the scalar loss L = Σ y·r (r a fixed random tensor, so dL/dy = r), for dx and every parameter gradient, in train
//! and eval mode.
//!
//! Each loss evaluation runs on a fresh clone of the layer: a train-mode forward updates the running statistics,
//! and the train-mode output does not depend on them, so cloning keeps every evaluation on the same function.
//! Eval-mode checks run after a few train steps so that the running statistics are far from (0, 1).
//!
//! Error measure: max_i |fd_i - analytic_i| / max(1, max_i |analytic_i|) per gradient tensor, which must stay below
//! [`TOL`]. With h = 1e-6 the truncation error is O(h²) ≈ 1e-12 and the round-off ≈ |L|·1e-16/h ≈ 1e-9; the worst
//! error measured over all cases is ~1e-9 (printed by `cargo test --test suite gradcheck_norm:: -- --nocapture`).

use crate::common;
use common::Relu;
use ndarray::{ArrayD, IxDyn};
use normvision::norm::*;
use normvision::state::{StateDict, Stateful};
use normvision::{Ctx, Layer};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;

const H: f64 = 1e-6;
const TOL: f64 = 1e-6;
/// Fused-ReLU cases need every pre-activation at least this far from the kink.
const RELU_MARGIN: f64 = 1e-3;

fn rng(seed: u64) -> Pcg64 {
    Pcg64::seed_from_u64(seed)
}

fn randn(rng: &mut Pcg64, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.sample::<f64, _>(StandardNormal))
}

fn uniform(rng: &mut Pcg64, n: usize, lo: f64, hi: f64) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(&[n]), || rng.gen_range(lo..hi))
}

/// x[.., c, ..] = mu_c + s_c·z (z standard normal) with c along `axis`: non-trivial per-channel means and scales.
fn channel_input(rng: &mut Pcg64, shape: &[usize], axis: usize) -> ArrayD<f64> {
    let c = shape[axis];
    let mu: Vec<f64> = (0..c).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let sc: Vec<f64> = (0..c).map(|_| rng.gen_range(0.5..2.0)).collect();
    let mut x = randn(rng, shape);
    for (idx, v) in x.indexed_iter_mut() {
        let ch = idx[axis];
        *v = mu[ch] + sc[ch] * *v;
    }
    x
}

fn loss<L: Layer<f64>>(l: &mut L, x: &ArrayD<f64>, r: &ArrayD<f64>, mode: Ctx) -> f64 {
    let y = l.forward(x, mode).expect("forward");
    y.iter().zip(r.iter()).map(|(a, b)| a * b).sum()
}

/// max |fd - an| / max(1, max |an|).
fn rel_err(fd: &[f64], an: &[f64]) -> f64 {
    assert_eq!(fd.len(), an.len());
    let scale = an.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    fd.iter()
        .zip(an)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

fn param_names<L: Layer<f64>>(l: &mut L) -> Vec<(String, usize)> {
    let mut v = vec![];
    l.visit_params("", &mut |n, p| v.push((n.to_string(), p.len())));
    v
}

/// Checks dx and every parameter gradient of `base` at `x` in `mode`; `expect_params` lists the parameter names the
/// layer must expose. Returns the worst error.
fn gradcheck<L: Layer<f64> + Clone>(
    what: &str,
    base: &L,
    x: &ArrayD<f64>,
    mode: Ctx,
    expect_params: &[&str],
    seed: u64,
) -> f64 {
    let r = randn(&mut rng(seed ^ 0x5eed), x.shape());
    // analytic
    let mut l = base.clone();
    l.zero_grad();
    l.forward(x, mode).expect("forward");
    let dx = l.backward(x, &r, mode).expect("backward");
    let mut grads: Vec<(String, Vec<f64>)> = vec![];
    l.visit_params("", &mut |n, p| {
        grads.push((n.to_string(), p.grad.iter().copied().collect()))
    });
    let names: Vec<String> = grads.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, expect_params, "{what}: parameter names");

    // finite differences in x
    let mut fd = vec![0.0; x.len()];
    let mut xp = x.clone();
    for (i, f) in fd.iter_mut().enumerate() {
        let x0 = xp.as_slice().unwrap()[i];
        xp.as_slice_mut().unwrap()[i] = x0 + H;
        let lp = loss(&mut base.clone(), &xp, &r, mode);
        xp.as_slice_mut().unwrap()[i] = x0 - H;
        let lm = loss(&mut base.clone(), &xp, &r, mode);
        xp.as_slice_mut().unwrap()[i] = x0;
        *f = (lp - lm) / (2.0 * H);
    }
    let dxv: Vec<f64> = dx.iter().copied().collect();
    assert!(
        dxv.iter().any(|v| v.abs() > 1e-3),
        "{what}: dx is (nearly) zero"
    );
    let mut worst = rel_err(&fd, &dxv);
    assert!(worst < TOL, "{what} ({mode:?}): dx error {worst:e}");

    // finite differences in each parameter
    let pn = param_names(&mut base.clone());
    for ((name, len), (_, an)) in pn.iter().zip(&grads) {
        let mut fd = vec![0.0; *len];
        for (j, f) in fd.iter_mut().enumerate() {
            let eval_at = |delta: f64| {
                let mut lp = base.clone();
                lp.visit_params("", &mut |n, p| {
                    if n == name {
                        p.value.as_slice_mut().unwrap()[j] += delta;
                    }
                });
                loss(&mut lp, x, &r, mode)
            };
            *f = (eval_at(H) - eval_at(-H)) / (2.0 * H);
        }
        assert!(
            an.iter().any(|v| v.abs() > 1e-3),
            "{what}: d{name} is (nearly) zero"
        );
        let e = rel_err(&fd, an);
        assert!(e < TOL, "{what} ({mode:?}): d{name} error {e:e}");
        worst = worst.max(e);
    }
    println!("{what:<48} {mode:?}: worst rel err {worst:.2e}");
    worst
}

/// Random weight and bias for a layer that has them.
fn randomize_params<L: Layer<f64>>(l: &mut L, rng: &mut Pcg64) {
    l.visit_params("", &mut |n, p| {
        let (lo, hi) = match n {
            "weight" => (0.5, 1.5),
            "bias" => (-0.5, 0.5),
            "l" => (-0.2, 1.2),
            _ => (-1.0, 1.0),
        };
        for v in p.value.iter_mut() {
            *v = rng.gen_range(lo..hi);
        }
    });
}

/// A few train steps on fresh batches of `shape`, so the running statistics are non-trivial.
fn warm_up<L: Layer<f64>>(l: &mut L, shape: &[usize], axis: usize, rng: &mut Pcg64) {
    for _ in 0..3 {
        let xb = channel_input(rng, shape, axis);
        l.forward(&xb, Ctx::train()).expect("warm-up forward");
    }
}

const AFFINE: &[&str] = &["weight", "bias"];
const NONE: &[&str] = &[];

// ---------------------------------------------------------------------------------------------------------------
// BatchNorm

fn bn_case(what: &str, cfg: BatchNormConfig, shape: &[usize], seed: u64) {
    bn_case_relu(what, cfg, false, shape, seed)
}

fn bn_case_relu(what: &str, cfg: BatchNormConfig, relu: bool, shape: &[usize], seed: u64) {
    let mut g = rng(seed);
    let affine = cfg.affine;
    let tracked = cfg.track_running_stats;
    let mut bn: BatchNorm<f64> = cfg.clone().build().unwrap();
    randomize_params(&mut bn, &mut g);
    let params = if affine { AFFINE } else { NONE };
    for mode in [Ctx::train(), Ctx::eval()] {
        let mut layer = bn.clone();
        if mode == Ctx::eval() && tracked {
            warm_up(&mut layer, shape, 1, &mut g);
            let rm = layer.running_mean().unwrap();
            assert!(
                rm.iter().any(|v| v.abs() > 0.1),
                "{what}: warm-up left running_mean ~ 0"
            );
        }
        // Fused ReLU: draw inputs until no pre-activation lies within RELU_MARGIN of the kink.
        let x = loop {
            let x = channel_input(&mut g, shape, 1);
            if !relu {
                break x;
            }
            let t = layer.clone().forward(&x, mode).unwrap();
            let pos = t.iter().filter(|v| **v > 0.0).count();
            if t.iter().all(|v| v.abs() > RELU_MARGIN) && pos > 0 && pos < t.len() {
                break x;
            }
        };
        if relu {
            gradcheck(what, &Relu(layer), &x, mode, params, seed);
        } else {
            gradcheck(what, &layer, &x, mode, params, seed);
        }
    }
}

#[test]
fn batch_norm_1d_nc_s1() {
    bn_case(
        "BN1d (7,5) S=1",
        BatchNormConfig::d1(5).momentum(Some(0.3)),
        &[7, 5],
        1,
    );
}

#[test]
fn batch_norm_1d_nc_s1_many_channel_blocks() {
    // C = 37 splits the S = 1 kernels into several channel blocks.
    bn_case(
        "BN1d (6,37) S=1",
        BatchNormConfig::d1(37).momentum(Some(0.3)),
        &[6, 37],
        2,
    );
}

#[test]
fn batch_norm_1d_ncl() {
    bn_case(
        "BN1d (5,3,7)",
        BatchNormConfig::d1(3).momentum(Some(0.3)),
        &[5, 3, 7],
        3,
    );
}

#[test]
fn batch_norm_2d() {
    bn_case(
        "BN2d (3,4,5,3)",
        BatchNormConfig::d2(4).momentum(Some(0.3)),
        &[3, 4, 5, 3],
        4,
    );
}

#[test]
fn batch_norm_3d() {
    bn_case(
        "BN3d (2,3,3,2,3)",
        BatchNormConfig::d3(3).momentum(Some(0.3)),
        &[2, 3, 3, 2, 3],
        5,
    );
}

#[test]
fn batch_norm_affine_off() {
    bn_case(
        "BN affine=off (4,3,5)",
        BatchNormConfig::new(3).affine(false),
        &[4, 3, 5],
        6,
    );
    bn_case(
        "BN affine=off (9,4) S=1",
        BatchNormConfig::new(4).affine(false),
        &[9, 4],
        7,
    );
}

#[test]
fn batch_norm_no_running_stats() {
    // Eval without running statistics normalises with batch statistics: the full batch-stat gradient again.
    let cfg = BatchNormConfig::new(3).track_running_stats(false);
    bn_case("BN track=off (4,3,5)", cfg, &[4, 3, 5], 8);
    let cfg = BatchNormConfig::new(4).track_running_stats(false);
    bn_case("BN track=off (6,4) S=1", cfg, &[6, 4], 9);
}

#[test]
fn batch_norm_fused_relu() {
    let cfg = BatchNormConfig::d2(3).momentum(Some(0.3));
    bn_case_relu("BN+ReLU (4,3,5,3)", cfg, true, &[4, 3, 5, 3], 10);
    let cfg = BatchNormConfig::d1(6).momentum(Some(0.3));
    bn_case_relu("BN+ReLU (9,6) S=1", cfg, true, &[9, 6], 11);
    let cfg = BatchNormConfig::new(3).affine(false);
    bn_case_relu("BN+ReLU affine=off (5,3,4)", cfg, true, &[5, 3, 4], 12);
}

#[test]
fn batch_norm_keras_convention() {
    bn_case(
        "BN keras (5,3,4,3)",
        BatchNormConfig::keras(3).momentum(Some(0.6)),
        &[5, 3, 4, 3],
        13,
    );
    bn_case(
        "BN keras (8,5) S=1",
        BatchNormConfig::keras(5).momentum(Some(0.6)),
        &[8, 5],
        14,
    );
}

#[test]
fn batch_norm_cumulative_momentum() {
    bn_case(
        "BN momentum=None (4,3,6)",
        BatchNormConfig::new(3).momentum(None),
        &[4, 3, 6],
        15,
    );
}

// ---------------------------------------------------------------------------------------------------------------
// FrozenBatchNorm (dx only)

fn frozen_case(what: &str, c: usize, shape: &[usize], relu: bool, seed: u64) {
    frozen_case_with(what, c, shape, relu, seed, false)
}

fn frozen_case_with(
    what: &str,
    c: usize,
    shape: &[usize],
    relu: bool,
    seed: u64,
    train_affine: bool,
) {
    let mut g = rng(seed);
    let mut f: FrozenBatchNorm<f64> = FrozenBatchNormConfig::new(c)
        .train_affine(train_affine)
        .build()
        .unwrap();
    let params = if train_affine { AFFINE } else { NONE };
    let mut sd = StateDict::new();
    sd.insert_float("weight".into(), &uniform(&mut g, c, -1.5, 1.5));
    sd.insert_float("bias".into(), &uniform(&mut g, c, -0.5, 0.5));
    sd.insert_float("running_mean".into(), &uniform(&mut g, c, -2.0, 2.0));
    sd.insert_float("running_var".into(), &uniform(&mut g, c, 0.3, 3.0));
    f.load_state("", &sd).unwrap();
    for mode in [Ctx::train(), Ctx::eval()] {
        let x = loop {
            let x = channel_input(&mut g, shape, 1);
            if !relu {
                break x;
            }
            let t = f.clone().forward(&x, mode).unwrap();
            if t.iter().all(|v| v.abs() > RELU_MARGIN) {
                break x;
            }
        };
        if relu {
            gradcheck(what, &Relu(f.clone()), &x, mode, params, seed);
        } else {
            gradcheck(what, &f, &x, mode, params, seed);
        }
    }
}

#[test]
fn frozen_batch_norm() {
    frozen_case("FrozenBN (3,4,5,3)", 4, &[3, 4, 5, 3], false, 20);
    frozen_case("FrozenBN (6,5) S=1", 5, &[6, 5], false, 21);
    frozen_case("FrozenBN+ReLU (3,4,5)", 4, &[3, 4, 5], true, 22);
}

/// FrozenBatchNorm with a trainable affine (fine-tuning with `--bn eval-stats`): dx, dweight and dbias.
#[test]
fn frozen_batch_norm_trainable_affine() {
    frozen_case_with(
        "FrozenBN affine (3,4,5,3)",
        4,
        &[3, 4, 5, 3],
        false,
        23,
        true,
    );
    frozen_case_with("FrozenBN affine (6,5) S=1", 5, &[6, 5], false, 24, true);
    frozen_case_with(
        "FrozenBN affine+ReLU (3,4,5)",
        4,
        &[3, 4, 5],
        true,
        25,
        true,
    );
}

// ---------------------------------------------------------------------------------------------------------------
// GroupNorm

fn gn_case(what: &str, cfg: GroupNormConfig, shape: &[usize], seed: u64) {
    let mut g = rng(seed);
    let params = if cfg.affine { AFFINE } else { NONE };
    let mut gn: GroupNorm<f64> = cfg.build().unwrap();
    randomize_params(&mut gn, &mut g);
    for mode in [Ctx::train(), Ctx::eval()] {
        let x = channel_input(&mut g, shape, 1);
        gradcheck(what, &gn, &x, mode, params, seed);
    }
}

#[test]
fn group_norm_several_groups() {
    for (i, groups) in [1usize, 2, 3, 6].into_iter().enumerate() {
        gn_case(
            &format!("GN G={groups} (3,6,4,3)"),
            GroupNormConfig::new(groups, 6),
            &[3, 6, 4, 3],
            30 + i as u64,
        );
    }
}

#[test]
fn group_norm_other_shapes() {
    gn_case("GN G=2 (3,6,5)", GroupNormConfig::new(2, 6), &[3, 6, 5], 35);
    gn_case("GN G=2 (4,6) S=1", GroupNormConfig::new(2, 6), &[4, 6], 36);
    gn_case(
        "GN G=2 affine=off (3,4,3,3)",
        GroupNormConfig::new(2, 4).affine(false),
        &[3, 4, 3, 3],
        37,
    );
}

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm

fn ln_case(what: &str, cfg: LayerNormConfig, shape: &[usize], params: &[&str], seed: u64) {
    let mut g = rng(seed);
    let mut ln: LayerNorm<f64> = cfg.build().unwrap();
    randomize_params(&mut ln, &mut g);
    for mode in [Ctx::train(), Ctx::eval()] {
        // per-"channel" statistics along the last axis make the rows' statistics differ
        let x = channel_input(&mut g, shape, shape.len() - 1);
        gradcheck(what, &ln, &x, mode, params, seed);
    }
}

#[test]
fn layer_norm_last_one_two_three_dims() {
    let shape = [3, 4, 5, 3];
    ln_case(
        "LN [3] on (3,4,5,3)",
        LayerNormConfig::new(&[3]),
        &shape,
        AFFINE,
        40,
    );
    ln_case(
        "LN [5,3] on (3,4,5,3)",
        LayerNormConfig::new(&[5, 3]),
        &shape,
        AFFINE,
        41,
    );
    ln_case(
        "LN [4,5,3] on (3,4,5,3)",
        LayerNormConfig::new(&[4, 5, 3]),
        &shape,
        AFFINE,
        42,
    );
    ln_case(
        "LN [7] on (6,7)",
        LayerNormConfig::new(&[7]),
        &[6, 7],
        AFFINE,
        43,
    );
}

#[test]
fn layer_norm_affine_variants() {
    let shape = [3, 4, 5];
    ln_case(
        "LN [4,5] no affine",
        LayerNormConfig::new(&[4, 5]).elementwise_affine(false),
        &shape,
        NONE,
        44,
    );
    ln_case(
        "LN [4,5] bias=false",
        LayerNormConfig::new(&[4, 5]).bias(false),
        &shape,
        &["weight"],
        45,
    );
}

// ---------------------------------------------------------------------------------------------------------------
// InstanceNorm

fn in_case(what: &str, cfg: InstanceNormConfig, shape: &[usize], seed: u64) {
    let mut g = rng(seed);
    let params = if cfg.affine { AFFINE } else { NONE };
    let tracked = cfg.track_running_stats;
    let mut inorm: InstanceNorm<f64> = cfg.build().unwrap();
    randomize_params(&mut inorm, &mut g);
    let unbatched = shape.len() == inorm.config().spatial_dims + 1;
    let axis = if unbatched { 0 } else { 1 };
    for mode in [Ctx::train(), Ctx::eval()] {
        let mut layer = inorm.clone();
        if mode == Ctx::eval() && tracked {
            warm_up(&mut layer, shape, axis, &mut g);
            let rm = layer.running_mean().unwrap();
            assert!(
                rm.iter().any(|v| v.abs() > 0.1),
                "{what}: warm-up left running_mean ~ 0"
            );
        }
        let x = channel_input(&mut g, shape, axis);
        gradcheck(what, &layer, &x, mode, params, seed);
    }
}

#[test]
fn instance_norm_affine() {
    in_case(
        "IN2d affine (3,4,5,3)",
        InstanceNormConfig::d2(4).affine(true),
        &[3, 4, 5, 3],
        50,
    );
    in_case(
        "IN1d affine (3,4,7)",
        InstanceNormConfig::d1(4).affine(true),
        &[3, 4, 7],
        51,
    );
    in_case(
        "IN2d no affine (2,3,4,4)",
        InstanceNormConfig::d2(3),
        &[2, 3, 4, 4],
        52,
    );
}

#[test]
fn instance_norm_running_stats_eval() {
    let cfg = InstanceNormConfig::d2(4)
        .affine(true)
        .track_running_stats(true)
        .momentum(Some(0.4));
    in_case("IN2d affine+track (3,4,5,3)", cfg, &[3, 4, 5, 3], 53);
    let cfg = InstanceNormConfig::d2(3)
        .track_running_stats(true)
        .momentum(Some(0.4));
    in_case("IN2d track, no affine (2,3,4,5)", cfg, &[2, 3, 4, 5], 54);
}

#[test]
fn instance_norm_unbatched() {
    in_case(
        "IN2d unbatched (4,5,3)",
        InstanceNormConfig::d2(4).affine(true),
        &[4, 5, 3],
        55,
    );
    let cfg = InstanceNormConfig::d2(4)
        .affine(true)
        .track_running_stats(true)
        .momentum(Some(0.4));
    in_case("IN2d unbatched+track (4,5,3)", cfg, &[4, 5, 3], 56);
}

// ---------------------------------------------------------------------------------------------------------------
// BatchChannelNorm (weight, bias and the BN/LN mix l)

fn bcn_case(what: &str, c: usize, shape: &[usize], seed: u64) {
    let mut g = rng(seed);
    let mut cfg = BatchChannelNormConfig::new(c);
    cfg.momentum = Some(0.4);
    let mut bcn: BatchChannelNorm<f64> = cfg.build().unwrap();
    randomize_params(&mut bcn, &mut g);
    assert!(bcn.l().value.iter().any(|v| (*v - 1.0).abs() > 0.1));
    for mode in [Ctx::train(), Ctx::eval()] {
        let mut layer = bcn.clone();
        if mode == Ctx::eval() {
            warm_up(&mut layer, shape, 1, &mut g);
            assert!(layer.running_mean().unwrap().iter().any(|v| v.abs() > 0.1));
        }
        let x = channel_input(&mut g, shape, 1);
        gradcheck(what, &layer, &x, mode, &["weight", "bias", "l"], seed);
    }
}

#[test]
fn batch_channel_norm() {
    bcn_case("BCN (4,3,5,3)", 3, &[4, 3, 5, 3], 60);
    bcn_case("BCN (4,3,6)", 3, &[4, 3, 6], 61);
    bcn_case("BCN (7,5) S=1", 5, &[7, 5], 62);
}

// ---------------------------------------------------------------------------------------------------------------

/// Parameter gradients accumulate across backward calls (PyTorch semantics), for every layer with parameters.
#[test]
fn parameter_gradients_accumulate() {
    fn twice<L: Layer<f64> + Clone>(mut l: L, x: &ArrayD<f64>, mode: Ctx) {
        let r = randn(&mut rng(99), x.shape());
        l.zero_grad();
        Layer::forward(&mut l, x, mode).unwrap();
        Layer::backward(&mut l, x, &r, mode).unwrap();
        let mut once = vec![];
        l.visit_params("", &mut |_, p| once.push(p.grad.clone()));
        Layer::backward(&mut l, x, &r, mode).unwrap();
        let mut i = 0;
        l.visit_params("", &mut |n, p| {
            for (a, b) in p.grad.iter().zip(once[i].iter()) {
                assert!(
                    (a - 2.0 * b).abs() <= 1e-12 * (1.0 + b.abs()),
                    "{n}: {a} vs 2·{b}"
                );
            }
            i += 1;
        });
        assert!(i > 0);
    }
    let mut g = rng(7);
    let x = channel_input(&mut g, &[3, 4, 3, 2], 1);
    for mode in [Ctx::train(), Ctx::eval()] {
        twice(BatchNormConfig::new(4).build::<f64>().unwrap(), &x, mode);
        twice(GroupNormConfig::new(2, 4).build::<f64>().unwrap(), &x, mode);
        twice(
            LayerNormConfig::new(&[3, 2]).build::<f64>().unwrap(),
            &x,
            mode,
        );
        twice(
            InstanceNormConfig::d2(4)
                .affine(true)
                .build::<f64>()
                .unwrap(),
            &x,
            mode,
        );
        twice(
            BatchChannelNormConfig::new(4).build::<f64>().unwrap(),
            &x,
            mode,
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Batch Renorm and Ghost BN

/// Batch Renorm at a step past its ramps. r and d are constants in its backward (the paper's stop_gradient),
/// so finite differences agree with it where r and d do not move with x: at r_max = 1, d_max = 0 (BatchNorm),
/// and where both are clipped at their limits (running statistics far from the batch's).
#[test]
fn batch_renorm() {
    let sched = RenormSchedule::Steps {
        warmup: 0,
        d_full: 1,
        r_full: 1,
    };
    let step = Ctx::train().with_step(10);
    for (what, shape, r_max, d_max, far) in [
        (
            "Renorm as BN (4,3,5,3)",
            &[4usize, 3, 5, 3][..],
            1.0,
            0.0,
            false,
        ),
        (
            "Renorm clipped (4,3,5,3)",
            &[4, 3, 5, 3][..],
            2.0,
            0.5,
            true,
        ),
        ("Renorm clipped (7,5) S=1", &[7, 5][..], 3.0, 5.0, true),
    ] {
        let mut g = rng(70);
        let c = shape[1];
        let mut rn: BatchRenorm<f64> = BatchRenormConfig::new(c)
            .limits(r_max, d_max)
            .schedule(sched)
            .build()
            .unwrap();
        randomize_params(&mut rn, &mut g);
        if far {
            let (rm, rv) = rn.batch_norm_mut().running_stats_mut().unwrap();
            rm.fill(1000.0);
            rv.fill(1e4);
        }
        let x = channel_input(&mut g, shape, 1);
        gradcheck(what, &rn, &x, step, AFFINE, 71);
        if far {
            let mut l = rn.clone();
            l.forward(&x, step).unwrap();
            let (r, d) = l.last_correction().unwrap();
            assert!(
                r.iter().all(|&v| v == 1.0 / r_max),
                "{what}: r {r:?} not clipped"
            );
            assert!(
                d.iter().all(|&v| v == -d_max),
                "{what}: d {d:?} not clipped"
            );
        }
        // eval mode: a BatchNorm on the running statistics
        let mut l = rn.clone();
        warm_up(&mut l, shape, 1, &mut g);
        gradcheck(
            what,
            &l,
            &channel_input(&mut g, shape, 1),
            Ctx::eval(),
            AFFINE,
            72,
        );
    }
}

#[test]
fn ghost_batch_norm() {
    for (what, shape, ghost) in [
        ("Ghost 2 of (6,3,4,3)", &[6usize, 3, 4, 3][..], 2),
        ("Ghost 4 of (10,3,5) ragged", &[10, 3, 5][..], 4),
        ("Ghost 3 of (9,4) S=1", &[9, 4][..], 3),
    ] {
        let mut g = rng(80);
        let mut gb: GhostBatchNorm<f64> =
            GhostBatchNormConfig::new(shape[1], ghost).build().unwrap();
        randomize_params(&mut gb, &mut g);
        for mode in [Ctx::train(), Ctx::eval()] {
            let mut l = gb.clone();
            if mode == Ctx::eval() {
                warm_up(&mut l, shape, 1, &mut g);
            }
            gradcheck(what, &l, &channel_input(&mut g, shape, 1), mode, AFFINE, 81);
        }
    }
}
