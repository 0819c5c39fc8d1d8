use super::super::tests::{close, max_abs, reference_dilated};
use super::super::weights::transform;
use super::*;
use rand::{Rng, SeedableRng};

/// The f64 reference of [`super::super::tests`], with dilation.
fn reference(
    s: BatchShape,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let ws = super::super::WinoShape {
        n: s.n,
        c: s.c,
        k: s.k,
        h: s.h,
        w: s.w,
    };
    reference_dilated(ws, s.d, x, w, dy)
}

fn case(rng: &mut impl Rng, s: BatchShape) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut draw = |len: usize, scale: f32| -> Vec<f32> {
        (0..len)
            .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    };
    let x = draw(s.n * s.c * s.h * s.w, 1.0);
    let w = draw(s.k * s.c * 9, 0.3);
    let bias = draw(s.k, 0.5);
    let dy = draw(s.n * s.k * s.h * s.w, 1.0);
    (x, w, bias, dy)
}

#[test]
fn every_output_pixel_lies_in_exactly_one_tile() {
    for (h, w) in [(8, 8), (7, 5), (1, 9), (13, 2)] {
        for d in 1..=6 {
            let s = BatchShape {
                n: 1,
                c: 1,
                k: 1,
                h,
                w,
                d,
            };
            let mut seen = vec![0; h * w];
            for t in s.tiles() {
                for a in 0..2 {
                    for b in 0..2 {
                        if let Some(p) = s.output_pixel(t, a, b) {
                            seen[p] += 1;
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&v| v == 1), "{h}x{w} d{d}: {seen:?}");
        }
    }
    let tiles = |d| {
        BatchShape {
            n: 1,
            c: 1,
            k: 1,
            h: 8,
            w: 8,
            d,
        }
        .tiles()
        .len()
    };
    assert_eq!([tiles(1), tiles(2), tiles(3), tiles(4)], [16, 16, 25, 16]);
}

#[test]
fn matches_an_f64_dilated_convolution_forward_and_backward() {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
    // DeepLab's 8×8 maps at dilations 1-4, odd sizes, channel counts that are not a multiple of 16, a
    // dilation larger than the map, one thread and two
    for &(n, c, k, h, w, d) in &[
        (3, 16, 24, 8, 8, 1),
        (2, 20, 16, 8, 8, 2),
        (2, 9, 5, 8, 8, 3),
        (3, 8, 17, 8, 8, 4),
        (2, 8, 3, 7, 5, 2),
        (1, 11, 4, 3, 6, 5),
        (4, 8, 8, 1, 1, 1),
        // the small DeepLab of the golden test (28×36 images): 7×9 and 4×5 maps
        (3, 8, 8, 7, 9, 1),
        (3, 12, 12, 4, 5, 1),
        (3, 16, 8, 4, 5, 2),
    ] {
        let s = BatchShape { n, c, k, h, w, d };
        let (x, wt, bias, dy) = case(&mut rng, s);
        let (y_ref, dx_ref, dw_ref, db_ref) = reference(s, &x, &wt, &dy);
        let u = transform(&wt, k, c);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut y = vec![f32::NAN; n * k * h * w];
                forward(s, &x, &u, Some(&bias), None, false, &mut y);
                let yb: Vec<f64> = y_ref
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + bias[(i / (h * w)) % k] as f64)
                    .collect();
                close(&y, &yb, max_abs(&yb), &format!("y {s:?}"));
                let mut yr = vec![f32::NAN; n * k * h * w];
                forward(s, &x, &u, Some(&bias), None, true, &mut yr);
                let ybr: Vec<f64> = yb.iter().map(|v| v.max(0.0)).collect();
                close(&yr, &ybr, max_abs(&yb), &format!("relu y {s:?}"));
                // an eval BatchNorm in the output pass: bitwise its own pass over the plain output
                let (a, b): (Vec<f32>, Vec<f32>) = (0..k)
                    .map(|i| (0.5 + i as f32 * 0.1, 0.25 - i as f32 * 0.05))
                    .unzip();
                let mut ya = vec![f32::NAN; y.len()];
                forward(s, &x, &u, Some(&bias), Some((&a, &b)), true, &mut ya);
                for (i, (got, plain)) in ya.iter().zip(&y).enumerate() {
                    let o = (i / (h * w)) % k;
                    assert_eq!(*got, (plain * a[o] + b[o]).max(0.0), "affine at {i}");
                }

                let mut dx = vec![f32::NAN; x.len()];
                let mut dw = vec![0.5f32; wt.len()]; // accumulates onto what is there
                let mut db = vec![0.25f64; k];
                backward(s, &x, &dy, Some(&u), Some(&mut dx), &mut dw, Some(&mut db));
                close(&dx, &dx_ref, max_abs(&dx_ref), &format!("dx {s:?}"));
                let dw_want: Vec<f64> = dw_ref.iter().map(|v| v + 0.5).collect();
                close(&dw, &dw_want, max_abs(&dw_ref), &format!("dw {s:?}"));
                for (g, r) in db.iter().zip(&db_ref) {
                    assert!(
                        (g - 0.25 - r).abs() < 1e-9 * r.abs().max(1.0),
                        "db {g} vs {r}"
                    );
                }
                let mut dw2 = vec![0f32; wt.len()];
                backward(s, &x, &dy, None, None, &mut dw2, None);
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

#[test]
fn results_are_bitwise_the_same_for_any_thread_count() {
    let s = BatchShape {
        n: 5,
        c: 24,
        k: 16,
        h: 8,
        w: 8,
        d: 2,
    };
    let (x, wt, bias, dy) = case(&mut rand_pcg::Pcg64Mcg::seed_from_u64(3), s);
    let u = transform(&wt, s.k, s.c);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut y = vec![0f32; s.n * s.k * 64];
            forward(s, &x, &u, Some(&bias), None, false, &mut y);
            let (mut dx, mut dw, mut db) =
                (vec![0f32; x.len()], vec![0f32; wt.len()], vec![0f64; s.k]);
            backward(s, &x, &dy, Some(&u), Some(&mut dx), &mut dw, Some(&mut db));
            (y, dx, dw, db)
        })
    };
    let one = run(1);
    for threads in [2, 3] {
        assert!(run(threads) == one, "{threads} threads differ from one");
    }
}

#[test]
fn empty_batches_and_channels_write_zeros() {
    for (n, c, k) in [(0, 8, 4), (2, 0, 4), (2, 8, 0)] {
        let s = BatchShape {
            n,
            c,
            k,
            h: 8,
            w: 8,
            d: 2,
        };
        let x = vec![1f32; n * c * 64];
        let wt = vec![1f32; k * c * 9];
        let u = transform(&wt, k, c);
        let mut y = vec![f32::NAN; n * k * 64];
        forward(s, &x, &u, None, None, false, &mut y);
        assert!(y.iter().all(|&v| v == 0.0), "{n} {c} {k}");
        let dy = vec![1f32; n * k * 64];
        let (mut dx, mut dw) = (vec![f32::NAN; x.len()], vec![0f32; wt.len()]);
        backward(s, &x, &dy, Some(&u), Some(&mut dx), &mut dw, None);
        assert!(dx.iter().all(|&v| v == 0.0) && dw.iter().all(|&v| v == 0.0));
    }
}
