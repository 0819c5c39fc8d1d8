//! `experiment finetune`: frozen BatchNorm when fine-tuning on little data at small batches (Wu & He 2018 §4.2:
//! fine-tuning BN at 2 images per GPU lost ≈6 AP; `experiments.md` §5).
//!
//! The reference CNN with BatchNorm is pre-trained on classes 0–7 of Fashion-MNIST, then fine-tuned, with a new
//! two-class head, on a few hundred images of classes 8 and 9 (bag, ankle boot) at batch 2, 4 and 16, with its
//! BatchNorms trained (`--bn train`), frozen (`--bn frozen`) or normalizing by their running statistics while
//! their affine trains (`--bn eval-stats`). The same network with GroupNorm, trained from scratch on the same
//! images, is the baseline that needs no pre-training. Reported: held-out accuracy on every test image of
//! classes 8 and 9, mean and standard deviation over seeds. The learning rate scales with the batch
//! (0.01·B/16) and every setting sees the same number of images.

use super::report::{Plot, Report, Series, Table, Verdict};
use super::{fashion, mean_std, ExperimentOptions};
use crate::model::{Model, ModelConfig, ModelKind, NormKind};
use crate::optim::LrSchedule;
use crate::train::finetune::{prepare, BnMode};
use crate::train::{self, RunOptions, TrainConfig};
use crate::Result;
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

const METHODS: [&str; 4] = [
    "BN train",
    "BN frozen",
    "BN eval-stats",
    "GroupNorm from scratch",
];

