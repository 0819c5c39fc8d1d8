//! Property tests (proptest) of the normalization family: what the definitions imply for any input, rather than
//! particular numbers. Case counts are kept modest so the file runs in seconds.

#![allow(clippy::needless_range_loop)]

use ndarray::{ArrayD, Axis, Dimension, IxDyn, Slice};
use normvision::internals::planes::local_moments;
use normvision::internals::stats::{Moments, Ncs};
use normvision::norm::*;
use normvision::state::Stateful;
use normvision::{Ctx, Layer};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;

/// `cases` per property, or `PROPTEST_CASES` from the environment for a longer soak.
fn cfg(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// x[.., c, ..] = mu_c + s_c·z with c along `axis` (per-channel offsets and scales, several orders of magnitude).
fn input(seed: u64, shape: &[usize], axis: usize) -> ArrayD<f64> {
    let mut g = Pcg64::seed_from_u64(seed);
    let c = shape[axis];
    let mu: Vec<f64> = (0..c).map(|_| g.gen_range(-10.0..10.0)).collect();
    let sc: Vec<f64> = (0..c).map(|_| 10f64.powf(g.gen_range(-1.0..1.0))).collect();
    let mut x = ArrayD::from_shape_simple_fn(IxDyn(shape), || g.sample::<f64, _>(StandardNormal));
    for (idx, v) in x.indexed_iter_mut() {
        *v = mu[idx[axis]] + sc[idx[axis]] * *v;
    }
    x
}

fn randn(seed: u64, shape: &[usize]) -> ArrayD<f64> {
    let mut g = Pcg64::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || g.sample::<f64, _>(StandardNormal))
}

fn max_abs_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// (mean, biased variance) of each block of `y` selected by `key(index) -> block`.
fn block_moments(
    y: &ArrayD<f64>,
    blocks: usize,
    key: impl Fn(&[usize]) -> usize,
) -> Vec<(f64, f64, usize)> {
    let mut s = vec![(0.0f64, 0.0f64, 0usize); blocks];
    for (idx, v) in y.indexed_iter() {
        let b = key(idx.slice());
        s[b].0 += v;
        s[b].2 += 1;
    }
    let means: Vec<f64> = s.iter().map(|(a, _, n)| a / *n as f64).collect();
    for (idx, v) in y.indexed_iter() {
        let b = key(idx.slice());
        s[b].1 += (v - means[b]).powi(2);
    }
    s.iter()
        .zip(&means)
        .map(|((_, q, n), m)| (*m, q / *n as f64, *n))
        .collect()
}

/// The normalised blocks of `y` have mean 0 and biased variance var_x/(var_x + eps) (= 1 up to eps), where var_x is
/// the biased variance of the same block of the input.
fn check_standardised(
    what: &str,
    x: &ArrayD<f64>,
    y: &ArrayD<f64>,
    eps: f64,
    blocks: usize,
    key: impl Fn(&[usize]) -> usize + Copy,
) -> Result<(), TestCaseError> {
    let sx = block_moments(x, blocks, key);
    let sy = block_moments(y, blocks, key);
    for (b, ((_, vx, n), (m, v, _))) in sx.iter().zip(&sy).enumerate() {
        let want = vx / (vx + eps);
        prop_assert!(
            m.abs() < 1e-10,
            "{}: block {} (n={}) mean {}",
            what,
            b,
            n,
            m
        );
        prop_assert!(
            (v - want).abs() < 1e-10,
            "{}: block {} (n={}) var {} want {}",
            what,
            b,
            n,
            v,
            want
        );
        if *vx > 1e-2 {
            prop_assert!((v - 1.0).abs() < 1e-3, "{}: block {} var {}", what, b, v);
        }
    }
    Ok(())
}

