//! Numerical stability on hard data: f32 input with mean 1e4 and standard deviation 1e-1 (shape (8, 3, 16, 16)).
//!
//! At 1e4 an f32 has an ulp of 2^-10 ≈ 9.8e-4, so E[x²] ≈ 1e8 carries an absolute rounding error of ~4 per term
//! while the variance is 1e-2: the textbook E[x²] − E[x]² in f32 is meaningless here (demonstrated below). The
//! layers must instead produce what an f64 computation on the same f32 inputs produces, up to the rounding of the
//! f32 output. The reference is computed directly in this file (two-pass, in f64, from the f32 inputs cast to f64).
//!
//! Tolerances asserted (measured worst values in brackets; printed with `-- --nocapture`):
//! - x̂ and y = γ·x̂ + β, training forward (BatchNorm 2d and 1d/S=1, GroupNorm G=1 and G=3, LayerNorm over the last
//!   1, 2, 3 dims): absolute ≤ 1e-6 [4.9e-7], i.e. a few f32 ulps of |y| ≤ ~5. (The f32-rounded mean alone is off by up to
//!   ulp(1e4)/2 ≈ 5e-4 = 5e-3 σ; the kernels subtract it exactly and fold the residual into the shift.)
//! - batch mean and biased variance saved by the forward (f64), and `local_moments`: relative ≤ 1e-12.
//! - running_mean / running_var (stored in f32): relative ≤ f32::EPSILON [3.4e-8], i.e. correctly rounded.
//! - dx: max |dx − dx_ref| ≤ 5e-7 · max |dx_ref| [1.4e-7] (|dx| up to ~50 here).
//! - dγ, dβ: |error| ≤ 1e-7 · Σ|terms| for BatchNorm/GroupNorm [8.6e-9]; ≤ 1e-6 · Σ|terms| for LayerNorm [2.0e-7].
//! - eval mode (running statistics): tests/numerics_eval.rs.

use ndarray::{ArrayD, Axis, Dimension, IxDyn};
use normvision::internals::planes::local_moments;
use normvision::internals::planes::train_forward;
use normvision::internals::stats::Ncs;
use normvision::norm::*;
use normvision::state::Stateful;
use normvision::{Ctx, Layer};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;

const SHAPE: [usize; 4] = [8, 3, 16, 16];
const EPS: f64 = 1e-5;
/// |x̂ − x̂_ref| and |y − y_ref| bound (absolute).
const Y_ATOL: f64 = 1e-6;
/// max |dx − dx_ref| / max |dx_ref|.
const DX_RTOL: f64 = 5e-7;
/// Bound for parameter gradients (sums over the batch) relative to Σ|terms| of the sum.
const DP_RTOL: f64 = 1e-7;
/// LayerNorm accumulates dweight/dbias across rows in the element type (as PyTorch's CPU kernel does with
/// `opmath_t` = float), so its bound is looser: measured ≤ 2e-7 here against ≤ 1e-8 for BatchNorm and GroupNorm,
/// whose parameter-gradient sums run in f64.
const LN_DP_RTOL: f64 = 1e-6;

/// x = 1e4 + 0.3·c + 0.1·z in f32: mean 1e4 (per channel slightly offset), standard deviation 1e-1.
fn hard_input(seed: u64) -> ArrayD<f32> {
    let mut g = Pcg64::seed_from_u64(seed);
    ArrayD::from_shape_fn(IxDyn(&SHAPE), |i| {
        let z: f64 = g.sample(StandardNormal);
        (1e4 + 0.3 * i[1] as f64 + 0.1 * z) as f32
    })
}

fn randn32(seed: u64, shape: &[usize]) -> ArrayD<f32> {
    let mut g = Pcg64::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || g.sample::<f64, _>(StandardNormal) as f32)
}

fn to64(a: &ArrayD<f32>) -> ArrayD<f64> {
    a.mapv(|v| v as f64)
}

/// Worst |a − b| over all elements.
fn max_abs_err(a: &ArrayD<f32>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(p, q)| (*p as f64 - q).abs())
        .fold(0.0, f64::max)
}

