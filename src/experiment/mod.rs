//! `normvision experiment NAME`: each experiment measures one published claim about BatchNorm on Fashion-MNIST,
//! puts the paper's number beside ours and gives a verdict. It writes `NAME.md` (the tables), `NAME.json`
//! (every measured number) and `NAME.svg` (a plot) into its output directory.
//!
//! | experiment | claim (`experiments.md`) | file |
//! |---|---|---|
//! | `shift` | re-estimating BN statistics on shifted test data recovers accuracy (AdaBN, Schneider et al.'s N/n mix) | [`shift`] |
//! | `finetune` | BN fine-tuned at small batches loses to frozen BN (Wu & He 2018 §4.2) | [`finetune`] |
//!
//! `--quick` runs each in about a minute (CI runs them), on subsets of the data; the full runs are what the
//! committed results in `docs/results/` come from.

pub mod finetune;
pub mod report;
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
}

/// The experiments, by command-line name.
pub const NAMES: [&str; 2] = ["shift", "finetune"];

/// Runs experiment `name`, returning its report (also written to `opts.out`).
pub fn run(name: &str, opts: &ExperimentOptions) -> Result<report::Report> {
    let r = match name {
        "shift" => shift::run(opts)?,
        "finetune" => finetune::run(opts)?,
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
