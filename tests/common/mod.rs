//! Shared test helpers: fixture loading and tolerant comparison.
#![allow(dead_code)]

pub mod cli;

use ndarray::{ArrayD, IxDyn};
use normvision::state::{StateDict, StateTensor};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct Fixture {
    pub name: String,
    pub meta: serde_json::Value,
    pub f32s: BTreeMap<String, ArrayD<f32>>,
    pub f64s: BTreeMap<String, ArrayD<f64>>,
    pub i64s: BTreeMap<String, i64>,
    /// Every int64 tensor in full (`i64s` holds their first element, for scalars such as num_batches_tracked).
    pub i64_arrays: BTreeMap<String, ArrayD<i64>>,
}

pub fn fixture_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(family)
}

pub fn load_fixture(family: &str, name: &str) -> Fixture {
    let path = fixture_dir(family).join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        md.metadata()
            .as_ref()
            .and_then(|m| m.get("meta"))
            .expect("meta"),
    )
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut f32s = BTreeMap::new();
    let mut f64s = BTreeMap::new();
    let mut i64s = BTreeMap::new();
    let mut i64_arrays = BTreeMap::new();
    for (k, v) in st.tensors() {
        match v.dtype() {
            safetensors::Dtype::F32 => {
                let data: Vec<f32> = v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                f32s.insert(
                    k.to_string(),
                    ArrayD::from_shape_vec(IxDyn(v.shape()), data).unwrap(),
                );
            }
            safetensors::Dtype::F64 => {
                let data: Vec<f64> = v
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                f64s.insert(
                    k.to_string(),
                    ArrayD::from_shape_vec(IxDyn(v.shape()), data).unwrap(),
                );
            }
            safetensors::Dtype::I64 => {
                let data: Vec<i64> = v
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                if let Some(&first) = data.first() {
                    i64s.insert(k.to_string(), first);
                }
                i64_arrays.insert(
                    k.to_string(),
                    ArrayD::from_shape_vec(IxDyn(v.shape()), data).unwrap(),
                );
            }
            d => panic!("unexpected dtype {d:?}"),
        }
    }
    Fixture {
        name: name.to_string(),
        meta,
        f32s,
        f64s,
        i64s,
        i64_arrays,
    }
}

pub fn list_fixtures(family: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixture_dir(family))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "safetensors")
                .then(|| p.file_stem().unwrap().to_string_lossy().to_string())
        })
        .collect();
    v.sort();
    v
}

impl Fixture {
    pub fn get(&self, k: &str) -> &ArrayD<f32> {
        self.f32s
            .get(k)
            .unwrap_or_else(|| panic!("{}: missing tensor {k}", self.name))
    }
    pub fn get_f64(&self, k: &str) -> &ArrayD<f64> {
        self.f64s
            .get(k)
            .unwrap_or_else(|| panic!("{}: missing f64 tensor {k}", self.name))
    }
    pub fn get_i64(&self, k: &str) -> &ArrayD<i64> {
        self.i64_arrays
            .get(k)
            .unwrap_or_else(|| panic!("{}: missing int64 tensor {k}", self.name))
    }
    pub fn has(&self, k: &str) -> bool {
        self.f32s.contains_key(k) || self.i64s.contains_key(k)
    }
    /// Tensors under `prefix.` as a state dict with the prefix stripped.
    pub fn state(&self, prefix: &str) -> StateDict {
        let mut sd = StateDict::new();
        let p = format!("{prefix}.");
        for (k, v) in &self.f32s {
            if let Some(rest) = k.strip_prefix(&p) {
                sd.tensors
                    .insert(rest.to_string(), StateTensor::F32(v.clone()));
            }
        }
        for (k, v) in &self.i64s {
            if let Some(rest) = k.strip_prefix(&p) {
                sd.tensors.insert(
                    rest.to_string(),
                    StateTensor::I64(ArrayD::from_elem(IxDyn(&[]), *v)),
                );
            }
        }
        sd
    }
    pub fn steps(&self) -> Vec<String> {
        self.meta["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }
    pub fn cfg(&self) -> &serde_json::Value {
        &self.meta["config"]
    }
}

/// |a - b| <= atol + rtol·|b| element-wise, with a readable failure.
pub fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, rtol: f32, atol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
        let err = (a - b).abs() - (atol + rtol * b.abs());
        if (err > 0.0 || err.is_nan()) && (err > worst.0 || worst.0 == 0.0 || err.is_nan()) {
            worst = (err.max(f32::MIN_POSITIVE), i);
        }
    }
    if worst.0 > 0.0 {
        let i = worst.1;
        panic!(
            "{what}: mismatch at flat index {i}: got {} want {} (rtol {rtol}, atol {atol})",
            got.iter().nth(i).unwrap(),
            want.iter().nth(i).unwrap()
        );
    }
}