fn max_abs(a: &ArrayD<f64>) -> f64 {
    a.iter().fold(0.0f64, |m, v| m.max(v.abs()))
}

/// Reference normalisation of `x` (f64) over blocks given by `key(index) -> block`: returns
/// (x̂, per-block mean, per-block biased variance, per-block count).
fn reference_norm(
    x: &ArrayD<f64>,
    blocks: usize,
    key: impl Fn(&[usize]) -> usize,
) -> (ArrayD<f64>, Vec<f64>, Vec<f64>, Vec<usize>) {
    let mut sum = vec![0.0; blocks];
    let mut cnt = vec![0usize; blocks];
    for (i, v) in x.indexed_iter() {
        let b = key(i.slice());
        sum[b] += v;
        cnt[b] += 1;
    }
    let mean: Vec<f64> = sum.iter().zip(&cnt).map(|(s, n)| s / *n as f64).collect();
    let mut m2 = vec![0.0; blocks];
    for (i, v) in x.indexed_iter() {
        let b = key(i.slice());
        m2[b] += (v - mean[b]).powi(2);
    }
    let var: Vec<f64> = m2.iter().zip(&cnt).map(|(m, n)| m / *n as f64).collect();
    let mut xh = x.clone();
    for (i, v) in xh.indexed_iter_mut() {
        let b = key(i.slice());
        *v = (*v - mean[b]) / (var[b] + EPS).sqrt();
    }
    (xh, mean, var, cnt)
}

/// Reference dx of a normalisation with batch statistics: per block,
/// dx = invstd·(u − mean(u) − x̂·mean(u·x̂)) with u = dy·γ (γ per element).
fn reference_dx(
    xh: &ArrayD<f64>,
    u: &ArrayD<f64>,
    var: &[f64],
    key: impl Fn(&[usize]) -> usize,
) -> ArrayD<f64> {
    let blocks = var.len();
    let mut su = vec![0.0; blocks];
    let mut sux = vec![0.0; blocks];
    let mut cnt = vec![0.0; blocks];
    for ((i, a), b) in u.indexed_iter().zip(xh.iter()) {
        let k = key(i.slice());
        su[k] += a;
        sux[k] += a * b;
        cnt[k] += 1.0;
    }
    let mut dx = u.clone();
    for ((i, d), b) in dx.indexed_iter_mut().zip(xh.iter()) {
        let k = key(i.slice());
        *d = (*d - su[k] / cnt[k] - b * sux[k] / cnt[k]) / (var[k] + EPS).sqrt();
    }
    dx
}

#[test]
fn the_data_is_hard_for_naive_f32_variance() {
    let x = hard_input(1);
    let (_, mean, var, _) = reference_norm(&to64(&x), 3, |i| i[1]);
    let mut worst_acc = 0.0f64;
    for c in 0..3 {
        let vals: Vec<f32> = x.index_axis(Axis(1), c).iter().copied().collect();
        let n = vals.len() as f32;
        // textbook one-pass formula, all in f32
        let (mut s, mut s2) = (0.0f32, 0.0f32);
        for v in &vals {
            s += v;
            s2 += v * v;
        }
        let m = s / n;
        let naive = s2 / n - m * m;
        // even with f64 accumulation, squaring in f32 loses everything
        let s2_acc: f64 = vals.iter().map(|v| (v * v) as f64).sum();
        let m_acc: f64 = vals.iter().map(|v| *v as f64).sum::<f64>() / vals.len() as f64;
        let naive_acc = s2_acc / vals.len() as f64 - m_acc * m_acc;
        println!(
            "channel {c}: mean {:.6} var {:.3e}; naive f32 var {naive:.3e}; f32 squares + f64 sums {naive_acc:.3e}",
            mean[c], var[c]
        );
        assert!(
            (var[c] - 0.01).abs() < 2e-3,
            "reference variance {}",
            var[c]
        );
        assert!(
            (naive as f64 - var[c]).abs() > 10.0 * var[c],
            "naive f32 variance {naive} is unexpectedly close to {}",
            var[c]
        );
        worst_acc = worst_acc.max((naive_acc - var[c]).abs() / var[c]);
    }
    assert!(
        worst_acc > 0.3,
        "squaring in f32 lost only {worst_acc} of the variance"
    );
}

