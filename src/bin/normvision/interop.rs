//! PyTorch state dicts on the command line: `import --torch`, `export --torch`, and `--weights` for `eval` and
//! `predict` (one flag for PyTorch weights everywhere; `--checkpoint` takes normvision's own checkpoints).

use crate::args::TorchModelArgs;
use normvision::data::Normalization;
use normvision::model::Model;
use normvision::train::{checkpoint, Position, TrainConfig};
use normvision::{NvError, Result};
use std::path::{Path, PathBuf};

/// Where the model to run comes from.
pub enum Source<'a> {
    /// A normvision checkpoint (`--checkpoint`).
    Checkpoint(&'a Path),
    /// A PyTorch state dict and the zoo architecture it belongs to (`--weights` and the model flags).
    Torch(&'a Path, &'a TorchModelArgs),
}

impl<'a> Source<'a> {
    /// From `--checkpoint` / `--weights` (clap makes them exclusive, and one of them required).
    pub fn of(
        checkpoint: &'a Option<PathBuf>,
        weights: &'a Option<PathBuf>,
        torch: &'a TorchModelArgs,
    ) -> Result<Source<'a>> {
        match (checkpoint, weights) {
            (Some(c), None) => Ok(Source::Checkpoint(c)),
            (None, Some(w)) => Ok(Source::Torch(w, torch)),
            _ => Err(NvError::Config(
                "give either --checkpoint (a normvision checkpoint) or --weights (a PyTorch state dict)".into(),
            )),
        }
    }

    /// The file, for messages.
    pub fn path(&self) -> &Path {
        match self {
            Source::Checkpoint(p) | Source::Torch(p, _) => p,
        }
    }

    /// The model with its weights, and the input normalization.
    pub fn load(&self) -> Result<(Model, Normalization)> {
        match self {
            Source::Checkpoint(p) => {
                let ck = checkpoint::load(p)?;
                Ok((checkpoint::restore_model(&ck)?, ck.norm))
            }
            Source::Torch(p, args) => args.load(p),
        }
    }
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
