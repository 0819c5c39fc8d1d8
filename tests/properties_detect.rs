//! Property tests of the detection parts. RoIAlign: a constant map pools to that constant over any region
//! inside it; its backward is the adjoint of its forward (<Ax, dy> = <x, Aᵀdy>); a region's output depends only
//! on its own image. NMS: the kept boxes overlap each other by at most the threshold, every dropped box
//! overlaps a kept box of at least its score by more than it, and the kept come in descending score order;
//! per-class NMS never lets boxes of different classes suppress each other. The box coder: decoding an
//! encoding gives back the box. Anchors are centred on their cell's corner and have the asked size and ratio.

use ndarray::{Array2, ArrayD, IxDyn};
use normvision::detect::{
    batched_nms, box_area, box_iou, nms, AnchorGenerator, BoxCoder, BoxF, Match, Matcher,
};
use normvision::nn::RoiAlign;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn randn(seed: u64, shape: &[usize]) -> ArrayD<f64> {
    let mut r = rand_pcg::Pcg64::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        r.sample::<f64, _>(rand_distr::StandardNormal)
    })
}

fn a_box() -> impl Strategy<Value = BoxF> {
    (0.0f32..100.0, 0.0f32..100.0, 1.0f32..60.0, 1.0f32..60.0)
        .prop_map(|(x, y, w, h)| [x, y, x + w, y + h])
}

