//! `experiment init`: BatchNorm makes training robust to the scale of the initial weights (BN paper §3.3:
//! BN(aWu) = BN(Wu), and ∂BN(aWu)/∂(aW) = (1/a)·∂BN(Wu)/∂W).
//!
//! First the exact property, measured on the reference CNN with BN: every convolution and linear layer that feeds
//! a BN has its weights multiplied by a; the logits must not change and those weights' gradients must scale by
//! 1/a. Then training: the initial weights of every convolution and linear layer (the classifier included) are
//! scaled by a ∈ {0.01, 0.1, 1, 10, 100}, with and without BN, for one epoch at lr 0.05 (SGD momentum 0.9,
//! batch 128). The invariance does not make training flat in a: a weight scaled by a sees an effective learning
//! rate scaled by 1/a², and the classifier, which feeds no BN, is scaled too.
//!
//! Budget (full): 10 settings × 3 seeds of one epoch, about 20 minutes.

use super::report::{Plot, Report, Series, Status, Table, Verdict};
use super::runs::{Outcome, RunCache};
use super::{fashion, mean_std, recipe, train_cfg, ExperimentOptions};
use crate::model::{Model, ModelConfig, ModelKind, NormKind};
use crate::nn::loss::cross_entropy;
use crate::state::Stateful;
use crate::{Ctx, Result};
use ndarray::{ArrayD, IxDyn};
use serde_json::json;
use std::time::Instant;

/// The names of the weights that feed a BatchNorm in the reference CNN (the BN's input is their output).
fn weights_before_bn(m: &Model) -> Vec<String> {
    let g = m.graph();
    g.nodes()
        .iter()
        .filter(|n| n.layer_as::<crate::norm::BatchNorm<f32>>().is_some())
        .filter_map(|n| {
            let v = n.inputs()[0];
            g.nodes()
                .iter()
                .find(|p| p.output() == v)
                .map(|p| format!("{}.weight", p.name()))
        })
        .collect()
}

/// max |logits(a·W) − logits(W)| / max |logits(W)|, and max |a·grad(a·W) − grad(W)| / max |grad(W)| over the
/// weights that feed a BN, in training mode on one batch.
pub fn scale_invariance(a: f32, seed: u64) -> Result<(f64, f64)> {
    let mut cfg = ModelConfig::fashion(ModelKind::Cnn, NormKind::Batch);
    cfg.seed = seed;
    let mut m = Model::new(cfg)?;
    let names = weights_before_bn(&m);
    let x = ArrayD::from_shape_fn(IxDyn(&[16, 1, 28, 28]), |i| {
        (((i[0] * 131 + i[2] * 17 + i[3] * 7) % 29) as f32 - 14.0) / 7.0
    });
    let y: Vec<usize> = (0..16).map(|i| i % 10).collect();
    let pass = |m: &mut Model| -> Result<(ArrayD<f32>, Vec<Vec<f32>>)> {
        m.zero_grad();
        let l = m.forward(&x, Ctx::train())?;
        let (_, dl) = cross_entropy(&l, &y, 0.0)?;
        m.backward_params(&x, &dl, Ctx::train())?;
        let mut gs = vec![];
        m.visit_params("", &mut |n, p| {
            if names.iter().any(|k| k == n) {
                gs.push(p.grads().to_vec());
            }
        });
        Ok((l, gs))
    };
    let mut m2 = Model::new(m.config().expect("zoo").clone())?;
    let (l1, g1) = pass(&mut m)?;
    m2.visit_params("", &mut |n, p| {
        if names.iter().any(|k| k == n) {
            p.values_mut().iter_mut().for_each(|v| *v *= a);
        }
    });
    let (l2, g2) = pass(&mut m2)?;
    let maxabs = |v: &mut dyn Iterator<Item = f32>| v.fold(0.0f64, |m, x| m.max(x.abs() as f64));
    let dl =
        maxabs(&mut l1.iter().zip(l2.iter()).map(|(p, q)| p - q)) / maxabs(&mut l1.iter().copied());
    let mut dg = 0.0f64;
    for (p, q) in g1.iter().zip(&g2) {
        let s = maxabs(&mut p.iter().copied());
        dg = dg.max(maxabs(&mut p.iter().zip(q).map(|(u, v)| u - a * v)) / s);
    }
    Ok((dl, dg))
}

