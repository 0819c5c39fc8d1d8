//! Property tests of the element-wise and shape layers ONNX import uses: Softmax rows are probabilities and
//! ignore a constant shift, Clamp stays in its bounds and is idempotent, Reshape round-trips, ScaleShift with
//! scale 1 and shift 0 is the identity and its backward is linear in dy. Bilinear resampling keeps constants,
//! is the identity at the same size, keeps the corners with `align_corners`, stays within the input's range, and
//! its backward is the adjoint of its forward (<Ax, dy> = <x, Aᵀdy>). Per-pixel cross-entropy is non-negative,
//! ignores a constant added to a pixel's logits and a common factor on the class weights, and its gradient sums
//! to zero over the classes at every pixel.

use ndarray::{ArrayD, IxDyn};
use normvision::nn::{
    Clamp, PixelCrossEntropy, Reshape, ScaleShift, Softmax, UpsampleBilinear, UpsampleSize,
};
use normvision::{Ctx, Layer};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn randn(seed: u64, shape: &[usize], scale: f64) -> ArrayD<f64> {
    let mut r = rand_pcg::Pcg64::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        r.sample::<f64, _>(rand_distr::StandardNormal) * scale
    })
}

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 2..5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn softmax_rows_are_probabilities_and_shift_invariant(shape in shape(), seed in any::<u64>(), scale in 0.1f64..200.0, c in -50.0f64..50.0) {
        let x = randn(seed, &shape, scale);
        let mut s = Softmax::<f64>::new();
        let y = s.forward(&x, Ctx::eval()).unwrap();
        let k = *shape.last().unwrap();
        for row in y.as_slice().unwrap().chunks(k) {
            let sum: f64 = row.iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-12, "row sums to {sum}");
            prop_assert!(row.iter().all(|&p| (0.0..=1.0).contains(&p)));
        }
        let y2 = s.forward(&x.mapv(|v| v + c), Ctx::eval()).unwrap();
        let d = y.iter().zip(y2.iter()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        prop_assert!(d < 1e-12, "shift changed the output by {d}");
    }

    #[test]
    fn clamp_stays_in_bounds_and_is_idempotent(shape in shape(), seed in any::<u64>(), lo in -3.0f64..0.0, w in 0.0f64..4.0) {
        let hi = lo + w;
        let x = randn(seed, &shape, 3.0);
        let mut c = Clamp::<f64>::new(lo, hi).unwrap();
        let y = c.forward(&x, Ctx::eval()).unwrap();
        prop_assert!(y.iter().all(|&v| v >= lo && v <= hi));
        prop_assert_eq!(c.forward(&y, Ctx::eval()).unwrap(), y);
    }

    #[test]
    fn reshape_round_trips(shape in shape(), seed in any::<u64>()) {
        let x = randn(seed, &shape, 1.0);
        let per: usize = shape[1..].iter().product();
        let mut to = Reshape::<f64>::new(vec![per]);
        let mut back = Reshape::<f64>::new(shape[1..].to_vec());
        let y = to.forward(&x, Ctx::eval()).unwrap();
        prop_assert_eq!(back.forward(&y, Ctx::eval()).unwrap(), x.clone());
        let dx = to.backward(&x, &y, Ctx::eval()).unwrap();
        prop_assert_eq!(dx, x);
    }

    #[test]
    fn scale_shift_identity_and_linear_backward(shape in shape(), seed in any::<u64>(), a in -3.0f64..3.0) {
        let x = randn(seed, &shape, 1.0);
        let per = &shape[1..];
        let mut id = ScaleShift::<f64>::new(Some(ArrayD::ones(IxDyn(per))), Some(ArrayD::zeros(IxDyn(&[*per.last().unwrap()]))));
        prop_assert_eq!(id.forward(&x, Ctx::eval()).unwrap(), x.clone());
        let mut s = ScaleShift::<f64>::new(Some(randn(seed ^ 1, per, 1.0)), None);
        let dy = randn(seed ^ 2, &shape, 1.0);
        let g1 = s.backward(&x, &dy, Ctx::eval()).unwrap();
        let g2 = s.backward(&x, &dy.mapv(|v| v * a), Ctx::eval()).unwrap();
        let d = g1.iter().zip(g2.iter()).map(|(p, q)| (p * a - q).abs()).fold(0.0, f64::max);
        prop_assert!(d < 1e-12);
    }

    #[test]
    fn bilinear_resampling_properties(h in 1usize..7, w in 1usize..7, oh in 1usize..13, ow in 1usize..13,
                                       align in any::<bool>(), seed in any::<u64>(), c in -5.0f64..5.0) {
        let x = randn(seed, &[2, 3, h, w], 1.0);
        let mut l = UpsampleBilinear::<f64>::new(UpsampleSize::Size(oh, ow), align).unwrap();
        let y = l.forward(&x, Ctx::train()).unwrap();
        prop_assert_eq!(y.shape(), &[2, 3, oh, ow]);
        // within the input's range (a convex mix)
        let (lo, hi) = x.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        prop_assert!(y.iter().all(|&v| v >= lo - 1e-12 && v <= hi + 1e-12));
        // constants stay constant
        let k = l.forward(&ArrayD::from_elem(IxDyn(&[1, 1, h, w]), c), Ctx::train()).unwrap();
        prop_assert!(k.iter().all(|&v| (v - c).abs() < 1e-12));
        // the same size is the identity
        let mut same = UpsampleBilinear::<f64>::new(UpsampleSize::Size(h, w), align).unwrap();
        prop_assert_eq!(same.forward(&x, Ctx::train()).unwrap(), x.clone());
        // with aligned corners the four corners are the input's
        if align && oh > 1 && ow > 1 {
            for (i, j, a, b) in [(0, 0, 0, 0), (h - 1, w - 1, oh - 1, ow - 1), (0, w - 1, 0, ow - 1), (h - 1, 0, oh - 1, 0)] {
                prop_assert!((y[[1, 2, a, b]] - x[[1, 2, i, j]]).abs() < 1e-12);
            }
        }
        // the backward is the forward's adjoint
        let dy = randn(seed ^ 1, &[2, 3, oh, ow], 1.0);
        let dx = l.backward(&x, &dy, Ctx::train()).unwrap();
        let lhs: f64 = y.iter().zip(dy.iter()).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(dx.iter()).map(|(a, b)| a * b).sum();
        prop_assert!((lhs - rhs).abs() < 1e-10 * (1.0 + lhs.abs()), "{} vs {}", lhs, rhs);
    }

    #[test]
    fn pixel_cross_entropy_properties(n in 1usize..3, k in 2usize..6, hw in 1usize..10, seed in any::<u64>(),
                                      c in -20.0f64..20.0, f in 0.1f64..10.0) {
        let logits = randn(seed, &[n, k, hw], 3.0);
        let mut r = rand_pcg::Pcg64::seed_from_u64(seed ^ 7);
        let targets: Vec<usize> = (0..n * hw).map(|_| if r.gen_bool(0.2) { 255 } else { r.gen_range(0..k) }).collect();
        let w: Vec<f64> = (0..k).map(|_| r.gen_range(0.1..3.0)).collect();
        let loss = PixelCrossEntropy::ignoring(255).with_weights(w.clone()).unwrap();
        let (l, g) = loss.forward(&logits, &targets).unwrap();
        prop_assert!(l >= 0.0);
        let (l2, _) = loss.forward(&logits.mapv(|v| v + c), &targets).unwrap();
        prop_assert!((l - l2).abs() < 1e-9 * (1.0 + l.abs()), "shift: {} vs {}", l, l2);
        let scaled = PixelCrossEntropy::ignoring(255).with_weights(w.iter().map(|v| v * f).collect()).unwrap();
        let (l3, _) = scaled.forward(&logits, &targets).unwrap();
        prop_assert!((l - l3).abs() < 1e-9 * (1.0 + l.abs()), "weight scale: {} vs {}", l, l3);
        for i in 0..n {
            for p in 0..hw {
                let s: f64 = (0..k).map(|c| g[[i, c, p]]).sum();
                prop_assert!(s.abs() < 1e-12, "gradient of pixel ({}, {}) sums to {}", i, p, s);
            }
        }
    }
}
