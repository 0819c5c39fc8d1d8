//! Weight initialisation, following `torch.nn.init`.
//!
//! | scheme | weight | bias (via [`Init::apply`]) |
//! |---|---|---|
//! | [`Init::Default`] (PyTorch's `reset_parameters` of Conv/Linear) | `kaiming_uniform_(a=√5)` = U(−1/√fan_in, 1/√fan_in) | U(−1/√fan_in, 1/√fan_in) |
//! | [`Init::KaimingUniform`] | U(−b, b), b = √2·√(3/fan_in) (ReLU gain, fan_in mode) | 0 |
//! | [`Init::KaimingNormal`] | N(0, std²), std = √2/√fan_in (`kaiming_normal_`, fan_in, ReLU) | 0 |
//! | [`Init::XavierUniform`] | U(−b, b), b = √(6/(fan_in+fan_out)) | 0 |
//! | [`Init::XavierNormal`] | N(0, std²), std = √(2/(fan_in+fan_out)) | 0 |
//!
//! fan_in = `shape[1]`·receptive field, fan_out = `shape[0]`·receptive field, as `_calculate_fan_in_and_fan_out`
//! (receptive field = product of the dimensions after the first two). `scale` multiplies the sampled weights
//! (not the bias) — e.g. 0 to zero-initialise a residual branch's last layer.

use crate::{NvError, Param, Real, Result};
use ndarray::ArrayD;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// An initialisation scheme (see the module docs).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// PyTorch's default for `nn.Conv2d` / `nn.Linear`.
    #[default]
    Default,
    KaimingUniform,
    KaimingNormal,
    XavierUniform,
    XavierNormal,
}

/// A scheme and a multiplicative factor on the weights, for configuration files.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InitSpec {
    pub init: Init,
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for InitSpec {
    fn default() -> Self {
        InitSpec {
            init: Init::Default,
            scale: 1.0,
        }
    }
}

impl InitSpec {
    pub fn apply<T: Real>(
        &self,
        weight: &mut Param<T>,
        bias: Option<&mut Param<T>>,
        rng: &mut impl Rng,
    ) -> Result<()> {
        self.init.apply(weight, bias, self.scale, rng)
    }
}

impl Init {
    /// Initialises a weight (and optional bias) in place; gradients are left untouched.
    pub fn apply<T: Real>(
        self,
        weight: &mut Param<T>,
        bias: Option<&mut Param<T>>,
        scale: f64,
        rng: &mut impl Rng,
    ) -> Result<()> {
        let w = &mut weight.value;
        let (fan_in, _) = fans(w.shape())?;
        match self {
            Init::Default => kaiming_uniform(w, 5f64.sqrt(), rng)?,
            Init::KaimingUniform => kaiming_uniform(w, 0.0, rng)?,
            Init::KaimingNormal => kaiming_normal(w, 0.0, rng)?,
            Init::XavierUniform => xavier_uniform(w, 1.0, rng)?,
            Init::XavierNormal => xavier_normal(w, 1.0, rng)?,
        }
        if scale != 1.0 {
            w.mapv_inplace(|v| T::of_f64(v.as_f64() * scale));
        }
        if let Some(b) = bias {
            match self {
                Init::Default => {
                    let bound = if fan_in > 0 {
                        1.0 / (fan_in as f64).sqrt()
                    } else {
                        0.0
                    };
                    uniform(&mut b.value, -bound, bound, rng);
                }
                _ => b.value.fill(T::zero()),
            }
        }
        Ok(())
    }
}

/// (fan_in, fan_out) of a weight tensor, as PyTorch's `_calculate_fan_in_and_fan_out`.
pub fn fans(shape: &[usize]) -> Result<(usize, usize)> {
    if shape.len() < 2 {
        return Err(NvError::Config(format!(
            "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions (shape {shape:?})"
        )));
    }
    let receptive: usize = shape[2..].iter().product();
    Ok((shape[1] * receptive, shape[0] * receptive))
}

/// `nn.init.calculate_gain("leaky_relu", a)` = √(2/(1+a²)); `a = 0` is ReLU's √2.
pub fn leaky_relu_gain(a: f64) -> f64 {
    (2.0 / (1.0 + a * a)).sqrt()
}

/// Fills with U(lo, hi).
pub fn uniform<T: Real>(a: &mut ArrayD<T>, lo: f64, hi: f64, rng: &mut impl Rng) {
    for v in a.iter_mut() {
        *v = T::of_f64(lo + (hi - lo) * rng.gen::<f64>());
    }
}

/// Fills with N(mean, std²).
pub fn normal<T: Real>(a: &mut ArrayD<T>, mean: f64, std: f64, rng: &mut impl Rng) {
    for v in a.iter_mut() {
        let z: f64 = StandardNormal.sample(rng);
        *v = T::of_f64(mean + std * z);
    }
}

fn std_from_fan(gain: f64, fan: usize) -> f64 {
    if fan == 0 {
        0.0
    } else {
        gain / (fan as f64).sqrt()
    }
}

