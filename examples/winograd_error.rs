//! Rounding error of the Winograd kernels against an f64 direct convolution (the library's own `Conv2d<f64>`,
//! im2col in f64) on the reference CNN's 28×28 layer (32→32, 4 images, inputs uniform in [-1, 1], weights uniform
//! in ±1/√288, PyTorch's default bound): `cargo run --release --example winograd_error`. Prints (relative RMS
//! error, max error / max value) for y, dx and dw, F(2×2, 3×3) and F(4×4, 3×3).
use normvision::ndarray::{ArrayD, IxDyn};
use normvision::nn::{Conv2dConfig, ConvAlgo, Epilogue};
use normvision::{Ctx, Layer};
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
    let (n, c, k, h, w_) = (4usize, 32usize, 32usize, 28usize, 28usize);
    let mut uniform = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    };
    let x = uniform(n * c * h * w_, 1.0);
    let w = uniform(k * c * 9, (1.0f32 / 288.0).sqrt());
    let dy = uniform(n * k * h * w_, 1.0);

    // the f64 reference: the same values through the direct convolution in f64
    let to64 = |v: &[f32], shape: &[usize]| {
        ArrayD::from_shape_vec(IxDyn(shape), v.iter().map(|&a| a as f64).collect()).unwrap()
    };
    let cfg = Conv2dConfig::new(c, k, 3).padding(1).bias(false);
    let mut conv = cfg
        .clone()
        .build::<f64>(&mut rand_pcg::Pcg64Mcg::seed_from_u64(0))
        .unwrap();
    conv.weight_mut().value = to64(&w, &[k, c, 3, 3]);
    let (x64, dy64) = (to64(&x, &[n, c, h, w_]), to64(&dy, &[n, k, h, w_]));
    let y_ref = conv.forward(&x64, Ctx::eval()).unwrap();
    let dx_ref = conv.backward(&x64, &dy64, Ctx::eval()).unwrap();
    let (y_ref, dx_ref) = (y_ref.as_slice().unwrap(), dx_ref.as_slice().unwrap());
    let dw_ref = conv.weight().grad.as_slice().unwrap();

    let x32 = ArrayD::from_shape_vec(IxDyn(&[n, c, h, w_]), x).unwrap();
    let dy32 = ArrayD::from_shape_vec(IxDyn(&[n, k, h, w_]), dy).unwrap();
    for algo in [ConvAlgo::Winograd2, ConvAlgo::Winograd4] {
        let mut c32 = cfg
            .clone()
            .build::<f32>(&mut rand_pcg::Pcg64Mcg::seed_from_u64(0))
            .unwrap();
        c32.weight_mut().value = ArrayD::from_shape_vec(IxDyn(&[k, c, 3, 3]), w.clone()).unwrap();
        let y = match c32.forward_with(&x32, algo, Epilogue::default()) {
            Ok(y) => y,
            Err(e) => {
                println!("{}: {e}", algo.name());
                continue;
            }
        };
        let mut dx = vec![0f32; x32.len()];
        c32.backward_with(&x32, &dy32, Some(&mut dx), algo).unwrap();
        let name = algo.name();
        println!("{name} y  {:?}", errors(y.as_slice().unwrap(), y_ref));
        println!("{name} dx {:?}", errors(&dx, dx_ref));
        println!(
            "{name} dw {:?}",
            errors(c32.weight().grad.as_slice().unwrap(), dw_ref)
        );
    }
}
