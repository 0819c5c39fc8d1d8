//! Folding an eval-mode BatchNorm into the convolution or linear layer before it (`Conv2d::fold_affine`,
//! `Graph::fold_batch_norm`): the folded convolution equals the convolution followed by the BatchNorm up to f32
//! rounding, a folded model gives the unfolded model's eval logits, and over a whole test set (Fashion-MNIST's
//! 10 000 images when installed) every zoo model's folded logits agree within 1e-4 and pick the same class.

use ndarray::{ArrayD, IxDyn};
use normvision::model::{Model, ModelConfig, ModelKind, NormKind};
use normvision::nn::loss::cross_entropy;
use normvision::nn::{Conv2dConfig, ReLU};
use normvision::norm::BatchNormConfig;
use normvision::state::Stateful;
use normvision::{Ctx, Layer};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn uniform(rng: &mut rand_pcg::Pcg64Mcg, shape: &[usize], lo: f32, hi: f32) -> ArrayD<f32> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.gen_range(lo..hi))
}

/// max |a - b| / (1 + max |b|).
fn rel_err(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()))
        / (1.0 + scale)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// conv → BatchNorm(eval) (→ ReLU) equals the folded conv (→ ReLU), for random shapes, strides, groups,
    /// running statistics and affine parameters, with and without a conv bias.
    #[test]
    fn folded_conv_equals_conv_then_batch_norm(
        seed in 0u64..1000,
        cin_per_group in 1usize..5,
        cout_per_group in 1usize..5,
        groups in 1usize..3,
        k in 1usize..4,
        stride in 1usize..3,
        hw in 5usize..11,
        bias: bool,
        relu: bool,
        n in 1usize..6,
    ) {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
        let (cin, cout) = (cin_per_group * groups, cout_per_group * groups);
        let cfg = Conv2dConfig::new(cin, cout, k)
            .stride(stride)
            .padding(k / 2)
            .groups(groups)
            .bias(bias);
        let mut conv = cfg.clone().build::<f32>(&mut rng).unwrap();
        let mut bn = BatchNormConfig::d2(cout).build::<f32>().unwrap();
        bn.weight_mut().unwrap().value = uniform(&mut rng, &[cout], 0.5, 1.5);
        bn.bias_mut().unwrap().value = uniform(&mut rng, &[cout], -0.5, 0.5);
        let (rm, rv) = bn.running_stats_mut().unwrap();
        *rm = uniform(&mut rng, &[cout], -0.5, 0.5);
        *rv = uniform(&mut rng, &[cout], 0.2, 2.0);
        let x = uniform(&mut rng, &[n, cin, hw, hw], -1.0, 1.0);
        let mut act = ReLU::<f32>::new();

        let y = conv.forward(&x, Ctx::eval()).unwrap();
        let mut want = bn.forward(&y, Ctx::eval()).unwrap();
        let aff = bn.eval_affine().expect("foldable");
        conv.fold_affine(&aff.scale, &aff.shift).unwrap();
        let mut got = conv.forward(&x, Ctx::eval()).unwrap();
        if relu {
            want = act.forward(&want, Ctx::eval()).unwrap();
            got = act.forward(&got, Ctx::eval()).unwrap();
        }
        let e = rel_err(&got, &want);
        prop_assert!(e < 1e-5, "relative error {e}");
    }
}

/// Without running statistics BatchNorm's eval uses batch statistics: not an affine, nothing to fold.
#[test]
fn batch_norm_without_running_stats_is_not_folded() {
    let bn = BatchNormConfig::d2(4)
        .track_running_stats(false)
        .build::<f32>()
        .unwrap();
    assert!(bn.eval_affine().is_none());
}

