//! BatchNorm adaptation without labels (`train::adapt`): AdaBN undoes an input shift exactly, the N/n mix has
//! the right limits, batches do not matter, and a model without BatchNorm is refused.

use ndarray::{ArrayD, IxDyn};
use normvision::model::Graph;
use normvision::nn::{Conv2dConfig, GlobalAvgPool, LinearConfig, ReLU};
use normvision::norm::{BatchNorm, BatchNormConfig};
use normvision::train::adapt::{adapt_batch_norms, infer_adapted, AdaptMethod};
use rand::{Rng, SeedableRng};

fn randn(r: &mut rand_pcg::Pcg64, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        r.sample::<f64, _>(rand_distr::StandardNormal)
    })
}

/// conv (no padding) → BN → ReLU → conv (padding 1) → BN → ReLU → global pool → linear, in f64 with BN eps
/// 1e-12, random source statistics.
fn model(seed: u64) -> Graph<f64> {
    let mut r = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut g = Graph::new();
    let x = g.input("x");
    let a = g
        .layer(
            "conv1",
            Conv2dConfig::new(3, 6, 3).build::<f64>(&mut r).unwrap(),
            x,
        )
        .unwrap();
    let a = g
        .layer(
            "bn1",
            BatchNormConfig::d2(6).eps(1e-12).build::<f64>().unwrap(),
            a,
        )
        .unwrap();
    let a = g.layer("relu1", ReLU::new(), a).unwrap();
    let a = g
        .layer(
            "conv2",
            Conv2dConfig::new(6, 5, 3)
                .padding(1)
                .build::<f64>(&mut r)
                .unwrap(),
            a,
        )
        .unwrap();
    let a = g
        .layer(
            "bn2",
            BatchNormConfig::d2(5).eps(1e-12).build::<f64>().unwrap(),
            a,
        )
        .unwrap();
    let a = g.layer("relu2", ReLU::new(), a).unwrap();
    let a = g.layer("pool", GlobalAvgPool::new(), a).unwrap();
    let y = g
        .layer(
            "fc",
            LinearConfig::new(5, 4).build::<f64>(&mut r).unwrap(),
            a,
        )
        .unwrap();
    g.set_outputs(&[y]).unwrap();
    for name in ["bn1", "bn2"] {
        let bn = g
            .node_mut(name)
            .unwrap()
            .layer_as_mut::<BatchNorm<f64>>()
            .unwrap();
        let (m, v) = bn.running_stats_mut().unwrap();
        m.mapv_inplace(|_| r.gen_range(-1.0..1.0));
        v.mapv_inplace(|_| r.gen_range(0.5..2.0));
    }
    g
}

fn data(seed: u64, n: usize) -> ArrayD<f64> {
    let mut r = rand_pcg::Pcg64::seed_from_u64(seed);
    randn(&mut r, &[n, 3, 9, 8]).mapv(|v| v * 0.7 + 0.2)
}

/// Adapts `g` to `x` in batches of `b`.
fn adapt(g: &mut Graph<f64>, x: &ArrayD<f64>, b: usize, method: AdaptMethod) {
    let n = x.shape()[0];
    adapt_batch_norms(g, method, &mut |f| {
        for s in (0..n).step_by(b) {
            let e = (s + b).min(n);
            f(&x.slice(ndarray::s![s..e, .., .., ..]).to_owned().into_dyn())?;
        }
        Ok(())
    })
    .unwrap();
}

fn max_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f64::max)
}

fn stats(g: &Graph<f64>, name: &str) -> (Vec<f64>, Vec<f64>) {
    let bn = g.node(name).unwrap().layer_as::<BatchNorm<f64>>().unwrap();
    (
        bn.running_mean().unwrap().iter().copied().collect(),
        bn.running_var().unwrap().iter().copied().collect(),
    )
}

