//! SyncBatchNorm over a group of ranks (threads of this process, `comm::LocalGroup`): the ranks' shards of one
//! batch, normalized with SyncBN, give what one BatchNorm gives on the whole batch (the output, dx of the global
//! loss, the weight and bias gradients summed over ranks, and the running statistics, identical on every rank),
//! also for uneven shards and empty ones; without synchronization they differ. Plus an f64 finite-difference
//! check of dx across two ranks and the errors. BatchNorm itself is checked against PyTorch in
//! tests/golden_norm.rs; PyTorch cannot run SyncBatchNorm on CPU tensors, so BN on the whole batch is the golden
//! value here.

use ndarray::{concatenate, s, ArrayD, Axis, IxDyn};
use normvision::comm::{Communicator, LocalGroup, SingleProcess};
use normvision::norm::{BatchNorm, BatchNormConfig, SyncBatchNorm};
use normvision::{Ctx, Layer, NvError, Param, Real};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;
use std::sync::Arc;

fn randn<T: Real>(seed: u64, shape: &[usize], mu: f64, sc: f64) -> ArrayD<T> {
    let mut g = Pcg64::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        T::of_f64(mu + sc * g.sample::<f64, _>(StandardNormal))
    })
}

fn max_rel<T: Real>(a: &ArrayD<T>, b: &ArrayD<T>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(1e-300f64, |m, v| m.max(v.as_f64().abs()));
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x.as_f64() - y.as_f64()).abs())
        .fold(0.0, f64::max)
        / scale
}

fn vec_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn grads<T: Real>(l: &mut impl Layer<T>) -> Vec<Vec<f64>> {
    let mut out = vec![];
    l.visit_params("", &mut |_, p: &mut Param<T>| {
        out.push(p.grads().iter().map(|g| g.as_f64()).collect())
    });
    out
}

fn running<T: Real>(bn: &BatchNorm<T>) -> (Vec<f64>, Vec<f64>) {
    (
        bn.running_mean()
            .unwrap()
            .iter()
            .map(|v| v.as_f64())
            .collect(),
        bn.running_var()
            .unwrap()
            .iter()
            .map(|v| v.as_f64())
            .collect(),
    )
}

/// A BatchNorm config with a non-trivial affine (set after building).
fn cfg(c: usize, rank: usize) -> BatchNormConfig {
    let mut b = BatchNormConfig::new(c);
    b.ranks = vec![rank];
    b
}

fn with_affine<T: Real>(mut bn: BatchNorm<T>) -> BatchNorm<T> {
    let c = bn.config().num_features;
    if let Some(w) = bn.weight_mut() {
        for (i, v) in w.values_mut().iter_mut().enumerate() {
            *v = T::of_f64(0.5 + 0.25 * i as f64);
        }
    }
    if let Some(b) = bn.bias_mut() {
        for (i, v) in b.values_mut().iter_mut().enumerate() {
            *v = T::of_f64(0.1 * i as f64 - 0.05 * c as f64);
        }
    }
    bn
}

/// What one rank ends with after `steps` training steps: outputs and dx of every step, summed-over-steps
/// parameter gradients, running statistics.
struct RankRun<T> {
    ys: Vec<ArrayD<T>>,
    dxs: Vec<ArrayD<T>>,
    grads: Vec<Vec<f64>>,
    running: (Vec<f64>, Vec<f64>),
}

/// Step `k`'s whole batch and the gradient of the global loss with respect to the output.
fn batch<T: Real>(k: u64, shape: &[usize]) -> (ArrayD<T>, ArrayD<T>) {
    (
        randn(100 + k, shape, 2.0, 3.0),
        randn(200 + k, shape, 0.0, 1.0),
    )
}

/// Trains a BatchNorm on the whole batch for `steps` steps.
fn single<T: Real>(shape: &[usize], steps: u64) -> RankRun<T> {
    let mut bn = with_affine(cfg(shape[1], shape.len()).build::<T>().unwrap());
    let (mut ys, mut dxs) = (vec![], vec![]);
    for k in 0..steps {
        let (x, dy) = batch::<T>(k, shape);
        let ctx = Ctx::train().with_step(k);
        ys.push(bn.forward(&x, ctx).unwrap());
        dxs.push(bn.backward(&x, &dy, ctx).unwrap());
    }
    RankRun {
        ys,
        dxs,
        grads: grads(&mut bn),
        running: running(&bn),
    }
}

