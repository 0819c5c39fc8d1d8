//! A BatchNorm2d layer on its own: a training-mode forward (batch statistics, running statistics updated), the
//! hand-written backward, the eval-mode forward (running statistics), and the PyTorch state-dict names.
//!
//! `cargo run --release --example batchnorm`

use normvision::ndarray::{ArrayD, IxDyn};
use normvision::norm::{BatchNormConfig, NormLayer};
use normvision::state::Stateful;
use normvision::{Ctx, Layer};

fn main() -> normvision::Result<()> {
    // nn.BatchNorm2d(3) with PyTorch's defaults: eps 1e-5, momentum 0.1, affine, tracking running statistics
    let mut bn = BatchNormConfig::d2(3).build::<f32>()?;
    // a batch of 2 images of 3 channels, 2×2 pixels; channel c has mean c
    let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 2, 2]), |i| {
        i[1] as f32 + 0.5 * (i[0] * 4 + i[2] * 2 + i[3]) as f32 - 1.75
    });

    // training: normalized with the batch's own mean and biased variance
    let y = bn.forward(&x, Ctx::train())?;
    let (mean, var) = bn.running_stats().expect("tracked");
    println!(
        "train-mode output, channel 0: {:?}",
        &y.as_slice().unwrap()[..4]
    );
    println!(
        "running mean after one batch (momentum 0.1): {:?}",
        mean.as_slice().unwrap()
    );
    println!(
        "running var (unbiased, PyTorch's convention):  {:?}",
        var.as_slice().unwrap()
    );

    // backward: dL/dx for an upstream gradient; weight and bias gradients accumulate in the layer
    let dy = ArrayD::from_shape_fn(IxDyn(&[2, 3, 2, 2]), |i| if i[3] == 0 { 1.0 } else { -0.5 });
    let dx = bn.backward(&x, &dy, Ctx::train())?;
    let mut grads = vec![];
    bn.visit_params("", &mut |name, p| {
        grads.push((name.to_string(), p.grad.clone()))
    });
    println!("dx, channel 0: {:?}", &dx.as_slice().unwrap()[..4]);
    for (name, g) in grads {
        println!("d{name}: {:?}", g.as_slice().unwrap());
    }

    // eval: normalized with the running statistics, so one image's output does not depend on the batch
    let one = x
        .slice(normvision::ndarray::s![0..1, .., .., ..])
        .to_owned()
        .into_dyn();
    let alone = bn.forward(&one, Ctx::eval())?;
    let batched = bn.forward(&x, Ctx::eval())?;
    assert_eq!(
        alone.as_slice().unwrap(),
        &batched.as_slice().unwrap()[..12]
    );
    println!("eval-mode output of image 0 is the same alone or in a batch");

    // the state dict has PyTorch's names
    let keys: Vec<String> = bn.state_dict().keys().cloned().collect();
    println!("state dict: {keys:?}");
    Ok(())
}