#[test]
fn batch_norm_train_forward_statistics_and_backward() {
    let x = hard_input(2);
    let x64 = to64(&x);
    let key = |i: &[usize]| i[1];
    let (xh, mean, var, cnt) = reference_norm(&x64, 3, key);

    // saved statistics (what the training forward hands to its backward) and the mergeable moments
    let mut scratch = vec![0.0f32; x.len()];
    let d = Ncs { n: 8, c: 3, s: 256 };
    let st = train_forward(
        x.as_slice().unwrap(),
        &mut scratch,
        d,
        None,
        None,
        EPS,
        false,
        normvision::KernelOptions::default(),
    );
    let mo = local_moments(
        x.as_slice().unwrap(),
        d,
        normvision::KernelOptions::default(),
    );
    for c in 0..3 {
        let m2 = var[c] * cnt[c] as f64;
        assert!(
            (st.mean[c] - mean[c]).abs() <= 1e-12 * mean[c],
            "saved mean {c}"
        );
        assert!(
            (st.var[c] - var[c]).abs() <= 1e-12 * var[c],
            "saved var {c}: {} vs {}",
            st.var[c],
            var[c]
        );
        assert!((st.invstd[c] - 1.0 / (var[c] + EPS).sqrt()).abs() <= 1e-12 * st.invstd[c]);
        assert!((mo.mean[c] - mean[c]).abs() <= 1e-12 * mean[c]);
        assert!((mo.m2[c] - m2).abs() <= 1e-12 * m2, "moments m2 {c}");
    }
    let e_xh = max_abs_err(
        &ArrayD::from_shape_vec(IxDyn(&SHAPE), scratch).unwrap(),
        &xh,
    );

    // the layer, with an affine and the running update, momentum 1 (running stats = this batch's) and default
    let mut g = Pcg64::seed_from_u64(3);
    let w: Vec<f32> = (0..3).map(|_| g.gen_range(0.5f32..2.0)).collect();
    let b: Vec<f32> = (0..3).map(|_| g.gen_range(-1.0f32..1.0)).collect();
    let mut bn: BatchNorm<f32> = BatchNormConfig::d2(3).momentum(Some(1.0)).build().unwrap();
    bn.weight_mut().unwrap().value = ArrayD::from_shape_vec(IxDyn(&[3]), w.clone()).unwrap();
    bn.bias_mut().unwrap().value = ArrayD::from_shape_vec(IxDyn(&[3]), b.clone()).unwrap();
    let mut bn_default = bn.clone();
    bn_default.set_momentum(Some(0.1)).unwrap();

    let y = bn.forward(&x, Ctx::train()).unwrap();
    let y_ref = ArrayD::from_shape_fn(IxDyn(&SHAPE), |i| w[i[1]] as f64 * xh[&i] + b[i[1]] as f64);
    let e_y = max_abs_err(&y, &y_ref);

    let rm = bn.running_mean().unwrap();
    let rv = bn.running_var().unwrap();
    bn_default.forward(&x, Ctx::train()).unwrap();
    let rm_d = bn_default.running_mean().unwrap();
    let rv_d = bn_default.running_var().unwrap();
    let f32_rel = f32::EPSILON as f64; // 2 half-ulps
    let mut e_run = 0.0f64;
    for c in 0..3 {
        let unb = var[c] * cnt[c] as f64 / (cnt[c] as f64 - 1.0);
        let checks = [
            (rm[c] as f64, mean[c]),
            (rv[c] as f64, unb),
            (rm_d[c] as f64, 0.1 * mean[c]),
            (rv_d[c] as f64, 0.9 + 0.1 * unb),
        ];
        for (k, (got, want)) in checks.into_iter().enumerate() {
            let rel = (got - want).abs() / want.abs();
            e_run = e_run.max(rel);
            assert!(
                rel <= f32_rel,
                "running stat {k} of channel {c}: {got} vs {want} (rel {rel:e})"
            );
        }
    }

    // backward
    let dy = randn32(4, &SHAPE);
    bn.zero_grad();
    let dx = bn.backward(&x, &dy, Ctx::train()).unwrap();
    let u = ArrayD::from_shape_fn(IxDyn(&SHAPE), |i| dy[&i] as f64 * w[i[1]] as f64);
    let dx_ref = reference_dx(&xh, &u, &var, key);
    let e_dx = max_abs_err(&dx, &dx_ref) / max_abs(&dx_ref);
    let mut e_dp = 0.0f64;
    for c in 0..3 {
        let (mut gw, mut gb, mut aw, mut ab) = (0.0, 0.0, 0.0, 0.0);
        for (i, v) in dy.indexed_iter() {
            if i[1] == c {
                gw += *v as f64 * xh[&i];
                gb += *v as f64;
                aw += (*v as f64 * xh[&i]).abs();
                ab += (*v as f64).abs();
            }
        }
        let got_w = bn.weight().unwrap().grad[c] as f64;
        let got_b = bn.bias().unwrap().grad[c] as f64;
        e_dp = e_dp.max((got_w - gw).abs() / aw);
        e_dp = e_dp.max((got_b - gb).abs() / ab);
    }
    println!(
        "BatchNorm: x̂ {e_xh:.2e}, y {e_y:.2e} (abs); running stats {e_run:.2e} (rel); dx {e_dx:.2e} (rel to max {:.1}); dγ/dβ {e_dp:.2e}",
        max_abs(&dx_ref)
    );
    assert!(e_xh <= Y_ATOL, "x̂ error {e_xh:e}");
    assert!(e_y <= Y_ATOL, "y error {e_y:e}");
    assert!(e_dx <= DX_RTOL, "dx error {e_dx:e}");
    assert!(e_dp <= DP_RTOL, "parameter gradient error {e_dp:e}");
}

