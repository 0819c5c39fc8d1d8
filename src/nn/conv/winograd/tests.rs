use super::*;
use rand::{Rng, SeedableRng};

/// f64 direct convolution (padding 1, no bias): y, dx, dw and db (Σ dy per output channel) for upstream
/// gradient dy (also [`super::f4`]'s reference).
pub(in crate::nn) fn reference(
    s: WinoShape,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    reference_dilated(s, 1, x, w, dy)
}

/// [`reference`] with padding and dilation `d` (the whole-batch driver's reference).
#[allow(clippy::needless_range_loop)]
pub(in crate::nn) fn reference_dilated(
    s: WinoShape,
    d: usize,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (n, c, k, h, wd, d) = (s.n, s.c, s.k, s.h, s.w, d as isize);
    let mut y = vec![0f64; n * k * h * wd];
    let mut dx = vec![0f64; n * c * h * wd];
    let mut dw = vec![0f64; k * c * 9];
    let mut db = vec![0f64; k];
    for b in 0..n {
        for o in 0..k {
            for i in 0..h {
                for j in 0..wd {
                    let yi = ((b * k + o) * h + i) * wd + j;
                    let g = dy[yi] as f64;
                    db[o] += g;
                    for ch in 0..c {
                        for r in 0..3 {
                            for q in 0..3 {
                                let ii = i as isize + (r as isize - 1) * d;
                                let jj = j as isize + (q as isize - 1) * d;
                                if ii < 0 || jj < 0 || ii >= h as isize || jj >= wd as isize {
                                    continue;
                                }
                                let xi = ((b * c + ch) * h + ii as usize) * wd + jj as usize;
                                let wi = ((o * c + ch) * 3 + r) * 3 + q;
                                y[yi] += x[xi] as f64 * w[wi] as f64;
                                dx[xi] += g * w[wi] as f64;
                                dw[wi] += g * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (y, dx, dw, db)
}

/// Random input in [-1, 1), weights in [-0.3, 0.3) and bias in [-0.5, 0.5) for `s`, drawn in that order.
pub(in crate::nn) fn conv_case(rng: &mut impl Rng, s: WinoShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = (0..s.n * s.c * s.h * s.w)
        .map(|_| rng.gen::<f32>() * 2.0 - 1.0)
        .collect();
    let wt = (0..s.k * s.c * 9)
        .map(|_| rng.gen::<f32>() * 0.6 - 0.3)
        .collect();
    let bias = (0..s.k).map(|_| rng.gen::<f32>() - 0.5).collect();
    (x, wt, bias)
}

pub(in crate::nn) fn close(got: &[f32], want: &[f64], scale: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tol = 2e-5 * scale.max(1e-12);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            ((*g as f64) - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tolerance {tol})"
        );
    }
}

pub(in crate::nn) fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

#[test]
fn fused_max_pool_is_bitwise_the_pool_of_the_unpooled_output() {
    if !available() {
        eprintln!("skipped: no AVX-512F");
        return;
    }
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(9);
    // even sizes only; tile rows of 1, 3, 14, 17 and 20 lanes (partial and full vectors), partial chunks
    for &(n, c, k, h, w) in &[
        (3, 8, 16, 28, 28),
        (5, 9, 3, 6, 2),
        (2, 16, 8, 4, 34),
        (4, 8, 24, 14, 14),
        (1, 8, 8, 2, 40),
        (3, 8, 4, 2, 6),
    ] {
        let s = WinoShape { n, c, k, h, w };
        let (x, wt, bias) = conv_case(&mut rng, s);
        // some channels scaled to zero or negated, so whole windows are clamped by the ReLU
        let a: Vec<f32> = (0..k).map(|i| [1.5, 0.0, -0.7, 0.3][i % 4]).collect();
        let b: Vec<f32> = (0..k).map(|_| rng.gen::<f32>() - 0.5).collect();
        for threads in [1, 2] {
            let tp = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            tp.install(|| {
                let mut full = vec![f32::NAN; n * k * h * w];
                forward_affine(s, &x, &wt, Some(&bias), Some((&a, &b)), true, &mut full);
                let (oh, ow) = (h / 2, w / 2);
                let mut want = vec![0f32; n * k * oh * ow];
                for p in 0..n * k {
                    for i in 0..oh {
                        for j in 0..ow {
                            let at = |r: usize, q: usize| full[p * h * w + r * w + q];
                            let m = [
                                at(2 * i, 2 * j + 1),
                                at(2 * i + 1, 2 * j),
                                at(2 * i + 1, 2 * j + 1),
                            ]
                            .iter()
                            .fold(at(2 * i, 2 * j), |m, &v| if v > m { v } else { m });
                            want[(p * oh + i) * ow + j] = m;
                        }
                    }
                }
                let mut got = vec![f32::NAN; want.len()];
                forward_affine_relu_maxpool(s, &x, &wt, Some(&bias), Some((&a, &b)), &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{s:?} [{i}]: {g} vs {w}");
                }
            });
        }
    }
}

#[test]
fn matches_an_f64_direct_convolution_forward_and_backward() {
    if !available() {
        eprintln!("skipped: no AVX-512F");
        return;
    }
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(5);
    // even and odd sizes, tile rows wider than 16 lanes, partial chunks, one thread and two
    for &(n, c, k, h, w) in &[
        (3, 8, 16, 28, 28),
        (5, 9, 3, 7, 7),
        (2, 16, 8, 5, 6),
        (1, 8, 8, 2, 40),
        (4, 8, 24, 14, 14),
        (2, 8, 8, 1, 3),
    ] {
        let s = WinoShape { n, c, k, h, w };
        let (x, wt, bias) = conv_case(&mut rng, s);
        let dy: Vec<f32> = (0..n * k * h * w)
            .map(|_| rng.gen::<f32>() * 2.0 - 1.0)
            .collect();
        let (y_ref, dx_ref, dw_ref, db_ref) = reference(s, &x, &wt, &dy);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut y = vec![f32::NAN; n * k * h * w];
                forward(s, &x, &wt, Some(&bias), false, &mut y);
                let yb: Vec<f64> = y_ref
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + bias[(i / (h * w)) % k] as f64)
                    .collect();
                close(&y, &yb, max_abs(&yb), &format!("y {s:?}"));
                let mut yr = vec![f32::NAN; n * k * h * w];
                forward(s, &x, &wt, Some(&bias), true, &mut yr);
                let ybr: Vec<f64> = yb.iter().map(|v| v.max(0.0)).collect();
                close(&yr, &ybr, max_abs(&yb), &format!("relu y {s:?}"));

                let mut dx = vec![f32::NAN; x.len()];
                let mut dw = vec![0.5f32; wt.len()]; // accumulates onto what is there
                let mut db = vec![0.25f64; k];
                backward(s, &x, &dy, &wt, Some(&mut dx), &mut dw, Some(&mut db));
                close(&dx, &dx_ref, max_abs(&dx_ref), &format!("dx {s:?}"));
                let dw_want: Vec<f64> = dw_ref.iter().map(|v| v + 0.5).collect();
                close(&dw, &dw_want, max_abs(&dw_ref), &format!("dw {s:?}"));
                for (g, r) in db.iter().zip(&db_ref) {
                    assert!(
                        (g - 0.25 - r).abs() < 1e-9 * r.abs().max(1.0),
                        "db {g} vs {r}"
                    );
                }
                // parameter gradients only
                let mut dw2 = vec![0f32; wt.len()];
                backward(s, &x, &dy, &wt, None, &mut dw2, None);
                close(
                    &dw2,
                    &dw_ref,
                    max_abs(&dw_ref),
                    &format!("dw (no dx) {s:?}"),
                );
            });
        }
    }
}

/// The signature of F(2×2)'s and F(4×4)'s backward.
pub(in crate::nn) type Backward =
    fn(WinoShape, &[f32], &[f32], &[f32], Option<&mut [f32]>, &mut [f32], Option<&mut [f64]>);

#[test]
fn gradients_are_bitwise_reproducible_for_any_thread_count() {
    if !available() {
        eprintln!("skipped: no AVX-512F");
        return;
    }
    assert_reproducible(
        backward,
        WinoShape {
            n: 37,
            c: 8,
            k: 16,
            h: 14,
            w: 14,
        },
    );
}

/// Asserts that `backward`'s dweight, dbias and dx are bitwise the same on 1, 2 and 3 threads, with and
/// without dx (shared by the F(2×2) and F(4×4) tests).
pub(in crate::nn) fn assert_reproducible(backward: Backward, s: WinoShape) {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(11);
    let x: Vec<f32> = (0..s.n * s.in_size())
        .map(|_| rng.gen::<f32>() - 0.5)
        .collect();
    let wt: Vec<f32> = (0..s.k * s.c * 9).map(|_| rng.gen::<f32>() - 0.5).collect();
    let dy: Vec<f32> = (0..s.n * s.out_size())
        .map(|_| rng.gen::<f32>() - 0.5)
        .collect();
    let run = |threads: usize, with_dx: bool| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut dx = vec![0f32; x.len()];
            let mut dw = vec![0f32; wt.len()];
            let mut db = vec![0f64; s.k];
            backward(
                s,
                &x,
                &dy,
                &wt,
                with_dx.then_some(&mut dx[..]),
                &mut dw,
                Some(&mut db),
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            (
                bits(&dw),
                db.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                bits(&dx),
            )
        })
    };
    let want = run(1, true);
    for threads in [2, 3, 2] {
        for with_dx in [true, false] {
            let got = run(threads, with_dx);
            assert_eq!(got.0, want.0, "dweight, {threads} threads, dx {with_dx}");
            assert_eq!(got.1, want.1, "dbias, {threads} threads, dx {with_dx}");
            if with_dx {
                assert_eq!(got.2, want.2, "dx, {threads} threads");
            }
        }
    }
}

