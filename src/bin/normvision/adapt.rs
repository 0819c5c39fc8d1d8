//! `adapt`: a checkpoint's BatchNorm statistics re-estimated on target images, without labels (AdaBN, or the
//! N/n mix with the source statistics; `normvision::train::adapt`), written as a new checkpoint that `eval` and
//! `predict` take.

use crate::args::{CorruptionArgs, DataArgs};
use normvision::train::adapt::{adapt_to_dataset, AdaptMethod};
use normvision::train::checkpoint;
use normvision::{NvError, Result};
use serde_json::json;
use std::path::Path;

#[allow(clippy::too_many_arguments)]
pub fn run(
    ck_path: &Path,
    data: &DataArgs,
    split: &str,
    corruption: &CorruptionArgs,
    method: &str,
    prior: Option<f64>,
    batch_size: usize,
    limit: Option<usize>,
    out: &Path,
    json_out: bool,
) -> Result<()> {
    let method = match (method, prior) {
        ("adabn", None) => AdaptMethod::AdaBn,
        ("adabn", Some(_)) => {
            return Err(NvError::Config(
                "--prior goes with --method mix, not adabn".into(),
            ))
        }
        ("mix", Some(p)) => AdaptMethod::Mix { prior: p },
        ("mix", None) => {
            return Err(NvError::Config(
                "--method mix needs --prior N (the source statistics' weight, in samples)".into(),
            ))
        }
        (m, _) => {
            return Err(NvError::Config(format!(
                "--method must be adabn or mix, got {m:?}"
            )))
        }
    };
    if batch_size == 0 {
        return Err(NvError::Config("--batch-size must be at least 1".into()));
    }
    let ck = checkpoint::load(ck_path)?;
    let mut model = checkpoint::restore_model(&ck)?;
    let (train, test) = data.load()?;
    let corruption_given = corruption.parsed()?;
    let ds = match split {
        "test" => corruption.apply(test, false)?,
        "train" => corruption.apply(train, true)?,
        other => {
            return Err(NvError::Config(format!(
                "--split must be train or test, got {other:?}"
            )))
        }
    };
    let [c, h, w] = model.input_shape();
    if ds.shape != [c, h, w] {
        return Err(NvError::Config(format!(
            "the data's images are {:?}, the model takes {c}x{h}x{w}",
            ds.shape
        )));
    }
    let n = limit.unwrap_or(ds.len()).min(ds.len());
    let report = adapt_to_dataset(
        model.graph_mut(),
        method,
        &ds,
        &ck.norm,
        Some(n),
        batch_size,
    )
    .map_err(|e| match e {
        NvError::Config(m) => NvError::Config(format!("{}: {m}", ck_path.display())),
        e => e,
    })?;
    let opt = ck.config.optim.build()?;
    checkpoint::save(
        out,
        &ck.config,
        &ck.norm,
        ck.position,
        &model,
        opt.as_ref(),
        None,
    )?;
    for l in &report {
        if json_out {
            println!(
                "{}",
                json!({"layer": l.name, "samples": l.samples, "values_per_channel": l.values_per_channel,
                    "max_mean_change": l.max_mean_change, "max_var_change": l.max_var_change})
            );
        } else {
            println!(
                "{:<24} {:>8} images  max |Δ running_mean| {:.4}  max |Δ running_var| {:.4}",
                l.name, l.samples, l.max_mean_change, l.max_var_change
            );
        }
    }
    if !json_out {
        println!(
            "{}: {} BatchNorms adapted ({}) on {n} {split} images of the data{}; written to {}",
            ck_path.display(),
            report.len(),
            match method {
                AdaptMethod::AdaBn => "AdaBN".to_string(),
                AdaptMethod::Mix { prior } => format!("mix with prior N = {prior}"),
            },
            corruption_given
                .map(|c| format!(", corrupted with {c}"))
                .unwrap_or_default(),
            out.display()
        );
    }
    Ok(())
}
