//! Data-parallel segmentation over ranks run as threads of one process ([`LocalGroup`]: the trainer's code
//! path under `mpirun`, which tests/mpi.rs runs over Open MPI):
//!
//! - SyncBN over 2 ranks of 2 images trains what one process trains at batch 4: the same losses step by step
//!   and the same weight updates, up to the order of float sums (at a small learning rate; see `config`);
//! - without SyncBN each rank's BatchNorm sees its own 2 images, and the first loss already differs;
//! - a global batch that leaves a rank without images is an error naming --batch-size.

use normvision::comm::LocalGroup;
use normvision::data::fashion_mnist::{self, Split};
use normvision::data::scenes::SceneGenerator;
use normvision::model::deeplab::DeepLabConfig;
use normvision::model::NormKind;
use normvision::segment::batches::normalization;
use normvision::segment::{
    train_segmentation, SegData, SegReport, SegRunOptions, SegSource, SegTrainConfig,
};
use normvision::state::{StateTensor, Stateful};
use normvision::train::Distributed;
use std::sync::Arc;

fn data() -> SegData {
    let src = |split, seed, n| {
        let ds = Arc::new(fashion_mnist::load(None, split).unwrap());
        SegSource::scenes(SceneGenerator::new(ds, 64, seed).unwrap(), 0, n).unwrap()
    };
    let train = src(Split::Train, 5, 16);
    SegData {
        norm: normalization(&train, 16).unwrap(),
        train,
        test: src(Split::Test, 6, 6),
        classes: (0..11).map(|k| format!("c{k}")).collect(),
    }
}

fn config(sync_bn: bool) -> SegTrainConfig {
    let mut model = DeepLabConfig::new(1, 11, NormKind::Batch);
    model.aspp_channels = 16;
    let mut cfg = SegTrainConfig::reference(model);
    cfg.epochs = 2;
    cfg.batch_size = 4;
    cfg.eval_batch_size = 4;
    cfg.sync_bn = sync_bn;
    // Crops that are never padded, and a small learning rate. A crop padded with a constant, and the scenes'
    // plateaus of equal pixels, put many pixels on the same side of a ReLU at once, so a rounding difference in
    // a BatchNorm's statistics (plane moments merged in one run, a SyncBN all-reduce in the other) can move
    // them across together. Measured at the recipe's lr with scales 0.75-1.5: the two runs agree to 3e-8 in
    // the first two losses and drift to 2e-3 by the fourth, and two single-process runs differing only in
    // --conv (winograd, direct) drift the same way. At lr 1e-4 the updates stay in the linear regime.
    cfg.lr = 1e-4;
    cfg.augment.scale = (1.0, 1.5);
    cfg
}

/// Rank 0's report and every rank's final state dict, training `cfg` over `ranks` threads.
fn over_ranks(
    cfg: &SegTrainConfig,
    data: &SegData,
    ranks: usize,
) -> normvision::Result<(SegReport, Vec<normvision::state::StateDict>)> {
    let group = LocalGroup::new(ranks)?;
    let results: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|g| {
                sc.spawn(move || {
                    let mut graph = cfg.model.build_graph()?;
                    let opts = SegRunOptions {
                        distributed: Some(Distributed::new(Arc::new(g))),
                        ..Default::default()
                    };
                    let r = train_segmentation(cfg, &mut graph, data, opts)?;
                    Ok::<_, normvision::NvError>((r, graph.state_dict()))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut reports = vec![];
    let mut states = vec![];
    for r in results {
        let (rep, sd) = r?;
        reports.push(rep);
        states.push(sd);
    }
    Ok((reports.swap_remove(0), states))
}

fn max_diff(a: &normvision::state::StateDict, b: &normvision::state::StateDict) -> f64 {
    let mut worst = 0.0f64;
    for (k, v) in &a.tensors {
        match (v, b.get(k).unwrap()) {
            (StateTensor::F32(x), StateTensor::F32(y)) => {
                for (p, q) in x.iter().zip(y.iter()) {
                    worst = worst.max((p - q).abs() as f64);
                }
            }
            (x, y) => assert_eq!(x, y, "{k}"),
        }
    }
    worst
}

/// ‖(b − init) − (a − init)‖ / ‖a − init‖ over the parameters (running statistics left out).
fn update_diff(
    init: &normvision::state::StateDict,
    a: &normvision::state::StateDict,
    b: &normvision::state::StateDict,
) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (k, w0) in &init.tensors {
        if k.contains("running_") {
            continue;
        }
        if let (StateTensor::F32(w0), Some(StateTensor::F32(x)), Some(StateTensor::F32(y))) =
            (w0, a.get(k), b.get(k))
        {
            for ((p, q), r) in x.iter().zip(y.iter()).zip(w0.iter()) {
                let (ua, ub) = ((*p - *r) as f64, (*q - *r) as f64);
                num += (ub - ua) * (ub - ua);
                den += ua * ua;
            }
        }
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

#[test]
fn syncbn_over_two_ranks_trains_what_one_process_trains() {
    let data = data();
    let cfg = config(true);
    let mut one = cfg.model.build_graph().unwrap();
    let init = one.state_dict();
    let single = train_segmentation(&cfg, &mut one, &data, SegRunOptions::default()).unwrap();
    let (synced, states) = over_ranks(&cfg, &data, 2).unwrap();
    assert_eq!(synced.losses.len(), 8);
    for (s, (a, b)) in single.losses.iter().zip(&synced.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "step {}: one process {a}, 2 ranks {b}",
            s + 1
        );
    }
    // the replicas are equal bit for bit, and their updates are the single process's up to rounding
    assert_eq!(max_diff(&states[0], &states[1]), 0.0);
    let d = update_diff(&init, &states[0], &one.state_dict());
    assert!(d < 1e-3, "the weights' updates differ by {d:e} (relative)");
    let (m1, m2) = (single.last().unwrap(), synced.last().unwrap());
    assert_eq!(m1.pixels, m2.pixels, "every test pixel evaluated once");
    assert!(
        (m1.miou - m2.miou).abs() < 1e-3,
        "{} vs {}",
        m1.miou,
        m2.miou
    );
}

#[test]
fn without_syncbn_each_rank_normalizes_its_own_images() {
    let data = data();
    let mut cfg = config(false);
    cfg.max_steps = Some(1);
    let mut one = cfg.model.build_graph().unwrap();
    let single = train_segmentation(&cfg, &mut one, &data, SegRunOptions::default()).unwrap();
    let (local, _) = over_ranks(&cfg, &data, 2).unwrap();
    let (a, b) = (single.losses[0], local.losses[0]);
    assert!(
        (a - b).abs() > 1e-4,
        "one process {a}, 2 unsynced ranks {b}"
    );
}

#[test]
fn a_batch_smaller_than_the_ranks_is_an_error() {
    let data = data();
    let mut cfg = config(true);
    cfg.batch_size = 1;
    let e = over_ranks(&cfg, &data, 2)
        .expect_err("an error")
        .to_string();
    assert!(e.contains("--batch-size of 1"), "{e}");
}
