//! Golden test of a whole network against PyTorch: the reference CNN (`Model::cnn`) with BatchNorm, and its
//! `--norm none` variant, one training-mode forward + mean cross-entropy + backward, compared on logits, loss,
//! every parameter gradient and the BN running statistics after the step.
//!
//! Fixtures: `tests/fixtures/model/{cnn_bn,cnn_plain}.safetensors`, written by
//! `tools/.venv/bin/python tools/gen_model_fixture.py` (see its header for the layout). Initial values are
//! stored as BF16 (they were rounded to bfloat16 before PyTorch's forward, so the widening here is exact).
//!
//! Tolerances: rtol 1e-4 / atol 1e-5 everywhere. For gradients the atol is additionally scaled down to the
//! tensor's magnitude (`min(1e-5, 1e-5 · max|g|)`, at least 1e-7), so a tensor of small gradients is not
//! compared with an atol larger than its entries. A weight gradient is a sum over N·H·W products (6272 for the
//! first convolution) whose summation order differs between PyTorch's kernels and ours, so entries that nearly
//! cancel carry an absolute error proportional to the tensor's scale rather than to their own value; measured
//! worst cases are ~1.6e-6 absolute, at most ~0.3 of the allowed error (printed with `--nocapture`).

use ndarray::{ArrayD, IxDyn};
use normvision::model::{Model, ModelConfig, ModelKind, NormKind};
use normvision::nn::loss::cross_entropy;
use normvision::state::{StateDict, StateTensor, Stateful};
use normvision::Ctx;
use std::collections::BTreeMap;
use std::path::PathBuf;

const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;
const GRAD_ATOL_REL: f32 = 1e-5;

enum T {
    F(ArrayD<f32>),
    I(ArrayD<i64>),
}

struct Fixture {
    name: String,
    meta: serde_json::Value,
    tensors: BTreeMap<String, T>,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/model")
            .join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (regenerate with tools/.venv/bin/python tools/gen_model_fixture.py)",
                path.display()
            )
        });
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta: serde_json::Value = serde_json::from_str(
            header
                .metadata()
                .as_ref()
                .and_then(|m| m.get("meta"))
                .expect("meta"),
        )
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = BTreeMap::new();
        for (k, v) in st.tensors() {
            let shape = IxDyn(v.shape());
            let d = v.data();
            let t = match v.dtype() {
                safetensors::Dtype::F32 => T::F(
                    ArrayD::from_shape_vec(
                        shape,
                        d.chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect(),
                    )
                    .unwrap(),
                ),
                // bfloat16 is the top half of an f32: widening is exact.
                safetensors::Dtype::BF16 => T::F(
                    ArrayD::from_shape_vec(
                        shape,
                        d.chunks_exact(2)
                            .map(|c| {
                                f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
                            })
                            .collect(),
                    )
                    .unwrap(),
                ),
                safetensors::Dtype::I64 => T::I(
                    ArrayD::from_shape_vec(
                        shape,
                        d.chunks_exact(8)
                            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                            .collect(),
                    )
                    .unwrap(),
                ),
                other => panic!("{name}: {k}: unexpected dtype {other:?}"),
            };
            tensors.insert(k.to_string(), t);
        }
        Fixture {
            name: name.to_string(),
            meta,
            tensors,
        }
    }

    fn f(&self, k: &str) -> &ArrayD<f32> {
        match self.tensors.get(k) {
            Some(T::F(a)) => a,
            _ => panic!("{}: no float tensor {k}", self.name),
        }
    }
    fn i(&self, k: &str) -> &ArrayD<i64> {
        match self.tensors.get(k) {
            Some(T::I(a)) => a,
            _ => panic!("{}: no int tensor {k}", self.name),
        }
    }

    /// Tensors under `prefix.` as a state dict (prefix stripped); I64 scalars stay I64.
    fn state(&self, prefix: &str) -> StateDict {
        let p = format!("{prefix}.");
        let mut sd = StateDict::new();
        for (k, v) in &self.tensors {
            if let Some(rest) = k.strip_prefix(&p) {
                let t = match v {
                    T::F(a) => StateTensor::F32(a.clone()),
                    T::I(a) => StateTensor::I64(a.clone()),
                };
                sd.tensors.insert(rest.to_string(), t);
            }
        }
        sd
    }
}

