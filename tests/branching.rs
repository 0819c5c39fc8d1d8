//! A branching model through the graph engine: parallel 1×1 and dilated 3×3 branches with BatchNorm,
//! concatenated, projected, added back to their input (the stem's output fans out three ways), and two output
//! heads (class logits and a map) trained on a weighted sum of cross-entropy and MSE.
//!
//! - golden: one training forward/backward and the eval forward after it, against PyTorch in float32 and
//!   float64 (`tests/fixtures/model/branching.safetensors`, made by `tools/gen_branching_fixture.py`, which
//!   documents the model). The f64 graph matches PyTorch's f64 to ~1e-13; the f32 graph is compared with the
//!   f64 answer, as closely as PyTorch's own f32 run is.
//! - gradient check: the f64 graph's gradients of every parameter and of the input against central finite
//!   differences of the weighted loss.
//! - it trains; the plan fuses across the branches (and without fusions gives the same numbers to rounding); a
//!   graph file rebuilds it.

use crate::common;
use ndarray::{ArrayD, IxDyn};
use normvision::io::{load_graph, save_graph};
use normvision::model::{Graph, PlanOptions, Sequential};
use normvision::nn::loss::{cross_entropy, mse, WeightedLosses};
use normvision::nn::{Conv2dConfig, GlobalAvgPool, LinearConfig, MaxPool2dConfig, ReLU};
use normvision::norm::{BatchNorm, BatchNormConfig};
use normvision::optim::sgd::{Sgd, SgdConfig};
use normvision::optim::Optimizer;
use normvision::state::Stateful;
use normvision::{Ctx, Isa, Real};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_pcg::Pcg64;

const WEIGHTS: [f64; 2] = [1.0, 0.5];

/// The model of `tools/gen_branching_fixture.py`, with PyTorch's module names.
fn build<T: Real>(rng: &mut impl Rng) -> Graph<T> {
    let conv =
        |cfg: Conv2dConfig, rng: &mut dyn rand::RngCore| cfg.build::<T>(&mut { rng }).unwrap();
    let bn = || BatchNormConfig::d2(8).build::<T>().unwrap();
    let mut g = Graph::new();
    let x = g.input("x");
    let mut stem = Sequential::new();
    stem.push(
        "0",
        conv(Conv2dConfig::new(1, 8, 3).padding(1).bias(false), rng),
    )
    .push("1", bn())
    .push("2", ReLU::new())
    .push("3", MaxPool2dConfig::new(2).build::<T>().unwrap());
    let s = g.chain("stem", stem, x).unwrap();
    let mut branches = vec![];
    for (i, (k, d)) in [(1usize, 1usize), (3, 2)].into_iter().enumerate() {
        let mut b = Sequential::new();
        b.push(
            "0",
            conv(
                Conv2dConfig::new(8, 8, k)
                    .padding(d * (k / 2))
                    .dilation(d)
                    .bias(false),
                rng,
            ),
        )
        .push("1", bn())
        .push("2", ReLU::new());
        branches.push(g.chain(&format!("aspp.{i}"), b, s).unwrap());
    }
    let cat = g.concat("cat", &branches, 1).unwrap();
    let mut project = Sequential::new();
    project
        .push("0", conv(Conv2dConfig::new(16, 8, 1).bias(false), rng))
        .push("1", bn());
    let p = g.chain("project", project, cat).unwrap();
    let sum = g.add("residual", &[p, s]).unwrap();
    let r = g.layer("relu", ReLU::new(), sum).unwrap();
    let pooled = g.layer("gap", GlobalAvgPool::new(), r).unwrap();
    let cls = g
        .layer(
            "classifier",
            LinearConfig::new(8, 10).build::<T>(rng).unwrap(),
            pooled,
        )
        .unwrap();
    let aux = g
        .layer("aux", conv(Conv2dConfig::new(8, 1, 1), rng), r)
        .unwrap();
    g.set_outputs(&[cls, aux]).unwrap();
    g
}

