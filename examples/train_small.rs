//! Training a small model through the library's API: the data loader, a model from the zoo, SGD with a one-cycle
//! schedule, the cross-entropy loss, the model's forward and backward, and an evaluation. This is the loop
//! `normvision train` runs (`normvision::train::train` adds checkpoints, logs, resume and divergence checks).
//!
//! `cargo run --release --example train_small` — Fashion-MNIST when it is installed
//! (`apt-get install dataset-fashion-mnist`), otherwise a synthetic 10-class task of the same shape.

use normvision::data::{fashion_mnist, DataLoader, Dataset, LoaderConfig};
use normvision::model::{Model, ModelConfig, ModelKind, NormKind};
use normvision::nn::loss::{accuracy, cross_entropy};
use normvision::optim::schedule::Schedule;
use normvision::optim::sgd::{Sgd, SgdConfig};
use normvision::optim::{LrSchedule, Optimizer};
use normvision::state::Stateful;
use normvision::{train, Ctx};
use std::sync::Arc;

/// 10 classes of 28×28 images: a bright block whose position is the class, on noise.
fn synthetic(n: usize, seed: u64) -> normvision::Result<Dataset> {
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let (mut images, mut labels) = (vec![], vec![]);
    for i in 0..n {
        let label = i % 10;
        let (r0, c0) = ((label / 5) * 12 + 3, (label % 5) * 5 + 1);
        for r in 0..28 {
            for c in 0..28 {
                let inside = (r0..r0 + 8).contains(&r) && (c0..c0 + 6).contains(&c);
                images.push((if inside { 170 } else { 20 } + next() % 60) as u8);
            }
        }
        labels.push(label);
    }
    Dataset::new(
        images,
        labels,
        (0..10).map(|k| format!("class {k}")).collect(),
        [1, 28, 28],
    )
}

fn main() -> normvision::Result<()> {
    let (train_ds, test_ds) = if fashion_mnist::is_available(None) {
        let tr = fashion_mnist::load(None, fashion_mnist::Split::Train)?.slice(0, 6400)?;
        let te = fashion_mnist::load(None, fashion_mnist::Split::Test)?.slice(0, 2000)?;
        println!("Fashion-MNIST: 6400 training and 2000 test images");
        (tr, te)
    } else {
        println!("Fashion-MNIST is not installed: a synthetic task");
        (synthetic(6400, 1)?, synthetic(2000, 2)?)
    };
    let norm = train_ds.mean_std()?; // per-channel mean and std of the training images
    let train_loader =
        DataLoader::new(Arc::new(train_ds), norm.clone(), LoaderConfig::train(64, 0))?;
    let test_loader = DataLoader::new(Arc::new(test_ds), norm, LoaderConfig::eval(500))?;

    // the reference CNN with BatchNorm: 4 conv layers, 2 max pools, 2 linear layers
    let mut model = Model::new(ModelConfig::fashion(ModelKind::Cnn, NormKind::Batch))?;
    println!("{} parameters", model.num_params());
    let epochs = 2;
    let steps = (epochs * train_loader.num_batches()) as u64;
    let schedule = LrSchedule::new(Schedule::one_cycle(0.1, steps))?;
    let mut opt = Sgd::new(SgdConfig {
        momentum: 0.9,
        ..SgdConfig::default()
    })?;

    let mut step = 0u64;
    for epoch in 0..epochs {
        let mut last = (0.0, 0.0);
        for (x, y) in train_loader.epoch(epoch) {
            let x = x.into_dyn();
            let ctx = Ctx::train().with_step(step); // the step seeds dropout, if the model has any
            model.zero_grad();
            let logits = model.forward(&x, ctx)?;
            let (loss, dlogits) = cross_entropy(&logits, &y, 0.0)?;
            model.backward_params(&x, &dlogits, ctx)?; // parameter gradients only: no dL/dx needed
            opt.step(&mut model, schedule.lr_at(step))?;
            last = (loss, accuracy(&logits, &y)?);
            step += 1;
        }
        let (acc, loss) = train::evaluate(&mut model, &test_loader)?;
        println!(
            "epoch {}: last batch loss {:.3} (accuracy {:.2}), test loss {loss:.3}, test accuracy {:.2}%",
            epoch + 1,
            last.0,
            last.1,
            acc * 100.0
        );
    }
    Ok(())
}
