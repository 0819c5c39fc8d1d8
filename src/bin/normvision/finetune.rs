//! `finetune`: train a checkpoint (or a PyTorch state dict) further, on a subset of classes or a few images per
//! class, with its BatchNorms trained, frozen or in eval mode, optionally with a new head and a frozen backbone
//! (`normvision::train::finetune`).

use crate::args::{DataArgs, OptimizerArg, TrainArgs};
use crate::interop::Source;
use crate::progress::Bars;
use clap::{Args, Parser};
use normvision::model::{Model, PlanOptions};
use normvision::train::finetune::{self, BnMode, FinetuneRecord};
use normvision::train::{self, RunOptions};
use normvision::{NvError, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What and how to fine-tune.
#[derive(Debug, Clone, Args)]
pub struct FinetuneArgs {
    /// train (statistics and affine updated), frozen (every BatchNorm becomes a FrozenBatchNorm, as in
    /// torchvision's detection backbones) or eval-stats (BatchNorm in eval mode: running statistics, affine
    /// trained).
    #[arg(long, default_value = "train")]
    pub bn: String,
    /// Train only the classifier (the last Linear layer); every other parameter is frozen.
    #[arg(long)]
    pub freeze_backbone: bool,
    /// Replace the classifier by a fresh one for K classes.
    #[arg(long, value_name = "K")]
    pub new_head: Option<usize>,
    /// Train and test on these labels only, relabelled 0..K-1 in the order given (e.g. 8,9).
    #[arg(long, value_delimiter = ',', value_name = "LABELS")]
    pub classes: Option<Vec<usize>>,
    /// N training images per class, chosen by --seed (--train-limit stays a total, applied after).
    #[arg(long, value_name = "N")]
    pub per_class: Option<usize>,
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    #[arg(long, value_enum, default_value_t = OptimizerArg::Sgd)]
    pub optimizer: OptimizerArg,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seeds the new head, the per-class choice, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also evaluate every K steps.
    #[arg(long, value_name = "K")]
    pub eval_every: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub train_limit: usize,
    #[arg(long, default_value_t = 0)]
    pub test_limit: usize,
    /// Augment training images: random crop (pad 2) and horizontal flip.
    #[arg(long)]
    pub augment: bool,
    #[arg(long)]
    pub drop_last: bool,
}

#[derive(Parser)]
struct Defaults {
    #[command(flatten)]
    t: TrainArgs,
}

impl FinetuneArgs {
    /// The run configuration: `train`'s, with these options.
    fn train_args(&self) -> TrainArgs {
        let mut t = Defaults::parse_from(["finetune"]).t;
        t.epochs = self.epochs;
        t.max_steps = self.max_steps;
        t.batch_size = self.batch_size;
        t.lr = self.lr;
        t.optimizer = self.optimizer;
        t.momentum = self.momentum;
        t.weight_decay = self.weight_decay;
        t.seed = self.seed;
        t.eval_every = self.eval_every;
        t.train_limit = self.train_limit;
        t.test_limit = self.test_limit;
        t.augment = self.augment;
        t.drop_last = self.drop_last;
        t
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    src: &Source,
    args: &FinetuneArgs,
    data: &DataArgs,
    out: &Path,
    log: Option<PathBuf>,
    json_out: bool,
    quiet: bool,
    plan: &PlanOptions,
) -> Result<()> {
    let bn: BnMode = args.bn.parse()?;
    let (model, norm) = src.load()?;
    let input = model.input_shape();
    let source_classes = model.num_classes();
    let mut graph = model.into_graph();
    let prep = finetune::prepare(
        &mut graph,
        bn,
        args.freeze_backbone,
        args.new_head,
        args.seed,
    )
    .map_err(|e| match e {
        NvError::Config(m) => NvError::Config(format!("{}: {m}", src.path().display())),
        e => e,
    })?;
    let model = Model::from_graph(graph, input)?;
    let (train_ds, test_ds) = data.load()?;
    let (mut train_ds, test_ds) = match &args.classes {
        Some(c) => (
            Arc::new(train_ds.select_classes(c)?),
            Arc::new(test_ds.select_classes(c)?),
        ),
        None => (train_ds, test_ds),
    };
    if let Some(n) = args.per_class {
        if n == 0 {
            return Err(NvError::Config("--per-class must be at least 1".into()));
        }
        train_ds = Arc::new(train_ds.per_class(n, args.seed)?);
    }
    if model.num_classes() != train_ds.num_classes() {
        return Err(NvError::Config(format!(
            "{}: the model's classifier has {} outputs, the data {} classes{}; add --new-head {}",
            src.path().display(),
            model.num_classes(),
            train_ds.num_classes(),
            if args.classes.is_some() {
                " (--classes)"
            } else {
                ""
            },
            train_ds.num_classes()
        )));
    }
    let mut cfg = args.train_args().to_config(&train_ds)?;
    cfg.finetune = Some(FinetuneRecord {
        from: src.path().display().to_string(),
        bn,
        freeze_backbone: args.freeze_backbone,
        new_head: args.new_head,
        classes: args.classes.clone(),
        class_names: train_ds.classes.clone(),
        per_class: args.per_class,
        converted_batch_norms: prep.converted_batch_norms.clone(),
        frozen_nodes: prep.frozen_nodes.clone(),
    });
    let log = log.unwrap_or_else(|| out.with_extension("jsonl"));
    if !quiet && !json_out {
        eprintln!(
            "fine-tuning {} ({} classes -> {}) on {} images, batch {}: --bn {}{}{}; checkpoint {}",
            src.path().display(),
            source_classes,
            model.num_classes(),
            train_ds.len(),
            args.batch_size,
            bn.as_str(),
            if prep.converted_batch_norms.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} BatchNorms made FrozenBatchNorm)",
                    prep.converted_batch_norms.len()
                )
            },
            if args.freeze_backbone {
                format!(", backbone frozen (only {} trains)", prep.head)
            } else {
                String::new()
            },
            out.display()
        );
    }
    let opts = RunOptions {
        checkpoint: Some(out.to_path_buf()),
        log: Some(log),
        progress: Bars::boxed("finetune", quiet),
        resume: None,
        plan: plan.clone(),
        normalization: Some(norm),
        distributed: None,
    };
    let r = train::train_model(model, &cfg, train_ds, test_ds, opts)?;
    if json_out {
        println!(
            "{}",
            serde_json::json!({"finetune": cfg.finetune, "report": r})
        );
    } else {
        for n in &r.notes {
            eprintln!("note: {n}");
        }
        crate::commands::print_report("finetune", &r);
        if r.diverged.is_none() {
            println!("  checkpoint: {}", out.display());
        }
    }
    if let Some(why) = &r.diverged {
        return Err(NvError::Diverged(why.clone()));
    }
    Ok(())
}