/// Fewer images than threads split each image instead of splitting the images: F(2×2) forwards by bands of
/// tile rows (plain, pooled), the forward with moments and F(4×4) by output channels. Each must give bitwise
/// what one thread gives: for channel counts that split evenly, unevenly and into more parts than threads, and
/// for odd sizes (a last band with one output row) and fewer tile rows than threads.
#[test]
fn a_forward_split_by_bands_or_channels_is_bitwise_the_one_thread_forward() {
    if !available() {
        eprintln!("skipped: no AVX-512F");
        return;
    }
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(21);
    for &(n, c, k, h, w) in &[
        (1, 8, 32, 28, 28),
        (1, 16, 64, 14, 14),
        (2, 8, 40, 6, 10),
        (1, 9, 17, 4, 4),
        (1, 8, 24, 2, 34),
        (1, 8, 16, 7, 9),
        (1, 5, 16, 13, 30),
        (3, 4, 8, 10, 6),
    ] {
        let s = WinoShape { n, c, k, h, w };
        let even = h % 2 == 0 && w % 2 == 0;
        let (x, wt, bias) = conv_case(&mut rng, s);
        let a: Vec<f32> = (0..k).map(|i| [1.5, 0.0, -0.7, 0.3][i % 4]).collect();
        let b: Vec<f32> = (0..k).map(|_| rng.gen::<f32>() - 0.5).collect();
        let run = |threads: usize| {
            let tp = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            tp.install(|| {
                let mut plain = vec![f32::NAN; n * k * h * w];
                forward_affine(s, &x, &wt, Some(&bias), Some((&a, &b)), true, &mut plain);
                let mut mom_y = vec![f32::NAN; n * k * h * w];
                let mut mom = vec![(f64::NAN, f64::NAN); n * k];
                forward_with_moments(s, &x, &wt, Some(&bias), &mut mom_y, &mut mom);
                let mut pooled = vec![f32::NAN; n * k * (h / 2) * (w / 2)];
                if even {
                    forward_affine_relu_maxpool(s, &x, &wt, None, Some((&a, &b)), &mut pooled);
                }
                let mut f4y = vec![f32::NAN; n * k * h * w];
                if f4::applies(&s) {
                    f4::forward(s, &x, &wt, Some(&bias), false, None, &mut f4y);
                }
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let mbits: Vec<(u64, u64)> =
                    mom.iter().map(|m| (m.0.to_bits(), m.1.to_bits())).collect();
                (bits(&plain), bits(&mom_y), mbits, bits(&pooled), bits(&f4y))
            })
        };
        let want = run(1);
        for threads in [2, 3, 4] {
            let got = run(threads);
            assert_eq!(got.0, want.0, "{s:?}: affine + ReLU, {threads} threads");
            assert_eq!(got.1, want.1, "{s:?}: with moments, {threads} threads");
            assert_eq!(got.2, want.2, "{s:?}: the moments, {threads} threads");
            assert_eq!(got.3, want.3, "{s:?}: pooled, {threads} threads");
            assert_eq!(got.4, want.4, "{s:?}: F(4x4), {threads} threads");
        }
    }
}

