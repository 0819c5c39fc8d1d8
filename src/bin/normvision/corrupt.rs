//! `corrupt`: a corrupted copy of a data set written as MNIST-format IDX files (gzip-free), for use with
//! `--data DIR` or elsewhere; `--list` prints the severity table.

use crate::args::DataArgs;
use indicatif::{ProgressBar, ProgressStyle};
use normvision::data::corrupt::SEVERITIES;
use normvision::data::idx::{write_idx, IdxArray, IdxData};
use normvision::data::{Corruption, Dataset};
use normvision::{NvError, Result};
use serde_json::json;
use std::path::Path;

/// Prints the severity table.
pub fn list(json_out: bool) {
    for r in &SEVERITIES {
        if json_out {
            println!(
                "{}",
                json!({"corruption": r.name, "severities": r.params, "parameter": r.meaning})
            );
        } else {
            let p: Vec<String> = r.params.iter().map(|v| format!("{v}")).collect();
            println!("{:<15} {:<28} {}", r.name, p.join(" "), r.meaning);
        }
    }
}

pub fn run(
    corruption: &str,
    seed: u64,
    data: &DataArgs,
    split: &str,
    out: &Path,
    quiet: bool,
) -> Result<()> {
    let c: Corruption = corruption.parse()?;
    let (train, test) = data.load()?;
    let splits: Vec<(&str, &Dataset)> = match split {
        "test" => vec![("t10k", &test)],
        "train" => vec![("train", &train)],
        "both" => vec![("train", &train), ("t10k", &test)],
        other => {
            return Err(NvError::Config(format!(
                "--split must be train, test or both, got {other:?}"
            )))
        }
    };
    std::fs::create_dir_all(out).map_err(|source| NvError::Io {
        path: out.display().to_string(),
        op: "create directory",
        source,
    })?;
    for (stem, ds) in splits {
        let bar = if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(ds.len() as u64)
        };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:28}] {pos}/{len}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{stem} {c}"));
        // the train and test splits draw from different streams of the seed; the test split's images are
        // those `eval --corruption` evaluates
        let split_seed = normvision::data::corrupt::split_seed(seed, stem == "train");
        let bad = c.apply_to_with_progress(ds, split_seed, &mut |d| bar.set_position(d as u64))?;
        bar.finish_and_clear();
        let [ch, h, w] = bad.shape;
        let count = bad.len();
        let dims = if ch == 1 {
            vec![bad.len(), h, w]
        } else {
            vec![bad.len(), ch, h, w]
        };
        let images = IdxArray::new(dims, IdxData::U8(bad.images))?;
        let labels = IdxArray::new(
            vec![bad.labels.len()],
            IdxData::U8(
                bad.labels
                    .iter()
                    .map(|&l| {
                        u8::try_from(l).map_err(|_| {
                            NvError::Config(format!("label {l} does not fit an IDX u8 label file"))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
        )?;
        let pi = out.join(format!("{stem}-images-idx3-ubyte"));
        let pl = out.join(format!("{stem}-labels-idx1-ubyte"));
        write_idx(&pi, &images, false)?;
        write_idx(&pl, &labels, false)?;
        println!(
            "{}: {} images corrupted with {c} (seed {seed}); labels in {}",
            pi.display(),
            count,
            pl.display()
        );
    }
    Ok(())
}
