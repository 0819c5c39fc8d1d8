//! Rounding error of the Winograd kernels against an f64 direct convolution (the library's own `Conv2d<f64>`,
//! im2col in f64) on the reference CNN's 28×28 layer (32→32, 4 images, inputs uniform in [-1, 1], weights uniform
//! in ±1/√288, PyTorch's default bound): `cargo run --release --example winograd_error`. Prints (relative RMS
//! error, max error / max value) for y, dx and dw, F(2×2, 3×3) and F(4×4, 3×3).
use ndarray::{ArrayD, IxDyn};
use normvision::nn::winograd::{self, WinoShape};
use normvision::nn::{winograd4, Conv2dConfig};
use rand::{Rng, SeedableRng};

/// (‖got − want‖ / ‖want‖, max |got − want| / max |want|).
fn errors(got: &[f32], want: &[f64]) -> (f64, f64) {
    let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
    let err = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum::<f64>()
        .sqrt();
    let max_err = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    let max_want = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    (err / norm, max_err / max_want)
}

fn main() {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(3);
    let s = WinoShape {
        n: 4,
        c: 32,
        k: 32,
        h: 28,
        w: 28,
    };
    let mut uniform = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    };
    let x = uniform(s.n * s.c * s.h * s.w, 1.0);
    let w = uniform(s.k * s.c * 9, (1.0f32 / 288.0).sqrt());
    let dy = uniform(s.n * s.k * s.h * s.w, 1.0);

    // the f64 reference: the same values through the direct convolution in f64
    let to64 = |v: &[f32], shape: &[usize]| {
        ArrayD::from_shape_vec(IxDyn(shape), v.iter().map(|&a| a as f64).collect()).unwrap()
    };
    let mut conv = Conv2dConfig::new(s.c, s.k, 3)
        .padding(1)
        .bias(false)
        .build::<f64>(&mut rand_pcg::Pcg64Mcg::seed_from_u64(0))
        .unwrap();
    conv.weight.value = to64(&w, &[s.k, s.c, 3, 3]);
    let (x64, dy64) = (
        to64(&x, &[s.n, s.c, s.h, s.w]),
        to64(&dy, &[s.n, s.k, s.h, s.w]),
    );
    let y_ref = conv.forward(&x64).unwrap();
    let dx_ref = conv.backward(&x64, &dy64).unwrap();
    let (y_ref, dx_ref) = (y_ref.as_slice().unwrap(), dx_ref.as_slice().unwrap());
    let dw_ref = conv.weight.grad.as_slice().unwrap();

    let (mut y2, mut y4) = (vec![0f32; y_ref.len()], vec![0f32; y_ref.len()]);
    winograd::forward(s, &x, &w, None, false, &mut y2);
    winograd4::forward(s, &x, &w, None, false, None, &mut y4);
    let (mut dx2, mut dx4) = (vec![0f32; x.len()], vec![0f32; x.len()]);
    let (mut dw2, mut dw4) = (vec![0f32; w.len()], vec![0f32; w.len()]);
    winograd::backward(s, &x, &dy, &w, Some(&mut dx2), &mut dw2, None);
    winograd4::backward(s, &x, &dy, &w, Some(&mut dx4), &mut dw4, None);
    println!("y  F2 {:?} F4 {:?}", errors(&y2, y_ref), errors(&y4, y_ref));
    println!(
        "dx F2 {:?} F4 {:?}",
        errors(&dx2, dx_ref),
        errors(&dx4, dx_ref)
    );
    println!(
        "dw F2 {:?} F4 {:?}",
        errors(&dw2, dw_ref),
        errors(&dw4, dw_ref)
    );
}