/// [`forward_kept`] keeps the transformed weights from call to call, and transforms them again as soon as
/// they change (a training step, a load): each call gives bitwise what [`forward_affine`] gives.
#[test]
fn kept_weights_follow_every_change_of_the_weights() {
    if !available() {
        eprintln!("skipped: no AVX-512F");
        return;
    }
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(22);
    let s = WinoShape {
        n: 2,
        c: 8,
        k: 16,
        h: 6,
        w: 8,
    };
    let (x, mut wt, bias) = conv_case(&mut rng, s);
    let mut kept = Transformed::default();
    for call in 0..4 {
        if call == 2 {
            wt[5] += 0.25; // one weight changes
        }
        let mut want = vec![f32::NAN; s.n * s.out_size()];
        forward_affine(s, &x, &wt, Some(&bias), None, true, &mut want);
        let mut got = vec![f32::NAN; want.len()];
        forward_kept(
            s,
            &x,
            &wt,
            &mut kept,
            Some(&bias),
            None,
            true,
            false,
            &mut got,
        );
        let mut pooled_want = vec![f32::NAN; want.len() / 4];
        forward_affine_relu_maxpool(s, &x, &wt, Some(&bias), None, &mut pooled_want);
        let mut pooled = vec![f32::NAN; want.len() / 4];
        forward_kept(
            s,
            &x,
            &wt,
            &mut kept,
            Some(&bias),
            None,
            true,
            true,
            &mut pooled,
        );
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "call {call}");
        assert_eq!(bits(&pooled), bits(&pooled_want), "call {call}, pooled");
    }
}
