//! Rounding error of the Winograd kernels against an f64 direct convolution, on the reference CNN's 28×28 layer
//! (32→32, 4 images, inputs uniform in [-1, 1], weights uniform in ±1/√288, PyTorch's default bound):
//! `cargo run --release --example winograd_error`. Prints (relative RMS error, max error / max value) for y,
//! dx and dw, F(2×2, 3×3) and F(4×4, 3×3).
use normvision::nn::winograd::{self, WinoShape};
use normvision::nn::winograd4;
use rand::{Rng, SeedableRng};
fn main() {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(3);
    let s = WinoShape {
        n: 4,
        c: 32,
        k: 32,
        h: 28,
        w: 28,
    };
    let x: Vec<f32> = (0..4 * 32 * 784)
        .map(|_| rng.gen::<f32>() * 2.0 - 1.0)
        .collect();
    let w: Vec<f32> = (0..32 * 32 * 9)
        .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * (1.0f32 / 288.0).sqrt())
        .collect();
    let dy: Vec<f32> = (0..4 * 32 * 784)
        .map(|_| rng.gen::<f32>() * 2.0 - 1.0)
        .collect();
    // f64 reference
    let (n, c, k, h, wd) = (4usize, 32usize, 32usize, 28usize, 28usize);
    let mut y = vec![0f64; n * k * h * wd];
    let mut dx = vec![0f64; n * c * h * wd];
    let mut dw = vec![0f64; k * c * 9];
    for b in 0..n {
        for o in 0..k {
            for i in 0..h {
                for j in 0..wd {
                    let yi = ((b * k + o) * h + i) * wd + j;
                    let g = dy[yi] as f64;
                    let mut acc = 0.0;
                    for ci in 0..c {
                        for a in 0..3 {
                            for e in 0..3 {
                                let (ii, jj) =
                                    (i as isize + a as isize - 1, j as isize + e as isize - 1);
                                if ii < 0 || jj < 0 || ii >= h as isize || jj >= wd as isize {
                                    continue;
                                }
                                let xi = ((b * c + ci) * h + ii as usize) * wd + jj as usize;
                                let wi = ((o * c + ci) * 3 + a) * 3 + e;
                                acc += x[xi] as f64 * w[wi] as f64;
                                dx[xi] += g * w[wi] as f64;
                                dw[wi] += g * x[xi] as f64;
                            }
                        }
                    }
                    y[yi] = acc;
                }
            }
        }
    }
    let rel = |got: &[f32], want: &[f64]| {
        let scale = want.iter().map(|v| v * v).sum::<f64>().sqrt();
        let err = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).powi(2))
            .sum::<f64>()
            .sqrt();
        let maxe = got
            .iter()
            .zip(want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        let maxw = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        (err / scale, maxe / maxw)
    };
    let mut y2 = vec![0f32; y.len()];
    let mut y4 = y2.clone();
    winograd::forward(s, &x, &w, None, false, &mut y2);
    winograd4::forward(s, &x, &w, None, false, None, &mut y4);
    let (mut dx2, mut dx4) = (vec![0f32; dx.len()], vec![0f32; dx.len()]);
    let (mut dw2, mut dw4) = (vec![0f32; dw.len()], vec![0f32; dw.len()]);
    winograd::backward(s, &x, &dy, &w, Some(&mut dx2), &mut dw2, None);
    winograd4::backward(s, &x, &dy, &w, Some(&mut dx4), &mut dw4, None);
    println!("y  F2 {:?} F4 {:?}", rel(&y2, &y), rel(&y4, &y));
    println!("dx F2 {:?} F4 {:?}", rel(&dx2, &dx), rel(&dx4, &dx));
    println!("dw F2 {:?} F4 {:?}", rel(&dw2, &dw), rel(&dw4, &dw));
}