/// The weighted loss of the two outputs, and dL/d(output) for each.
fn loss<T: Real>(
    outs: &[ArrayD<T>],
    targets: &[usize],
    aux_target: &ArrayD<T>,
) -> (f64, Vec<ArrayD<T>>) {
    let c = WeightedLosses::new(&WEIGHTS)
        .unwrap()
        .combine(vec![
            cross_entropy(&outs[0], targets, 0.0).unwrap(),
            mse(&outs[1], aux_target).unwrap(),
        ])
        .unwrap();
    (c.loss, c.grads)
}

/// One training step's loss; accumulates the gradients and returns dL/dx.
fn step<T: Real>(
    g: &mut Graph<T>,
    x: &ArrayD<T>,
    targets: &[usize],
    aux_target: &ArrayD<T>,
) -> (f64, ArrayD<T>) {
    let ctx = Ctx::train();
    let outs = g.forward(&[x], ctx).unwrap();
    let (l, dys) = loss(&outs, targets, aux_target);
    let dys: Vec<&ArrayD<T>> = dys.iter().collect();
    let dx = g
        .backward(&[x], &dys, ctx, true)
        .unwrap()
        .remove(0)
        .unwrap();
    (l, dx)
}

fn grads<T: Real>(g: &mut Graph<T>) -> Vec<(String, ArrayD<T>)> {
    let mut v = vec![];
    g.visit_params("", &mut |n, p| v.push((n.to_string(), p.grad.clone())));
    v
}