pub fn run(opts: &ExperimentOptions) -> Result<Report> {
    let t0 = Instant::now();
    let (train, test) = fashion(opts)?;
    let (scales, train_limit, test_limit, def_seeds): (Vec<f64>, usize, usize, usize) =
        if opts.quick {
            (vec![0.1, 1.0, 10.0], 3_000, 2_000, 1)
        } else {
            (vec![0.01, 0.1, 1.0, 10.0, 100.0], 0, 0, 3)
        };
    let seeds = if opts.seeds > 0 {
        opts.seeds
    } else {
        def_seeds
    };
    let norms = [NormKind::Batch, NormKind::None];
    let mut prop = Table::new(
        "The exact property on the reference CNN with BN (f32, one training batch of 16)",
        &[
            "a",
            "logits: max rel. change",
            "a·grad(aW) vs grad(W): max rel. diff",
        ],
    );
    // worst over a > 1 (where a²·Var ≫ eps) and over a < 1 (where eps = 1e-5 is no longer negligible)
    let (mut worst, mut worst_small) = ((0.0f64, 0.0f64), (0.0f64, 0.0f64));
    for &a in &[0.01f32, 0.1, 10.0, 100.0] {
        let (dl, dg) = scale_invariance(a, 0)?;
        let w = if a > 1.0 {
            &mut worst
        } else {
            &mut worst_small
        };
        *w = (w.0.max(dl), w.1.max(dg));
        prop.row(vec![
            format!("{a}"),
            format!("{dl:.1e}"),
            format!("{dg:.1e}"),
        ]);
    }
    let mut cache = RunCache::new(opts, "init", scales.len() * norms.len() * seeds)?;
    let mut acc = vec![vec![vec![]; scales.len()]; norms.len()];
    let mut outcomes = vec![vec![vec![]; scales.len()]; norms.len()];
    let mut records = vec![];
    for seed in 0..seeds as u64 {
        for (si, &a) in scales.iter().enumerate() {
            for (ni, &nk) in norms.iter().enumerate() {
                let key = json!({"experiment": "init", "norm": nk.as_str(), "scale": a, "seed": seed,
                    "train_limit": train_limit, "test_limit": test_limit});
                let r = cache.get_or_run(key.clone(), || {
                    let mut cfg = recipe(ModelKind::Cnn, nk, seed, 0.05, 1);
                    cfg.model.init.scale = a;
                    cfg.train_limit = train_limit;
                    cfg.test_limit = test_limit;
                    let (rep, _) = train_cfg(&cfg, &train, &test)?;
                    Ok(
                        json!({"outcome": Outcome::of(&rep, 10), "accuracy": rep.final_test_acc,
                        "diverged": rep.diverged}),
                    )
                })?;
                let o: Outcome =
                    serde_json::from_value(r["outcome"].clone()).unwrap_or(Outcome::Diverged);
                acc[ni][si].push(if o == Outcome::Trained {
                    r["accuracy"].as_f64().unwrap_or(0.1)
                } else {
                    0.1
                });
                outcomes[ni][si].push(o);
                records.push(json!({"key": key, "result": r}));
            }
        }
    }
    let names = ["BN", "plain"];
    let mut table = Table::new(
        &format!("Test accuracy (%) after one epoch, mean ± std over {seeds} seed(s); failed runs count as 10%"),
        &[&["net"][..], &scales.iter().map(|a| format!("a = {a}")).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>()[..]].concat(),
    );
    for ni in 0..2 {
        let mut row = vec![names[ni].to_string()];
        for si in 0..scales.len() {
            let (m, s) = mean_std(&acc[ni][si]);
            let fails: Vec<&str> = outcomes[ni][si]
                .iter()
                .filter(|o| **o != Outcome::Trained)
                .map(|o| o.as_str())
                .collect();
            row.push(if fails.is_empty() {
                format!("{:.2} ± {:.2}", m * 100.0, s * 100.0)
            } else {
                format!(
                    "{:.2} ± {:.2} ({} of {}: {})",
                    m * 100.0,
                    s * 100.0,
                    fails.len(),
                    outcomes[ni][si].len(),
                    fails[0]
                )
            });
        }
        table.row(row);
    }
    let spread = |ni: usize| {
        let ms: Vec<f64> = (0..scales.len())
            .map(|si| mean_std(&acc[ni][si]).0)
            .collect();
        let hi = ms.iter().cloned().fold(f64::MIN, f64::max);
        let lo = ms.iter().cloned().fold(f64::MAX, f64::min);
        hi - lo
    };
    let trained = |ni: usize| {
        (0..scales.len())
            .filter(|&si| outcomes[ni][si].iter().all(|o| *o == Outcome::Trained))
            .count()
    };
    let v_exact = Verdict::graded(
        "A layer followed by BN gives the same output when its weights are scaled by a > 0, and a gradient scaled by 1/a",
        "BN(aWu) = BN(Wu); ∂BN((aW)u)/∂(aW) = (1/a)·∂BN(Wu)/∂W (BN paper §3.3)",
        format!(
            "a = 10, 100: logits change by at most {:.1e} (relative), gradients match 1/a to {:.1e}; a = 0.01, 0.1: {:.1e} and {:.1e}",
            worst.0, worst.1, worst_small.0, worst_small.1
        ),
        if worst.0 < 1e-4 && worst.1 < 1e-4 { Status::Confirmed } else { Status::NotReproduced },
        "exact up to f32 rounding while a²·Var(Wu) ≫ eps; BN's eps = 1e-5 breaks it for small a (tests/properties_norm.rs checks the identity in f64 with eps 1e-30 to 1e-9)",
    );
    let v_train = Verdict::graded(
        "Training with BN is robust to the initial weight scale",
        "BN makes training more resilient to the parameter scale (§3.3); no number is given",
        format!(
            "scales that train: BN {} of {}, plain {} of {}; accuracy range over the scales: BN {:.2} points, plain {:.2}",
            trained(0), scales.len(), trained(1), scales.len(), spread(0) * 100.0, spread(1) * 100.0
        ),
        if trained(0) > trained(1) || (trained(0) == trained(1) && spread(0) < spread(1)) {
            Status::Confirmed
        } else if spread(0) < spread(1) {
            Status::Partly
        } else {
            Status::NotReproduced
        },
        "not flat in a even with BN: the effective learning rate of a weight scaled by a is lr/a², and the classifier (no BN after it) is scaled as well",
    );
    let plot = Plot {
        title: "Test accuracy after one epoch against the initial weight scale (log10 a)".into(),
        x: "log10(a)".into(),
        y: "test accuracy".into(),
        series: (0..2)
            .map(|ni| Series {
                label: names[ni].into(),
                points: scales
                    .iter()
                    .enumerate()
                    .map(|(si, a)| (a.log10(), mean_std(&acc[ni][si]).0))
                    .collect(),
            })
            .collect(),
    };
    Ok(Report {
        name: "init".into(),
        command: super::command("init", opts),
        quick: opts.quick,
        setup: format!(
            "Reference CNN with BN and without; every conv and linear weight drawn Kaiming-normal, then multiplied by \
             a; one epoch{}, SGD momentum 0.9, lr 0.05, batch 128; tested on {} images. {seeds} seed(s).",
            if train_limit > 0 { format!(" of the first {train_limit} training images") } else { String::new() },
            if test_limit > 0 { test_limit } else { test.len() }
        ),
        tables: vec![prop, table],
        verdicts: vec![v_exact, v_train],
        plot: Some(plot),
        extra_plots: vec![],
        date: super::now_utc(),
        records,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