/// A region whose samples all fall on the map, even after RoIAlign (without `aligned`) widens it to one
/// pixel: its corners stay within [0, side − 1] and it starts at least 2 pixels before the far side.
fn region(h: f64, w: f64) -> impl Strategy<Value = [f64; 4]> {
    (0.0..w - 2.0, 0.0..h - 2.0, 0.0..1.0f64, 0.0..1.0f64).prop_map(move |(x, y, a, b)| {
        [
            x,
            y,
            x + a * (w - 1.0 - x).max(0.0),
            y + b * (h - 1.0 - y).max(0.0),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn roi_align_of_a_constant_is_the_constant(
        c in -5.0f64..5.0, r in region(10.0, 13.0), aligned in any::<bool>(), sampling in -1i32..4,
    ) {
        let x = ArrayD::from_elem(IxDyn(&[1, 2, 10, 13]), c);
        let rois = Array2::from_shape_vec((1, 5), vec![0.0, r[0], r[1], r[2], r[3]]).unwrap();
        let l = RoiAlign::new((5, 4), 1.0, sampling, aligned).unwrap();
        let y = l.forward(&x.view(), &rois.view()).unwrap();
        for v in y.iter() {
            // an empty sampling grid (adaptive sampling of an aligned, zero-size region) pools to 0
            prop_assert!((v - c).abs() < 1e-12 || *v == 0.0, "{v} vs {c}");
        }
    }

    #[test]
    fn roi_align_backward_is_the_adjoint(seed in 0u64..1000, aligned in any::<bool>(), sampling in -1i32..3,
                                         scale in prop::sample::select(vec![0.25, 0.5, 1.0])) {
        let x = randn(seed, &[2, 3, 8, 9]);
        let mut r = rand_pcg::Pcg64::seed_from_u64(seed + 1);
        let rows: Vec<f64> = (0..5).flat_map(|_| {
            let (x1, y1) = (r.gen_range(-10.0..40.0), r.gen_range(-10.0..40.0));
            let (w, h) = (r.gen_range(0.0..30.0), r.gen_range(0.0..30.0));
            [r.gen_range(0..2) as f64, x1, y1, x1 + w, y1 + h]
        }).collect();
        let rois = Array2::from_shape_vec((5, 5), rows).unwrap();
        let l = RoiAlign::new((3, 3), scale, sampling, aligned).unwrap();
        let y = l.forward(&x.view(), &rois.view()).unwrap();
        let dy = randn(seed + 2, y.shape());
        let dx = l.backward(&dy.view(), &rois.view(), x.shape()).unwrap();
        let (a, b) = ((&y * &dy).sum(), (&x * &dx).sum());
        prop_assert!((a - b).abs() <= 1e-10 * (1.0 + a.abs()), "{a} vs {b}");
    }

    #[test]
    fn roi_align_reads_only_its_image(seed in 0u64..1000) {
        let mut x = randn(seed, &[2, 1, 6, 6]);
        let rois = Array2::from_shape_vec((1, 5), vec![1.0, 0.5, 0.5, 5.0, 4.0]).unwrap();
        let l = RoiAlign::new((2, 2), 1.0, 2, false).unwrap();
        let y = l.forward(&x.view(), &rois.view()).unwrap();
        x.slice_mut(ndarray::s![0, .., .., ..]).fill(1e9);
        prop_assert_eq!(y, l.forward(&x.view(), &rois.view()).unwrap());
    }

    #[test]
    fn nms_keeps_a_consistent_set(bs in prop::collection::vec(a_box(), 1..60), seed in 0u64..1000,
                                  thr in 0.2f64..0.8) {
        let mut r = rand_pcg::Pcg64::seed_from_u64(seed);
        // quantized scores: ties are common
        let s: Vec<f32> = bs.iter().map(|_| r.gen_range(0..8) as f32 / 8.0).collect();
        let keep = nms(&bs, &s, thr);
        let iou = box_iou(&bs, &bs);
        let n = bs.len();
        for w in keep.windows(2) {
            prop_assert!(s[w[0]] > s[w[1]] || (s[w[0]] == s[w[1]] && w[0] < w[1]));
        }
        for (a, &i) in keep.iter().enumerate() {
            for &j in &keep[a + 1..] {
                prop_assert!(iou[i * n + j] as f64 <= thr);
            }
        }
        for j in (0..n).filter(|j| !keep.contains(j)) {
            prop_assert!(keep.iter().any(|&i| iou[i * n + j] as f64 > thr
                && (s[i] > s[j] || (s[i] == s[j] && i < j))), "box {j} dropped without cause");
        }
    }

    #[test]
    fn batched_nms_is_nms_per_class(bs in prop::collection::vec(a_box(), 1..40), seed in 0u64..1000) {
        let mut r = rand_pcg::Pcg64::seed_from_u64(seed);
        let s: Vec<f32> = bs.iter().map(|_| r.gen_range(0..16) as f32 / 16.0).collect();
        let c: Vec<usize> = bs.iter().map(|_| r.gen_range(0..3)).collect();
        let keep = batched_nms(&bs, &s, &c, 0.5);
        for class in 0..3 {
            let idx: Vec<usize> = (0..bs.len()).filter(|&i| c[i] == class).collect();
            let b: Vec<BoxF> = idx.iter().map(|&i| bs[i]).collect();
            let ss: Vec<f32> = idx.iter().map(|&i| s[i]).collect();
            let mut want: Vec<usize> = nms(&b, &ss, 0.5).into_iter().map(|k| idx[k]).collect();
            let mut got: Vec<usize> = keep.iter().copied().filter(|&i| c[i] == class).collect();
            want.sort_unstable();
            got.sort_unstable();
            prop_assert_eq!(got, want, "class {}", class);
        }
    }

    #[test]
    fn decoding_an_encoding_gives_the_box(g in a_box(), p in a_box(), head in any::<bool>()) {
        let c = BoxCoder::new(if head { [10.0, 10.0, 5.0, 5.0] } else { [1.0; 4] });
        let d = c.encode(&g, &p);
        prop_assume!(d[2] / c.weights[2] < c.clip && d[3] / c.weights[3] < c.clip);
        let back = c.decode(&d, &p);
        for k in 0..4 {
            prop_assert!((back[k] - g[k]).abs() <= 1e-3 * (1.0 + g[k].abs()), "{back:?} vs {g:?}");
        }
    }

    #[test]
    fn anchors_have_their_size_and_ratio(size in 4.0f32..128.0, ratio in 0.25f32..4.0,
                                         mh in 1usize..6, mw in 1usize..6) {
        let g = AnchorGenerator::new(vec![size], vec![ratio]).unwrap();
        let cell = g.cell_anchors()[0];
        let (w, h) = (cell[2] - cell[0], cell[3] - cell[1]);
        // rounding each corner to an integer moves each side by at most 1
        prop_assert!((w - size / ratio.sqrt()).abs() <= 1.0 && (h - size * ratio.sqrt()).abs() <= 1.0);
        // so the area moves by at most (w + h + 1)
        let (we, he) = (size / ratio.sqrt(), size * ratio.sqrt());
        prop_assert!((box_area(&cell) - size * size).abs() <= we + he + 1.0 + 1e-3 * size * size);
        let grid = g.grid(mh, mw, 8 * mh, 8 * mw);
        prop_assert_eq!(grid.len(), mh * mw);
        let last = grid[mh * mw - 1];
        prop_assert_eq!(last[0] - cell[0], 8.0 * (mw - 1) as f32);
        prop_assert_eq!(last[1] - cell[1], 8.0 * (mh - 1) as f32);
    }

    #[test]
    fn every_gt_gets_its_best_anchor(gts in prop::collection::vec(a_box(), 1..6)) {
        let anchors = AnchorGenerator::new(vec![16.0, 32.0, 64.0], vec![0.5, 1.0, 2.0]).unwrap()
            .grid(16, 16, 128, 128);
        let iou = box_iou(&gts, &anchors);
        let m = Matcher { high: 0.7, low: 0.3, allow_low_quality: true }
            .matches(&iou, gts.len(), anchors.len());
        let n = anchors.len();
        for g in 0..gts.len() {
            let row = &iou[g * n..(g + 1) * n];
            let top = row.iter().copied().fold(f32::MIN, f32::max);
            let best = row.iter().position(|&v| v == top).unwrap();
            prop_assert!(matches!(m[best], Match::Gt(_)), "gt {g}'s best anchor is not a positive");
        }
    }
}
