//! Criterion benches of every normalization kernel: train forward, train forward+backward, eval forward.
//!
//! `cargo bench --bench norm_kernels` (set `RAYON_NUM_THREADS=1` or `2` to pick the thread count).
//! Throughput is reported in bytes with the same effective-bytes convention as `normvision bench-kernels`
//! (2·numel·4 for a forward, 5·numel·4 for forward+backward), so criterion's GB/s compare with the STREAM figure.

#![allow(clippy::needless_range_loop)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ndarray::{ArrayD, IxDyn};
use normvision::norm::{
    BatchChannelNormConfig, BatchNormConfig, BnFusion, FrozenBatchNormConfig, GroupNormConfig,
    InstanceNormConfig, LayerNormConfig, NormLayer,
};
use normvision::{Ctx, Layer};
use rand::{Rng, SeedableRng};
use std::time::Duration;

fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    ArrayD::from_shape_vec(
        IxDyn(shape),
        (0..n).map(|_| rng.gen::<f32>() * 2.0 - 0.5).collect(),
    )
    .unwrap()
}

fn layers(shape: &[usize]) -> Vec<(&'static str, Box<dyn NormLayer<f32>>)> {
    let c = shape[1];
    let mut v: Vec<(&'static str, Box<dyn NormLayer<f32>>)> = vec![
        (
            "batch_norm",
            Box::new(BatchNormConfig::new(c).build::<f32>().unwrap()),
        ),
        (
            "frozen_batch_norm",
            Box::new(FrozenBatchNormConfig::new(c).build::<f32>().unwrap()),
        ),
        (
            "layer_norm",
            Box::new(LayerNormConfig::new(&shape[1..]).build::<f32>().unwrap()),
        ),
        (
            "batch_channel_norm",
            Box::new(BatchChannelNormConfig::new(c).build::<f32>().unwrap()),
        ),
    ];
    if shape.len() == 4 {
        v.push((
            "group_norm",
            Box::new(GroupNormConfig::new(8, c).build::<f32>().unwrap()),
        ));
        v.push((
            "instance_norm",
            Box::new(InstanceNormConfig::d2(c).build::<f32>().unwrap()),
        ));
    }
    v
}

fn bench(cr: &mut Criterion) {
    let shapes: &[&[usize]] = &[&[64, 32, 28, 28], &[128, 128, 7, 7], &[512, 1024]];
    for &shape in shapes {
        let x = random(shape, 1);
        let dy = random(shape, 2);
        let numel = x.len();
        let label = shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        for (name, mut layer) in layers(shape) {
            let mut g = cr.benchmark_group(name);
            g.sample_size(20)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(1));
            let mut y = vec![0.0f32; numel];
            let mut dx = vec![0.0f32; numel];
            g.throughput(Throughput::Bytes((2 * numel * 4) as u64));
            g.bench_function(BenchmarkId::new("train_fwd", &label), |b| {
                b.iter(|| layer.forward_into(x.view(), &mut y, Ctx::train()).unwrap())
            });
            g.bench_function(BenchmarkId::new("eval_fwd", &label), |b| {
                b.iter(|| layer.forward_into(x.view(), &mut y, Ctx::eval()).unwrap())
            });
            g.throughput(Throughput::Bytes((5 * numel * 4) as u64));
            g.bench_function(BenchmarkId::new("train_fwd_bwd", &label), |b| {
                b.iter(|| {
                    layer.forward_into(x.view(), &mut y, Ctx::train()).unwrap();
                    layer
                        .backward_into(x.view(), dy.view(), &mut dx, Ctx::train())
                        .unwrap();
                })
            });
            g.finish();
        }
        // BatchNorm with its ReLU fused (as a model's plan runs it), allocating its output
        let mut bn = BatchNormConfig::new(shape[1]).build::<f32>().unwrap();
        let relu = BnFusion {
            relu: true,
            ..Default::default()
        };
        let mut g = cr.benchmark_group("batch_norm_relu");
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        g.throughput(Throughput::Bytes((5 * numel * 4) as u64));
        g.bench_function(BenchmarkId::new("train_fwd_bwd", &label), |b| {
            b.iter(|| {
                drop(bn.forward_fused(&x, Ctx::train(), relu).unwrap());
                drop(bn.backward(&x, &dy, Ctx::train()).unwrap());
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