/// The S = 1 layout (BatchNorm1d on (N, C)) takes a different kernel path; same data flattened to (2048, 3).
#[test]
fn batch_norm_1d_s1_layout() {
    let x4 = hard_input(5);
    // (N, C, H, W) -> (N·H·W, C): the same values per channel, now with S = 1
    let v: Vec<f32> = x4
        .permuted_axes(IxDyn(&[0, 2, 3, 1]))
        .iter()
        .copied()
        .collect();
    let x = ArrayD::from_shape_vec(IxDyn(&[2048, 3]), v).unwrap();
    let key = |i: &[usize]| i[1];
    let (xh, _, var, _) = reference_norm(&to64(&x), 3, key);
    let mut bn: BatchNorm<f32> = BatchNormConfig::d1(3).affine(false).build().unwrap();
    let y = bn.forward(&x, Ctx::train()).unwrap();
    let e_y = max_abs_err(&y, &xh);
    let dy = randn32(6, &[2048, 3]);
    let dx = bn.backward(&x, &dy, Ctx::train()).unwrap();
    let dx_ref = reference_dx(&xh, &to64(&dy), &var, key);
    let e_dx = max_abs_err(&dx, &dx_ref) / max_abs(&dx_ref);
    println!("BatchNorm1d S=1: y {e_y:.2e} (abs), dx {e_dx:.2e} (rel)");
    assert!(e_y <= Y_ATOL, "y error {e_y:e}");
    assert!(e_dx <= DX_RTOL, "dx error {e_dx:e}");
}