/// Worst-case error of `got` against `want`: (max |a-b|, max |a-b| / |b| over |b| > atol, max of
/// |a-b| / (atol + rtol |b|)), the last being ≤ 1 when within tolerance.
fn compare(
    what: &str,
    got: &ArrayD<f32>,
    want: &ArrayD<f32>,
    rtol: f32,
    atol: f32,
) -> (f32, f32, f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (mut max_abs, mut max_rel, mut worst, mut worst_i) = (0f32, 0f32, 0f32, 0usize);
    for (i, (&a, &b)) in got.iter().zip(want.iter()).enumerate() {
        assert!(
            a.is_finite(),
            "{what}: non-finite value {a} at flat index {i}"
        );
        let d = (a - b).abs();
        max_abs = max_abs.max(d);
        if b.abs() > atol {
            max_rel = max_rel.max(d / b.abs());
        }
        let r = d / (atol + rtol * b.abs());
        if r > worst {
            worst = r;
            worst_i = i;
        }
    }
    assert!(
        worst <= 1.0,
        "{what}: mismatch at flat index {worst_i}: got {} want {} (rtol {rtol}, atol {atol}; max abs err {max_abs:e})",
        got.iter().nth(worst_i).unwrap(),
        want.iter().nth(worst_i).unwrap()
    );
    (max_abs, max_rel, worst)
}

fn run_case(name: &str, cfg: ModelConfig) {
    let fx = Fixture::load(name);
    assert_eq!(fx.meta["norm"].as_str().unwrap(), cfg.norm.as_str());
    let x = fx.f("x").clone();
    assert_eq!(
        x.shape()[1..],
        [cfg.in_channels, cfg.height, cfg.width],
        "{name}: fixture input does not match the model config"
    );
    let targets: Vec<usize> = fx.i("targets").iter().map(|&t| t as usize).collect();

    let mut model = Model::new(cfg).unwrap();
    let init = fx.state("init");

    // Same names on both sides: the Rust indices match the nn.Sequential's.
    let ours: Vec<String> = model.state_dict().keys().cloned().collect();
    let theirs: Vec<String> = init.keys().cloned().collect();
    assert_eq!(
        ours, theirs,
        "{name}: state-dict keys differ from PyTorch's"
    );
    let meta_keys: Vec<String> = fx.meta["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let mut sorted = meta_keys.clone();
    sorted.sort();
    assert_eq!(ours, sorted);

    model.load_state("", &init).unwrap();
    // Loading is exact: the state dict read back is the fixture's.
    assert_eq!(
        model.state_dict(),
        init,
        "{name}: load_state/save_state round trip"
    );

    model.zero_grad();
    let logits = model.forward(&x, Ctx::train()).unwrap();
    let (loss, dlogits) = cross_entropy(&logits, &targets, 0.0).unwrap();
    model.backward(&x, &dlogits, Ctx::train()).unwrap();

    let mut report = vec![];
    let r = compare(
        &format!("{name}: logits"),
        &logits,
        fx.f("logits"),
        RTOL,
        ATOL,
    );
    report.push(("logits".to_string(), r));
    let loss_arr = ArrayD::from_elem(IxDyn(&[1]), loss as f32);
    let r = compare(
        &format!("{name}: loss"),
        &loss_arr,
        fx.f("loss"),
        RTOL,
        ATOL,
    );
    report.push(("loss".to_string(), r));

    // Every parameter has a PyTorch gradient, and every PyTorch gradient a parameter.
    let mut grads: BTreeMap<String, ArrayD<f32>> = BTreeMap::new();
    model.visit_params("", &mut |k, p| {
        grads.insert(k.to_string(), p.grad.clone());
    });
    let want_grads: Vec<String> = fx
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix("grad.").map(str::to_string))
        .collect();
    assert_eq!(
        grads.keys().cloned().collect::<Vec<_>>(),
        want_grads,
        "{name}: parameter names"
    );
    for (k, g) in &grads {
        let want = fx.f(&format!("grad.{k}"));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name}: grad.{k} is all zero in the fixture");
        let atol = ATOL.min(GRAD_ATOL_REL * scale).max(1e-7);
        let r = compare(&format!("{name}: grad.{k}"), g, want, RTOL, atol);
        report.push((format!("grad.{k}"), r));
    }

    // Running statistics after the step, and num_batches_tracked incremented.
    let after = model.state_dict();
    let state = fx.state("state");
    for (k, want) in &state.tensors {
        match (after.get(k), want) {
            (Some(StateTensor::F32(got)), StateTensor::F32(w)) => {
                let r = compare(&format!("{name}: state.{k}"), got, w, RTOL, ATOL);
                report.push((format!("state.{k}"), r));
            }
            (Some(StateTensor::I64(got)), StateTensor::I64(w)) => {
                assert_eq!(got, w, "{name}: state.{k}");
            }
            (got, _) => panic!("{name}: state.{k}: ours is {got:?}"),
        }
    }
    if cfg_has_bn(&fx) {
        assert!(!state.tensors.is_empty());
    }
    // Parameters are not touched by a forward/backward.
    for (k, v) in &init.tensors {
        if !k.contains("running_") && !k.ends_with("num_batches_tracked") {
            assert_eq!(after.get(k), Some(v), "{name}: {k} changed");
        }
    }

    eprintln!("{name}: loss ours {loss:.7} torch {:.7}", fx.f("loss")[0]);
    eprintln!(
        "{:<28} {:>12} {:>12} {:>10}",
        "tensor", "max abs err", "max rel err", "err/tol"
    );
    for (k, (a, r, w)) in &report {
        eprintln!("{k:<28} {a:>12.3e} {r:>12.3e} {w:>10.3}");
    }
}

