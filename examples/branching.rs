//! A branching, two-headed model built as a graph and trained through the API: parallel 1×1 and dilated 3×3
//! branches with BatchNorm, concatenated, projected and added back to their input, then a classification head
//! and a map head, trained on a weighted sum of their losses. Shows the plan the engine compiles for it (its
//! fusions and convolution algorithms) and saves the graph to a file that rebuilds it.
//!
//! `cargo run --release --example branching`

use normvision::io::{load_graph, save_graph};
use normvision::model::{Graph, Sequential};
use normvision::ndarray::{ArrayD, IxDyn};
use normvision::nn::loss::{cross_entropy, mse, WeightedLosses};
use normvision::nn::{Conv2dConfig, GlobalAvgPool, LinearConfig, MaxPool2dConfig, ReLU};
use normvision::norm::BatchNormConfig;
use normvision::optim::adamw::{AdamW, AdamWConfig};
use normvision::optim::Optimizer;
use normvision::state::Stateful;
use normvision::{Ctx, Result};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn build(rng: &mut impl Rng) -> Result<Graph> {
    let mut g = Graph::new();
    let x = g.input("x");
    let mut stem = Sequential::new();
    stem.push(
        "0",
        Conv2dConfig::new(1, 16, 3)
            .padding(1)
            .bias(false)
            .build(rng)?,
    )
    .push("1", BatchNormConfig::d2(16).build()?)
    .push("2", ReLU::new())
    .push("3", MaxPool2dConfig::new(2).build()?);
    let s = g.chain("stem", stem, x)?;
    // the branches read the same value: its gradient is the sum of theirs and the residual's
    let mut branches = vec![];
    for (i, dilation) in [1, 2].into_iter().enumerate() {
        let k = if dilation == 1 { 1 } else { 3 };
        let mut b = Sequential::new();
        b.push(
            "0",
            Conv2dConfig::new(16, 16, k)
                .padding(dilation * (k / 2))
                .dilation(dilation)
                .bias(false)
                .build(rng)?,
        )
        .push("1", BatchNormConfig::d2(16).build()?)
        .push("2", ReLU::new());
        branches.push(g.chain(&format!("aspp.{i}"), b, s)?);
    }
    let cat = g.concat("cat", &branches, 1)?;
    let mut project = Sequential::new();
    project
        .push("0", Conv2dConfig::new(32, 16, 1).bias(false).build(rng)?)
        .push("1", BatchNormConfig::d2(16).build()?);
    let p = g.chain("project", project, cat)?;
    let sum = g.add("residual", &[p, s])?;
    let r = g.layer("relu", ReLU::new(), sum)?;
    let pooled = g.layer("gap", GlobalAvgPool::new(), r)?;
    let cls = g.layer("classifier", LinearConfig::new(16, 10).build(rng)?, pooled)?;
    let map = g.layer("aux", Conv2dConfig::new(16, 1, 1).build(rng)?, r)?;
    g.set_outputs(&[cls, map])?;
    Ok(g)
}

/// A batch of a two-headed task: which of ten prototypes an image is a noisy copy of, and its 2×2 average.
fn batch(
    rng: &mut impl Rng,
    protos: &[Vec<f32>],
    n: usize,
) -> (ArrayD<f32>, Vec<usize>, ArrayD<f32>) {
    let (h, w) = (16, 16);
    let mut x = ArrayD::zeros(IxDyn(&[n, 1, h, w]));
    let mut map = ArrayD::zeros(IxDyn(&[n, 1, h / 2, w / 2]));
    let mut t = vec![];
    for i in 0..n {
        let k = rng.gen_range(0..protos.len());
        t.push(k);
        for r in 0..h {
            for c in 0..w {
                let v = protos[k][r * w + c] + 0.5 * rng.sample::<f32, _>(StandardNormal);
                x[[i, 0, r, c]] = v;
                map[[i, 0, r / 2, c / 2]] += v / 4.0;
            }
        }
    }
    (x, t, map)
}

fn main() -> Result<()> {
    let rng = &mut rand_pcg::Pcg64::seed_from_u64(0);
    let mut g = build(rng)?;
    println!("{g:?}");
    println!(
        "training plan for (32, 1, 16, 16):\n{}",
        g.describe_plan(&[&[32, 1, 16, 16]], Ctx::train(), false)?
    );

    let protos: Vec<Vec<f32>> = (0..10)
        .map(|_| {
            (0..256)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect()
        })
        .collect();
    // the classification loss counts fully, the map's half
    let losses = WeightedLosses::new(&[1.0, 0.5])?;
    let mut opt = AdamW::new(AdamWConfig::default())?;
    for step in 0..150u64 {
        let (x, t, m) = batch(rng, &protos, 32);
        let ctx = Ctx::train().with_step(step);
        g.zero_grad();
        let outs = g.forward(&[&x], ctx)?;
        let c = losses.combine(vec![cross_entropy(&outs[0], &t, 0.0)?, mse(&outs[1], &m)?])?;
        g.backward(&[&x], &c.grad_refs(), ctx, false)?;
        opt.step(&mut g, 1e-2)?;
        if step % 25 == 0 || step == 149 {
            println!(
                "step {step:3}: loss {:.4} (cross-entropy {:.4}, map mse {:.4})",
                c.loss, c.parts[0], c.parts[1]
            );
        }
    }

    let (x, t, m) = batch(rng, &protos, 200);
    let outs = g.infer(&[&x])?;
    println!(
        "held-out: accuracy {:.1}%, map mse {:.4}",
        100.0 * normvision::nn::accuracy(&outs[0], &t)?,
        mse(&outs[1], &m)?.0
    );

    let path = std::env::temp_dir().join("normvision-branching.safetensors");
    save_graph(&path, &g)?;
    let mut back = load_graph(&path)?;
    assert_eq!(back.infer(&[&x])?, outs);
    println!(
        "saved to {} and rebuilt from the file alone: same outputs",
        path.display()
    );
    Ok(())
}