/// The S = 1 kernels cut (N, C) into tiles in three ways, chosen by the thread count and the shape: one tile
/// (small inputs, one thread), one column block of channels per thread (C ≥ 256 per thread; fused), and one row
/// block per thread (fewer channels; staged, partial sums added across blocks). Every way must give the f64
/// reference's y and dx on hard data, on 1, 2 and 3 threads.
#[test]
fn batch_norm_1d_s1_every_tiling_matches_the_reference() {
    for (n, c) in [
        (2048usize, 3usize),
        (8192, 3),
        (64, 1100),
        (40, 1024),
        (3, 600),
    ] {
        let mut g = Pcg64::seed_from_u64(n as u64 * 31 + c as u64);
        let x = ArrayD::from_shape_fn(IxDyn(&[n, c]), |i| {
            let z: f64 = g.sample(StandardNormal);
            (1e4 + 0.3 * i[1] as f64 + 0.1 * z) as f32
        });
        let dy = randn32(9, &[n, c]);
        let key = |i: &[usize]| i[1];
        let (xh, _, var, _) = reference_norm(&to64(&x), c, key);
        let dx_ref = reference_dx(&xh, &to64(&dy), &var, key);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (y, dx, relu_y) = pool.install(|| {
                let mut bn: BatchNorm<f32> = BatchNormConfig::d1(c).affine(false).build().unwrap();
                let y = bn.forward(&x, Ctx::train()).unwrap();
                let dx = bn.backward(&x, &dy, Ctx::train()).unwrap();
                let mut fused: BatchNorm<f32> =
                    BatchNormConfig::d1(c).affine(false).build().unwrap();
                let relu = BnFusion {
                    relu: true,
                    ..Default::default()
                };
                (y, dx, fused.forward_fused(&x, Ctx::train(), relu).unwrap())
            });
            let e_y = max_abs_err(&y, &xh);
            let e_dx = max_abs_err(&dx, &dx_ref) / max_abs(&dx_ref);
            let e_relu = max_abs_err(&relu_y, &xh.mapv(|v| v.max(0.0)));
            println!(
                "({n}, {c}) on {threads} threads: y {e_y:.2e}, relu {e_relu:.2e}, dx {e_dx:.2e}"
            );
            assert!(e_y <= Y_ATOL, "({n}, {c}) T={threads}: y error {e_y:e}");
            assert!(
                e_relu <= Y_ATOL,
                "({n}, {c}) T={threads}: relu y error {e_relu:e}"
            );
            assert!(e_dx <= DX_RTOL, "({n}, {c}) T={threads}: dx error {e_dx:e}");
        }
    }
}

#[test]
fn group_norm_on_hard_data() {
    let x = hard_input(8);
    let x64 = to64(&x);
    let dy = randn32(9, &SHAPE);
    let mut g = Pcg64::seed_from_u64(10);
    let w: Vec<f32> = (0..3).map(|_| g.gen_range(0.5f32..2.0)).collect();
    let b: Vec<f32> = (0..3).map(|_| g.gen_range(-1.0f32..1.0)).collect();
    for groups in [1usize, 3] {
        let cpg = 3 / groups;
        let key = move |i: &[usize]| i[0] * groups + i[1] / cpg;
        let (xh, _, var, _) = reference_norm(&x64, 8 * groups, key);
        let mut gn: GroupNorm<f32> = GroupNormConfig::new(groups, 3).build().unwrap();
        gn.weight_mut().unwrap().value = ArrayD::from_shape_vec(IxDyn(&[3]), w.clone()).unwrap();
        gn.bias_mut().unwrap().value = ArrayD::from_shape_vec(IxDyn(&[3]), b.clone()).unwrap();
        let y = gn.forward(&x, Ctx::train()).unwrap();
        let y_ref =
            ArrayD::from_shape_fn(IxDyn(&SHAPE), |i| w[i[1]] as f64 * xh[&i] + b[i[1]] as f64);
        let e_y = max_abs_err(&y, &y_ref);
        let dx = gn.backward(&x, &dy, Ctx::train()).unwrap();
        let u = ArrayD::from_shape_fn(IxDyn(&SHAPE), |i| dy[&i] as f64 * w[i[1]] as f64);
        let dx_ref = reference_dx(&xh, &u, &var, key);
        let e_dx = max_abs_err(&dx, &dx_ref) / max_abs(&dx_ref);
        let mut e_dp = 0.0f64;
        for c in 0..3 {
            let (mut gw, mut gb, mut aw, mut ab) = (0.0, 0.0, 0.0, 0.0);
            for (i, v) in dy.indexed_iter() {
                if i[1] == c {
                    gw += *v as f64 * xh[&i];
                    gb += *v as f64;
                    aw += (*v as f64 * xh[&i]).abs();
                    ab += (*v as f64).abs();
                }
            }
            e_dp = e_dp.max((gn.weight().unwrap().grad[c] as f64 - gw).abs() / aw);
            e_dp = e_dp.max((gn.bias().unwrap().grad[c] as f64 - gb).abs() / ab);
        }
        println!("GroupNorm G={groups}: y {e_y:.2e} (abs), dx {e_dx:.2e} (rel), dγ/dβ {e_dp:.2e}");
        assert!(e_y <= Y_ATOL, "G={groups}: y error {e_y:e}");
        assert!(e_dx <= DX_RTOL, "G={groups}: dx error {e_dx:e}");
        assert!(
            e_dp <= DP_RTOL,
            "G={groups}: parameter gradient error {e_dp:e}"
        );
    }
}