/// Trains one SyncBatchNorm per rank, rank r on samples `bounds[r]..bounds[r + 1]` of each step's batch, each
/// rank on its own thread. With `sync` false each rank's layer is a plain BatchNorm on its shard.
fn sharded<T: Real>(shape: &[usize], steps: u64, bounds: &[usize], sync: bool) -> Vec<RankRun<T>> {
    let group = LocalGroup::new(bounds.len() - 1).unwrap();
    std::thread::scope(|sc| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|g| {
                sc.spawn(move || {
                    let r = g.rank();
                    let (a, b) = (bounds[r], bounds[r + 1]);
                    let bn = with_affine(cfg(shape[1], shape.len()).build::<T>().unwrap());
                    // unsynchronized: each rank a BatchNorm of its own shard
                    let comm: Arc<dyn Communicator> = if sync {
                        Arc::new(g)
                    } else {
                        Arc::new(SingleProcess)
                    };
                    let mut l = SyncBatchNorm::from_batch_norm(bn, comm);
                    let (mut ys, mut dxs) = (vec![], vec![]);
                    for k in 0..steps {
                        let (x, dy) = batch::<T>(k, shape);
                        let x = x.slice_axis(Axis(0), (a..b).into()).to_owned();
                        let dy = dy.slice_axis(Axis(0), (a..b).into()).to_owned();
                        let ctx = Ctx::train().with_step(k);
                        ys.push(l.forward(&x, ctx).unwrap());
                        dxs.push(l.backward(&x, &dy, ctx).unwrap());
                    }
                    RankRun {
                        ys,
                        dxs,
                        grads: grads(&mut l),
                        running: running(l.batch_norm()),
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Largest relative difference between the sharded run (shards put back together, gradients summed over
/// ranks) and the single run; also checks that every rank holds the same running statistics, bit for bit, when
/// the ranks were synchronized.
fn compare<T: Real>(one: &RankRun<T>, ranks: &[RankRun<T>]) -> f64 {
    for r in ranks {
        assert_eq!(
            r.running, ranks[0].running,
            "running statistics differ between ranks"
        );
    }
    compare_unsynced(one, ranks)
}

fn compare_unsynced<T: Real>(one: &RankRun<T>, ranks: &[RankRun<T>]) -> f64 {
    let mut worst: f64 = 0.0;
    for k in 0..one.ys.len() {
        let y = concatenate(
            Axis(0),
            &ranks.iter().map(|r| r.ys[k].view()).collect::<Vec<_>>(),
        )
        .unwrap();
        let dx = concatenate(
            Axis(0),
            &ranks.iter().map(|r| r.dxs[k].view()).collect::<Vec<_>>(),
        )
        .unwrap();
        worst = worst
            .max(max_rel(&y, &one.ys[k]))
            .max(max_rel(&dx, &one.dxs[k]));
    }
    for (p, g1) in one.grads.iter().enumerate() {
        let mut sum = vec![0.0; g1.len()];
        for r in ranks {
            for (s, g) in sum.iter_mut().zip(&r.grads[p]) {
                *s += g;
            }
        }
        worst = worst.max(vec_rel(&sum, g1));
    }
    worst
        .max(vec_rel(&ranks[0].running.0, &one.running.0))
        .max(vec_rel(&ranks[0].running.1, &one.running.1))
}

#[test]
fn two_ranks_of_16_are_one_batch_of_32() {
    let shape = [32, 3, 5, 4];
    for steps in [1, 4] {
        let r = compare(
            &single::<f64>(&shape, steps),
            &sharded::<f64>(&shape, steps, &[0, 16, 32], true),
        );
        assert!(r < 1e-12, "f64, {steps} steps: {r:e}");
        let r = compare(
            &single::<f32>(&shape, steps),
            &sharded::<f32>(&shape, steps, &[0, 16, 32], true),
        );
        assert!(r < 1e-5, "f32, {steps} steps: {r:e}");
    }
    // without synchronization each rank normalizes its own half: far from the whole batch's BatchNorm
    let r = compare_unsynced(
        &single::<f64>(&shape, 2),
        &sharded::<f64>(&shape, 2, &[0, 16, 32], false),
    );
    assert!(r > 1e-3, "unsynchronized halves should differ, got {r:e}");
}

#[test]
fn uneven_and_empty_shards_give_the_whole_batch() {
    let shape = [32, 4, 3, 3];
    let one = single::<f64>(&shape, 3);
    for bounds in [
        &[0, 17, 32][..],
        &[0, 32, 32],
        &[0, 0, 32],
        &[0, 10, 10, 32],
        &[0, 1, 2, 3, 32],
    ] {
        let r = compare(&one, &sharded::<f64>(&shape, 3, bounds, true));
        assert!(r < 1e-12, "shards {bounds:?}: {r:e}");
    }
}

#[test]
fn batchnorm1d_rows() {
    for shape in [[24, 7], [9, 5]] {
        let one = single::<f64>(&shape, 2);
        let r = compare(&one, &sharded::<f64>(&shape, 2, &[0, 5, shape[0]], true));
        assert!(r < 1e-12, "{shape:?}: {r:e}");
    }
}

#[test]
fn one_rank_is_batch_norm() {
    let shape = [8, 3, 6, 6];
    let one = single::<f32>(&shape, 3);
    let mut l = SyncBatchNorm::from_batch_norm(
        with_affine(cfg(3, 4).build::<f32>().unwrap()),
        Arc::new(SingleProcess),
    );
    for k in 0..3 {
        let (x, dy) = batch::<f32>(k, &shape);
        let ctx = Ctx::train().with_step(k);
        let y = l.forward(&x, ctx).unwrap();
        let dx = l.backward(&x, &dy, ctx).unwrap();
        // BatchNorm's fused training kernels and SyncBN's staged ones round alike to a few ulps
        assert!(max_rel(&y, &one.ys[k as usize]) < 1e-6);
        assert!(max_rel(&dx, &one.dxs[k as usize]) < 1e-6);
    }
    // eval is the BatchNorm's eval, bit for bit, and exchanges nothing
    let x: ArrayD<f32> = randn(7, &shape, 1.0, 2.0);
    let mut bn = l.batch_norm().clone();
    assert_eq!(
        l.forward(&x, Ctx::eval()).unwrap(),
        bn.forward(&x, Ctx::eval()).unwrap()
    );
}

/// dx of the global loss Σ_r Σ y_r·g_r by central differences in f64, across two ranks.
#[test]
fn gradcheck_across_two_ranks() {
    let shape = [5, 2, 2, 2];
    let bounds = [0, 2, 5];
    let (x, g): (ArrayD<f64>, ArrayD<f64>) =
        (randn(1, &shape, 1.0, 2.0), randn(2, &shape, 0.0, 1.0));
    let run = |x: &ArrayD<f64>| -> (f64, ArrayD<f64>) {
        let group = LocalGroup::new(2).unwrap();
        let parts: Vec<(f64, ArrayD<f64>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = group
                .into_iter()
                .map(|grp| {
                    let (x, g) = (&x, &g);
                    sc.spawn(move || {
                        let r = grp.rank();
                        let sl = s![bounds[r]..bounds[r + 1], .., .., ..];
                        let (xr, gr) = (
                            x.slice(sl).to_owned().into_dyn(),
                            g.slice(sl).to_owned().into_dyn(),
                        );
                        let bn = with_affine(cfg(2, 4).build::<f64>().unwrap());
                        let mut l = SyncBatchNorm::from_batch_norm(bn, Arc::new(grp));
                        let y = l.forward(&xr, Ctx::train()).unwrap();
                        let dx = l.backward(&xr, &gr, Ctx::train()).unwrap();
                        ((&y * &gr).sum(), dx)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let loss = parts.iter().map(|p| p.0).sum();
        let dx = concatenate(
            Axis(0),
            &parts.iter().map(|p| p.1.view()).collect::<Vec<_>>(),
        )
        .unwrap();
        (loss, dx)
    };
    let (_, dx) = run(&x);
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for i in 0..x.len() {
        let mut xp = x.clone();
        xp.as_slice_mut().unwrap()[i] += h;
        let mut xm = x.clone();
        xm.as_slice_mut().unwrap()[i] -= h;
        let fd = (run(&xp).0 - run(&xm).0) / (2.0 * h);
        worst = worst.max((fd - dx.as_slice().unwrap()[i]).abs());
    }
    let scale = dx.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(
        worst / scale < 1e-7,
        "finite differences: {:e}",
        worst / scale
    );
}

#[test]
fn errors_are_typed_and_reach_every_rank() {
    // one value per channel over the whole group: every rank fails alike, none hangs
    let group = LocalGroup::new(2).unwrap();
    let errs: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|g| {
                sc.spawn(move || {
                    let n = if g.rank() == 0 { 1 } else { 0 };
                    let mut l = SyncBatchNorm::<f32>::new(cfg(3, 4), Arc::new(g)).unwrap();
                    let x = ArrayD::<f32>::zeros(IxDyn(&[n, 3, 1, 1]));
                    let e = l.forward(&x, Ctx::train()).unwrap_err();
                    assert!(matches!(e, NvError::OneValuePerChannel { .. }));
                    e.to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(errs[0].contains("BatchNorm"), "{}", errs[0]);
    // ranks that disagree on the channel count
    let group = LocalGroup::new(2).unwrap();
    std::thread::scope(|sc| {
        for g in group {
            sc.spawn(move || {
                let c = 3 + g.rank();
                let mut l = SyncBatchNorm::<f32>::new(cfg(c, 4), Arc::new(g)).unwrap();
                let x = ArrayD::<f32>::ones(IxDyn(&[4, c, 2, 2]));
                let e = l.forward(&x, Ctx::train()).unwrap_err().to_string();
                assert!(e.contains("channels"), "{e}");
            });
        }
    });
    // backward without forward
    let mut l = SyncBatchNorm::<f32>::single(cfg(3, 4)).unwrap();
    let x = ArrayD::<f32>::ones(IxDyn(&[4, 3, 2, 2]));
    assert!(matches!(
        l.backward(&x, &x, Ctx::train()),
        Err(NvError::NoSavedState { .. })
    ));
    assert_eq!(l.communicator().size(), 1);
    assert!(l.name().starts_with("SyncBatchNorm(3"));
}