#[test]
fn adabn_undoes_an_input_shift_exactly() {
    let x = data(1, 23);
    for (a, b) in [(2.5, -0.7), (0.3, 4.0), (1.0, 10.0)] {
        let shifted = x.mapv(|v| a * v + b);
        let (mut clean, mut moved) = (model(7), model(7));
        adapt(&mut clean, &x, 6, AdaptMethod::AdaBn);
        adapt(&mut moved, &shifted, 6, AdaptMethod::AdaBn);
        let l1 = clean.infer(&[&x]).unwrap().remove(0);
        let l2 = moved.infer(&[&shifted]).unwrap().remove(0);
        let d = max_diff(&l1, &l2);
        eprintln!("a = {a}, b = {b}: max |logit difference| = {d:.2e}");
        assert!(d <= 1e-9, "{d}");
        // without adaptation the shift changes the logits
        let mut source = model(7);
        let l3 = source.infer(&[&shifted]).unwrap().remove(0);
        assert!(max_diff(&l3, &l2) > 1e-3);
    }
}

#[test]
fn adabn_does_not_depend_on_the_batches() {
    let x = data(2, 31);
    let (mut g1, mut g2) = (model(3), model(3));
    adapt(&mut g1, &x, 31, AdaptMethod::AdaBn);
    adapt(&mut g2, &x, 4, AdaptMethod::AdaBn);
    for name in ["bn1", "bn2"] {
        let ((m1, v1), (m2, v2)) = (stats(&g1, name), stats(&g2, name));
        assert!(m1
            .iter()
            .zip(&m2)
            .chain(v1.iter().zip(&v2))
            .all(|(p, q)| (p - q).abs() <= 1e-12 * (1.0 + p.abs())));
    }
    // bn1's statistics are those of conv1's output over all 31 images: population mean and variance
    let mut c = model(3);
    c.set_outputs(&[c.node("conv1").unwrap().output()]).unwrap();
    let y = c.infer(&[&x]).unwrap().remove(0);
    let (m, v) = stats(&g1, "bn1");
    for ch in 0..6 {
        let vals: Vec<f64> = y.index_axis(ndarray::Axis(1), ch).iter().copied().collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / vals.len() as f64;
        assert!((mean - m[ch]).abs() < 1e-12 && (var - v[ch]).abs() < 1e-12);
    }
}

#[test]
fn online_adaptation_is_per_batch_and_restores_the_source() {
    let x = data(5, 10);
    let (a, b) = (1.7, -0.4);
    let shifted = x.mapv(|v| a * v + b);
    let mut g = model(9);
    let before = [stats(&g, "bn1"), stats(&g, "bn2")];
    for prior in [0.0, 8.0] {
        let online = infer_adapted(&mut g, prior, &shifted).unwrap().remove(0);
        // bitwise the source statistics afterwards
        assert_eq!([stats(&g, "bn1"), stats(&g, "bn2")], before);
        // the same as adapting a copy to this batch alone with the N/n mix
        let mut copy = model(9);
        adapt(&mut copy, &shifted, 10, AdaptMethod::Mix { prior });
        let offline = copy.infer(&[&shifted]).unwrap().remove(0);
        assert!(max_diff(&online, &offline) <= 1e-12, "prior {prior}");
    }
    // with N = 0 each batch is normalized by its own statistics: the shift is undone exactly
    let clean = infer_adapted(&mut g, 0.0, &x).unwrap().remove(0);
    let moved = infer_adapted(&mut g, 0.0, &shifted).unwrap().remove(0);
    assert!(max_diff(&clean, &moved) <= 1e-9);
}

