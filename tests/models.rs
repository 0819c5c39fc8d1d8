//! Every model builds with every applicable normalization, runs forward and backward on a batch, exposes
//! PyTorch-style state-dict names, and takes optimizer steps that lower the loss on a fixed batch.

use ndarray::{ArrayD, IxDyn};
use normvision::model::{Model, ModelConfig, ModelKind, NormKind};
use normvision::nn::loss::cross_entropy;
use normvision::optim::sgd::SgdConfig;
use normvision::optim::OptimConfig;
use normvision::state::Stateful;
use normvision::Ctx;
use rand::{Rng, SeedableRng};

const NORMS: [NormKind; 7] = [
    NormKind::None,
    NormKind::Batch,
    NormKind::Group,
    NormKind::Layer,
    NormKind::Instance,
    NormKind::Bcn,
    NormKind::Frozen,
];

fn batch(n: usize) -> (ArrayD<f32>, Vec<usize>) {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
    let x = ArrayD::from_shape_fn(IxDyn(&[n, 1, 28, 28]), |_| rng.gen::<f32>() * 2.0 - 1.0);
    let y = (0..n).map(|i| i % 10).collect();
    (x, y)
}

#[test]
fn every_model_and_norm_trains_on_a_fixed_batch() {
    let (x, y) = batch(16);
    for kind in [ModelKind::Cnn, ModelKind::Mlp, ModelKind::Resnet] {
        for norm in NORMS {
            let cfg = ModelConfig::fashion(kind, norm);
            let mut m = match Model::new(cfg) {
                Ok(m) => m,
                Err(e) => {
                    // The MLP has no spatial dims, so instance norm is rejected with a clear error.
                    assert!(
                        kind == ModelKind::Mlp && norm == NormKind::Instance,
                        "{kind:?}/{norm:?}: {e}"
                    );
                    continue;
                }
            };
            let mut opt = OptimConfig::Sgd(SgdConfig {
                momentum: 0.9,
                ..SgdConfig::default()
            })
            .build()
            .unwrap();
            let mut losses = vec![];
            for _ in 0..8 {
                m.zero_grad();
                let logits = m.forward(&x, Ctx::train()).unwrap();
                assert_eq!(logits.shape(), &[16, 10], "{kind:?}/{norm:?}");
                let (loss, d) = cross_entropy(&logits, &y, 0.0).unwrap();
                let dx = m.backward(&x, &d, Ctx::train()).unwrap();
                assert_eq!(dx.shape(), x.shape());
                opt.step(&mut m, 0.02).unwrap();
                losses.push(loss);
            }
            assert!(
                losses.iter().all(|l| l.is_finite()),
                "{kind:?}/{norm:?}: {losses:?}"
            );
            assert!(
                losses[7] < losses[0],
                "{kind:?}/{norm:?}: loss did not fall: {losses:?}"
            );
            let logits = m.forward(&x, Ctx::eval()).unwrap();
            assert!(logits.iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn resnet_state_dict_uses_pytorch_style_names() {
    let m = Model::new(ModelConfig::fashion(ModelKind::Resnet, NormKind::Batch)).unwrap();
    let sd = m.state_dict();
    for k in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.0.bn2.num_batches_tracked",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.running_mean",
        "layer3.2.conv2.weight",
        "fc.weight",
        "fc.bias",
    ] {
        assert!(
            sd.get(k).is_some(),
            "missing {k}; have {:?}",
            sd.keys().collect::<Vec<_>>()
        );
    }
    assert!(
        sd.get("layer1.0.shortcut.0.weight").is_none(),
        "identity shortcut has no weights"
    );
}

#[test]
fn frozen_model_loads_a_batchnorm_checkpoint() {
    let mut bn = Model::new(ModelConfig::fashion(ModelKind::Cnn, NormKind::Batch)).unwrap();
    let (x, _) = batch(8);
    for _ in 0..3 {
        bn.forward(&x, Ctx::train()).unwrap();
    }
    let sd = bn.state_dict();
    let mut frozen = Model::new(ModelConfig::fashion(ModelKind::Cnn, NormKind::Frozen)).unwrap();
    frozen.load_state("", &sd).unwrap();
    let a = bn.forward(&x, Ctx::eval()).unwrap();
    let b = frozen.forward(&x, Ctx::train()).unwrap();
    for (p, q) in a.iter().zip(b.iter()) {
        assert!((p - q).abs() <= 1e-5 * (1.0 + p.abs()), "{p} vs {q}");
    }
}

#[test]
fn wrong_input_shape_is_a_typed_error() {
    let mut m = Model::new(ModelConfig::fashion(ModelKind::Cnn, NormKind::Batch)).unwrap();
    let x = ArrayD::zeros(IxDyn(&[2, 3, 28, 28]));
    let e = m.forward(&x, Ctx::train()).unwrap_err();
    assert!(e.to_string().contains("expected input"), "{e}");
    let one = ArrayD::zeros(IxDyn(&[1, 1, 28, 28]));
    let e = m.forward(&one, Ctx::train()).unwrap_err();
    assert!(
        e.to_string()
            .contains("Expected more than 1 value per channel when training"),
        "{e}"
    );
}

/// Layers take their outputs from a pool of recycled buffers (stale contents; NaN-filled in debug builds) that
/// eval passes refill, so every layer must write all of its output. A model that has already run a step on other data must give the
/// same logits, input gradient and parameter gradients, bit for bit, as a fresh copy of itself.
#[test]
fn recycled_buffers_do_not_leak_into_results() {
    let (x, y) = batch(16);
    let (other, _) = {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(99);
        (
            ArrayD::from_shape_fn(IxDyn(&[16, 1, 28, 28]), |_| rng.gen::<f32>() * 4.0),
            (),
        )
    };
    for kind in [ModelKind::Cnn, ModelKind::Resnet] {
        for norm in NORMS {
            let cfg = ModelConfig::fashion(kind, norm);
            let run = |m: &mut Model, inp: &ArrayD<f32>| {
                m.zero_grad();
                let logits = m.forward(inp, Ctx::train()).unwrap();
                let (_, d) = cross_entropy(&logits, &y, 0.0).unwrap();
                let dx = m.backward(inp, &d, Ctx::train()).unwrap();
                let mut grads = vec![];
                m.visit_params("", &mut |_, p| grads.extend(p.grad.iter().copied()));
                (logits, dx, grads)
            };
            let mut used = Model::new(cfg.clone()).unwrap();
            let mut fresh = Model::new(cfg).unwrap();
            // eval passes hand their activations back to the pool; the train step after them reuses them
            used.forward(&other, Ctx::eval()).unwrap();
            used.forward(&other, Ctx::eval()).unwrap();
            run(&mut used, &other);
            used.forward(&other, Ctx::eval()).unwrap();
            // the running statistics moved in `used`; give `fresh` the same state before comparing
            let mut sd = normvision::state::StateDict::default();
            used.save_state("", &mut sd);
            fresh.load_state("", &sd).unwrap();
            let ea = used.forward(&x, Ctx::eval()).unwrap();
            let eb = fresh.forward(&x, Ctx::eval()).unwrap();
            assert!(
                ea.iter()
                    .zip(eb.iter())
                    .all(|(u, v)| u.to_bits() == v.to_bits()),
                "{kind:?}/{norm:?}: eval logits differ"
            );
            let a = run(&mut used, &x);
            let b = run(&mut fresh, &x);
            let same = |p: &[f32], q: &[f32]| {
                p.len() == q.len() && p.iter().zip(q).all(|(u, v)| u.to_bits() == v.to_bits())
            };
            assert!(
                same(a.0.as_slice().unwrap(), b.0.as_slice().unwrap()),
                "{kind:?}/{norm:?}: logits differ"
            );
            assert!(
                same(a.1.as_slice().unwrap(), b.1.as_slice().unwrap()),
                "{kind:?}/{norm:?}: dx differs"
            );
            assert!(
                same(&a.2, &b.2),
                "{kind:?}/{norm:?}: parameter gradients differ"
            );
            assert!(a.0.iter().all(|v| v.is_finite()), "{kind:?}/{norm:?}");
        }
    }
}

#[test]
fn backward_params_gives_backwards_parameter_gradients() {
    // Training skips the gradient with respect to the images (the first layer's dx): the parameter
    // gradients must be bitwise those of the full backward, for every model and norm.
    let (x, y) = batch(8);
    for kind in [ModelKind::Cnn, ModelKind::Mlp, ModelKind::Resnet] {
        for norm in NORMS {
            let cfg = ModelConfig::fashion(kind, norm);
            if Model::new(cfg.clone()).is_err() {
                continue; // a combination the model refuses (InstanceNorm in the MLP)
            }
            let grads = |full: bool| {
                let mut m = Model::new(cfg.clone()).unwrap();
                m.zero_grad();
                let logits = m.forward(&x, Ctx::train()).unwrap();
                let (_, d) = cross_entropy(&logits, &y, 0.0).unwrap();
                if full {
                    let dx = m.backward(&x, &d, Ctx::train()).unwrap();
                    assert_eq!(dx.shape(), x.shape());
                } else {
                    m.backward_params(&x, &d, Ctx::train()).unwrap();
                }
                let mut g = vec![];
                m.visit_params("", &mut |_, p| g.extend(p.grad.iter().map(|v| v.to_bits())));
                g
            };
            let (a, b) = (grads(true), grads(false));
            assert!(!a.is_empty());
            assert!(a == b, "{kind:?}/{norm:?}: parameter gradients differ");
        }
    }
}

#[test]
fn inference_forward_is_bitwise_the_eval_forward() {
    // forward_inference runs each conv + BatchNorm(+ReLU) pair as one pass (the affine applied in the
    // convolution's output); its logits must be those of forward(Eval) (bitwise unless the affine is fused
    // into a convolution's output pass), for every model and norm,
    // with running statistics moved away from their initial values by a few training steps.
    let (x, y) = batch(16);
    for kind in [ModelKind::Cnn, ModelKind::Mlp, ModelKind::Resnet] {
        for norm in NORMS {
            let cfg = ModelConfig::fashion(kind, norm);
            let Ok(mut m) = Model::new(cfg) else {
                continue; // a combination the model refuses (InstanceNorm in the MLP)
            };
            let mut opt = OptimConfig::Sgd(SgdConfig {
                momentum: 0.9,
                ..Default::default()
            })
            .build()
            .unwrap();
            for _ in 0..3 {
                m.zero_grad();
                let logits = m.forward(&x, Ctx::train()).unwrap();
                let (_, d) = cross_entropy(&logits, &y, 0.0).unwrap();
                m.backward_params(&x, &d, Ctx::train()).unwrap();
                opt.step(&mut m, 0.05).unwrap();
            }
            let want = m.forward(&x, Ctx::eval()).unwrap();
            // where a convolution's output pass applies the norm's eval affine (the AVX-512 direct
            // algorithms), it computes y·a + (bias − mean·a) where the norm computes (y − mean)·a + bias: the
            // two agree to f32 rounding of the affine (the bound of plan::fusions::fold), not bitwise
            let plan = m
                .graph_mut()
                .describe_plan(&[x.shape()], Ctx::eval(), true)
                .unwrap();
            let fused_affine = plan.contains("+ eval affine");
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for _ in 0..2 {
                let got = m.forward_inference(&x).unwrap();
                assert_eq!(got.shape(), want.shape());
                let ok = |(a, b): (&f32, &f32)| {
                    a.to_bits() == b.to_bits() || fused_affine && (a - b).abs() <= 1e-5 * scale
                };
                let worst = got
                    .iter()
                    .zip(want.iter())
                    .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                assert!(
                    got.iter().zip(want.iter()).all(ok),
                    "{kind:?}/{norm:?}: inference logits differ from eval logits by up to {worst:e} of \
                     {scale:e} (fused affine: {fused_affine})"
                );
            }
            // no activations are kept: a backward now is a typed error, not garbage
            let d = ArrayD::zeros(want.raw_dim());
            assert!(
                m.backward(&x, &d, Ctx::eval()).is_err(),
                "{kind:?}/{norm:?}"
            );
        }
    }
}

#[test]
fn strict_loading_lists_missing_unexpected_and_mismatched_keys() {
    use normvision::state::StateTensor;
    let mut m = Model::new(ModelConfig::fashion(ModelKind::Mlp, NormKind::Batch)).unwrap();
    let good = m.state_dict();
    m.load_strict(&good).unwrap();

    // a DataParallel-style prefix is consumed, as PyTorch's consume_prefix_in_state_dict_if_present does
    let mut prefixed = normvision::state::StateDict::new();
    for (k, v) in &good.tensors {
        prefixed.tensors.insert(format!("module.{k}"), v.clone());
    }
    let e = m.load_strict(&prefixed).unwrap_err().to_string();
    assert!(
        e.contains("missing keys") && e.contains("unexpected keys [\"module."),
        "{e}"
    );
    prefixed.consume_prefix("module.");
    assert_eq!(prefixed, good);

    let mut extra = good.clone();
    extra.insert_i64("head.num_batches_tracked".into(), 1);
    let e = m.load_strict(&extra).unwrap_err().to_string();
    assert!(
        e.contains("unexpected keys [\"head.num_batches_tracked\"]"),
        "{e}"
    );

    let mut missing = good.clone();
    let first = missing.keys().next().unwrap().clone();
    missing.tensors.remove(&first);
    let e = m.load_strict(&missing).unwrap_err().to_string();
    assert!(e.contains(&format!("missing keys [\"{first}\"]")), "{e}");

    let mut wrong = good.clone();
    let (k, shape) = good
        .tensors
        .iter()
        .find_map(|(k, v)| {
            matches!(v, StateTensor::F32(_)).then(|| (k.clone(), v.shape().to_vec()))
        })
        .unwrap();
    let bad = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[shape.iter().product::<usize>() + 1]));
    wrong.tensors.insert(k.clone(), StateTensor::F32(bad));
    let e = m.load_strict(&wrong).unwrap_err().to_string();
    assert!(e.contains(&format!("size mismatch for {k}")), "{e}");
}

/// Activations are planned by liveness: in inference a chain holds two activations at a time whatever its
/// depth; training keeps exactly what each backward reads (each Linear's and each ReLU's input); and the
/// backward consumes them, so a second backward needs a second forward, as in PyTorch.
#[test]
fn activation_memory_follows_liveness_not_depth() {
    use normvision::model::Sequential;
    use normvision::nn::{LinearConfig, ReLU};
    let (batch, width) = (32, 64);
    let bytes = batch * width * 4;
    for depth in [4, 16] {
        let mut seq = Sequential::new();
        let rng = &mut rand::thread_rng();
        for i in 0..depth {
            seq.push(
                format!("{}", 2 * i),
                LinearConfig::new(width, width).build::<f32>(rng).unwrap(),
            )
            .push(format!("{}", 2 * i + 1), ReLU::new());
        }
        let mut g = seq.into_graph().unwrap();
        let shape = [batch, width];
        let (kept, peak) = g.activation_memory(&[&shape], Ctx::eval(), true).unwrap();
        assert_eq!((kept, peak), (0, 2 * bytes), "inference, depth {depth}");
        let (kept, _) = g.activation_memory(&[&shape], Ctx::train(), false).unwrap();
        assert_eq!(kept, (2 * depth - 1) * bytes, "training, depth {depth}");

        let x = ndarray::ArrayD::<f32>::ones(ndarray::IxDyn(&shape));
        let dy = ndarray::ArrayD::<f32>::ones(ndarray::IxDyn(&shape));
        g.forward(&[&x], Ctx::train()).unwrap();
        g.backward(&[&x], &[&dy], Ctx::train(), false).unwrap();
        let again = g.backward(&[&x], &[&dy], Ctx::train(), false);
        assert!(
            matches!(again, Err(normvision::NvError::NoSavedState { .. })),
            "{again:?}"
        );
    }
}
