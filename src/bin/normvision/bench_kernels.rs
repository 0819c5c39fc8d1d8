//! `normvision bench-kernels`: times the normalization kernels on the benchmark shapes, for the side-by-side
//! comparison with PyTorch (`tools/bench_norm_vs_torch.py`), and prints a table or JSON lines.

use normvision::ndarray::{ArrayD, IxDyn};
use normvision::norm::{
    BatchNormConfig, GroupNormConfig, InstanceNormConfig, LayerNormConfig, NormLayer,
};
use normvision::{Ctx, KernelOptions, NvError, Result};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// The shapes of the benchmark (N, C, H, W) and BatchNorm1d's (N, C).
pub const DEFAULT_SHAPES: &[&[usize]] = &[
    &[64, 32, 28, 28],
    &[64, 64, 14, 14],
    &[128, 128, 7, 7],
    &[32, 64, 56, 56],
    &[256, 16, 32, 32],
    &[512, 1024],
];
pub const OPS: &[&str] = &["batch_norm", "group_norm", "layer_norm", "instance_norm"];
pub const MODES: &[&str] = &["train_fwd", "train_fwd_bwd", "eval_fwd"];
/// Groups of the benchmark's GroupNorm (`nn.GroupNorm(8, C)` on the PyTorch side).
pub const GROUP_NORM_GROUPS: usize = 8;

/// One measured row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelTiming {
    pub op: String,
    pub shape: Vec<usize>,
    pub mode: String,
    pub threads: usize,
    pub min_ms: f64,
    pub median_ms: f64,
    /// Effective bytes moved per call (2·numel·4 forward, 5·numel·4 forward+backward).
    pub bytes: usize,
    pub gbps: f64,
}

/// Builds the benchmark's layer for an op and shape; `None` when the op does not apply to the shape
/// (group_norm / instance_norm on a non-4-D shape, group_norm when C is not divisible by [`GROUP_NORM_GROUPS`]).
pub fn layer_for(op: &str, shape: &[usize]) -> Result<Option<Box<dyn NormLayer<f32>>>> {
    let c = shape[1];
    Ok(match (op, shape.len()) {
        ("batch_norm", _) => Some(Box::new(BatchNormConfig::new(c).build::<f32>()?)),
        // GroupNorm(8, C) needs C divisible by 8; other shapes are skipped (as tools/bench_norm_vs_torch.py does).
        ("group_norm", 4) if c.is_multiple_of(GROUP_NORM_GROUPS) => Some(Box::new(
            GroupNormConfig::new(GROUP_NORM_GROUPS, c).build::<f32>()?,
        )),
        ("layer_norm", _) => Some(Box::new(LayerNormConfig::new(&shape[1..]).build::<f32>()?)),
        ("instance_norm", 4) => Some(Box::new(InstanceNormConfig::d2(c).build::<f32>()?)),
        ("group_norm" | "instance_norm", _) => None,
        _ => {
            return Err(NvError::Config(format!(
                "unknown op {op}; expected one of {OPS:?}"
            )))
        }
    })
}

fn random(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0 + 0.5).collect();
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("shape")
}

/// Times one (op, shape, mode) on the current rayon pool.
pub fn time_one(
    op: &str,
    shape: &[usize],
    mode: &str,
    warmup: usize,
    reps: usize,
    kernels: KernelOptions,
) -> Result<Option<(f64, f64)>> {
    let Some(mut layer) = layer_for(op, shape)? else {
        return Ok(None);
    };
    let x = random(shape, 1);
    let dy = random(shape, 2);
    let mut y = vec![0.0f32; x.len()];
    let mut dx = vec![0.0f32; x.len()];
    let (train, eval) = (
        Ctx::train().with_kernels(kernels),
        Ctx::eval().with_kernels(kernels),
    );
    let mut once = |layer: &mut Box<dyn NormLayer<f32>>| -> Result<()> {
        match mode {
            "train_fwd" => layer.forward_into(x.view(), &mut y, train),
            "train_fwd_bwd" => {
                layer.forward_into(x.view(), &mut y, train)?;
                layer.backward_into(x.view(), dy.view(), &mut dx, train)
            }
            "eval_fwd" => layer.forward_into(x.view(), &mut y, eval),
            m => Err(NvError::Config(format!(
                "unknown mode {m}; expected one of {MODES:?}"
            ))),
        }
    };
    for _ in 0..warmup {
        normvision::runtime::keep_workers_warm();
        once(&mut layer)?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        normvision::runtime::keep_workers_warm();
        let t = Instant::now();
        once(&mut layer)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(Some((times[0], times[times.len() / 2])))
}

pub fn effective_bytes(shape: &[usize], mode: &str) -> usize {
    let numel: usize = shape.iter().product();
    if mode == "train_fwd_bwd" {
        5 * numel * 4
    } else {
        2 * numel * 4
    }
}

/// Runs the grid on a pool of `threads` threads.
#[allow(clippy::too_many_arguments)]
pub fn run(
    ops: &[String],
    shapes: &[Vec<usize>],
    modes: &[String],
    threads: usize,
    warmup: usize,
    reps: usize,
    kernels: KernelOptions,
    mut emit: impl FnMut(&KernelTiming) + Send,
) -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| NvError::Config(e.to_string()))?;
    pool.install(|| {
        for op in ops {
            for shape in shapes {
                for mode in modes {
                    if let Some((min_ms, median_ms)) =
                        time_one(op, shape, mode, warmup, reps, kernels)?
                    {
                        let bytes = effective_bytes(shape, mode);
                        let row = KernelTiming {
                            op: op.clone(),
                            shape: shape.clone(),
                            mode: mode.clone(),
                            threads,
                            min_ms,
                            median_ms,
                            bytes,
                            gbps: bytes as f64 / (median_ms * 1e-3) / 1e9,
                        };
                        emit(&row);
                    }
                }
            }
        }
        Ok(())
    })
}

/// Parses "64x32x28x28".
pub fn parse_shape(s: &str) -> Result<Vec<usize>> {
    let v: std::result::Result<Vec<usize>, _> = s
        .split(['x', ','])
        .map(|p| p.trim().parse::<usize>())
        .collect();
    match v {
        Ok(v) if v.len() >= 2 && v.iter().all(|&d| d > 0) => Ok(v),
        _ => Err(NvError::Config(format!(
            "bad shape {s:?}: expected e.g. 64x32x28x28"
        ))),
    }
}