#[test]
fn layer_norm_on_hard_data() {
    check_layer_norm(&SHAPE, &[vec![16usize], vec![16, 16], vec![3, 16, 16]]);
}

/// Rows longer than the backward's 1024-value chunks (rows of 4551 and 1517 values: the per-row backward with a
/// partial last chunk), and rows of 72000 values (288 KB: the two-phase column backward), on 1, 2 and 3 threads.
#[test]
fn layer_norm_long_rows_on_hard_data() {
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| check_layer_norm(&[2, 3, 37, 41], &[vec![3, 37, 41], vec![37, 41]]));
        pool.install(|| check_layer_norm(&[2, 3, 150, 160], &[vec![3, 150, 160]]));
    }
}

fn check_layer_norm(shape: &[usize], norm_shapes: &[Vec<usize>]) {
    let nd = shape.len();
    let mut g = Pcg64::seed_from_u64(11);
    let x = ArrayD::from_shape_fn(IxDyn(shape), |i| {
        let z: f64 = g.sample(StandardNormal);
        (1e4 + 0.3 * i[1] as f64 + 0.1 * z) as f32
    });
    let x64 = to64(&x);
    let dy = randn32(12, shape);
    for ns in norm_shapes {
        let k = ns.len();
        let lead = shape[..nd - k].to_vec();
        let rows: usize = lead.iter().product();
        let lead2 = lead.clone();
        let key = move |i: &[usize]| {
            i[..nd - k]
                .iter()
                .zip(&lead2)
                .fold(0, |a, (v, d)| a * d + v)
        };
        let (xh, _, var, _) = reference_norm(&x64, rows, &key);
        let mut ln: LayerNorm<f32> = LayerNormConfig::new(ns).build().unwrap();
        let nsz: usize = ns.iter().product();
        let w = randn32(13, ns).mapv(|v| 1.0 + 0.3 * v);
        let b = randn32(14, ns);
        ln.weight_mut().unwrap().value = w.clone();
        ln.bias_mut().unwrap().value = b.clone();
        let wf: Vec<f32> = w.iter().copied().collect();
        let bf: Vec<f32> = b.iter().copied().collect();
        let flat = |i: &IxDyn| {
            i.slice()[nd - k..]
                .iter()
                .zip(ns)
                .fold(0, |a, (v, d)| a * d + v)
        };
        let y = ln.forward(&x, Ctx::train()).unwrap();
        let y_ref = ArrayD::from_shape_fn(IxDyn(shape), |i| {
            let j = flat(&i);
            wf[j] as f64 * xh[&i] + bf[j] as f64
        });
        let e_y = max_abs_err(&y, &y_ref);
        let dx = ln.backward(&x, &dy, Ctx::train()).unwrap();
        let u = ArrayD::from_shape_fn(IxDyn(shape), |i| dy[&i] as f64 * wf[flat(&i)] as f64);
        let dx_ref = reference_dx(&xh, &u, &var, &key);
        let e_dx = max_abs_err(&dx, &dx_ref) / max_abs(&dx_ref);
        let (mut gw, mut gb) = (vec![0.0; nsz], vec![0.0; nsz]);
        let (mut aw, mut ab) = (vec![0.0; nsz], vec![0.0; nsz]);
        for (i, v) in dy.indexed_iter() {
            let j = flat(&i);
            gw[j] += *v as f64 * xh[&i];
            gb[j] += *v as f64;
            aw[j] += (*v as f64 * xh[&i]).abs();
            ab[j] += (*v as f64).abs();
        }
        let mut e_dp = 0.0f64;
        for j in 0..nsz {
            let got_w = ln.weight().unwrap().grad.as_slice().unwrap()[j] as f64;
            let got_b = ln.bias().unwrap().grad.as_slice().unwrap()[j] as f64;
            e_dp = e_dp.max((got_w - gw[j]).abs() / aw[j]);
            e_dp = e_dp.max((got_b - gb[j]).abs() / ab[j]);
        }
        println!("LayerNorm {ns:?}: y {e_y:.2e} (abs), dx {e_dx:.2e} (rel), dγ/dβ {e_dp:.2e}");
        assert!(e_y <= Y_ATOL, "{ns:?}: y error {e_y:e}");
        assert!(e_dx <= DX_RTOL, "{ns:?}: dx error {e_dx:e}");
        assert!(
            e_dp <= LN_DP_RTOL,
            "{ns:?}: parameter gradient error {e_dp:e}"
        );
    }
}

