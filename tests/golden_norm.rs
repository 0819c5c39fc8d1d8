//! Golden tests: every normalization layer against PyTorch 2.x, step by step (forward, dx, parameter gradients,
//! running statistics). Fixtures: `tests/fixtures/norm/*.safetensors`, written by `tools/gen_fixtures.py`
//! (`bash tools/gen_fixtures.sh`), which holds the PyTorch code that produced every number.

use crate::common;
use common::*;
use ndarray::ArrayD;
use normvision::norm::*;
use normvision::state::{StateDict, StateTensor};
use normvision::{Ctx, Isa, KernelOptions, Layer};

const RTOL: f32 = 1e-5;
const ATOL: f32 = 1e-5;

fn build(fx: &Fixture) -> Box<dyn Layer<f32>> {
    let c = fx.cfg();
    let eps = c["eps"].as_f64().unwrap_or(1e-5);
    match fx.meta["layer"].as_str().unwrap() {
        kind @ ("batch_norm" | "batch_norm_relu") => {
            let cfg = BatchNormConfig::new(c["num_features"].as_u64().unwrap() as usize)
                .eps(eps)
                .momentum(c["momentum"].as_f64())
                .affine(c["affine"].as_bool().unwrap())
                .track_running_stats(c["track_running_stats"].as_bool().unwrap());
            let bn = BatchNorm::new(cfg).unwrap();
            if kind == "batch_norm_relu" {
                Box::new(Relu(bn))
            } else {
                Box::new(bn)
            }
        }
        "group_norm" => Box::new(
            GroupNormConfig::new(
                c["num_groups"].as_u64().unwrap() as usize,
                c["num_channels"].as_u64().unwrap() as usize,
            )
            .eps(eps)
            .affine(c["affine"].as_bool().unwrap())
            .build()
            .unwrap(),
        ),
        "layer_norm" => {
            let ns: Vec<usize> = c["normalized_shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            Box::new(
                LayerNormConfig::new(&ns)
                    .eps(eps)
                    .elementwise_affine(c["elementwise_affine"].as_bool().unwrap())
                    .bias(c["bias"].as_bool().unwrap())
                    .build()
                    .unwrap(),
            )
        }
        "instance_norm" => {
            let x0 = fx.get("x.0");
            let batched_rank = match fx.meta["torch_module"].as_str().unwrap_or("InstanceNorm2d") {
                "InstanceNorm1d" => 3,
                "InstanceNorm3d" => 5,
                _ => 4,
            };
            let _ = x0;
            Box::new(
                InstanceNormConfig::new(
                    c["num_features"].as_u64().unwrap() as usize,
                    batched_rank - 2,
                )
                .eps(eps)
                .momentum(c["momentum"].as_f64())
                .affine(c["affine"].as_bool().unwrap())
                .track_running_stats(c["track_running_stats"].as_bool().unwrap())
                .build()
                .unwrap(),
            )
        }
        "frozen_batch_norm" => Box::new(
            FrozenBatchNormConfig::new(c["num_features"].as_u64().unwrap() as usize)
                .eps(eps)
                .build::<f32>()
                .unwrap(),
        ),
        "batch_channel_norm" => {
            let mut cfg = BatchChannelNormConfig::new(c["num_features"].as_u64().unwrap() as usize);
            cfg.eps = eps;
            cfg.momentum = c["momentum"].as_f64();
            Box::new(cfg.build().unwrap())
        }
        other => panic!("unknown layer kind {other}"),
    }
}

fn run_case(fx: &Fixture, isa: Isa) {
    let mut layer = build(fx);
    let init = fx.state("init");
    if !init.tensors.is_empty() {
        layer
            .load_state("", &init)
            .unwrap_or_else(|e| panic!("{}: load init: {e}", fx.name));
    }
    for (k, step) in fx.steps().iter().enumerate() {
        let mode = if step == "train" {
            Ctx::train()
        } else {
            Ctx::eval()
        }
        .with_kernels(KernelOptions {
            isa,
            ..KernelOptions::default()
        });
        let x = fx.get(&format!("x.{k}"));
        let dy = fx.get(&format!("dy.{k}"));
        let y = layer
            .forward(x, mode)
            .unwrap_or_else(|e| panic!("{} step {k}: {e}", fx.name));
        assert_close(
            &format!("{} step {k} ({step}) y", fx.name),
            &y,
            fx.get(&format!("y.{k}")),
            RTOL,
            ATOL,
        );
        layer.zero_grad();
        let dx = layer.backward(x, dy, mode).unwrap();
        assert_close(
            &format!("{} step {k} ({step}) dx", fx.name),
            &dx,
            fx.get(&format!("dx.{k}")),
            RTOL,
            ATOL,
        );
        let mut grads: Vec<(String, ArrayD<f32>)> = vec![];
        layer.visit_params("", &mut |name, p| {
            grads.push((name.to_string(), p.grad.clone()))
        });
        for (name, g) in grads {
            let key = format!("grad.{k}.{name}");
            if fx.has(&key) {
                assert_close(
                    &format!("{} step {k} d{name}", fx.name),
                    &g,
                    fx.get(&key),
                    RTOL,
                    ATOL,
                );
            } else {
                assert!(
                    g.iter().all(|v| *v == 0.0) || fx.meta["layer"] == "frozen_batch_norm",
                    "{}: unexpected grad {name}",
                    fx.name
                );
            }
        }
        let sd: StateDict = layer.state_dict();
        let want = fx.state(&format!("state.{k}"));
        for (name, t) in &want.tensors {
            match (t, sd.get(name)) {
                (StateTensor::F32(w), Some(StateTensor::F32(g))) => {
                    assert_close(&format!("{} step {k} {name}", fx.name), g, w, RTOL, ATOL)
                }
                (StateTensor::I64(w), Some(StateTensor::I64(g))) => {
                    assert_eq!(g, w, "{} step {k} {name}", fx.name)
                }
                (_, got) => panic!(
                    "{} step {k}: state {name} missing or wrong type: {got:?}",
                    fx.name
                ),
            }
        }
    }
}

#[test]
fn all_norm_fixtures_match_pytorch() {
    let names = list_fixtures("norm");
    assert!(
        names.len() >= 26,
        "expected the committed fixtures, found {}",
        names.len()
    );
    let mut failures = vec![];
    // every instruction set this CPU has, forced through the kernel options
    for isa in common::isas() {
        for name in &names {
            let fx = load_fixture("norm", name);
            if let Err(e) = std::panic::catch_unwind(|| run_case(&fx, isa)) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| format!("{e:?}"));
                failures.push(format!("[{}] {msg}", isa.as_str()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}
