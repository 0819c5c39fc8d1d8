//! `normvision experiment NAME`: each experiment measures one published claim about BatchNorm on Fashion-MNIST,
//! puts the paper's number beside ours and gives a verdict. It writes `NAME.md` (the tables), `NAME.json`
//! (every measured number) and `NAME.svg` (a plot) into its output directory.
//!
//! | experiment | claim (`experiments.md`) | file |
//! |---|---|---|
//! | `convergence` | BN trains in fewer steps and at higher learning rates (BN paper §4.2) | [`convergence`] |
//! | `mlp-sigmoid` | the BN paper's MNIST network: faster training, stable sigmoid inputs (§4.1, Fig. 1) | [`mlp_sigmoid`] |
//! | `init` | BN makes training robust to the scale of the initial weights (§3.3) | [`init`] |
//! | `batch-size` | BN breaks at small batches; GN, LN, IN, BCN, Batch Renorm and Ghost BN compared (Wu & He 2018) | [`batch_size`] |
//! | `regularization` | BN regularizes: a smaller train/test gap (§3.4) | [`regularization`] |
//! | `landscape` | BN smooths the loss landscape (Santurkar et al. 2018) | [`landscape`] |
//! | `shift` | re-estimating BN statistics on shifted test data recovers accuracy (AdaBN, Schneider et al.'s N/n mix) | [`shift`] |
//! | `finetune` | BN fine-tuned at small batches loses to frozen BN (Wu & He 2018 §4.2) | [`finetune`] |
//! | `seg-norm` | in segmentation (DeepLabV3 on garment scenes) BN breaks at small batches; GN, a frozen BN backbone and SyncBN do not | [`seg_norm`] |
//! | `det-norm` | in detection (Faster R-CNN at batch 2) a GN head beats a head without norm, a GN backbone adds to it, fine-tuning BN loses to frozen BN (Wu & He 2018 §6) | [`det_norm`] |
//!
//! `--quick` runs each in well under a minute (CI runs them), on subsets of the data; the full runs are what the
//! committed results in `docs/results/` come from. Every setting's result is cached as a small JSON under
//! `OUT/runs/NAME/` ([`runs::RunCache`]), so an interrupted suite resumes, and [`results`] assembles
//! `docs/RESULTS.md` from the reports and `docs/claims.json` without re-running anything.

pub mod batch_size;
pub mod convergence;
pub mod det_norm;
pub mod finetune;
pub mod init;
pub mod landscape;
pub mod mlp_sigmoid;
pub mod regularization;
pub mod report;
pub mod results;
pub mod runs;
pub mod seg_norm;
pub mod shift;

use crate::data::{fashion_mnist, Dataset};
use crate::Result;
use std::path::PathBuf;
use std::sync::Arc;

/// What every experiment takes.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    /// The short version (about a minute): fewer images, epochs and settings.
    pub quick: bool,
    /// Seeds to repeat each setting over (0: the experiment's default).
    pub seeds: usize,
    /// Where to write the tables, the JSON and the plot.
    pub out: PathBuf,
    /// The Fashion-MNIST directory (default: Debian's).
    pub data: Option<PathBuf>,
    /// Print progress lines on stderr.
    pub verbose: bool,
    /// Progress of the runs (the CLI draws a bar from it).
    pub progress: Option<runs::RunProgress>,
}

/// The experiments, by command-line name, in the suite's order.
pub const NAMES: [&str; 10] = [
    "convergence",
    "mlp-sigmoid",
    "init",
    "batch-size",
    "regularization",
    "landscape",
    "shift",
    "finetune",
    "seg-norm",
    "det-norm",
];

/// Runs experiment `name`, returning its report (also written to `opts.out`).
pub fn run(name: &str, opts: &ExperimentOptions) -> Result<report::Report> {
    let r = match name {
        "convergence" => convergence::run(opts)?,
        "mlp-sigmoid" => mlp_sigmoid::run(opts)?,
        "init" => init::run(opts)?,
        "batch-size" => batch_size::run(opts)?,
        "regularization" => regularization::run(opts)?,
        "landscape" => landscape::run(opts)?,
        "shift" => shift::run(opts)?,
        "finetune" => finetune::run(opts)?,
        "seg-norm" => seg_norm::run(opts)?,
        "det-norm" => det_norm::run(opts)?,
        other => {
            return Err(crate::NvError::Config(format!(
                "unknown experiment {other:?}; the experiments are: {}",
                NAMES.join(", ")
            )))
        }
    };
    r.write(&opts.out)?;
    Ok(r)
}