/// Many small blocks (the GroupNorm/InstanceNorm kernels' phased runs of 32 blocks, with several rayon tasks and a
/// partial last run) on hard data, 1 and 2 threads: y and dx as the f64 reference, within the tolerances above.
#[test]
fn group_norm_many_small_blocks_on_hard_data() {
    for (shape, groups) in [
        ([3usize, 700, 7, 7], 700usize), // 2100 blocks of 49: 7 tasks of 334 blocks, partial runs
        ([3, 700, 7, 7], 350),           // blocks of two channels
        ([2, 37, 3, 5], 37),             // 74 blocks of 15: one task, a partial third run
        ([23, 16, 7, 7], 1), // 23 blocks of 784 (two chunks): tasks of 20 and 3, runs of 10, 10, 3
    ] {
        let c = shape[1];
        let cpg = c / groups;
        let mut g = Pcg64::seed_from_u64(21);
        let x = ArrayD::from_shape_fn(IxDyn(&shape), |i| {
            let z: f64 = g.sample(StandardNormal);
            (1e4 + 0.3 * (i[1] % 5) as f64 + 0.1 * z) as f32
        });
        let x64 = to64(&x);
        let dy = randn32(22, &shape);
        let w: Vec<f32> = (0..c).map(|_| g.gen_range(0.5f32..2.0)).collect();
        let b: Vec<f32> = (0..c).map(|_| g.gen_range(-1.0f32..1.0)).collect();
        let key = move |i: &[usize]| i[0] * groups + i[1] / cpg;
        let (xh, _, var, _) = reference_norm(&x64, shape[0] * groups, key);
        let y_ref =
            ArrayD::from_shape_fn(IxDyn(&shape), |i| w[i[1]] as f64 * xh[&i] + b[i[1]] as f64);
        let u = ArrayD::from_shape_fn(IxDyn(&shape), |i| dy[&i] as f64 * w[i[1]] as f64);
        let dx_ref = reference_dx(&xh, &u, &var, key);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (y, dx) = pool.install(|| {
                let mut gn: GroupNorm<f32> = GroupNormConfig::new(groups, c).build().unwrap();
                gn.weight_mut().unwrap().value =
                    ArrayD::from_shape_vec(IxDyn(&[c]), w.clone()).unwrap();
                gn.bias_mut().unwrap().value =
                    ArrayD::from_shape_vec(IxDyn(&[c]), b.clone()).unwrap();
                let y = gn.forward(&x, Ctx::train()).unwrap();
                (y, gn.backward(&x, &dy, Ctx::train()).unwrap())
            });
            let e_y = max_abs_err(&y, &y_ref);
            let e_dx = max_abs_err(&dx, &dx_ref) / max_abs(&dx_ref);
            println!("GroupNorm {shape:?} G={groups} T={threads}: y {e_y:.2e}, dx {e_dx:.2e}");
            assert!(
                e_y <= Y_ATOL,
                "{shape:?} G={groups} T={threads}: y error {e_y:e}"
            );
            assert!(
                e_dx <= DX_RTOL,
                "{shape:?} G={groups} T={threads}: dx error {e_dx:e}"
            );
        }
    }
}