/// Shapes (N, C, *spatial) with 0-3 spatial dims, at least 2 values per channel, S = 1 included.
fn bn_shape() -> impl Strategy<Value = Vec<usize>> {
    (
        2usize..9,
        1usize..6,
        prop::collection::vec(1usize..5, 0..=3),
    )
        .prop_map(|(n, c, sp)| {
            let mut s = vec![n, c];
            s.extend(sp);
            s
        })
}

// ---------------------------------------------------------------------------------------------------------------
// statistics of the output

proptest! {
    #![proptest_config(cfg(48))]

    #[test]
    fn batch_norm_train_output_is_standardised_per_channel(shape in bn_shape(), seed in any::<u64>()) {
        let c = shape[1];
        let x = input(seed, &shape, 1);
        let mut bn: BatchNorm<f64> = BatchNormConfig::new(c).affine(false).build().unwrap();
        let y = bn.forward(&x, Ctx::train()).unwrap();
        check_standardised("BN", &x, &y, 1e-5, c, |i| i[1])?;
    }

    #[test]
    fn group_norm_output_is_standardised_per_sample_and_group(
        n in 1usize..4, cpg in 1usize..4, groups in 1usize..4, sp in prop::collection::vec(2usize..5, 0..=2),
        seed in any::<u64>(),
    ) {
        let c = cpg * groups;
        let mut shape = vec![n, c];
        shape.extend(&sp);
        let x = input(seed, &shape, 1);
        let mut gn: GroupNorm<f64> = GroupNormConfig::new(groups, c).affine(false).build().unwrap();
        for mode in [Ctx::train(), Ctx::eval()] {
            let y = gn.forward(&x, mode).unwrap();
            check_standardised("GN", &x, &y, 1e-5, n * groups, |i| i[0] * groups + i[1] / cpg)?;
        }
    }

    #[test]
    fn layer_norm_output_is_standardised_per_row(
        lead in prop::collection::vec(1usize..4, 1..=2), ns in prop::collection::vec(2usize..6, 1..=3),
        seed in any::<u64>(),
    ) {
        let mut shape = lead.clone();
        shape.extend(&ns);
        let x = input(seed, &shape, shape.len() - 1);
        let mut ln: LayerNorm<f64> = LayerNormConfig::new(&ns).elementwise_affine(false).build().unwrap();
        let y = ln.forward(&x, Ctx::train()).unwrap();
        let rows: usize = lead.iter().product();
        let k = lead.len();
        let lead2 = lead.clone();
        let key = move |i: &[usize]| i[..k].iter().zip(&lead2).fold(0, |acc, (v, d)| acc * d + v);
        check_standardised("LN", &x, &y, 1e-5, rows, &key)?;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// equivalences between layers

proptest! {
    #![proptest_config(cfg(32))]

    /// GroupNorm(G=1) = LayerNorm over (C, *spatial) with the per-channel affine broadcast over the spatial axes:
    /// forward, dx, and the parameter gradients (LN's summed over the spatial axes).
    #[test]
    fn group_norm_one_group_equals_layer_norm(
        n in 1usize..4, c in 1usize..5, h in 1usize..4, w in 2usize..4, seed in any::<u64>(),
    ) {
        let shape = [n, c, h, w];
        let x = input(seed, &shape, 1);
        let dy = randn(seed ^ 1, &shape);
        let mut gn: GroupNorm<f64> = GroupNormConfig::new(1, c).build().unwrap();
        let wv = randn(seed ^ 2, &[c]);
        let bv = randn(seed ^ 3, &[c]);
        gn.weight_mut().unwrap().value.assign(&wv);
        gn.bias_mut().unwrap().value.assign(&bv);
        let mut ln: LayerNorm<f64> = LayerNormConfig::new(&[c, h, w]).build().unwrap();
        let bcast = |v: &ArrayD<f64>| ArrayD::from_shape_fn(IxDyn(&[c, h, w]), |i| v[[i[0]]]);
        ln.weight_mut().unwrap().value.assign(&bcast(&wv));
        ln.bias_mut().unwrap().value.assign(&bcast(&bv));
        for mode in [Ctx::train(), Ctx::eval()] {
            gn.zero_grad();
            ln.zero_grad();
            let yg = gn.forward(&x, mode).unwrap();
            let yl = ln.forward(&x, mode).unwrap();
            prop_assert!(max_abs_diff(&yg, &yl) < 1e-12, "y differs by {}", max_abs_diff(&yg, &yl));
            let dg = gn.backward(&x, &dy, mode).unwrap();
            let dl = ln.backward(&x, &dy, mode).unwrap();
            let scale = 1.0 + dg.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            prop_assert!(max_abs_diff(&dg, &dl) < 1e-10 * scale, "dx differs by {}", max_abs_diff(&dg, &dl));
            for (gp, lp) in [(gn.weight(), ln.weight()), (gn.bias(), ln.bias())] {
                let gsum = lp.unwrap().grad.sum_axis(Axis(2)).sum_axis(Axis(1));
                let d = max_abs_diff(&gp.unwrap().grad, &gsum);
                prop_assert!(d < 1e-9, "parameter gradient differs by {}", d);
            }
        }
    }

    /// GroupNorm(G=C) = InstanceNorm(affine=true) with the same weight and bias (forward, dx, dweight, dbias).
    #[test]
    fn group_norm_c_groups_equals_instance_norm(
        n in 1usize..4, c in 1usize..5, sp in prop::collection::vec(2usize..5, 1..=3), seed in any::<u64>(),
    ) {
        let mut shape = vec![n, c];
        shape.extend(&sp);
        let x = input(seed, &shape, 1);
        let dy = randn(seed ^ 1, &shape);
        let mut gn: GroupNorm<f64> = GroupNormConfig::new(c, c).build().unwrap();
        let mut inorm: InstanceNorm<f64> =
            InstanceNormConfig::new(c, sp.len()).affine(true).build().unwrap();
        let wv = randn(seed ^ 2, &[c]);
        let bv = randn(seed ^ 3, &[c]);
        gn.weight_mut().unwrap().value.assign(&wv);
        gn.bias_mut().unwrap().value.assign(&bv);
        inorm.weight_mut().unwrap().value.assign(&wv);
        inorm.bias_mut().unwrap().value.assign(&bv);
        for mode in [Ctx::train(), Ctx::eval()] {
            gn.zero_grad();
            inorm.zero_grad();
            let yg = gn.forward(&x, mode).unwrap();
            let yi = inorm.forward(&x, mode).unwrap();
            prop_assert!(max_abs_diff(&yg, &yi) < 1e-12);
            let dg = gn.backward(&x, &dy, mode).unwrap();
            let di = inorm.backward(&x, &dy, mode).unwrap();
            prop_assert!(max_abs_diff(&dg, &di) < 1e-12);
            prop_assert!(max_abs_diff(&gn.weight().unwrap().grad, &inorm.weight().unwrap().grad) < 1e-12);
            prop_assert!(max_abs_diff(&gn.bias().unwrap().grad, &inorm.bias().unwrap().grad) < 1e-12);
        }
    }

    /// A BatchNorm in eval mode is a per-channel affine map: each sample's output is independent of the others
    /// (bit for bit), for S = 1 and S > 1 layouts.
    #[test]
    fn batch_norm_eval_is_per_sample(shape in bn_shape(), seed in any::<u64>(), relu in any::<bool>()) {
        let c = shape[1];
        let mut bn: BatchNorm<f32> = BatchNormConfig::new(c).build().unwrap();
        let f = BnFusion { relu, ..Default::default() };
        for k in 0..3 {
            let xb = input(seed ^ (10 + k), &shape, 1).mapv(|v| v as f32);
            bn.forward_fused(&xb, Ctx::train(), f).unwrap();
        }
        let x = input(seed, &shape, 1).mapv(|v| v as f32);
        let y = bn.forward_fused(&x, Ctx::eval(), f).unwrap();
        // the same first sample in a batch of different companions, and alone
        let mut other = input(seed ^ 99, &shape, 1).mapv(|v| (v * 3.0) as f32);
        other.index_axis_mut(Axis(0), 0).assign(&x.index_axis(Axis(0), 0));
        let y2 = bn.forward_fused(&other, Ctx::eval(), f).unwrap();
        let alone = x.slice_axis(Axis(0), Slice::from(0..1)).to_owned();
        let y3 = bn.forward_fused(&alone, Ctx::eval(), f).unwrap();
        prop_assert_eq!(y.index_axis(Axis(0), 0), y2.index_axis(Axis(0), 0));
        prop_assert_eq!(y.index_axis(Axis(0), 0), y3.index_axis(Axis(0), 0));
    }

    /// BN(a·x + b) = BN(x) for a > 0 in train mode (Ioffe & Szegedy §3.3). With eps the exact identity is
    /// BN_eps(a·x + b) = BN_{eps/a²}(x), and dx scales by 1/a; with a tiny eps BN(a·x + b) and BN(x) agree directly
    /// wherever the batch variance is not itself tiny.
    #[test]
    fn batch_norm_train_is_scale_and_shift_invariant(
        shape in bn_shape(), seed in any::<u64>(), a in 0.1f64..10.0, b in -10.0f64..10.0,
    ) {
        let c = shape[1];
        let x = input(seed, &shape, 1);
        let xs = x.mapv(|v| a * v + b);
        let eps = 1e-5;
        let mut l1: BatchNorm<f64> = BatchNormConfig::new(c).eps(eps).build().unwrap();
        let mut l2: BatchNorm<f64> = BatchNormConfig::new(c).eps(eps / (a * a)).build().unwrap();
        let w = randn(seed ^ 5, &[c]);
        let bias = randn(seed ^ 4, &[c]);
        for l in [&mut l1, &mut l2] {
            l.weight_mut().unwrap().value.assign(&w);
            l.bias_mut().unwrap().value.assign(&bias);
        }
        let y1 = l1.forward(&xs, Ctx::train()).unwrap();
        let y2 = l2.forward(&x, Ctx::train()).unwrap();
        prop_assert!(max_abs_diff(&y1, &y2) < 1e-9, "exact identity off by {}", max_abs_diff(&y1, &y2));
        let dy = randn(seed ^ 6, &shape);
        let d1 = l1.backward(&xs, &dy, Ctx::train()).unwrap();
        let d2 = l2.backward(&x, &dy, Ctx::train()).unwrap().mapv(|v| v / a);
        let scale = 1.0 + d2.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        prop_assert!(max_abs_diff(&d1, &d2) < 1e-9 * scale, "dx off by {}", max_abs_diff(&d1, &d2));
        for (p1, p2) in [(l1.weight(), l2.weight()), (l1.bias(), l2.bias())] {
            let (g1, g2) = (&p1.unwrap().grad, &p2.unwrap().grad);
            prop_assert!(max_abs_diff(g1, g2) < 1e-9 * (1.0 + g2.iter().fold(0.0f64, |m, v| m.max(v.abs()))));
        }
        // plain invariance with a tiny eps, on channels whose variance dwarfs it
        let tiny = 1e-14;
        let mut t: BatchNorm<f64> = BatchNormConfig::new(c).eps(tiny).affine(false).build().unwrap();
        let z1 = t.forward(&xs, Ctx::train()).unwrap();
        let z2 = t.forward(&x, Ctx::train()).unwrap();
        let vx = block_moments(&x, c, |i| i[1]);
        for ((idx, p), q) in z1.indexed_iter().zip(z2.iter()) {
            let var = vx[idx[1]].1 * a.min(1.0).powi(2);
            if var > 1e-6 {
                prop_assert!((p - q).abs() < 1e-7, "channel {}: {} vs {} (var {})", idx[1], p, q, var);
            }
        }
    }

    /// A FrozenBatchNorm made from a trained BatchNorm computes exactly (bit for bit) what the BatchNorm computes in
    /// eval mode, forward and dx, with or without the fused ReLU.
    #[test]
    fn frozen_from_batch_norm_equals_eval(shape in bn_shape(), seed in any::<u64>(), relu in any::<bool>()) {
        let c = shape[1];
        fn check<T: normvision::Real>(shape: &[usize], c: usize, seed: u64, relu: bool) -> Result<(), TestCaseError> {
            let mut bn: BatchNorm<T> = BatchNormConfig::new(c).momentum(Some(0.5)).build().unwrap();
            let f = BnFusion { relu, ..Default::default() };
            let cast = |a: ArrayD<f64>| a.mapv(T::of_f64);
            bn.weight_mut().unwrap().value.assign(&cast(randn(seed ^ 7, &[c])));
            bn.bias_mut().unwrap().value.assign(&cast(randn(seed ^ 8, &[c])));
            for k in 0..3 {
                bn.forward_fused(&cast(input(seed ^ (20 + k), shape, 1)), Ctx::train(), f).unwrap();
            }
            let mut fz = FrozenBatchNorm::from_batch_norm(&bn).unwrap();
            let x = cast(input(seed, shape, 1));
            let dy = cast(randn(seed ^ 9, shape));
            for mode in [Ctx::train(), Ctx::eval()] {
                prop_assert_eq!(fz.forward_fused(&x, mode, relu).unwrap(), bn.forward_fused(&x, Ctx::eval(), f).unwrap());
                prop_assert_eq!(fz.backward(&x, &dy, mode).unwrap(), bn.backward(&x, &dy, Ctx::eval()).unwrap());
            }
            Ok(())
        }
        check::<f32>(&shape, c, seed, relu)?;
        check::<f64>(&shape, c, seed, relu)?;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Moments (the mergeable summaries SyncBN builds on) and running statistics

fn rel_close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())))
}