/// `kaiming_uniform_(w, a, mode="fan_in", nonlinearity="leaky_relu")`: U(−b, b), b = gain(a)·√(3/fan_in).
pub fn kaiming_uniform<T: Real>(w: &mut ArrayD<T>, a: f64, rng: &mut impl Rng) -> Result<()> {
    let (fan_in, _) = fans(w.shape())?;
    let bound = 3f64.sqrt() * std_from_fan(leaky_relu_gain(a), fan_in);
    uniform(w, -bound, bound, rng);
    Ok(())
}

/// `kaiming_normal_(w, a, mode="fan_in", nonlinearity="leaky_relu")`: N(0, (gain(a)/√fan_in)²).
pub fn kaiming_normal<T: Real>(w: &mut ArrayD<T>, a: f64, rng: &mut impl Rng) -> Result<()> {
    let (fan_in, _) = fans(w.shape())?;
    normal(w, 0.0, std_from_fan(leaky_relu_gain(a), fan_in), rng);
    Ok(())
}

/// `xavier_uniform_(w, gain)`: U(−b, b), b = gain·√(6/(fan_in+fan_out)).
pub fn xavier_uniform<T: Real>(w: &mut ArrayD<T>, gain: f64, rng: &mut impl Rng) -> Result<()> {
    let (fi, fo) = fans(w.shape())?;
    let bound = 3f64.sqrt() * std_from_fan(gain * 2f64.sqrt(), fi + fo);
    uniform(w, -bound, bound, rng);
    Ok(())
}

/// `xavier_normal_(w, gain)`: N(0, std²), std = gain·√(2/(fan_in+fan_out)).
pub fn xavier_normal<T: Real>(w: &mut ArrayD<T>, gain: f64, rng: &mut impl Rng) -> Result<()> {
    let (fi, fo) = fans(w.shape())?;
    normal(w, 0.0, std_from_fan(gain * 2f64.sqrt(), fi + fo), rng);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn stats(a: &ArrayD<f64>) -> (f64, f64, f64) {
        let n = a.len() as f64;
        let mean = a.sum() / n;
        let var = a.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let maxabs = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        (mean, var.sqrt(), maxabs)
    }

    #[test]
    fn bounds_and_stds_match_pytorch_formulas() {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
        // conv weight 64x32x3x3: fan_in 288, fan_out 576
        let shape = [64usize, 32, 3, 3];
        assert_eq!(fans(&shape).unwrap(), (288, 576));
        let mut w = Param::<f64>::new(ArrayD::zeros(ndarray::IxDyn(&shape)));
        let mut b = Param::<f64>::new(ArrayD::zeros(ndarray::IxDyn(&[64])));
        Init::Default
            .apply(&mut w, Some(&mut b), 1.0, &mut rng)
            .unwrap();
        let bound = 1.0 / 288f64.sqrt();
        let (_, sd, mx) = stats(&w.value);
        assert!(mx <= bound && mx > 0.95 * bound);
        assert!((sd - bound / 3f64.sqrt()).abs() < 0.05 * bound);
        assert!(b.value.iter().all(|v| v.abs() <= bound) && b.value.iter().any(|v| *v != 0.0));

        Init::KaimingNormal
            .apply(&mut w, Some(&mut b), 0.5, &mut rng)
            .unwrap();
        let (m, sd, _) = stats(&w.value);
        let want = 0.5 * (2.0 / 288f64).sqrt();
        assert!(
            m.abs() < 0.05 * want && (sd - want).abs() < 0.05 * want,
            "{sd} vs {want}"
        );
        assert!(b.value.iter().all(|v| *v == 0.0));

        Init::XavierUniform
            .apply(&mut w, None, 1.0, &mut rng)
            .unwrap();
        let bound = (6.0 / (288.0 + 576.0f64)).sqrt();
        let (_, _, mx) = stats(&w.value);
        assert!(mx <= bound && mx > 0.95 * bound);

        Init::XavierNormal
            .apply(&mut w, None, 1.0, &mut rng)
            .unwrap();
        let (_, sd, _) = stats(&w.value);
        let want = (2.0 / (288.0 + 576.0f64)).sqrt();
        assert!((sd - want).abs() < 0.05 * want);

        Init::KaimingUniform
            .apply(&mut w, None, 1.0, &mut rng)
            .unwrap();
        let bound = (6.0 / 288f64).sqrt();
        let (_, _, mx) = stats(&w.value);
        assert!(mx <= bound && mx > 0.95 * bound);
    }

    #[test]
    fn serde_names_and_errors() {
        let s: InitSpec = serde_json::from_str(r#"{"init":"kaiming_normal"}"#).unwrap();
        assert_eq!(
            s,
            InitSpec {
                init: Init::KaimingNormal,
                scale: 1.0
            }
        );
        assert!(fans(&[3]).is_err());
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
        let mut w = Param::<f32>::new(ArrayD::zeros(ndarray::IxDyn(&[4])));
        assert!(Init::Default.apply(&mut w, None, 1.0, &mut rng).is_err());
    }
}
