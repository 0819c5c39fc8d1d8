//! The training-side subcommands: train, eval, predict, bench, compare.

use crate::args::{CorruptionArgs, DataArgs, TrainArgs};
use crate::interop::Source;
use crate::progress::Bars;
use crate::resume::{check_resume_flags, RunPaths};
use normvision::data::{load_image_for_model, DataLoader, LoaderConfig};
use normvision::model::{Model, ModelConfig, ModelKind, NormKind, PlanOptions};
use normvision::ndarray::{ArrayD, IxDyn};
use normvision::nn::loss::cross_entropy;
use normvision::state::Stateful;
use normvision::train::adapt::infer_adapted;
use normvision::train::{self, checkpoint, Distributed, RunOptions, TrainReport};
use normvision::{Ctx, NvError, Result};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn fmt_pct(a: Option<f64>) -> String {
    a.map(|v| format!("{:.2}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// The people-facing summary of one run.
pub fn print_report(label: &str, r: &TrainReport) {
    let accs = r.epoch_accs();
    println!(
        "{label}: {} steps, {:.0} img/s (training)",
        r.steps, r.train_img_s
    );
    println!(
        "  {:<6} {:>10} {:>10} {:>10}",
        "epoch", "step", "test acc", "test loss"
    );
    for e in r.evals.iter().filter(|e| e.end_of_epoch) {
        println!(
            "  {:<6} {:>10} {:>9.2}% {:>10.4}",
            e.epoch,
            e.step,
            e.test_acc * 100.0,
            e.test_loss
        );
    }
    if accs.is_empty() {
        if let Some(e) = r.evals.last() {
            println!(
                "  last evaluation at step {}: {:.2}%",
                e.step,
                e.test_acc * 100.0
            );
        }
    }
    if let Some(s) = r.reached_target_at {
        println!("  reached the target accuracy at step {s}");
    }
    if let Some(d) = &r.diverged {
        println!("  DIVERGED: {d}");
    }
}

/// `train`; with `dist`, this process is one rank of a data-parallel run (rank 0 alone prints and writes).
#[allow(clippy::too_many_arguments)]
pub fn train(
    args: &TrainArgs,
    data: &DataArgs,
    paths: RunPaths,
    explicit: &[String],
    json_out: bool,
    quiet: bool,
    plan: &PlanOptions,
    dist: Option<Distributed>,
) -> Result<TrainReport> {
    let root = dist.as_ref().is_none_or(|d| d.rank() == 0);
    let (quiet, json_out) = (quiet || !root, json_out && root);
    let (train_ds, test_ds) = data.load()?;
    let cfg = args.to_config(&train_ds)?;
    let resume = match (&paths.resume, &dist) {
        (Some(p), None) => Some((p.clone(), checkpoint::load(p)?)),
        // rank 0 reads the checkpoint and hands its bytes to the others (no shared file system needed)
        (Some(p), Some(d)) => {
            let mut bytes = vec![];
            if root {
                bytes = std::fs::read(p).map_err(|e| NvError::io(p, "read", e))?;
            }
            d.comm.broadcast_bytes(&mut bytes, 0)?;
            Some((p.clone(), checkpoint::from_bytes(&bytes, p)?))
        }
        (None, _) => None,
    };
    // A resumed run lives where its checkpoint is (not where the current flags' defaults point), unless --out
    // says otherwise; its model and norm name it.
    let run_cfg = resume
        .as_ref()
        .map(|(_, ck)| ck.config.clone())
        .unwrap_or_else(|| cfg.clone());
    let run_cfg = &run_cfg;
    let name = format!(
        "{}-{}",
        run_cfg.model.kind.as_str(),
        run_cfg.model.norm.as_str()
    );
    let ckpt = match (&paths.out, &resume) {
        (Some(o), _) => o.clone(),
        (None, Some((p, _))) => p.clone(),
        (None, None) => PathBuf::from("runs").join(&name).join("model.safetensors"),
    };
    let log = paths.log.unwrap_or_else(|| ckpt.with_extension("jsonl"));
    if let Some((p, ck)) = &resume {
        let applied = check_resume_flags(explicit, &cfg, &ck.config, p)?;
        if !quiet && !json_out {
            eprintln!(
                "resuming {} at step {} (epoch {}, batch {}){}",
                p.display(),
                ck.position.step,
                ck.position.epoch + 1,
                ck.position.batch,
                if applied.is_empty() {
                    String::new()
                } else {
                    format!("; applying {}", applied.join(", "))
                }
            );
        }
    }
    if !quiet && !json_out {
        let ranks = match &dist {
            Some(d) => format!(
                "{} ranks x {} threads{}",
                d.size(),
                rayon::current_num_threads(),
                if run_cfg.sync_bn { ", SyncBN" } else { "" }
            ),
            None => format!("{} threads", rayon::current_num_threads()),
        };
        eprintln!(
            "training {} with --norm {} on {} images ({ranks}); checkpoint {}, log {}",
            run_cfg.model.kind.as_str(),
            run_cfg.model.norm,
            train_ds.len(),
            ckpt.display(),
            log.display()
        );
    }
    let had_checkpoint = ckpt.is_file();
    let opts = RunOptions {
        checkpoint: Some(ckpt.clone()),
        log: Some(log),
        progress: Bars::boxed(&name, quiet),
        resume: resume.map(|(_, ck)| ck),
        plan: plan.clone(),
        normalization: None,
        distributed: dist,
    };
    let r = train::train(&cfg, train_ds, test_ds, opts)?;
    if !root {
        return match &r.diverged {
            Some(why) => Err(NvError::Diverged(why.clone())),
            None => Ok(r),
        };
    }
    if json_out {
        println!("{}", serde_json::to_string(&json!({"model": run_cfg.model.kind.as_str(), "norm": run_cfg.model.norm.as_str(), "report": r})).expect("json"));
    } else {
        for n in &r.notes {
            eprintln!("note: {n}");
        }
        print_report(&name, &r);
        if r.diverged.is_none() {
            println!("  checkpoint: {}", ckpt.display());
        }
    }
    if let Some(why) = &r.diverged {
        // A divergence is a failed run: the exit status says so (compare reports it as an outcome instead).
        let kept = if had_checkpoint || ckpt.is_file() {
            format!("; the last good checkpoint is kept at {}", ckpt.display())
        } else {
            "; no checkpoint was written".to_string()
        };
        return Err(NvError::Diverged(format!("{why}{kept}")));
    }
    Ok(r)
}

/// The covariate shift `eval` measures: a corruption of the test images, and online BN adaptation.
pub struct Shift<'a> {
    pub corruption: &'a CorruptionArgs,
    /// `Some(N)`: adapt each batch online with the N/n mix.
    pub adapt_prior: Option<f64>,
}

pub fn eval(
    src: &Source,
    data: &DataArgs,
    batch_size: usize,
    fold_bn: bool,
    shift: &Shift,
    json_out: bool,
    plan: &PlanOptions,
) -> Result<()> {
    let checkpoint_path = src.path();
    let corruption = shift.corruption.parsed()?;
    let (mut model, input_norm, record) = src.load_with_record()?;
    model.set_plan_options(plan.clone())?;
    if fold_bn {
        model.fold_batch_norm()?;
    }
    let (_, test) = data.load()?;
    // a model fine-tuned on a subset of the classes is evaluated on that subset, relabelled as it was trained
    let test = match record.as_ref().and_then(|r| r.classes.as_ref()) {
        Some(classes) if test.num_classes() != model.num_classes() => {
            Arc::new(test.select_classes(classes)?)
        }
        _ => test,
    };
    check_data_matches(&model, &test)?;
    let test = shift.corruption.apply(test, false)?;
    let loader = DataLoader::new(test.clone(), input_norm, LoaderConfig::eval(batch_size))?;
    let t = Instant::now();
    let (acc, loss) = match shift.adapt_prior {
        None => train::evaluate(&mut model, &loader)?,
        Some(prior) => train::evaluate_with(&mut model, &loader, &mut |m, x| {
            m.check_input(x)?;
            Ok(infer_adapted(m.graph_mut(), prior, x)?.remove(0))
        })
        .map_err(|e| match e {
            NvError::Config(m) => {
                NvError::Config(format!("{}: --adapt-bn: {m}", checkpoint_path.display()))
            }
            e => e,
        })?,
    };
    let secs = t.elapsed().as_secs_f64();
    let what = match (corruption, shift.adapt_prior) {
        (Some(c), Some(p)) => format!(" ({c}, online BN adaptation with prior N = {p})"),
        (Some(c), None) => format!(" ({c})"),
        (None, Some(p)) => format!(" (online BN adaptation with prior N = {p})"),
        (None, None) => String::new(),
    };
    if json_out {
        println!(
            "{}",
            json!({"checkpoint": checkpoint_path, "test_acc": acc, "test_loss": loss, "samples": test.len(),
                "img_s": test.len() as f64 / secs,
                "corruption": corruption.map(|c| c.to_string()),
                "corruption_seed": corruption.map(|_| shift.corruption.corruption_seed),
                "adapt_bn_prior": shift.adapt_prior})
        );
    } else {
        println!(
            "{}: test accuracy {:.2}%, loss {:.4} on {} images{what} ({:.0} img/s)",
            checkpoint_path.display(),
            acc * 100.0,
            loss,
            test.len(),
            test.len() as f64 / secs
        );
    }
    Ok(())
}

fn check_data_matches(model: &Model, ds: &normvision::data::Dataset) -> Result<()> {
    let [c, h, w] = model.input_shape();
    if ds.shape != [c, h, w] || ds.classes.len() != model.num_classes() {
        return Err(NvError::Config(format!(
            "the data ({:?}, {} classes) does not match the model ({c}x{h}x{w}, {} classes)",
            ds.shape,
            ds.classes.len(),
            model.num_classes()
        )));
    }
    Ok(())
}

pub fn predict(
    src: &Source,
    images: &[PathBuf],
    top_k: usize,
    classes: Option<Vec<String>>,
    fold_bn: bool,
    json_out: bool,
    plan: &PlanOptions,
) -> Result<()> {
    let (mut model, input_norm, record) = src.load_with_record()?;
    model.set_plan_options(plan.clone())?;
    if fold_bn {
        model.fold_batch_norm()?;
    }
    let [ch, h, w] = model.input_shape();
    let k = model.num_classes();
    let recorded = record
        .map(|r| r.class_names)
        .filter(|n| n.len() == k && !n.is_empty());
    let names: Vec<String> = classes.or(recorded).unwrap_or_else(|| {
        if k == 10 && ch == 1 {
            normvision::data::fashion_mnist::CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            (0..k).map(|i| format!("class {i}")).collect()
        }
    });
    for path in images {
        let mut x = load_image_for_model(path, ch, h, w)?;
        input_norm.normalize(&mut x)?;
        let logits = model.forward_inference(&x.into_dyn())?;
        let row: Vec<f64> = logits.iter().map(|v| *v as f64).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        let mut probs: Vec<(usize, f64)> =
            row.iter().map(|v| (v - m).exp() / z).enumerate().collect();
        probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        probs.truncate(top_k.max(1));
        if json_out {
            let top: Vec<_> = probs.iter().map(|(i, p)| json!({"class": names.get(*i).cloned().unwrap_or_default(), "index": i, "prob": p})).collect();
            println!("{}", json!({"image": path, "top": top}));
        } else {
            println!("{}", path.display());
            for (i, p) in &probs {
                println!(
                    "  {:>6.2}%  {}",
                    p * 100.0,
                    names.get(*i).map(String::as_str).unwrap_or("?")
                );
            }
        }
    }
    Ok(())
}

/// Training and inference throughput on synthetic data of the model's input shape (no dataset needed).
pub fn plan(
    kind: ModelKind,
    norm: NormKind,
    batch: usize,
    mode: &str,
    json_out: bool,
    plan: &PlanOptions,
) -> Result<()> {
    let (ctx, inference) = match mode {
        "train" => (Ctx::train(), false),
        "eval" => (Ctx::eval(), false),
        "inference" => (Ctx::eval(), true),
        _ => {
            return Err(NvError::Config(format!(
                "--mode must be train, eval or inference, got {mode}"
            )))
        }
    };
    if batch == 0 {
        return Err(NvError::Config("--batch-size must be > 0".into()));
    }
    let cfg = ModelConfig::fashion(kind, norm);
    let mut model = Model::new(cfg.clone())?;
    model.set_plan_options(plan.clone())?;
    let shape = [batch, cfg.in_channels, cfg.height, cfg.width];
    let g = model.graph_mut();
    let text = g.describe_plan(&[&shape], ctx, inference)?;
    let (kept, peak) = g.activation_memory(&[&shape], ctx, inference)?;
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    if json_out {
        println!(
            "{}",
            json!({"model": kind.as_str(), "norm": norm.as_str(), "mode": mode, "input": shape,
                "steps": text.lines().filter(|l| !l.trim().is_empty()).collect::<Vec<_>>(),
                "kept_bytes": kept, "peak_bytes": peak})
        );
    } else {
        println!(
            "{} with {} norm, input {shape:?}, {mode} plan:",
            kind.as_str(),
            norm.as_str()
        );
        print!("{text}");
        println!(
            "activations: {:.1} MiB kept for the backward, {:.1} MiB alive at the peak of the forward",
            mib(kept),
            mib(peak)
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn bench(
    kind: ModelKind,
    norm: NormKind,
    batch: usize,
    steps: usize,
    warmup: usize,
    mode: &str,
    fold_bn: bool,
    profile: bool,
    json_out: bool,
    plan: &PlanOptions,
) -> Result<Vec<(String, f64)>> {
    let cfg = ModelConfig::fashion(kind, norm);
    let mut model = Model::new(cfg.clone())?;
    model.set_plan_options(plan.clone())?;
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
    let x = ArrayD::from_shape_fn(
        IxDyn(&[batch, cfg.in_channels, cfg.height, cfg.width]),
        |_| rng.gen::<f32>() * 2.0 - 1.0,
    );
    let y: Vec<usize> = (0..batch).map(|i| i % cfg.num_classes).collect();
    let mut opt = normvision::optim::OptimConfig::Sgd(normvision::optim::sgd::SgdConfig {
        momentum: 0.9,
        ..Default::default()
    })
    .build()?;
    let mut out = vec![];
    let modes: Vec<&str> = if mode == "both" {
        vec!["train", "eval"]
    } else {
        vec![mode]
    };
    for m in modes {
        let mut folded = 0;
        if m == "eval" && fold_bn {
            folded = model.fold_batch_norm()?;
        }
        let mut times = vec![];
        let mut extra = [0.0f64; 3];
        for i in 0..warmup + steps {
            if profile && i == warmup {
                model.graph_mut().enable_timing();
            }
            let t = Instant::now();
            // wall clock of the step's parts outside the layers: zero_grad, loss, optimizer step
            let mut outside = [0.0f64; 3];
            if m == "train" {
                let t0 = Instant::now();
                model.zero_grad();
                outside[0] = t0.elapsed().as_secs_f64();
                let logits = model.forward(&x, Ctx::train())?;
                let t1 = Instant::now();
                let (_, d) = cross_entropy(&logits, &y, 0.0)?;
                outside[1] = t1.elapsed().as_secs_f64();
                model.backward_params(&x, &d, Ctx::train())?;
                let t2 = Instant::now();
                opt.step(&mut model, 0.01)?;
                outside[2] = t2.elapsed().as_secs_f64();
            } else {
                model.forward_inference(&x)?;
            }
            if i >= warmup {
                times.push(t.elapsed().as_secs_f64());
                for (a, b) in extra.iter_mut().zip(outside) {
                    *a += b;
                }
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[times.len() / 2];
        let img_s = batch as f64 / med;
        let best = batch as f64 / times[0];
        if json_out {
            println!(
                "{}",
                json!({"model": kind.as_str(), "norm": norm.as_str(), "mode": m, "batch": batch,
                "threads": rayon::current_num_threads(), "img_s": img_s, "img_s_best": best, "ms_median": med * 1e3,
                "folded_bn": folded,
                "conv": plan.conv.name(), "isa": plan.kernels.isa.as_str()})
            );
        } else {
            let note = if folded > 0 {
                format!(", {folded} BatchNorms folded")
            } else {
                String::new()
            };
            println!("{} --norm {} {m:<5} batch {batch}, {} threads: {img_s:.0} img/s (median of {steps}; best {best:.0}{note})",
                kind.as_str(), norm, rayon::current_num_threads());
        }
        if profile {
            print_layer_profile(model.graph(), m, steps, med, &extra, json_out);
        }
        out.push((m.to_string(), img_s));
    }
    Ok(out)
}

/// The `bench --profile` table: each top-level layer's forward and backward milliseconds per step.
pub fn print_layer_profile(
    graph: &normvision::model::Graph,
    mode: &str,
    steps: usize,
    median_step: f64,
    outside: &[f64; 3],
    json_out: bool,
) {
    let mut rows: Vec<(String, String, f64, f64)> = graph
        .step_times()
        .into_iter()
        .map(|s| (s.nodes, s.what, s.forward_s, s.backward_s))
        .collect();
    if mode == "train" {
        for (name, s) in ["zero_grad", "loss", "optimizer"].iter().zip(outside) {
            rows.push((name.to_string(), "(outside the layers)".into(), *s, 0.0));
        }
    }
    let per_step = |s: f64| s * 1e3 / steps.max(1) as f64;
    let total: f64 = rows.iter().map(|r| r.2 + r.3).sum::<f64>();
    if json_out {
        for (name, layer, f, b) in &rows {
            println!(
                "{}",
                json!({"profile": mode, "layer": name, "kind": layer, "forward_ms": per_step(*f),
                "backward_ms": per_step(*b), "share": (f + b) / total.max(1e-12)})
            );
        }
        return;
    }
    println!(
        "where a {mode} step goes (wall clock per step, mean of {steps}; step median {:.2} ms):",
        median_step * 1e3
    );
    println!(
        "{:<16} {:<48} {:>10} {:>10} {:>7}",
        "step (nodes)", "what", "fwd ms", "bwd ms", "share"
    );
    for (name, layer, f, b) in &rows {
        let kind: String = layer.chars().take(48).collect();
        println!(
            "{name:<16} {kind:<48} {:>10.3} {:>10.3} {:>6.1}%",
            per_step(*f),
            per_step(*b),
            100.0 * (f + b) / total.max(1e-12)
        );
    }
    println!(
        "{:<16} {:<48} {:>10.3} {:>10.3}",
        "total",
        "",
        per_step(rows.iter().map(|r| r.2).sum()),
        per_step(rows.iter().map(|r| r.3).sum())
    );
}

/// The main job: the same network with BatchNorm and without normalization, side by side.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    args: &TrainArgs,
    data: &DataArgs,
    norms: &[NormKind],
    target: f64,
    json_out: bool,
    quiet: bool,
    out_dir: &Path,
    plan: &PlanOptions,
) -> Result<()> {
    let (train_ds, test_ds) = data.load()?;
    let mut rows = vec![];
    for &norm in norms {
        let mut a = args.clone();
        a.norm = norm;
        a.eval_every = a.eval_every.or(Some(100));
        let cfg = a.to_config(&train_ds)?;
        let label = format!("{}-{}", cfg.model.kind.as_str(), norm.as_str());
        let ckpt = out_dir.join(format!("{label}.safetensors"));
        let opts = RunOptions {
            checkpoint: Some(ckpt.clone()),
            log: Some(ckpt.with_extension("jsonl")),
            progress: Bars::boxed(&label, quiet),
            resume: None,
            plan: plan.clone(),
            normalization: None,
            distributed: None,
        };
        if !quiet && !json_out {
            eprintln!(
                "== {label}: lr {}, batch {}, {} epochs ({} threads)",
                a.lr,
                a.batch_size,
                a.epochs,
                rayon::current_num_threads()
            );
        }
        let r = train::train(&cfg, Arc::clone(&train_ds), Arc::clone(&test_ds), opts)?;
        let steps_to = r
            .evals
            .iter()
            .find(|e| e.test_acc >= target)
            .map(|e| e.step);
        if json_out {
            println!(
                "{}",
                json!({"model": cfg.model.kind.as_str(), "norm": norm.as_str(), "lr": a.lr, "epoch_acc": r.epoch_accs(),
                "steps_to_target": steps_to, "target": target, "train_img_s": r.train_img_s, "diverged": r.diverged})
            );
        } else if !quiet {
            print_report(&label, &r);
        }
        rows.push((norm, r, steps_to));
    }
    if !json_out {
        let epochs = rows
            .iter()
            .map(|(_, r, _)| r.epoch_accs().len())
            .max()
            .unwrap_or(0);
        println!();
        println!(
            "{} on {} training / {} test images, lr {}, batch {} (evaluated every {} steps)",
            args.model.as_str(),
            train_ds.len().min(if args.train_limit > 0 {
                args.train_limit
            } else {
                usize::MAX
            }),
            test_ds.len().min(if args.test_limit > 0 {
                args.test_limit
            } else {
                usize::MAX
            }),
            args.lr,
            args.batch_size,
            args.eval_every.unwrap_or(100)
        );
        let mut head = format!("| {:<8} |", "norm");
        for e in 1..=epochs {
            head += &format!(" {:>8} |", format!("epoch {e}"));
        }
        head += &format!(
            " {:>14} | {:>9} | {:<10} |",
            format!("steps to {:.0}%", target * 100.0),
            "img/s",
            "status"
        );
        println!("{head}");
        println!(
            "|{}|",
            head.split('|')
                .skip(1)
                .filter(|s| !s.is_empty())
                .map(|s| "-".repeat(s.len()))
                .collect::<Vec<_>>()
                .join("|")
        );
        for (norm, r, steps_to) in &rows {
            let accs = r.epoch_accs();
            let mut line = format!("| {:<8} |", norm.as_str());
            for e in 0..epochs {
                line += &format!(" {:>8} |", fmt_pct(accs.get(e).copied()));
            }
            let status = if r.diverged.is_some() {
                "diverged"
            } else {
                "ok"
            };
            line += &format!(
                " {:>14} | {:>9.0} | {:<10} |",
                steps_to
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "not reached".into()),
                r.train_img_s,
                status
            );
            println!("{line}");
        }
        for (norm, r, _) in &rows {
            if let Some(d) = &r.diverged {
                println!("{norm}: diverged: {d}");
            }
        }
    }
    Ok(())
}