fn moments_close(a: &Moments, b: &Moments, tol: f64) -> bool {
    a.count == b.count && rel_close(&a.mean, &b.mean, tol) && rel_close(&a.m2, &b.m2, tol)
}

proptest! {
    #![proptest_config(cfg(64))]

    /// Merging is associative (up to rounding) and merging the moments of two halves of a batch (split along N,
    /// either side possibly empty) equals the moments of the whole batch.
    #[test]
    fn moments_merge_is_exact_and_associative(
        n1 in 0usize..6, n2 in 0usize..6, n3 in 0usize..6, c in 1usize..40, s in 1usize..5, seed in any::<u64>(),
    ) {
        let total = n1 + n2 + n3;
        let x = input(seed, &[total, c, s], 1);
        let part = |lo: usize, hi: usize| {
            let xs = x.slice_axis(Axis(0), Slice::from(lo..hi)).to_owned();
            local_moments(
                xs.as_slice().unwrap(),
                Ncs { n: hi - lo, c, s },
                normvision::KernelOptions::default(),
            )
        };
        let (a, b, cc) = (part(0, n1), part(n1, n1 + n2), part(n1 + n2, total));
        let left = a.merge(&b).merge(&cc);
        let right = a.merge(&b.merge(&cc));
        prop_assert!(moments_close(&left, &right, 1e-12), "{:?} vs {:?}", left, right);
        let whole = part(0, total);
        prop_assert!(moments_close(&left, &whole, 1e-11), "{:?} vs {:?}", left, whole);
        let halves = part(0, n1).merge(&part(n1, total));
        prop_assert!(moments_close(&halves, &whole, 1e-11));
        // the empty summary is a two-sided identity
        let e = Moments::empty(c);
        prop_assert_eq!(&whole.merge(&e), &whole);
        prop_assert_eq!(&e.merge(&whole), &whole);
        prop_assert_eq!(part(0, 0).count, 0);
        // biased variance of the merged summary matches a direct two-pass computation
        if total * s > 0 {
            let vb = whole.var_biased();
            for ch in 0..c {
                let vals: Vec<f64> = x.index_axis(Axis(1), ch).iter().copied().collect();
                let m = vals.iter().sum::<f64>() / vals.len() as f64;
                let v = vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / vals.len() as f64;
                prop_assert!((whole.mean[ch] - m).abs() <= 1e-12 * (1.0 + m.abs()));
                prop_assert!((vb[ch] - v).abs() <= 1e-11 * (1.0 + v));
            }
        }
    }

    /// With momentum None the running statistics are the cumulative averages of the batch means and of the
    /// unbiased batch variances; num_batches_tracked counts the steps.
    #[test]
    fn cumulative_running_stats(shape in bn_shape(), k in 1usize..6, seed in any::<u64>()) {
        let c = shape[1];
        let mut bn: BatchNorm<f64> = BatchNormConfig::new(c).momentum(None).build().unwrap();
        let mut sum_mean = vec![0.0; c];
        let mut sum_var = vec![0.0; c];
        for step in 0..k {
            let x = input(seed.wrapping_add(step as u64), &shape, 1);
            bn.forward(&x, Ctx::train()).unwrap();
            for ch in 0..c {
                let vals: Vec<f64> = x.index_axis(Axis(1), ch).iter().copied().collect();
                let m = vals.iter().sum::<f64>() / vals.len() as f64;
                let v = vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (vals.len() - 1) as f64;
                sum_mean[ch] += m;
                sum_var[ch] += v;
            }
        }
        prop_assert_eq!(bn.num_batches_tracked(), k as i64);
        let rm: Vec<f64> = bn.running_mean().unwrap().iter().copied().collect();
        let rv: Vec<f64> = bn.running_var().unwrap().iter().copied().collect();
        let want_m: Vec<f64> = sum_mean.iter().map(|v| v / k as f64).collect();
        let want_v: Vec<f64> = sum_var.iter().map(|v| v / k as f64).collect();
        prop_assert!(rel_close(&rm, &want_m, 1e-12), "{:?} vs {:?}", rm, want_m);
        prop_assert!(rel_close(&rv, &want_v, 1e-12), "{:?} vs {:?}", rv, want_v);
    }

    /// Keras convention: with momentum k, one step gives running_mean = k·0 + (1-k)·mean and
    /// running_var = k·1 + (1-k)·var_biased (no m/(m-1)); a second step folds in the same way.
    #[test]
    fn keras_running_update(shape in bn_shape(), k in 0.0f64..1.0, seed in any::<u64>()) {
        let c = shape[1];
        let mut bn: BatchNorm<f64> = BatchNormConfig::keras(c).momentum(Some(k)).build().unwrap();
        prop_assert_eq!(bn.config().eps, 1e-3);
        let mut want_m = vec![0.0; c];
        let mut want_v = vec![1.0; c];
        for step in 0..2u64 {
            let x = input(seed ^ step, &shape, 1);
            bn.forward(&x, Ctx::train()).unwrap();
            for ch in 0..c {
                let vals: Vec<f64> = x.index_axis(Axis(1), ch).iter().copied().collect();
                let m = vals.iter().sum::<f64>() / vals.len() as f64;
                let v = vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / vals.len() as f64;
                want_m[ch] = k * want_m[ch] + (1.0 - k) * m;
                want_v[ch] = k * want_v[ch] + (1.0 - k) * v;
            }
            let rm: Vec<f64> = bn.running_mean().unwrap().iter().copied().collect();
            let rv: Vec<f64> = bn.running_var().unwrap().iter().copied().collect();
            prop_assert!(rel_close(&rm, &want_m, 1e-12), "step {}: {:?} vs {:?}", step, rm, want_m);
            prop_assert!(rel_close(&rv, &want_v, 1e-12), "step {}: {:?} vs {:?}", step, rv, want_v);
        }
    }

    /// PyTorch convention for comparison: momentum m, unbiased variance into running_var.
    #[test]
    fn pytorch_running_update(shape in bn_shape(), mo in 0.0f64..=1.0, seed in any::<u64>()) {
        let c = shape[1];
        let mut bn: BatchNorm<f64> = BatchNormConfig::new(c).momentum(Some(mo)).build().unwrap();
        let x = input(seed, &shape, 1);
        bn.forward(&x, Ctx::train()).unwrap();
        for ch in 0..c {
            let vals: Vec<f64> = x.index_axis(Axis(1), ch).iter().copied().collect();
            let n = vals.len() as f64;
            let m = vals.iter().sum::<f64>() / n;
            let v = vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0);
            let rm = bn.running_mean().unwrap()[ch];
            let rv = bn.running_var().unwrap()[ch];
            prop_assert!((rm - mo * m).abs() <= 1e-12 * (1.0 + m.abs()));
            prop_assert!((rv - ((1.0 - mo) + mo * v)).abs() <= 1e-12 * (1.0 + v));
        }
    }
}

