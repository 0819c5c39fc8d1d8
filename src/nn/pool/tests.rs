use super::*;
use crate::layer::Layer;
use crate::Ctx;
use ndarray::{ArrayD, IxDyn};

#[test]
fn max2x2_forward_and_backward_route_to_the_first_maximum() {
    // ties, NaN and -0 gradients, odd and wide planes (more than 16 outputs per row), 1 and 2 threads
    use rand::{Rng, SeedableRng};
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(9);
    for &(n, c, h, w) in &[(2, 3, 7, 9), (1, 2, 28, 28), (2, 1, 6, 37), (3, 4, 14, 14)] {
        let x = ArrayD::from_shape_fn(IxDyn(&[n, c, h, w]), |_| match rng.gen_range(0..20) {
            0 => f32::NAN,
            1..=6 => 1.0, // ties
            _ => rng.gen::<f32>(),
        });
        let dy = ArrayD::from_shape_fn(IxDyn(&[n, c, h / 2, w / 2]), |_| {
            match rng.gen_range(0..8) {
                0 => -0.0,
                _ => rng.gen::<f32>() - 0.5,
            }
        });
        // reference: scalar argmax (first maximum in row-major window order; a NaN is taken and kept)
        let (oh, ow) = (h / 2, w / 2);
        let mut y_ref = vec![0f32; n * c * oh * ow];
        let mut dx_ref = vec![0f32; n * c * h * w];
        for p in 0..n * c {
            for oi in 0..oh {
                for oj in 0..ow {
                    let at = |r: usize, q: usize| p * h * w + (2 * oi + r) * w + 2 * oj + q;
                    let xs = x.as_slice().unwrap();
                    let mut best = at(0, 0);
                    for (r, q) in [(0, 1), (1, 0), (1, 1)] {
                        let v = xs[at(r, q)];
                        if v > xs[best] || v.is_nan() {
                            best = at(r, q);
                        }
                    }
                    let o = (p * oh + oi) * ow + oj;
                    y_ref[o] = xs[best];
                    dx_ref[best] = 0.0 + dy.as_slice().unwrap()[o];
                }
            }
        }
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut mp = MaxPool2dConfig::new(2).build::<f32>().unwrap();
                let y = mp.forward(&x, Ctx::train()).unwrap();
                let dx = mp.backward(&x, &dy, Ctx::train()).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(y.as_slice().unwrap()),
                    bits(&y_ref),
                    "y {:?}",
                    (n, c, h, w)
                );
                assert_eq!(
                    bits(dx.as_slice().unwrap()),
                    bits(&dx_ref),
                    "dx {:?}",
                    (n, c, h, w)
                );
            });
        }
    }
}

#[test]
fn output_sizes_follow_pytorch() {
    assert_eq!(out_size(28, 2, 0, 2, 1, false), Some(14));
    assert_eq!(out_size(5, 2, 0, 2, 1, false), Some(2));
    assert_eq!(out_size(5, 2, 0, 2, 1, true), Some(3));
    // ceil mode: the last window may not start in the right padding
    assert_eq!(out_size(6, 3, 1, 2, 1, true), Some(4));
    assert_eq!(out_size(5, 3, 1, 2, 1, true), Some(3));
    assert_eq!(out_size(5, 2, 1, 2, 1, true), Some(3));
    assert_eq!(out_size(1, 2, 0, 2, 1, false), None);
    assert_eq!(out_size(7, 3, 1, 2, 2, false), Some(3));
}