fn cfg_has_bn(fx: &Fixture) -> bool {
    fx.meta["norm"] == "batch"
}

#[test]
fn cnn_batchnorm_matches_pytorch() {
    run_case(
        "cnn_bn",
        ModelConfig::fashion(ModelKind::Cnn, NormKind::Batch),
    );
}

#[test]
fn cnn_without_norm_matches_pytorch() {
    // 8x8 inputs keep the fixture small (the first linear is 256 -> 128).
    let cfg = ModelConfig {
        height: 8,
        width: 8,
        ..ModelConfig::fashion(ModelKind::Cnn, NormKind::None)
    };
    run_case("cnn_plain", cfg);
}

/// A model built from the fixture's state but run in eval mode uses the running statistics: check the
/// eval logits are finite and differ from the train-mode ones (the statistics were non-trivial).
#[test]
fn eval_mode_uses_running_stats() {
    let fx = Fixture::load("cnn_bn");
    let mut model = Model::new(ModelConfig::fashion(ModelKind::Cnn, NormKind::Batch)).unwrap();
    model.load_state("", &fx.state("init")).unwrap();
    let x = fx.f("x").clone();
    let before = model.state_dict();
    let eval = model.forward(&x, Ctx::eval()).unwrap();
    assert_eq!(model.state_dict(), before, "eval forward changed the state");
    assert!(eval.iter().all(|v| v.is_finite()));
    let train = fx.f("logits");
    let diff = eval
        .iter()
        .zip(train.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff > 1e-2,
        "eval logits equal train logits (max diff {diff})"
    );
}

/// Many steps against PyTorch: 60 SGD steps (momentum 0.9) of the 8x8 reference CNN from the same initial values
/// on the same batches of a learnable task. One-step agreement does not show that training *dynamics* agree
/// (the optimizer, running statistics over many updates, num_batches_tracked); this does, up to the drift that
/// summation order causes in any chaotic iteration. The fixture carries PyTorch's own drift: the same run in
/// channels_last (`losses_cl`).
///
/// For the first [`TIGHT_STEPS`] steps each loss must be within 2e-5·(1 + step/3) of PyTorch's (relative), or
/// within 3× PyTorch's own channels_last deviation at that step: a wrong rule (momentum, eps, running
/// statistics, a mask) shows up in the first steps. After that a rounding-level event (an activation whose sign
/// flips at the ReLU, a near-tie in max pooling) can start chaotic growth at any step, so the bound is 5e-2.
/// Measured (`--nocapture`): BatchNorm at lr 0.2 agrees to ≤ 2.5e-6 until step 35, then one such event at
/// step 36 (1.2e-4) grows to 1.6e-2 by step 59; in a previous fixture both normvision and PyTorch's own
/// channels_last run left the contiguous run at the same step (12). The plain network stays within 1e-7 of
/// PyTorch for all 60 steps while PyTorch's channels_last run drifts to 9e-3.
const TIGHT_STEPS: usize = 20;