/// A trained reference CNN: the folded model's eval logits (plain and through the inference plan) equal the
/// unfolded model's, its state dict has no BatchNorm keys, and it is an ordinary model of convolutions with
/// biases (it still trains).
#[test]
fn folded_model_gives_the_same_eval_logits() {
    let mut m = Model::new(ModelConfig::fashion(ModelKind::Cnn, NormKind::Batch)).unwrap();
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(5);
    let x = uniform(&mut rng, &[16, 1, 28, 28], -1.0, 1.0);
    let y: Vec<usize> = (0..16).map(|i| i % 10).collect();
    // a few train steps move the running statistics away from (0, 1)
    for _ in 0..3 {
        m.zero_grad();
        let logits = m.forward(&x, Ctx::train()).unwrap();
        let (_, d) = cross_entropy(&logits, &y, 0.0).unwrap();
        m.backward(&x, &d, Ctx::train()).unwrap();
    }
    let want = m.forward(&x, Ctx::eval()).unwrap();
    let before = m.state_dict().keys().count();
    let folded = m.fold_batch_norm().unwrap();
    assert_eq!(
        folded, 5,
        "the four conv+BN pairs and the linear+BatchNorm1d pair"
    );
    let got = m.forward(&x, Ctx::eval()).unwrap();
    let e = rel_err(&got, &want);
    assert!(e < 1e-5, "folded logits differ: {e}");
    let inferred = m.forward_inference(&x).unwrap();
    assert_eq!(
        inferred, got,
        "the folded model's inference plan is bitwise its eval forward"
    );
    // the plan fuses each 2×2 max pool into the convolution (+ folded BN) + ReLU before it
    let plan = m
        .graph_mut()
        .describe_plan(&[&[16, 1, 28, 28]], Ctx::eval(), true)
        .unwrap();
    assert_eq!(plan.matches("+ 2x2 max pool").count(), 2, "{plan}");
    // one image at a time (each convolution split over the threads by output channel)
    for i in [0, 7] {
        let xi = x
            .slice(ndarray::s![i..i + 1, .., .., ..])
            .to_owned()
            .into_dyn();
        let one = m.forward_inference(&xi).unwrap();
        let want_i = m.forward(&xi, Ctx::eval()).unwrap();
        assert_eq!(
            one, want_i,
            "image {i} alone: inference plan against eval forward"
        );
    }
    let keys: Vec<String> = m.state_dict().keys().cloned().collect();
    assert_eq!(
        keys.len(),
        before - 5 * 5 + 5,
        "BN keys gone, one new conv or linear bias each"
    );
    assert!(keys
        .iter()
        .all(|k| !k.starts_with("1.") && !k.starts_with("4.") && !k.starts_with("16.")));
    assert!(keys.contains(&"0.bias".to_string()) && keys.contains(&"15.bias".to_string()));
    let (_, d) = cross_entropy(&got, &y, 0.0).unwrap();
    m.forward(&x, Ctx::train()).unwrap();
    assert!(m.backward(&x, &d, Ctx::train()).is_ok());
    // models without BatchNorm fold nothing
    let mut plain = Model::new(ModelConfig::fashion(ModelKind::Cnn, NormKind::Group)).unwrap();
    assert_eq!(plain.fold_batch_norm().unwrap(), 0);
}

/// The whole zoo with BatchNorm, a few training steps in (so that the running statistics and the affine
/// parameters are not their initial values), folded: every logit of every test image within 1e-4 of the
/// unfolded model's, and the same argmax except where the unfolded top two are within 1e-4.
#[test]
fn folded_zoo_models_agree_on_the_whole_test_set() {
    use normvision::data::{fashion_mnist, DataLoader, LoaderConfig};
    let test = if fashion_mnist::is_available(None) {
        fashion_mnist::load(None, fashion_mnist::Split::Test).unwrap()
    } else {
        eprintln!("Fashion-MNIST not installed: 2000 synthetic images instead");
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(9);
        let images = (0..2000 * 784).map(|_| rng.gen::<u8>()).collect();
        let labels = (0..2000).map(|i| i % 10).collect();
        let classes = (0..10).map(|i| i.to_string()).collect();
        normvision::data::Dataset::new(images, labels, classes, [1, 28, 28]).unwrap()
    };
    let n = test.len();
    let norm = test.mean_std().unwrap();
    let loader = DataLoader::new(std::sync::Arc::new(test), norm, LoaderConfig::eval(500)).unwrap();
    for kind in [ModelKind::Cnn, ModelKind::Mlp, ModelKind::Resnet] {
        let mut m = Model::new(ModelConfig::fashion(kind, NormKind::Batch)).unwrap();
        let (x0, y0) = loader.batch_at(0, 0).unwrap();
        let x0 = x0.into_dyn();
        for _ in 0..3 {
            m.zero_grad();
            let logits = m.forward(&x0, Ctx::train()).unwrap();
            let (_, d) = cross_entropy(&logits, &y0, 0.0).unwrap();
            m.backward_params(&x0, &d, Ctx::train()).unwrap();
            normvision::optim::OptimConfig::Sgd(Default::default())
                .build()
                .unwrap()
                .step(&mut m, 0.05)
                .unwrap();
        }
        let mut folded = Model::new(ModelConfig::fashion(kind, NormKind::Batch)).unwrap();
        folded.load_strict(&m.state_dict()).unwrap();
        let pairs = folded.fold_batch_norm().unwrap();
        assert!(pairs > 0, "{kind:?}: nothing folded");
        let (mut worst, mut differ, mut ties) = (0.0f32, 0, 0);
        for (x, _) in loader.epoch(0) {
            let x = x.into_dyn();
            let a = m.forward_inference(&x).unwrap();
            let b = folded.forward_inference(&x).unwrap();
            for (ra, rb) in a.outer_iter().zip(b.outer_iter()) {
                for (p, q) in ra.iter().zip(rb.iter()) {
                    worst = worst.max((p - q).abs());
                }
                let top = |r: &ndarray::ArrayViewD<f32>| {
                    let mut v: Vec<(usize, f32)> = r.iter().copied().enumerate().collect();
                    v.sort_by(|x, y| y.1.total_cmp(&x.1));
                    (v[0].0, v[0].1 - v[1].1)
                };
                let ((ia, gap), (ib, _)) = (top(&ra), top(&rb));
                if ia != ib {
                    if gap <= 1e-4 {
                        ties += 1;
                    } else {
                        differ += 1;
                    }
                }
            }
        }
        eprintln!("{kind:?}: {pairs} pairs folded; over {n} images max |logit difference| {worst:.2e}, {differ} argmax changes, {ties} near-ties");
        assert!(worst <= 1e-4, "{kind:?}: folded logits off by {worst}");
        assert_eq!(differ, 0, "{kind:?}: argmax changed");
    }
}