/// Fashion-MNIST's (train, test) splits.
pub(crate) fn fashion(opts: &ExperimentOptions) -> Result<(Arc<Dataset>, Arc<Dataset>)> {
    let d = opts.data.as_deref();
    Ok((
        Arc::new(fashion_mnist::load(d, fashion_mnist::Split::Train)?),
        Arc::new(fashion_mnist::load(d, fashion_mnist::Split::Test)?),
    ))
}

/// A ResNet-14 classifier with `norm`, trained on Fashion-MNIST at the classification reference recipe for
/// `epochs` (on the first `limit` training images, all when 0; tested on 2000): the backbone the dense-task
/// experiments start from, as its state dict and test accuracy. `who` names the experiment in progress lines.
pub(crate) fn pretrain_resnet14(
    norm: crate::model::NormKind,
    epochs: usize,
    limit: usize,
    train: &Arc<Dataset>,
    test: &Arc<Dataset>,
    verbose: bool,
    who: &str,
) -> Result<(crate::state::StateDict, f64)> {
    use crate::state::Stateful;
    let mut cfg = crate::train::TrainConfig::reference(crate::model::ModelKind::Resnet14, norm);
    cfg.epochs = epochs;
    cfg.train_limit = limit;
    cfg.test_limit = 2_000;
    if verbose {
        eprintln!(
            "{who}: pre-training the resnet14 classifier with {} ({epochs} epochs)",
            norm.as_str()
        );
    }
    let (rep, model) = crate::train::train_model_keep(
        crate::model::Model::new(cfg.model.clone())?,
        &cfg,
        train.clone(),
        test.clone(),
        crate::train::RunOptions::default(),
    )?;
    Ok((model.state_dict(), rep.final_test_acc.unwrap_or(f64::NAN)))
}

/// Mean and sample standard deviation.
pub(crate) fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let s = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, s)
}

/// The current UTC time as RFC 3339 (seconds).
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil-from-days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The command line that reproduces a run of `name` with `opts`.
pub(crate) fn command(name: &str, opts: &ExperimentOptions) -> String {
    format!(
        "normvision experiment {name}{}{}",
        if opts.quick { " --quick" } else { "" },
        if opts.seeds > 0 {
            format!(" --seeds {}", opts.seeds)
        } else {
            String::new()
        }
    )
}

/// A training configuration of the reference recipe (SGD momentum 0.9, batch 128, eval batch 1000) for
/// `kind` and `norm`, with the seed, learning rate, epochs and data limits given.
pub(crate) fn recipe(
    kind: crate::model::ModelKind,
    norm: crate::model::NormKind,
    seed: u64,
    lr: f64,
    epochs: usize,
) -> crate::train::TrainConfig {
    let mut cfg = crate::train::TrainConfig::reference(kind, norm);
    cfg.seed = seed;
    cfg.model.seed = seed;
    cfg.schedule = crate::optim::LrSchedule::constant(lr);
    cfg.epochs = epochs;
    cfg.eval_batch_size = 1000;
    cfg
}

/// Trains `cfg` (its zoo model) on the experiment's data with the training set's normalization.
pub(crate) fn train_cfg(
    cfg: &crate::train::TrainConfig,
    train: &Arc<Dataset>,
    test: &Arc<Dataset>,
) -> Result<(crate::train::TrainReport, crate::model::Model)> {
    let model = crate::model::Model::new(cfg.model.clone())?;
    crate::train::train_model_keep(
        model,
        cfg,
        train.clone(),
        test.clone(),
        crate::train::RunOptions::default(),
    )
}

/// [`train_cfg`] data-parallel over `ranks` ranks run as threads of this process ([`crate::comm::LocalGroup`]:
/// the trainer's code path under `mpirun`, without a launcher); rank 0's report and model.
pub(crate) fn train_cfg_ranks(
    cfg: &crate::train::TrainConfig,
    train: &Arc<Dataset>,
    test: &Arc<Dataset>,
    ranks: usize,
) -> Result<(crate::train::TrainReport, crate::model::Model)> {
    let group = crate::comm::LocalGroup::new(ranks)?;
    let mut results: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|g| {
                sc.spawn(move || {
                    let model = crate::model::Model::new(cfg.model.clone())?;
                    let opts = crate::train::RunOptions {
                        distributed: Some(crate::train::Distributed::new(Arc::new(g))),
                        ..Default::default()
                    };
                    crate::train::train_model_keep(model, cfg, train.clone(), test.clone(), opts)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("a rank thread panicked"))
            .collect()
    });
    results.swap_remove(0)
}
