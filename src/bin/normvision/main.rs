//! The `normvision` binary: argument parsing (clap), progress bars (indicatif), tables and JSON lines, over the
//! library's API.

mod adapt;
mod args;
mod bench_kernels;
mod choice;
mod cli;
mod coco_eval;
mod commands;
mod corrupt;
mod detect;
mod distributed;
mod finetune;
mod inference_bench;
mod interop;
mod progress;
mod resume;
mod scenes;
mod segment;

use args::set_threads;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use cli::{Cli, Cmd};
use normvision::model::PlanOptions;
use std::path::PathBuf;
use std::process::ExitCode;

fn run(cli: Cli, explicit: Vec<String>) -> normvision::Result<()> {
    let mut plan = PlanOptions::default().conv(cli.conv).fuse(!cli.no_fusion);
    if let Some(isa) = cli.isa {
        plan = plan.isa(isa.checked()?);
    }
    match cli.cmd {
        Cmd::BenchKernels {
            ops,
            modes,
            shapes,
            reps,
            warmup,
            json,
        } => {
            let threads = cli.threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let shapes: Vec<Vec<usize>> = if shapes.is_empty() {
                bench_kernels::DEFAULT_SHAPES
                    .iter()
                    .map(|s| s.to_vec())
                    .collect()
            } else {
                shapes
                    .iter()
                    .map(|s| bench_kernels::parse_shape(s))
                    .collect::<normvision::Result<_>>()?
            };
            if !json {
                println!(
                    "{:<14} {:<18} {:<14} {:>7} {:>10} {:>10} {:>8}",
                    "op", "shape", "mode", "threads", "min ms", "median ms", "GB/s"
                );
            }
            bench_kernels::run(
                &ops,
                &shapes,
                &modes,
                threads,
                warmup,
                reps,
                plan.kernels,
                |r| {
                    if json {
                        println!("{}", serde_json::to_string(r).expect("serialisable"));
                    } else {
                        let shape = r
                            .shape
                            .iter()
                            .map(|d| d.to_string())
                            .collect::<Vec<_>>()
                            .join("x");
                        println!(
                            "{:<14} {:<18} {:<14} {:>7} {:>10.3} {:>10.3} {:>8.1}",
                            r.op, shape, r.mode, r.threads, r.min_ms, r.median_ms, r.gbps
                        );
                    }
                },
            )
        }
        Cmd::Train {
            task,
            train,
            data,
            seg,
            det,
            out,
            resume,
            log,
            json,
            quiet,
            fault_kill_in_write,
            distributed,
            shard_sizes,
        } => {
            if let Some(n) = fault_kill_in_write {
                normvision::io::atomic::fault::kill_in_write(n);
            }
            if task.task == segment::Task::Detect {
                if resume.is_some() {
                    return Err(normvision::NvError::Config(
                        "--task detect: --resume is not available for detection (a detection run restarts \
                         from its start)"
                            .into(),
                    ));
                }
                if shard_sizes.is_some() {
                    return Err(normvision::NvError::Config(
                        "--shard-sizes applies to classification and segmentation; detection splits each \
                         global batch evenly over the ranks"
                            .into(),
                    ));
                }
                if distributed {
                    return distributed::as_rank(cli.threads, quiet, None, |d| {
                        detect::train(
                            &train,
                            &data,
                            &seg,
                            &det,
                            out,
                            log,
                            &explicit,
                            json,
                            quiet,
                            &plan,
                            Some(d),
                        )
                    });
                }
                return detect::train(
                    &train, &data, &seg, &det, out, log, &explicit, json, quiet, &plan, None,
                );
            }
            if task.task == segment::Task::Segment {
                if resume.is_some() {
                    return Err(normvision::NvError::Config(
                        "--task segment: --resume is classification-only for now (a segmentation run \
                         restarts from its start)"
                            .into(),
                    ));
                }
                if distributed {
                    return distributed::as_rank(cli.threads, quiet, shard_sizes, |d| {
                        segment::train(
                            &train,
                            &data,
                            &seg,
                            out,
                            log,
                            &explicit,
                            json,
                            quiet,
                            &plan,
                            Some(d),
                        )
                    });
                }
                if shard_sizes.is_some() {
                    return Err(normvision::NvError::Config(
                        "--shard-sizes applies to --distributed training only".into(),
                    ));
                }
                set_threads(cli.threads, false)?;
                return segment::train(
                    &train, &data, &seg, out, log, &explicit, json, quiet, &plan, None,
                );
            }
            let run = resume::RunPaths { out, resume, log };
            if distributed {
                return distributed::train(
                    &train,
                    &data,
                    run,
                    &explicit,
                    json,
                    quiet,
                    &plan,
                    cli.threads,
                    shard_sizes,
                );
            }
            if shard_sizes.is_some() {
                return Err(normvision::NvError::Config(
                    "--shard-sizes applies to --distributed training only".into(),
                ));
            }
            set_threads(cli.threads, false)?;
            commands::train(&train, &data, run, &explicit, json, quiet, &plan, None).map(|_| ())
        }
        cmd => {
            let serving = matches!(
                cmd,
                Cmd::Predict { .. }
                    | Cmd::Bench {
                        inference: true,
                        ..
                    }
                    | Cmd::Bench { onnx: Some(_), .. }
            );
            set_threads(cli.threads, serving)?;
            match cmd {
                Cmd::Train { .. } => unreachable!("handled above"),
                Cmd::Scenes {
                    out,
                    size,
                    count,
                    seed,
                    split,
                    data,
                    quiet,
                } => scenes::run(&out, size, count, seed, &split, data.as_deref(), quiet),
                Cmd::CocoEval { gt, dets, json } => coco_eval::run(&gt, &dets, json),
                Cmd::Compare {
                    train,
                    data,
                    norms,
                    target,
                    out_dir,
                    json,
                    quiet,
                } => commands::compare(&train, &data, &norms, target, json, quiet, &out_dir, &plan),
                Cmd::Eval {
                    checkpoint,
                    weights,
                    onnx,
                    torch,
                    data,
                    task,
                    seg,
                    det,
                    batch_size,
                    fold_bn,
                    corruption,
                    adapt_bn,
                    prior,
                    json,
                } => {
                    if task.task == segment::Task::Detect {
                        let ck = checkpoint.as_deref().ok_or_else(|| {
                            normvision::NvError::Config(
                                "eval --task detect needs --checkpoint (a detection checkpoint)"
                                    .into(),
                            )
                        })?;
                        let bs = if explicit.iter().any(|e| e == "batch_size") {
                            batch_size
                        } else {
                            8
                        };
                        return detect::eval(ck, &data, &seg, &det, &explicit, bs, json, &plan);
                    }
                    if task.task == segment::Task::Segment {
                        let ck = checkpoint.as_deref().ok_or_else(|| {
                            normvision::NvError::Config(
                                "eval --task segment needs --checkpoint (a segmentation checkpoint)".into(),
                            )
                        })?;
                        let bs = if explicit.iter().any(|e| e == "batch_size") {
                            batch_size
                        } else {
                            32
                        };
                        return segment::eval(ck, &data, &seg, bs, json, &plan);
                    }
                    let norm_given = explicit.iter().any(|f| f == "mean" || f == "std");
                    let src =
                        interop::Source::of(&checkpoint, &weights, &onnx, &torch, norm_given)?;
                    let shift = commands::Shift {
                        corruption: &corruption,
                        adapt_prior: adapt_bn.then_some(prior),
                    };
                    commands::eval(&src, &data, batch_size, fold_bn, &shift, json, &plan)
                }
                Cmd::Predict {
                    checkpoint,
                    weights,
                    onnx,
                    torch,
                    images,
                    task,
                    top_k,
                    classes,
                    fold_bn,
                    json,
                } => {
                    if task.task == segment::Task::Detect {
                        let ck = checkpoint.as_deref().ok_or_else(|| {
                            normvision::NvError::Config(
                                "predict --task detect needs --checkpoint (a detection checkpoint)"
                                    .into(),
                            )
                        })?;
                        return detect::predict(ck, &images, json, &plan);
                    }
                    if task.task == segment::Task::Segment {
                        let ck = checkpoint.as_deref().ok_or_else(|| {
                            normvision::NvError::Config(
                                "predict --task segment needs --checkpoint (a segmentation checkpoint)"
                                    .into(),
                            )
                        })?;
                        return segment::predict(ck, &images, json, &plan);
                    }
                    let norm_given = explicit.iter().any(|f| f == "mean" || f == "std");
                    let src =
                        interop::Source::of(&checkpoint, &weights, &onnx, &torch, norm_given)?;
                    commands::predict(&src, &images, top_k, classes, fold_bn, json, &plan)
                }
                Cmd::Import { torch, model, out } => interop::import(&torch, &model, &out),
                Cmd::Adapt {
                    checkpoint,
                    data,
                    split,
                    corruption,
                    method,
                    prior,
                    batch_size,
                    limit,
                    out,
                    json,
                } => adapt::run(
                    &checkpoint,
                    &data,
                    &split,
                    &corruption,
                    &method,
                    prior,
                    batch_size,
                    limit,
                    &out,
                    json,
                ),
                Cmd::Finetune {
                    from,
                    weights,
                    torch,
                    finetune,
                    data,
                    out,
                    log,
                    json,
                    quiet,
                } => {
                    let norm_given = explicit.iter().any(|f| f == "mean" || f == "std");
                    let src = interop::Source::of(&from, &weights, &None, &torch, norm_given)?;
                    finetune::run(&src, &finetune, &data, &out, log, json, quiet, &plan)
                }
                Cmd::Experiment {
                    name,
                    quick,
                    full: _,
                    seeds,
                    out,
                    data,
                    json,
                    quiet,
                } => {
                    let names: Vec<String> = if name == "all" {
                        normvision::experiment::NAMES
                            .iter()
                            .map(|s| s.to_string())
                            .collect()
                    } else {
                        vec![name.clone()]
                    };
                    let bar = progress::RunBar::new(quiet || json);
                    for (i, name) in names.iter().enumerate() {
                        let opts = normvision::experiment::ExperimentOptions {
                            quick,
                            seeds,
                            out: out
                                .clone()
                                .unwrap_or_else(|| PathBuf::from("runs/experiments")),
                            data: data.clone(),
                            verbose: false,
                            progress: bar.callback(&format!("{name} ({}/{})", i + 1, names.len())),
                        };
                        let r = normvision::experiment::run(name, &opts)?;
                        bar.finish();
                        if json {
                            println!(
                                "{}",
                                serde_json::to_string(&r).expect("a report serialises")
                            );
                        } else {
                            println!("{}", r.markdown());
                            let stems: Vec<String> =
                                r.plots().into_iter().map(|(s, _)| s).collect();
                            println!(
                                "written: {}/{{{n}.md, {n}.json}} and plots {}",
                                opts.out.display(),
                                stems
                                    .iter()
                                    .map(|s| format!("{s}.png/.svg"))
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                n = r.name
                            );
                        }
                    }
                    Ok(())
                }
                Cmd::Report {
                    claims,
                    results,
                    out,
                } => {
                    let md =
                        normvision::experiment::results::write_report(&claims, &results, &out)?;
                    let rows = md
                        .lines()
                        .filter(|l| l.starts_with("| ") && !l.starts_with("| claim"))
                        .count();
                    println!("written: {} ({rows} claims)", out.display());
                    Ok(())
                }
                Cmd::Corrupt {
                    corruption,
                    corruption_seed,
                    data,
                    split,
                    out,
                    list,
                    json,
                    quiet,
                } => match (list, corruption, out) {
                    (true, _, _) => {
                        corrupt::list(json);
                        Ok(())
                    }
                    (false, Some(c), Some(out)) => {
                        corrupt::run(&c, corruption_seed, &data, &split, &out, quiet)
                    }
                    _ => Err(normvision::NvError::Config(
                        "corrupt needs --corruption NAME:SEVERITY and --out DIR (or --list)".into(),
                    )),
                },
                Cmd::Export {
                    checkpoint,
                    torch: _,
                    onnx,
                    opset,
                    fold_bn,
                    out,
                } => {
                    if onnx {
                        interop::export_onnx(&checkpoint, &out, fold_bn, opset)
                    } else {
                        interop::export_torch(&checkpoint, &out, fold_bn)
                    }
                }
                Cmd::Bench {
                    task,
                    side,
                    model,
                    norm,
                    batch_size,
                    steps,
                    warmup,
                    mode,
                    fold_bn,
                    profile,
                    inference,
                    onnx,
                    json,
                } => {
                    if task.task == segment::Task::Detect {
                        let b = if explicit.iter().any(|e| e == "batch_size") {
                            batch_size
                        } else {
                            2
                        };
                        let side = if explicit.iter().any(|e| e == "side") {
                            side
                        } else {
                            128
                        };
                        return detect::bench(b, side, steps, warmup, json, &plan);
                    }
                    if task.task == segment::Task::Segment {
                        let b = if explicit.iter().any(|e| e == "batch_size") {
                            batch_size
                        } else {
                            8
                        };
                        if steps == 0 || b == 0 || !(8..=1024).contains(&side) {
                            return Err(normvision::NvError::Config(format!(
                                "--steps and --batch-size must be at least 1 and --side in 8..=1024, got {steps}, {b} and {side}"
                            )));
                        }
                        return segment::bench(norm, b, side, steps, warmup, json, &plan, profile);
                    }
                    if inference || onnx.is_some() {
                        if steps == 0 || batch_size == 0 {
                            return Err(normvision::NvError::Config(format!(
                                "--steps and --batch-size must be at least 1, got {steps} and {batch_size}"
                            )));
                        }
                        let subject = match &onnx {
                            Some(p) => crate::inference_bench::Subject::Onnx(p),
                            None => crate::inference_bench::Subject::Zoo(model, norm),
                        };
                        return crate::inference_bench::run(
                            subject, batch_size, steps, warmup, json, &plan, profile,
                        );
                    }
                    if !["train", "eval", "both"].contains(&mode.as_str()) {
                        return Err(normvision::NvError::Config(format!(
                            "--mode must be train, eval or both, got {mode}"
                        )));
                    }
                    if steps == 0 || batch_size == 0 {
                        return Err(normvision::NvError::Config(format!(
                            "--steps and --batch-size must be at least 1, got {steps} and {batch_size}"
                        )));
                    }
                    commands::bench(
                        model, norm, batch_size, steps, warmup, &mode, fold_bn, profile, json,
                        &plan,
                    )
                    .map(|_| ())
                }
                Cmd::Plan {
                    model,
                    norm,
                    batch_size,
                    mode,
                    json,
                } => commands::plan(model, norm, batch_size, &mode, json, &plan),
                Cmd::BenchKernels { .. } => unreachable!("handled above"),
            }
        }
    }
}

fn main() -> ExitCode {
    normvision::runtime::tune_allocator();
    // A decoder panic on a malformed image becomes an error naming the file; say nothing about the panic itself.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !normvision::data::decode::is_decoder_panic(info) {
            default_hook(info);
        }
    }));
    let matches = Cli::command().get_matches();
    // The flags typed on the command line (not defaults): a resumed run checks them against its checkpoint.
    let explicit: Vec<String> = matches
        .subcommand()
        .map(|(_, m)| {
            m.ids()
                .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
                .map(|id| id.to_string())
                .collect()
        })
        .unwrap_or_default();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli, explicit) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
