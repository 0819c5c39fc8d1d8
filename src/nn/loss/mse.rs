//! Mean squared error (`nn.MSELoss`, `reduction="mean"`): L = mean((x − t)²) over every element, dL/dx =
//! 2·(x − t)/numel. The sum runs in f64.
//!
//! | | PyTorch `nn.MSELoss` | here |
//! |---|---|---|
//! | shapes | broadcast, with a warning when they differ | must be equal ([`NvError::Shape`]) |
//! | empty input | NaN | [`NvError::Shape`] |
//! | NaN / ±inf | propagates | [`NvError::NonFinite`] naming the first bad element |
//! | reduction | `mean`, `sum`, `none` | `mean` |

use crate::kernels::shape::contiguous as cont;
use crate::{NvError, Real, Result};
use ndarray::{ArrayD, IxDyn};

const NAME: &str = "MSELoss";

/// Mean squared error (mean reduction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MseLoss;

impl MseLoss {
    pub fn new() -> Self {
        MseLoss
    }
    /// (mean loss, dloss/dinput).
    pub fn forward<T: Real>(
        &self,
        input: &ArrayD<T>,
        target: &ArrayD<T>,
    ) -> Result<(f64, ArrayD<T>)> {
        mse(input, target)
    }
}

/// Mean of (input − target)² over every element, and its gradient with respect to `input`.
///
/// ```
/// use normvision::ndarray::{arr1, ArrayD};
/// use normvision::nn::loss::mse;
/// let x: ArrayD<f64> = arr1(&[1.0, 2.0]).into_dyn();
/// let t: ArrayD<f64> = arr1(&[0.0, 4.0]).into_dyn();
/// let (loss, grad) = mse(&x, &t).unwrap();
/// assert_eq!(loss, 2.5); // (1 + 4) / 2
/// assert_eq!(grad.as_slice().unwrap(), &[1.0, -2.0]); // 2·(x − t)/2
/// ```
pub fn mse<T: Real>(input: &ArrayD<T>, target: &ArrayD<T>) -> Result<(f64, ArrayD<T>)> {
    if input.shape() != target.shape() {
        return Err(NvError::Shape {
            layer: NAME,
            msg: format!(
                "input of shape {:?} and target of shape {:?} differ (no broadcasting)",
                input.shape(),
                target.shape()
            ),
        });
    }
    let n = input.len();
    if n == 0 {
        return Err(NvError::Shape {
            layer: NAME,
            msg: format!("empty input of shape {:?}", input.shape()),
        });
    }
    let (xs, ts) = (cont(input), cont(target));
    let scale = 2.0 / n as f64;
    let mut total = 0.0f64;
    let mut grad = Vec::with_capacity(n);
    for (i, (&x, &t)) in xs.iter().zip(ts.iter()).enumerate() {
        let d = x.as_f64() - t.as_f64();
        if !d.is_finite() {
            return Err(NvError::NonFinite(format!(
                "{NAME}: element {i} of input ({}) or target ({}) is not finite",
                x.as_f64(),
                t.as_f64()
            )));
        }
        total += d * d;
        grad.push(T::of_f64(d * scale));
    }
    let loss = total / n as f64;
    if !loss.is_finite() {
        return Err(NvError::NonFinite(format!("{NAME}: loss is {loss}")));
    }
    Ok((
        loss,
        ArrayD::from_shape_vec(IxDyn(input.shape()), grad).expect("one gradient per element"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_is_the_finite_difference() {
        let x = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.3, -1.2, 2.0, 0.0, 5.5, -0.7f64])
            .unwrap();
        let t = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, -1.0, 0.5, 0.25, 4.0, 0.0f64])
            .unwrap();
        let (_, g) = mse(&x, &t).unwrap();
        let h = 1e-6;
        for i in 0..x.len() {
            let (mut a, mut b) = (x.clone(), x.clone());
            a.as_slice_mut().unwrap()[i] += h;
            b.as_slice_mut().unwrap()[i] -= h;
            let fd = (mse(&a, &t).unwrap().0 - mse(&b, &t).unwrap().0) / (2.0 * h);
            assert!(
                (fd - g.as_slice().unwrap()[i]).abs() < 1e-8,
                "element {i}: {fd} vs {}",
                g[[i / 3, i % 3]]
            );
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let x = ArrayD::<f32>::zeros(IxDyn(&[2, 3]));
        let t = ArrayD::<f32>::zeros(IxDyn(&[3, 2]));
        assert!(matches!(mse(&x, &t), Err(NvError::Shape { .. })));
        let e = ArrayD::<f32>::zeros(IxDyn(&[0, 3]));
        assert!(matches!(mse(&e, &e), Err(NvError::Shape { .. })));
        let mut nan = x.clone();
        nan[[1, 2]] = f32::NAN;
        let msg = mse(&nan, &x).unwrap_err().to_string();
        assert!(msg.contains("element 5"), "{msg}");
    }
}
