//! `bench --inference`: deployment inference of a zoo model or an ONNX file (`--onnx`), timed call by call. The model is folded (every
//! BatchNorm into the layer before it) and run through the inference plan, at batch 1 and at the given batch
//! size; each call is timed on its own, so the report has the throughput of the median call and the latency
//! percentiles a server would see. `tools/bench_inference_vs_ort.py` runs it beside ONNX Runtime and PyTorch.

use normvision::model::{Model, ModelConfig, ModelKind, NormKind, PlanOptions};
use normvision::ndarray::{ArrayD, IxDyn};
use normvision::Result;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::Instant;

/// The q-quantile (0..=1) of sorted values, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// What to time: a zoo model (`--model --norm`) or an ONNX file (`--onnx`).
pub enum Subject<'a> {
    Zoo(ModelKind, NormKind),
    Onnx(&'a std::path::Path),
}

pub fn run(
    subject: Subject,
    batch: usize,
    steps: usize,
    warmup: usize,
    json_out: bool,
    plan: &PlanOptions,
    profile: bool,
) -> Result<()> {
    let (mut model, folded, label, norm_label) = match subject {
        Subject::Zoo(kind, norm) => {
            let mut model = Model::new(ModelConfig::fashion(kind, norm))?;
            let folded = model.fold_batch_norm()?;
            (
                model,
                folded,
                kind.as_str().to_string(),
                norm.as_str().to_string(),
            )
        }
        Subject::Onnx(path) => {
            let m = normvision::io::onnx::load_onnx(path)?;
            let folded = m.folded_batch_norms;
            (
                m.into_classifier()?,
                folded,
                path.display().to_string(),
                "onnx".to_string(),
            )
        }
    };
    model.set_plan_options(plan.clone())?;
    let [c, h, w] = model.input_shape();
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
    let mut batches = vec![1];
    if batch != 1 {
        batches.push(batch);
    }
    for b in batches {
        let x = ArrayD::from_shape_fn(IxDyn(&[b, c, h, w]), |_| rng.gen::<f32>() * 2.0 - 1.0);
        let calls = if b == 1 { steps * 10 } else { steps };
        for _ in 0..warmup.max(1) * if b == 1 { 10 } else { 1 } {
            model.forward_inference(&x)?;
        }
        let mut t: Vec<f64> = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t0 = Instant::now();
            model.forward_inference(&x)?;
            t.push(t0.elapsed().as_secs_f64());
        }
        t.sort_by(|a, b| a.total_cmp(b));
        let (p50, p99) = (quantile(&t, 0.5), quantile(&t, 0.99));
        let img_s = b as f64 / p50;
        if json_out {
            println!(
                "{}",
                json!({"model": label, "norm": norm_label, "mode": "inference", "batch": b,
                    "threads": rayon::current_num_threads(), "img_s": img_s, "calls": calls,
                    "latency_ms_p50": p50 * 1e3, "latency_ms_p99": p99 * 1e3, "latency_ms_min": t[0] * 1e3,
                    "folded_bn": folded, "isa": plan.kernels.isa.as_str()})
            );
        } else {
            println!(
                "{label} ({norm_label}) inference batch {b}, {} threads, {folded} BatchNorms folded: {img_s:.0} img/s; \
                 latency p50 {:.3} ms, p99 {:.3} ms, min {:.3} ms ({calls} calls)",
                rayon::current_num_threads(),
                p50 * 1e3,
                p99 * 1e3,
                t[0] * 1e3
            );
        }
        if profile {
            // a second series of calls with every step timed (the timing itself costs a little per step)
            model.graph_mut().enable_timing();
            for _ in 0..calls {
                model.forward_inference(&x)?;
            }
            crate::commands::print_layer_profile(
                model.graph(),
                "inference",
                calls,
                p50,
                &[0.0; 3],
                json_out,
            );
        }
    }
    Ok(())
}