pub fn run(opts: &ExperimentOptions) -> Result<Report> {
    let t0 = Instant::now();
    let (train_all, test_all) = fashion(opts)?;
    let (pre_epochs, pre_limit, per_class, epochs, batches, seeds) = if opts.quick {
        (1, 8_000, 50, 1, vec![2, 16], 1)
    } else {
        (2, 0, 150, 5, vec![2, 4, 16], opts.seeds.max(3))
    };
    let seeds = if opts.seeds > 0 { opts.seeds } else { seeds };
    let old: Vec<usize> = (0..8).collect();
    let pre_train = Arc::new(train_all.select_classes(&old)?);
    let pre_test = Arc::new(test_all.select_classes(&old)?.take(2_000));
    let new_train = train_all.select_classes(&[8, 9])?;
    let new_test = Arc::new(test_all.select_classes(&[8, 9])?);
    let norm = train_all.mean_std()?;

    // pre-training on classes 0-7
    let mut pre_cfg = TrainConfig::reference(ModelKind::Cnn, NormKind::Batch);
    pre_cfg.model.num_classes = 8;
    pre_cfg.epochs = pre_epochs;
    pre_cfg.train_limit = pre_limit;
    if opts.verbose {
        eprintln!(
            "finetune: pre-training the reference CNN with BN on classes 0-7 ({pre_epochs} epochs)"
        );
    }
    let (pre_rep, pre_model) = train::train_model_keep(
        Model::new(pre_cfg.model.clone())?,
        &pre_cfg,
        pre_train.clone(),
        pre_test,
        RunOptions {
            normalization: Some(norm.clone()),
            ..Default::default()
        },
    )?;
    let pre_acc = pre_rep.final_test_acc.unwrap_or(f64::NAN);
    let pre_graph_state = crate::state::Stateful::state_dict(&pre_model);
    let pre_spec = pre_model.graph().spec()?;

    let mut records = vec![];
    // acc[method][batch] = accuracies over seeds
    let mut acc: Vec<Vec<Vec<f64>>> = vec![vec![vec![]; batches.len()]; METHODS.len()];
    for seed in 0..seeds as u64 {
        let few = Arc::new(new_train.per_class(per_class, seed)?);
        for (bi, &b) in batches.iter().enumerate() {
            let lr = 0.01 * b as f64 / 16.0;
            let mut cfg = TrainConfig::reference(ModelKind::Cnn, NormKind::Batch);
            cfg.model.num_classes = 2;
            cfg.batch_size = b;
            cfg.epochs = epochs;
            cfg.seed = seed;
            cfg.schedule = LrSchedule::constant(lr);
            for (m, name) in METHODS.iter().enumerate() {
                let model = if m < 3 {
                    let mut g = crate::model::Graph::from_spec(&pre_spec)?;
                    crate::state::Stateful::load_strict(&mut g, &pre_graph_state)?;
                    let bn = [BnMode::Train, BnMode::Frozen, BnMode::EvalStats][m];
                    prepare(&mut g, bn, false, Some(2), seed)?;
                    Model::from_graph(g, pre_model.input_shape())?
                } else {
                    let mut mc = ModelConfig::fashion(ModelKind::Cnn, NormKind::Group);
                    mc.num_classes = 2;
                    mc.seed = seed;
                    Model::new(mc)?
                };
                let (rep, _) = train::train_model_keep(
                    model,
                    &cfg,
                    few.clone(),
                    new_test.clone(),
                    RunOptions {
                        normalization: Some(norm.clone()),
                        ..Default::default()
                    },
                )?;
                let a = rep.final_test_acc.unwrap_or(f64::NAN);
                if opts.verbose {
                    eprintln!(
                        "finetune: seed {seed}, batch {b}, {name}: {:.2}%",
                        a * 100.0
                    );
                }
                acc[m][bi].push(a);
                records.push(
                    json!({"seed": seed, "batch": b, "lr": lr, "method": name, "accuracy": a,
                    "diverged": rep.diverged}),
                );
            }
        }
    }
    let mut table = Table::new(
        "Held-out accuracy (%) on classes 8 and 9, mean ± std over seeds",
        &[
            &["method"][..],
            &batches
                .iter()
                .map(|b| format!("batch {b}"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()[..],
        ]
        .concat(),
    );
    for (m, name) in METHODS.iter().enumerate() {
        let mut row = vec![name.to_string()];
        for runs in &acc[m] {
            let (mu, sd) = mean_std(runs);
            row.push(format!("{:.2} ± {:.2}", mu * 100.0, sd * 100.0));
        }
        table.row(row);
    }
    let at = |m: usize, bi: usize| mean_std(&acc[m][bi]).0;
    let small = 0; // the smallest batch
    let verdicts = vec![
        Verdict {
            claim: format!(
                "At batch {}, frozen BN fine-tunes at least as well as trained BN",
                batches[small]
            ),
            paper: "Wu & He 2018 §4.2: fine-tuning BN at 2 images/GPU lost ≈6 AP against frozen BN".into(),
            ours: format!(
                "frozen {:.2}% vs train {:.2}% (eval-stats {:.2}%)",
                at(1, small) * 100.0,
                at(0, small) * 100.0,
                at(2, small) * 100.0
            ),
            holds: at(1, small) >= at(0, small),
            status: None,
            why: String::new(),
        },
        Verdict {
            claim: "Frozen BN's lead over trained BN is larger at the smallest batch than at the largest".into(),
            paper: "BN's batch statistics are noisy at small batches; frozen statistics are not".into(),
            ours: format!(
                "frozen minus train: {:+.2} points at batch {}, {:+.2} at batch {}",
                (at(1, small) - at(0, small)) * 100.0,
                batches[small],
                (at(1, batches.len() - 1) - at(0, batches.len() - 1)) * 100.0,
                batches[batches.len() - 1]
            ),
            holds: at(1, small) - at(0, small)
                >= at(1, batches.len() - 1) - at(0, batches.len() - 1),
            status: None,
            why: String::new(),
        },
    ];
    let plot = Plot {
        title: "Fine-tuning on classes 8-9: held-out accuracy against batch size".into(),
        x: "batch size".into(),
        y: "accuracy".into(),
        series: METHODS
            .iter()
            .enumerate()
            .map(|(m, name)| Series {
                label: name.to_string(),
                points: batches
                    .iter()
                    .enumerate()
                    .map(|(bi, &b)| (b as f64, at(m, bi)))
                    .collect(),
            })
            .collect(),
    };
    Ok(Report {
        name: "finetune".into(),
        command: super::command("finetune", opts),
        quick: opts.quick,
        setup: format!(
            "Pre-training: reference CNN with BN on classes 0-7 ({} images, {pre_epochs} epoch(s), SGD 0.9, \
             lr 0.05, batch 128): {:.2}% on 2000 test images of those classes. Fine-tuning: {per_class} images \
             of each of classes 8 and 9 (chosen by the seed), a new 2-class head, {epochs} epoch(s), SGD 0.9, lr \
             0.01·B/16; tested on all {} test images of classes 8 and 9. {seeds} seed(s).",
            if pre_limit > 0 { pre_limit } else { pre_train.len() },
            pre_acc * 100.0,
            new_test.len()
        ),
        tables: vec![table],
        verdicts,
        plot: Some(plot),
        extra_plots: vec![],
        date: super::now_utc(),
        records,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
