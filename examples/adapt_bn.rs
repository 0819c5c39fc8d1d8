//! Covariate shift through the library API: corrupt a test set, then recover accuracy by re-estimating the
//! BatchNorm statistics without labels (AdaBN), with the N/n mix from a few images, and online per batch.
//!
//! `cargo run --release --example adapt_bn -- CHECKPOINT [NAME:SEVERITY]`
//!
//! CHECKPOINT is any normvision checkpoint of a model with BatchNorm (`normvision train -o cnn.safetensors`);
//! the corruption defaults to `contrast:3`. The test set is Fashion-MNIST's (Debian's `dataset-fashion-mnist`).

use normvision::data::fashion_mnist::{self, Split};
use normvision::data::{Corruption, DataLoader, LoaderConfig};
use normvision::train::adapt::{adapt_to_dataset, infer_adapted, AdaptMethod};
use normvision::train::{checkpoint, evaluate, evaluate_with};
use std::sync::Arc;

fn main() -> normvision::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(ck_path) = args.next() else {
        eprintln!("usage: adapt_bn CHECKPOINT [NAME:SEVERITY]");
        std::process::exit(2);
    };
    let corruption: Corruption = args.next().as_deref().unwrap_or("contrast:3").parse()?;
    let ck = checkpoint::load(ck_path.as_ref())?;
    let norm = ck.norm.clone();
    let test = fashion_mnist::load(None, Split::Test)?;
    // the corruption is a u8 -> u8 transform of the data set, a pure function of (seed, sample index)
    let shifted = Arc::new(corruption.apply_to(&test, 0)?);
    let loader = DataLoader::new(shifted.clone(), norm.clone(), LoaderConfig::eval(500))?;

    let mut model = checkpoint::restore_model(&ck)?;
    let (source, _) = evaluate(&mut model, &loader)?;

    // AdaBN: every BN layer's statistics re-estimated on the shifted images, layer by layer, in batches of 500
    let report = adapt_to_dataset(
        model.graph_mut(),
        AdaptMethod::AdaBn,
        &shifted,
        &norm,
        None,
        500,
    )?;
    let (adabn, _) = evaluate(&mut model, &loader)?;

    // the N/n mix from the first 32 shifted images, with a prior of N = 16 source samples
    let mut model = checkpoint::restore_model(&ck)?;
    let mix_method = AdaptMethod::Mix { prior: 16.0 };
    adapt_to_dataset(
        model.graph_mut(),
        mix_method,
        &shifted,
        &norm,
        Some(32),
        500,
    )?;
    let (mix, _) = evaluate(&mut model, &loader)?;

    // online: each batch of 128 mixed with the source statistics on its own (they are restored after each)
    let mut model = checkpoint::restore_model(&ck)?;
    let online_loader = DataLoader::new(shifted, norm, LoaderConfig::eval(128))?;
    let (online, _) = evaluate_with(&mut model, &online_loader, &mut |m, x| {
        Ok(infer_adapted(m.graph_mut(), 16.0, x)?.remove(0))
    })?;

    println!(
        "{ck_path} on Fashion-MNIST test, {corruption} ({} BatchNorms adapted):",
        report.len()
    );
    for (what, acc) in [
        ("source statistics", source),
        ("AdaBN", adabn),
        ("mix, N = 16, n = 32", mix),
        ("online, N = 16, batches of 128", online),
    ] {
        println!("  {what:<32} {:6.2}%", acc * 100.0);
    }
    Ok(())
}