#[test]
fn the_mix_has_the_right_limits() {
    let x = data(4, 12);
    let source = model(5);
    // N = 0 is AdaBN
    let (mut mix0, mut ada) = (model(5), model(5));
    adapt(&mut mix0, &x, 5, AdaptMethod::Mix { prior: 0.0 });
    adapt(&mut ada, &x, 5, AdaptMethod::AdaBn);
    for name in ["bn1", "bn2"] {
        assert_eq!(stats(&mix0, name), stats(&ada, name));
    }
    // n = 0 keeps the source statistics
    let mut none = model(5);
    adapt_batch_norms(&mut none, AdaptMethod::Mix { prior: 16.0 }, &mut |_| Ok(())).unwrap();
    for name in ["bn1", "bn2"] {
        assert_eq!(stats(&none, name), stats(&source, name));
    }
    // N = n: half way, for the first layer (whose input does not depend on earlier adaptation)
    let mut half = model(5);
    adapt(&mut half, &x, 5, AdaptMethod::Mix { prior: 12.0 });
    let ((ms, vs), (mt, vt), (mh, vh)) = (
        stats(&source, "bn1"),
        stats(&ada, "bn1"),
        stats(&half, "bn1"),
    );
    for ch in 0..6 {
        assert!((mh[ch] - 0.5 * (ms[ch] + mt[ch])).abs() < 1e-12);
        assert!((vh[ch] - 0.5 * (vs[ch] + vt[ch])).abs() < 1e-12);
    }
    // a negative prior is refused
    assert!(adapt_batch_norms(
        &mut model(5),
        AdaptMethod::Mix { prior: -1.0 },
        &mut |_| Ok(())
    )
    .is_err());
}

#[test]
fn a_model_without_batch_norm_is_refused() {
    let mut r = rand_pcg::Pcg64::seed_from_u64(1);
    let mut g = Graph::<f64>::new();
    let x = g.input("x");
    let y = g
        .layer(
            "fc",
            LinearConfig::new(3, 2).build::<f64>(&mut r).unwrap(),
            x,
        )
        .unwrap();
    g.set_outputs(&[y]).unwrap();
    let e = adapt_batch_norms(&mut g, AdaptMethod::AdaBn, &mut |_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("no BatchNorm"), "{e}");
    // AdaBN needs target images
    let e = adapt_batch_norms(&mut model(1), AdaptMethod::AdaBn, &mut |_| Ok(())).unwrap_err();
    assert!(e.to_string().contains("no target images"), "{e}");
}

use crate::common;

#[test]
fn cli_adapt_writes_a_checkpoint_eval_reads() {
    use common::cli::*;
    let dir = tempfile::tempdir().unwrap();
    let (data, ck) = train_mlp(dir.path(), 200, &[]);
    let out = dir.path().join("adapted.safetensors");
    let o = nv(&[
        "adapt",
        "--checkpoint",
        s(&ck),
        "--data",
        s(&data),
        "--batch-size",
        "16",
        "-o",
        s(&out),
        "--json",
    ]);
    assert_ok("adapt", &o);
    assert_eq!(
        stdout(&o).lines().count(),
        3,
        "the mlp's three BatchNorms: {}",
        stdout(&o)
    );
    assert_ok(
        "eval the adapted checkpoint",
        &nv(&["eval", "--checkpoint", s(&out), "--data", s(&data)]),
    );
    let mix = dir.path().join("mix.safetensors");
    assert_ok(
        "adapt --method mix",
        &nv(&[
            "adapt",
            "--checkpoint",
            s(&ck),
            "--data",
            s(&data),
            "--method",
            "mix",
            "--prior",
            "16",
            "-o",
            s(&mix),
        ]),
    );
    assert_fails(
        "mix without a prior",
        &nv(&[
            "adapt",
            "--checkpoint",
            s(&ck),
            "--data",
            s(&data),
            "--method",
            "mix",
            "-o",
            s(&mix),
        ]),
        &["--prior"],
    );
    assert_fails(
        "unknown method",
        &nv(&[
            "adapt",
            "--checkpoint",
            s(&ck),
            "--data",
            s(&data),
            "--method",
            "tent",
            "-o",
            s(&mix),
        ]),
        &["adabn or mix"],
    );
    // a model without BatchNorm
    let none_dir = dir.path().join("none");
    let (data2, ck2) = train_mlp(&none_dir, 100, &["--norm", "none"]);
    assert_fails(
        "adapt without BatchNorm",
        &nv(&[
            "adapt",
            "--checkpoint",
            s(&ck2),
            "--data",
            s(&data2),
            "-o",
            s(&mix),
        ]),
        &["no BatchNorm"],
    );
}
