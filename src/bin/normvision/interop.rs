//! PyTorch state dicts on the command line: `import --torch`, `export --torch`, and `--weights` for `eval` and
//! `predict` (one flag for PyTorch weights everywhere; `--checkpoint` takes normvision's own checkpoints).

use crate::args::TorchModelArgs;
use normvision::data::Normalization;
use normvision::model::Model;
use normvision::train::finetune::FinetuneRecord;
use normvision::train::{checkpoint, Position, TrainConfig};
use normvision::{NvError, Result};
use std::path::{Path, PathBuf};

/// Where the model to run comes from.
pub enum Source<'a> {
    /// A normvision checkpoint (`--checkpoint`).
    Checkpoint(&'a Path),
    /// A PyTorch state dict and the zoo architecture it belongs to (`--weights` and the model flags).
    Torch(&'a Path, &'a TorchModelArgs),
    /// An ONNX model (`--onnx`); `--mean`/`--std` when typed (`true`), else the file's normvision metadata.
    Onnx(&'a Path, &'a TorchModelArgs, bool),
}

impl<'a> Source<'a> {
    /// From `--checkpoint` / `--weights` (clap makes them exclusive, and one of them required).
    pub fn of(
        checkpoint: &'a Option<PathBuf>,
        weights: &'a Option<PathBuf>,
        onnx: &'a Option<PathBuf>,
        torch: &'a TorchModelArgs,
        norm_given: bool,
    ) -> Result<Source<'a>> {
        match (checkpoint, weights, onnx) {
            (Some(c), None, None) => Ok(Source::Checkpoint(c)),
            (None, Some(w), None) => Ok(Source::Torch(w, torch)),
            (None, None, Some(o)) => Ok(Source::Onnx(o, torch, norm_given)),
            _ => Err(NvError::Config(
                "give one of --checkpoint (a normvision checkpoint), --weights (a PyTorch state dict) or --onnx (an ONNX model)".into(),
            )),
        }
    }

    /// The file, for messages.
    pub fn path(&self) -> &Path {
        match self {
            Source::Checkpoint(p) | Source::Torch(p, _) | Source::Onnx(p, _, _) => p,
        }
    }

    /// The model with its weights, and the input normalization.
    pub fn load(&self) -> Result<(Model, Normalization)> {
        self.load_with_record().map(|(m, n, _)| (m, n))
    }

    /// [`Source::load`], with the fine-tuning record of a fine-tuned checkpoint (its classes, what was frozen).
    pub fn load_with_record(&self) -> Result<(Model, Normalization, Option<FinetuneRecord>)> {
        match self {
            Source::Checkpoint(p) => {
                let ck = checkpoint::load(p)?;
                Ok((checkpoint::restore_model(&ck)?, ck.norm, ck.config.finetune))
            }
            Source::Torch(p, args) => args.load(p).map(|(m, n)| (m, n, None)),
            Source::Onnx(p, args, norm_given) => {
                load_onnx_classifier(p, args, *norm_given).map(|(m, n)| (m, n, None))
            }
        }
    }
}

/// An ONNX classifier and its input normalization: the file's normvision metadata, or --mean/--std when
/// typed (`norm_given`) or when the file has none.
fn load_onnx_classifier(
    p: &Path,
    args: &TorchModelArgs,
    norm_given: bool,
) -> Result<(Model, Normalization)> {
    let m = normvision::io::onnx::load_onnx(p)?;
    let from_file = m.normalization.clone();
    let model = m.into_classifier().map_err(|e| NvError::Format {
        path: p.display().to_string(),
        msg: e.to_string(),
    })?;
    let norm = match from_file {
        Some(n) if !norm_given => n,
        _ => Normalization::new(args.mean.clone(), args.std.clone())
            .map_err(|e| NvError::Config(format!("--mean/--std: {e}")))?,
    };
    let c = model.input_shape()[0];
    if norm.channels() != c {
        return Err(NvError::Config(format!(
            "--mean/--std give {} channels, the ONNX model {} takes {c}",
            norm.channels(),
            p.display()
        )));
    }
    Ok((model, norm))
}

/// `import --torch`: a PyTorch state dict of a zoo model's twin becomes a normvision checkpoint (step 0, the
/// reference optimizer), which `eval`, `predict` and `train --resume` take.
pub fn import(torch: &Path, args: &TorchModelArgs, out: &Path) -> Result<()> {
    let (mut model, norm) = args.load(torch)?;
    let mut cfg = TrainConfig::reference(args.model, args.norm);
    cfg.model = args.config()?;
    let opt = cfg.optim.build()?;
    checkpoint::save(
        out,
        &cfg,
        &norm,
        Position::default(),
        &model,
        opt.as_ref(),
        None,
    )?;
    println!(
        "{}: {} {} with {} parameters, imported from {}",
        out.display(),
        args.model.as_str(),
        args.norm.as_str(),
        model.num_params(),
        torch.display()
    );
    Ok(())
}

/// `export --onnx`: a checkpoint's model as ONNX (eval mode, dynamic batch, BatchNorm kept or folded), with
/// the input normalization in the file's metadata so that `--onnx` finds it again.
pub fn export_onnx(ck_path: &Path, out: &Path, fold_bn: bool, opset: i64) -> Result<()> {
    let ck = checkpoint::load(ck_path)?;
    let model = checkpoint::restore_model(&ck)?;
    let opts = normvision::io::onnx::ExportOptions {
        opset,
        fold_bn,
        normalization: Some(ck.norm.clone()),
    };
    normvision::io::onnx::save_onnx(out, model.graph(), &model.input_shape(), &opts)?;
    println!(
        "{}: ONNX opset {opset} of {}{}",
        out.display(),
        ck_path.display(),
        if fold_bn { ", BatchNorm folded" } else { "" }
    );
    Ok(())
}

/// `export --torch`: a checkpoint's model as a PyTorch state dict (PyTorch names, F32, no metadata), with every
/// foldable BatchNorm folded into its convolution or linear layer when `fold_bn`.
pub fn export_torch(ck_path: &Path, out: &Path, fold_bn: bool) -> Result<()> {
    let ck = checkpoint::load(ck_path)?;
    let mut model = checkpoint::restore_model(&ck)?;
    let folded = if fold_bn { model.fold_batch_norm()? } else { 0 };
    normvision::io::torch::save(&model, out)?;
    println!(
        "{}: the state dict of {}{}",
        out.display(),
        ck_path.display(),
        if fold_bn {
            format!(", {folded} BatchNorms folded")
        } else {
            String::new()
        }
    );
    Ok(())
}
