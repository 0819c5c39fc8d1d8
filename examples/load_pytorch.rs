//! Loading a PyTorch state dict into the same architecture built with normvision, and checking it gives
//! PyTorch's answers.
//!
//! `cargo run --release --example load_pytorch [STATE_DICT IO]`
//!
//! The default files in `examples/data/` were written by `tools/gen_branching_fixture.py`: a small two-headed
//! model (an ASPP-like block: 1×1 and dilated 3×3 branches, a concatenation, a residual) trained for 200 steps
//! in PyTorch and saved with `safetensors.torch.save_file(model.state_dict(), path)`, and a batch of inputs
//! with the model's eval-mode outputs. On the PyTorch side:
//!
//! ```python
//! class Branching(nn.Module):
//!     def __init__(self):
//!         super().__init__()
//!         self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
//!                                   nn.MaxPool2d(2))
//!         self.aspp = nn.ModuleList([
//!             nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
//!             nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(8), nn.ReLU())])
//!         self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
//!         self.classifier = nn.Linear(8, 10)
//!         self.aux = nn.Conv2d(8, 1, 1)
//!     def forward(self, x):
//!         s = self.stem(x)
//!         r = F.relu(self.project(torch.cat([b(s) for b in self.aspp], 1)) + s)
//!         return self.classifier(r.mean((2, 3))), self.aux(r)
//! ```
//!
//! Each PyTorch module becomes a node (or a chain of nodes) with the module's name, so the state-dict keys match.

use normvision::io::load_state_dict;
use normvision::model::{Graph, Sequential};
use normvision::nn::{Conv2dConfig, GlobalAvgPool, LinearConfig, MaxPool2dConfig, ReLU};
use normvision::norm::BatchNormConfig;
use normvision::state::{StateTensor, Stateful};
use normvision::Result;
use std::path::PathBuf;

fn branching() -> Result<Graph> {
    // the weights come from the file: the initialisation does not matter
    let rng = &mut rand::thread_rng();
    let mut g = Graph::new();
    let x = g.input("x");
    let mut stem = Sequential::new();
    stem.push(
        "0",
        Conv2dConfig::new(1, 8, 3)
            .padding(1)
            .bias(false)
            .build(rng)?,
    )
    .push("1", BatchNormConfig::d2(8).build()?)
    .push("2", ReLU::new())
    .push("3", MaxPool2dConfig::new(2).build()?);
    let s = g.chain("stem", stem, x)?;
    let mut branches = vec![];
    for (i, (k, d)) in [(1, 1), (3, 2)].into_iter().enumerate() {
        let mut b = Sequential::new();
        b.push(
            "0",
            Conv2dConfig::new(8, 8, k)
                .padding(d * (k / 2))
                .dilation(d)
                .bias(false)
                .build(rng)?,
        )
        .push("1", BatchNormConfig::d2(8).build()?)
        .push("2", ReLU::new());
        branches.push(g.chain(&format!("aspp.{i}"), b, s)?);
    }
    let cat = g.concat("cat", &branches, 1)?;
    let mut project = Sequential::new();
    project
        .push("0", Conv2dConfig::new(16, 8, 1).bias(false).build(rng)?)
        .push("1", BatchNormConfig::d2(8).build()?);
    let p = g.chain("project", project, cat)?;
    let sum = g.add("residual", &[p, s])?;
    let r = g.layer("relu", ReLU::new(), sum)?;
    let pooled = g.layer("gap", GlobalAvgPool::new(), r)?;
    let cls = g.layer("classifier", LinearConfig::new(8, 10).build(rng)?, pooled)?;
    let aux = g.layer("aux", Conv2dConfig::new(8, 1, 1).build(rng)?, r)?;
    g.set_outputs(&[cls, aux])?;
    Ok(g)
}

fn f32_tensor(
    sd: &normvision::state::StateDict,
    key: &str,
) -> Result<normvision::ndarray::ArrayD<f32>> {
    match sd.get(key) {
        Some(StateTensor::F32(a)) => Ok(a.clone()),
        _ => Err(normvision::NvError::State(format!(
            "no float tensor {key:?}"
        ))),
    }
}

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let (weights, io) = match args.as_slice() {
        [w, io] => (w.clone(), io.clone()),
        [] => (
            data.join("branching_pytorch.safetensors"),
            data.join("branching_pytorch_io.safetensors"),
        ),
        _ => {
            eprintln!("usage: load_pytorch [STATE_DICT IO]");
            std::process::exit(2);
        }
    };

    let mut model = branching()?;
    let (mut sd, _) = load_state_dict(&weights)?;
    // checkpoints saved from DistributedDataParallel or Lightning carry a prefix; strip it as PyTorch would
    sd.consume_prefix("module.");
    // strict, as PyTorch's load_state_dict: the same keys and shapes, or an error listing the differences
    model.load_strict(&sd)?;
    println!(
        "loaded {} tensors from {}",
        sd.tensors.len(),
        weights.display()
    );

    let (batch, _) = load_state_dict(&io)?;
    let x = f32_tensor(&batch, "x")?;
    let outs = model.infer(&[&x])?;
    for (name, got) in ["cls", "aux"].iter().zip(&outs) {
        let want = f32_tensor(&batch, name)?;
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        println!("{name}: max |normvision - PyTorch| = {diff:.2e} (largest value {scale:.2})");
    }
    let pred = normvision::nn::argmax(&outs[0])?;
    println!("predicted classes: {pred:?}");
    Ok(())
}