proptest! {
    #![proptest_config(cfg(24))]

    /// The property behind the BN paper's §3.3: a convolution or linear layer followed by BN gives the same
    /// training output when its weights are scaled by a > 0, and the weights' gradient scales by 1/a (f64, eps
    /// 1e-30 so that the variance's eps does not break the identity).
    #[test]
    fn bn_after_a_layer_is_invariant_to_its_weight_scale(
        a in prop_oneof![0.01f64..0.1, 0.1f64..10.0, 10.0f64..100.0],
        conv in any::<bool>(),
        seed in any::<u64>(),
    ) {
        use normvision::nn::{Conv2dConfig, LinearConfig};
        let mut g = Pcg64::seed_from_u64(seed);
        let (mut layer, x, bn_cfg): (Box<dyn Layer<f64>>, ArrayD<f64>, BatchNormConfig) = if conv {
            (
                Box::new(Conv2dConfig::new(3, 4, 3).padding(1).bias(false).build::<f64>(&mut g).unwrap()),
                randn(seed ^ 7, &[5, 3, 6, 6]),
                BatchNormConfig::d2(4),
            )
        } else {
            (
                Box::new(LinearConfig::new(6, 4).bias(false).build::<f64>(&mut g).unwrap()),
                randn(seed ^ 7, &[9, 6]),
                BatchNormConfig::d1(4),
            )
        };
        let dy = |shape: &[usize]| randn(seed ^ 11, shape);
        let run = |layer: &mut Box<dyn Layer<f64>>| {
            let mut bn: BatchNorm<f64> = bn_cfg.clone().eps(1e-30).build().unwrap();
            layer.zero_grad();
            let h = layer.forward(&x, Ctx::train()).unwrap();
            let y = bn.forward(&h, Ctx::train()).unwrap();
            let dh = bn.backward(&h, &dy(y.shape()), Ctx::train()).unwrap();
            layer.backward(&x, &dh, Ctx::train()).unwrap();
            let mut gw = vec![];
            layer.visit_params("", &mut |_, p| gw.extend(p.grad.iter().copied()));
            (y, gw)
        };
        let (y1, g1) = run(&mut layer);
        layer.visit_params("", &mut |_, p| p.value.mapv_inplace(|v| v * a));
        let (y2, g2) = run(&mut layer);
        prop_assert!(max_abs_diff(&y1, &y2) < 1e-10, "output changed by {:e}", max_abs_diff(&y1, &y2));
        let scale = g1.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (p, q) in g1.iter().zip(&g2) {
            prop_assert!((p - a * q).abs() <= 1e-9 * scale, "gradient {q} vs {p}/{a}");
        }
    }
}