/// max |a − b| / max(1e-3, max |b|): the error relative to the reference tensor's scale.
fn err<T: Real>(a: &ArrayD<T>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.as_f64() - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn to64(a: &ArrayD<f32>) -> ArrayD<f64> {
    a.mapv(|v| v as f64)
}

struct Golden {
    fx: common::Fixture,
}

impl Golden {
    fn load() -> Golden {
        Golden {
            fx: common::load_fixture("model", "branching"),
        }
    }
    fn targets(&self) -> Vec<usize> {
        self.fx
            .get_i64("targets")
            .iter()
            .map(|&t| t as usize)
            .collect()
    }
    fn graph<T: Real>(&self) -> Graph<T> {
        let mut g = build::<T>(&mut Pcg64::seed_from_u64(0));
        let keys: Vec<String> = g.state_dict().keys().cloned().collect();
        let mut want: Vec<String> = self.fx.meta["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        want.sort();
        assert_eq!(keys, want, "state-dict names are PyTorch's");
        g.load_state("", &self.fx.state("init")).unwrap();
        g
    }
    /// Every compared tensor of a run in precision `T`: (name, ours, torch f32, torch f64).
    fn compare<T: Real>(&self) -> Vec<(String, f64, f64)> {
        let fx = &self.fx;
        let mut g = self.graph::<T>();
        let x: ArrayD<T> = fx.get("x").mapv(|v| T::of_f64(v as f64));
        let aux_t: ArrayD<T> = fx.get("aux_target").mapv(|v| T::of_f64(v as f64));
        let ctx = Ctx::train();
        let outs = g.forward(&[&x], ctx).unwrap();
        let (l, dys) = loss(&outs, &self.targets(), &aux_t);
        let dys: Vec<&ArrayD<T>> = dys.iter().collect();
        let dx = g
            .backward(&[&x], &dys, ctx, true)
            .unwrap()
            .remove(0)
            .unwrap();
        let mut ours: Vec<(String, ArrayD<f64>)> = vec![
            ("cls".into(), outs[0].mapv(|v| v.as_f64())),
            ("aux".into(), outs[1].mapv(|v| v.as_f64())),
            ("loss".into(), ArrayD::from_elem(IxDyn(&[1]), l)),
            ("grad.x".into(), dx.mapv(|v| v.as_f64())),
        ];
        for (n, gr) in grads(&mut g) {
            ours.push((format!("grad.{n}"), gr.mapv(|v| v.as_f64())));
        }
        // the running statistics in the graph's own precision (a state dict holds float32)
        for node in g.nodes() {
            if let Some(bn) = node.layer_as::<BatchNorm<T>>() {
                for (stat, v) in [
                    ("running_mean", bn.running_mean()),
                    ("running_var", bn.running_var()),
                ] {
                    let v = v.expect("tracked statistics").mapv(|v| v.as_f64());
                    ours.push((format!("state.{}.{stat}", node.name()), v));
                }
            }
        }
        let ev = g.forward(&[&x], Ctx::eval()).unwrap();
        ours.push(("eval_cls".into(), ev[0].mapv(|v| v.as_f64())));
        ours.push(("eval_aux".into(), ev[1].mapv(|v| v.as_f64())));
        ours.into_iter()
            .map(|(name, a)| {
                let key = |p: &str| {
                    if name == "loss" {
                        format!("{p}.loss")
                    } else {
                        format!("{p}.{name}")
                    }
                };
                let (t32, t64) = (to64(fx.get(&key("f32"))), fx.get_f64(&key("f64")).clone());
                let (t32, t64) = if name == "loss" {
                    (
                        t32.slice_move(ndarray::s![2..3]).into_dyn(),
                        t64.slice_move(ndarray::s![2..3]).into_dyn(),
                    )
                } else {
                    (t32, t64)
                };
                (name, err(&a, &t64), err(&t32, &t64))
            })
            .collect()
    }
}

#[test]
fn f64_graph_matches_pytorch_f64() {
    let rows = Golden::load().compare::<f64>();
    assert_eq!(
        rows.len(),
        4 + 16 + 8 + 2,
        "every output, gradient and statistic compared"
    );
    for (name, ours, _) in rows {
        assert!(
            ours < 1e-12,
            "{name}: error {ours:e} against PyTorch's float64"
        );
    }
}

#[test]
fn f32_graph_is_as_close_to_the_f64_answer_as_pytorchs_f32() {
    let rows = Golden::load().compare::<f32>();
    let (mut worst, mut worst_torch) = (0.0f64, 0.0f64);
    for (name, ours, torch) in &rows {
        println!("{name:32} ours {ours:9.2e}  torch f32 {torch:9.2e}");
        // within 4× PyTorch's own float32 error on the same tensor, or a float32 rounding of the scale
        assert!(
            *ours <= (4.0 * torch).max(2e-6),
            "{name}: error {ours:e} vs PyTorch f32's {torch:e}"
        );
        worst = worst.max(*ours);
        worst_torch = worst_torch.max(*torch);
    }
    println!("worst: ours {worst:.2e}, torch f32 {worst_torch:.2e}");
    assert!(
        worst <= 2.0 * worst_torch.max(1e-6),
        "worst {worst:e} vs PyTorch's {worst_torch:e}"
    );
}

fn randn(rng: &mut Pcg64, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.sample::<f64, _>(StandardNormal))
}

/// Adds `delta` to element `i` of parameter `k`.
fn probe(g: &mut Graph<f64>, k: usize, i: usize, delta: f64) {
    let mut j = 0;
    g.visit_params("", &mut |_, p| {
        if j == k {
            p.value.as_slice_mut().unwrap()[i] += delta;
        }
        j += 1;
    });
}

#[test]
fn f64_gradients_pass_a_finite_difference_check() {
    let mut rng = Pcg64::seed_from_u64(7);
    let mut g = build::<f64>(&mut rng);
    // non-trivial affine parameters, so every gradient path carries weight
    g.visit_params("", &mut |n, p| {
        if n.ends_with("1.weight") || n.ends_with("1.bias") || n.starts_with("aux.bias") {
            for v in p.value.iter_mut() {
                *v = 0.5 + rng.gen::<f64>();
            }
        }
    });
    let (n, h, w) = (3, 8, 6);
    let x = randn(&mut rng, &[n, 1, h, w]);
    let targets = [1usize, 4, 9];
    let aux_t = randn(&mut rng, &[n, 1, h / 2, w / 2]);
    g.zero_grad();
    let (_, dx) = step(&mut g, &x, &targets, &aux_t);
    let analytic = grads(&mut g);
    let f = |g: &mut Graph<f64>, x: &ArrayD<f64>| {
        let outs = g.forward(&[x], Ctx::train()).unwrap();
        loss(&outs, &targets, &aux_t).0
    };
    let hh = 1e-6;
    let check = |what: &str, fd: Vec<f64>, an: &[f64]| {
        let scale = an.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let e = fd
            .iter()
            .zip(an)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
            / scale;
        assert!(e < 1e-6, "{what}: finite-difference error {e:e}");
        e
    };
    let mut fd = vec![];
    for i in 0..x.len() {
        let (mut a, mut b) = (x.clone(), x.clone());
        a.as_slice_mut().unwrap()[i] += hh;
        b.as_slice_mut().unwrap()[i] -= hh;
        fd.push((f(&mut g, &a) - f(&mut g, &b)) / (2.0 * hh));
    }
    let mut worst = check("x", fd, dx.as_slice().unwrap());
    assert_eq!(analytic.len(), 16);
    for (k, (name, an)) in analytic.iter().enumerate() {
        let len = an.len();
        let mut fd = vec![];
        for i in 0..len {
            probe(&mut g, k, i, hh);
            let up = f(&mut g, &x);
            probe(&mut g, k, i, -2.0 * hh);
            let down = f(&mut g, &x);
            probe(&mut g, k, i, hh);
            fd.push((up - down) / (2.0 * hh));
        }
        worst = worst.max(check(name, fd, an.as_slice().unwrap()));
    }
    println!("worst finite-difference error {worst:.2e}");
}

/// A learnable two-headed task: the class is which of ten prototypes an image is a noisy copy of; the map is
/// the image's 2×2 average.
fn task(
    rng: &mut Pcg64,
    protos: &[ArrayD<f32>],
    n: usize,
) -> (ArrayD<f32>, Vec<usize>, ArrayD<f32>) {
    let (h, w) = (12, 10);
    let mut x = ArrayD::<f32>::zeros(IxDyn(&[n, 1, h, w]));
    let mut map = ArrayD::<f32>::zeros(IxDyn(&[n, 1, h / 2, w / 2]));
    let mut t = vec![];
    for i in 0..n {
        let k = rng.gen_range(0..protos.len());
        t.push(k);
        for r in 0..h {
            for c in 0..w {
                let v = protos[k][[r, c]] + 0.3 * rng.sample::<f32, _>(StandardNormal);
                x[[i, 0, r, c]] = v;
                map[[i, 0, r / 2, c / 2]] += v / 4.0;
            }
        }
    }
    (x, t, map)
}

#[test]
fn trains_through_the_graph_engine() {
    let mut rng = Pcg64::seed_from_u64(11);
    let protos: Vec<ArrayD<f32>> = (0..10)
        .map(|_| randn(&mut rng, &[12, 10]).mapv(|v| v as f32))
        .collect();
    let batches: Vec<_> = (0..4).map(|_| task(&mut rng, &protos, 16)).collect();
    let mut g = build::<f32>(&mut rng);
    let mut opt = Sgd::new(SgdConfig {
        momentum: 0.9,
        ..SgdConfig::default()
    })
    .unwrap();
    const EPOCHS: usize = 30;
    let mut first = None;
    let mut last = vec![];
    for epoch in 0..EPOCHS {
        for (x, t, m) in &batches {
            g.zero_grad();
            let (l, _) = step(&mut g, x, t, m);
            opt.step(&mut g, 0.05).unwrap();
            first.get_or_insert(l);
            if epoch == EPOCHS - 1 {
                last.push(l);
            }
        }
    }
    let first = first.unwrap();
    let last = last.iter().sum::<f64>() / last.len() as f64;
    println!("loss {first:.4} -> {last:.4}");
    assert!(last < 0.25 * first, "loss {first} -> {last}");
    // both heads learned: training accuracy and the map's error
    let (x, t, m) = &batches[0];
    let outs = g.forward(&[x], Ctx::eval()).unwrap();
    let acc = normvision::nn::accuracy(&outs[0], t).unwrap();
    let map_err = mse(&outs[1], m).unwrap().0;
    let map_var = mse(m, &ArrayD::zeros(m.raw_dim())).unwrap().0;
    println!("accuracy {acc}, map mse {map_err} vs mean square {map_var}");
    assert!(acc >= 0.9, "accuracy {acc}");
    assert!(
        map_err < 0.3 * map_var,
        "map mse {map_err} vs its mean square {map_var}"
    );
}

#[test]
fn plan_fuses_across_branches_and_unfused_agrees() {
    let mut rng = Pcg64::seed_from_u64(3);
    let mut fused = build::<f32>(&mut rng);
    let mut plain = build::<f32>(&mut Pcg64::seed_from_u64(3));
    plain
        .set_plan_options(PlanOptions::default().fuse(false))
        .unwrap();
    let plan = fused
        .describe_plan(&[&[4, 1, 12, 10]], Ctx::train(), false)
        .unwrap();
    println!("{plan}");
    // the fusions every instruction set has, and the AVX-512 ones (BN+pool, conv moments) where it runs
    let mut expect = vec!["aspp.1.1+aspp.1.2", "+ ReLU", "residual+relu"];
    // the stem's BatchNorm hands dx to the first convolution by planes, unless (AVX-512) it is fused with
    // the max pool after it, which the dx-planes pattern does not combine with
    if Isa::detect() == Isa::Avx512 {
        expect.extend(["+ 2x2 max pool", "plane moments"]);
    } else {
        expect.push("dx by planes");
    }
    for fusion in expect {
        assert!(
            plan.contains(fusion),
            "the training plan applies {fusion}:\n{plan}"
        );
    }
    let x = randn(&mut rng, &[4, 1, 12, 10]).mapv(|v| v as f32);
    let aux_t = randn(&mut rng, &[4, 1, 6, 5]).mapv(|v| v as f32);
    let t = [0usize, 3, 5, 9];
    let (la, dxa) = step(&mut fused, &x, &t, &aux_t);
    let (lb, dxb) = step(&mut plain, &x, &t, &aux_t);
    assert!(
        (la - lb).abs() < 1e-6 * la.abs().max(1.0),
        "loss {la} vs {lb}"
    );
    assert!(err(&dxa, &dxb.mapv(|v| v as f64)) < 1e-5);
    for ((n, a), (_, b)) in grads(&mut fused).iter().zip(grads(&mut plain)) {
        let e = err(a, &b.mapv(|v| v as f64));
        assert!(e < 1e-5, "{n}: fused vs unfused {e:e}");
    }
    let ea = fused.infer(&[&x]).unwrap();
    let eb = plain.forward(&[&x], Ctx::eval()).unwrap();
    for (a, b) in ea.iter().zip(&eb) {
        assert!(err(a, &b.mapv(|v| v as f64)) < 1e-6);
    }
}

#[test]
fn a_graph_file_rebuilds_the_model() {
    let mut rng = Pcg64::seed_from_u64(5);
    let mut g = build::<f32>(&mut rng);
    let x = randn(&mut rng, &[2, 1, 12, 10]).mapv(|v| v as f32);
    let aux_t = randn(&mut rng, &[2, 1, 6, 5]).mapv(|v| v as f32);
    step(&mut g, &x, &[1, 2], &aux_t); // running statistics move away from their defaults
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("branching.safetensors");
    save_graph(&path, &g).unwrap();
    let mut back = load_graph(&path).unwrap();
    assert_eq!(back.spec().unwrap(), g.spec().unwrap());
    let (a, b) = (
        g.forward(&[&x], Ctx::eval()).unwrap(),
        back.forward(&[&x], Ctx::eval()).unwrap(),
    );
    assert_eq!(a, b, "eval outputs after a save and load");
    // a plain state dict has no architecture: a typed error naming the file
    normvision::io::save_state_dict(&path, &g.state_dict(), &Default::default()).unwrap();
    let e = load_graph(&path).unwrap_err().to_string();
    assert!(
        e.contains("branching.safetensors") && e.contains("no architecture"),
        "{e}"
    );
}

#[test]
fn an_aspp_style_graph_with_image_pooling_trains_and_round_trips() {
    // DeepLabV3's ASPP shape: a 1x1 branch, a dilated 3x3 branch and image pooling (global average, 1x1 conv,
    // bilinear back to the map), concatenated, projected, then up-sampled to the input
    use normvision::nn::{AvgPool2dConfig, UpsampleBilinear, UpsampleSize};
    let mut rng = Pcg64::seed_from_u64(5);
    let mut g = Graph::<f32>::new();
    let x = g.input("x");
    let stem = g
        .layer(
            "stem",
            Conv2dConfig::new(2, 4, 3)
                .padding(1)
                .stride(2)
                .build::<f32>(&mut rng)
                .unwrap(),
            x,
        )
        .unwrap();
    let b1 = g
        .layer(
            "b1",
            Conv2dConfig::new(4, 3, 1).build::<f32>(&mut rng).unwrap(),
            stem,
        )
        .unwrap();
    let b2 = g
        .layer(
            "b2",
            Conv2dConfig::new(4, 3, 3)
                .padding(2)
                .dilation(2)
                .build::<f32>(&mut rng)
                .unwrap(),
            stem,
        )
        .unwrap();
    let p = g
        .layer(
            "pool",
            AvgPool2dConfig::new(4).build::<f32>().unwrap(),
            stem,
        )
        .unwrap();
    let p = g
        .layer(
            "pool_conv",
            Conv2dConfig::new(4, 3, 1).build::<f32>(&mut rng).unwrap(),
            p,
        )
        .unwrap();
    let p = g
        .layer(
            "pool_up",
            UpsampleBilinear::<f32>::new(UpsampleSize::Size(4, 4), false).unwrap(),
            p,
        )
        .unwrap();
    let cat = g.concat("cat", &[b1, b2, p], 1).unwrap();
    let proj = g
        .layer(
            "proj",
            Conv2dConfig::new(9, 5, 1).build::<f32>(&mut rng).unwrap(),
            cat,
        )
        .unwrap();
    let up = g
        .layer(
            "up",
            UpsampleBilinear::<f32>::new(UpsampleSize::Scale(2.0, 2.0), true).unwrap(),
            proj,
        )
        .unwrap();
    g.set_outputs(&[up]).unwrap();
    let input = ArrayD::from_shape_fn(IxDyn(&[2, 2, 8, 8]), |i| {
        ((i[1] * 7 + i[2] * 3 + i[3]) % 5) as f32 - 2.0
    });
    let y = g.forward(&[&input], Ctx::train()).unwrap().remove(0);
    assert_eq!(y.shape(), &[2, 5, 8, 8]);
    let grads = g
        .backward(&[&input], &[&ArrayD::ones(y.raw_dim())], Ctx::train(), true)
        .unwrap();
    assert_eq!(grads[0].as_ref().unwrap().shape(), input.shape());
    // the architecture, upsampling layers included, survives a graph file
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aspp.safetensors");
    save_graph(&path, &g).unwrap();
    let mut back = load_graph(&path).unwrap();
    let y2 = back.forward(&[&input], Ctx::eval()).unwrap().remove(0);
    let y1 = g.forward(&[&input], Ctx::eval()).unwrap().remove(0);
    assert_eq!(y1, y2);
}

#[test]
fn resize_as_follows_any_input_size_with_the_layers_numbers_and_gradients() {
    // image pooling broadcast back to the map and the final up-sampling to the input, for inputs of any size:
    // x -> conv(stride 2) -> [global average -> 1x1 conv -> resize as the map] ++ map -> 1x1 conv -> resize
    // as x
    use normvision::model::Op;
    use normvision::nn::{UpsampleBilinear, UpsampleSize};
    use normvision::Layer;
    let build = |align: bool| {
        let mut rng = Pcg64::seed_from_u64(11);
        let mut g = Graph::<f64>::new();
        let x = g.input("x");
        let stem = g
            .layer(
                "stem",
                Conv2dConfig::new(2, 4, 3)
                    .padding(1)
                    .stride(2)
                    .build::<f64>(&mut rng)
                    .unwrap(),
                x,
            )
            .unwrap();
        let p = g.layer("pool", GlobalAvgPool::new(), stem).unwrap();
        let p = g
            .layer("pool_conv", normvision::nn::Reshape::new(vec![4, 1, 1]), p)
            .unwrap();
        let p = g.resize_as("pool_up", p, stem, align).unwrap();
        let cat = g.concat("cat", &[stem, p], 1).unwrap();
        let proj = g
            .layer(
                "proj",
                Conv2dConfig::new(8, 3, 1).build::<f64>(&mut rng).unwrap(),
                cat,
            )
            .unwrap();
        let up = g.resize_as("up", proj, x, align).unwrap();
        g.set_outputs(&[up]).unwrap();
        g
    };
    for align in [false, true] {
        let mut g = build(align);
        assert!(matches!(
            g.node("up").unwrap().op(),
            Op::ResizeAs { align_corners } if *align_corners == align
        ));
        for (h, w) in [(8usize, 8usize), (13, 10)] {
            let mut rng = Pcg64::seed_from_u64((h * 100 + w) as u64);
            let x = randn(&mut rng, &[2, 2, h, w]);
            let y = g.forward(&[&x], Ctx::train()).unwrap().remove(0);
            assert_eq!(y.shape(), &[2, 3, h, w]);
            // the same numbers as the layer at that size: the projection's output, resampled
            let mut proj_only = build(align);
            let proj_v = proj_only.node("proj").unwrap().output();
            proj_only.set_outputs(&[proj_v]).unwrap();
            let p = proj_only.forward(&[&x], Ctx::train()).unwrap().remove(0);
            let mut layer = UpsampleBilinear::<f64>::new(UpsampleSize::Size(h, w), align).unwrap();
            assert_eq!(y, layer.forward(&p, Ctx::train()).unwrap());
            // finite differences through both resizes, on the input
            let dy = randn(&mut rng, y.shape());
            let dx = g
                .backward(&[&x], &[&dy], Ctx::train(), true)
                .unwrap()
                .remove(0)
                .unwrap();
            let mut g2 = build(align);
            let f = |x: &ArrayD<f64>, g2: &mut Graph<f64>| -> f64 {
                let y = g2.forward(&[x], Ctx::train()).unwrap().remove(0);
                y.iter().zip(dy.iter()).map(|(a, b)| a * b).sum()
            };
            let hh = 1e-6;
            for i in (0..x.len()).step_by(7) {
                let (mut a, mut b) = (x.clone(), x.clone());
                a.as_slice_mut().unwrap()[i] += hh;
                b.as_slice_mut().unwrap()[i] -= hh;
                let fd = (f(&a, &mut g2) - f(&b, &mut g2)) / (2.0 * hh);
                let an = dx.as_slice().unwrap()[i];
                assert!(
                    (fd - an).abs() < 1e-6 * an.abs().max(1.0),
                    "align {align} {h}x{w} dx[{i}]: {an} vs finite differences {fd}"
                );
            }
        }
        // the architecture survives a spec round trip
        let spec = g.spec().unwrap();
        let back = Graph::<f64>::from_spec(&spec).unwrap();
        assert_eq!(back.spec().unwrap(), spec);
    }
}