/// A BatchNorm or FrozenBatchNorm with its ReLU fused into its kernels, as a model's plan runs them
/// ([`normvision::norm::BnFusion`], `FrozenBatchNorm::forward_fused`): the layer the tests check for the fused
/// BN+ReLU pattern.
#[derive(Clone)]
pub struct Relu<L>(pub L);

impl<T: normvision::Real> normvision::Layer<T> for Relu<normvision::norm::BatchNorm<T>> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: normvision::Ctx) -> normvision::Result<ArrayD<T>> {
        let f = normvision::norm::BnFusion {
            relu: true,
            ..Default::default()
        };
        self.0.forward_fused(x, ctx, f)
    }
    fn backward(
        &mut self,
        x: &ArrayD<T>,
        dy: &ArrayD<T>,
        ctx: normvision::Ctx,
    ) -> normvision::Result<ArrayD<T>> {
        self.0.backward(x, dy, ctx)
    }
    fn output_shape(&self, s: &[usize]) -> normvision::Result<Vec<usize>> {
        self.0.output_shape(s)
    }
    fn name(&self) -> String {
        "BatchNorm+ReLU".into()
    }
}

impl<T: normvision::Real> normvision::Layer<T> for Relu<normvision::norm::FrozenBatchNorm<T>> {
    fn forward(&mut self, x: &ArrayD<T>, ctx: normvision::Ctx) -> normvision::Result<ArrayD<T>> {
        self.0.forward_fused(x, ctx, true)
    }
    fn backward(
        &mut self,
        x: &ArrayD<T>,
        dy: &ArrayD<T>,
        ctx: normvision::Ctx,
    ) -> normvision::Result<ArrayD<T>> {
        self.0.backward(x, dy, ctx)
    }
    fn output_shape(&self, s: &[usize]) -> normvision::Result<Vec<usize>> {
        self.0.output_shape(s)
    }
    fn name(&self) -> String {
        "FrozenBatchNorm+ReLU".into()
    }
}

impl<T: normvision::Real, L: normvision::state::Stateful<T>> normvision::state::Stateful<T>
    for Relu<L>
{
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.0.save_state(prefix, sd)
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> normvision::Result<()> {
        self.0.load_state(prefix, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut normvision::Param<T>)) {
        self.0.visit_params(prefix, f)
    }
}

/// A convolution run with one algorithm (a plan's choice, forced).
#[derive(Clone)]
pub struct ConvWith<T: normvision::Real>(
    pub normvision::nn::Conv2d<T>,
    pub normvision::nn::ConvAlgo,
);

impl<T: normvision::Real> normvision::Layer<T> for ConvWith<T> {
    fn forward(&mut self, x: &ArrayD<T>, _ctx: normvision::Ctx) -> normvision::Result<ArrayD<T>> {
        self.0
            .forward_with(x, self.1, normvision::nn::Epilogue::default())
    }
    fn backward(
        &mut self,
        x: &ArrayD<T>,
        dy: &ArrayD<T>,
        _ctx: normvision::Ctx,
    ) -> normvision::Result<ArrayD<T>> {
        let mut dx = ArrayD::zeros(x.raw_dim());
        self.0
            .backward_with(x, dy, Some(dx.as_slice_mut().unwrap()), self.1)?;
        Ok(dx)
    }
    fn backward_params(
        &mut self,
        x: &ArrayD<T>,
        dy: &ArrayD<T>,
        _ctx: normvision::Ctx,
    ) -> normvision::Result<()> {
        self.0.backward_with(x, dy, None, self.1)
    }
    fn output_shape(&self, s: &[usize]) -> normvision::Result<Vec<usize>> {
        self.0.output_shape(s)
    }
    fn name(&self) -> String {
        format!("{} [{}]", self.0.name(), self.1.name())
    }
}

impl<T: normvision::Real> normvision::state::Stateful<T> for ConvWith<T> {
    fn save_state(&self, prefix: &str, sd: &mut StateDict) {
        self.0.save_state(prefix, sd)
    }
    fn load_state(&mut self, prefix: &str, sd: &StateDict) -> normvision::Result<()> {
        self.0.load_state(prefix, sd)
    }
    fn visit_params(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut normvision::Param<T>)) {
        self.0.visit_params(prefix, f)
    }
}

/// Every instruction set this CPU runs, best first: tests run their checks once per set, forcing it through the
/// kernel options (`Ctx::with_kernels`, `PlanOptions::isa`), so one build checks every kernel version.
pub fn isas() -> Vec<normvision::Isa> {
    use normvision::Isa;
    [Isa::Avx512, Isa::Avx2, Isa::Portable]
        .into_iter()
        .filter(|&i| i <= Isa::detect())
        .collect()
}

/// ‖a − b‖ / ‖b‖ (Euclidean norms; the denominator at least 1e-30).
pub fn rel_norm(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(p, q)| (p - q) * (p - q))
        .sum::<f64>()
        .sqrt();
    num / b.iter().map(|q| q * q).sum::<f64>().sqrt().max(1e-30)
}