fn run_trajectory(name: &str, norm: NormKind) {
    use normvision::optim::sgd::SgdConfig;
    use normvision::optim::OptimConfig;
    let fx = Fixture::load(name);
    let steps = fx.meta["steps"].as_u64().unwrap() as usize;
    let lr = fx.meta["lr"].as_f64().unwrap();
    let cfg = ModelConfig {
        height: 8,
        width: 8,
        ..ModelConfig::fashion(ModelKind::Cnn, norm)
    };
    let mut model = Model::new(cfg).unwrap();
    model.load_state("", &fx.state("init")).unwrap();
    let mut opt = OptimConfig::Sgd(SgdConfig {
        momentum: 0.9,
        ..SgdConfig::default()
    })
    .build()
    .unwrap();
    let (xs, ys) = (fx.f("x"), fx.i("targets"));
    let (want, cl) = (fx.f("losses"), fx.f("losses_cl"));
    let (mut worst, mut sum_ours, mut sum_cl) = (0f64, 0f64, 0f64);
    let eval_at = fx.meta["eval_at"].as_u64().unwrap() as usize;
    let x0 = xs.index_axis(ndarray::Axis(0), 0).to_owned();
    let mut eval = None;
    for s in 0..steps {
        if s == eval_at {
            eval = Some(model.forward(&x0, Ctx::eval()).unwrap());
        }
        let x = xs.index_axis(ndarray::Axis(0), s).to_owned();
        let t: Vec<usize> = ys
            .index_axis(ndarray::Axis(0), s)
            .iter()
            .map(|&v| v as usize)
            .collect();
        model.zero_grad();
        let logits = model.forward(&x, Ctx::train()).unwrap();
        let (loss, d) = cross_entropy(&logits, &t, 0.0).unwrap();
        model.backward(&x, &d, Ctx::train()).unwrap();
        opt.step(&mut model, lr).unwrap();
        let w = want[s] as f64;
        let rel = (loss - w).abs() / w.abs();
        let rel_cl = (cl[s] as f64 - w).abs() / w.abs();
        let tol = if s < TIGHT_STEPS {
            (2e-5 * (1.0 + s as f64 / 3.0)).max(3.0 * rel_cl)
        } else {
            5e-2
        };
        sum_ours += rel;
        sum_cl += rel_cl;
        if s % 10 == 0 || s + 1 == steps {
            eprintln!(
                "{name}: step {s:>2} loss ours {loss:.6} torch {w:.6} rel {rel:.2e} (torch channels_last {rel_cl:.2e})"
            );
        }
        worst = worst.max(rel / tol);
        assert!(
            rel <= tol,
            "{name}: step {s}: loss {loss} vs PyTorch {w} (rel {rel:e} > {tol:e})"
        );
    }
    eprintln!(
        "{name}: mean rel deviation from PyTorch: ours {:.2e}, PyTorch channels_last {:.2e}; worst {worst:.2} of the tolerance",
        sum_ours / steps as f64,
        sum_cl / steps as f64
    );
    // Eval-mode logits after `eval_at` steps (through the running statistics, inside the tight window), and
    // num_batches_tracked after the last step.
    let eval = eval.expect("eval_at < steps");
    let (w, wcl) = (fx.f("eval_logits"), fx.f("eval_logits_cl"));
    let mut worst_e = 0f32;
    for ((&a, &b), &c) in eval.iter().zip(w.iter()).zip(wcl.iter()) {
        let allowed = 1e-4 + 1e-4 * b.abs() + 3.0 * (c - b).abs();
        assert!(
            (a - b).abs() <= allowed,
            "{name}: eval logit {a} vs PyTorch {b} (channels_last {c})"
        );
        worst_e = worst_e.max((a - b).abs() / allowed);
    }
    eprintln!("{name}: eval logits worst {worst_e:.2} of the tolerance");
    let after = model.state_dict();
    for (k, w) in &fx.state("state").tensors {
        if let (Some(StateTensor::I64(got)), StateTensor::I64(w)) = (after.get(k), w) {
            assert_eq!(got, w, "{name}: state.{k}");
        }
    }
}

#[test]
fn sgd_trajectory_with_batchnorm_matches_pytorch() {
    run_trajectory("cnn_bn_sgd", NormKind::Batch);
}

#[test]
fn sgd_trajectory_without_norm_matches_pytorch() {
    run_trajectory("cnn_plain_sgd", NormKind::None);
}
