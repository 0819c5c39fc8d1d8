//! Box AP and AR exactly as pycocotools' `COCOeval` (iouType `bbox`) computes them: `evaluate`,
//! `accumulate` and `summarize`, step for step.
//!
//! - IoU thresholds 0.50:0.05:0.95 and recall thresholds 0:0.01:1, built as `numpy.linspace` builds them.
//! - Per (category, image): detections sorted by score (stable, so ties keep their input order) and cut to the
//!   largest maxDets; crowd ground truth is ignored, and a detection's IoU with it is its intersection over
//!   the detection's own area; gt outside the area range is ignored and sorted last; greedy matching in score
//!   order, each detection taking the unmatched gt of highest IoU ≥ the threshold, never leaving a regular
//!   gt for an ignored one; unmatched detections outside the area range are ignored.
//! - Per (category, area range, maxDets): detections of all images merged by score (stable), cumulative TP
//!   and FP, precision made monotone, read at the 101 recall thresholds (101-point interpolation); -1 where
//!   the category has no non-ignored ground truth.
//! - The twelve summary numbers are means over the entries that are not -1 (-1 when there are none).
//!
//! pycocotools records a match by the gt's id, so a gt annotation whose id is 0 counts as unmatched
//! (`dtm == 0`); that is reproduced here, so the numbers agree on any input.

use super::coco::{CocoDataset, CocoDetection};
use std::collections::HashMap;

/// `numpy.linspace(start, stop, num)`: `i·step + start`, the last value `stop` exactly.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// pycocotools' default `Params` for boxes.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoParams {
    pub iou_thrs: Vec<f64>,
    pub rec_thrs: Vec<f64>,
    pub max_dets: [usize; 3],
    /// all, small, medium, large: `[lo, hi]` in area, both ends included.
    pub area_rngs: [(f64, f64); 4],
}

impl Default for CocoParams {
    fn default() -> Self {
        CocoParams {
            iou_thrs: linspace(0.5, 0.95, 10),
            rec_thrs: linspace(0.0, 1.0, 101),
            max_dets: [1, 10, 100],
            area_rngs: [
                (0.0, 1e10),
                (0.0, 32.0 * 32.0),
                (32.0 * 32.0, 96.0 * 96.0),
                (96.0 * 96.0, 1e10),
            ],
        }
    }
}

/// The names of the twelve summary numbers, in pycocotools' order.
pub const STAT_NAMES: [&str; 12] = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
];

/// The result of an evaluation: pycocotools' `eval['precision']`, `eval['recall']` and `stats`.
#[derive(Debug, Clone)]
pub struct CocoEvaluation {
    pub params: CocoParams,
    /// The ground truth's category ids, sorted (the K axis).
    pub category_ids: Vec<i64>,
    /// `[T][R][K][A][M]`, flattened in that order; -1 where undefined.
    pub precision: Vec<f64>,
    /// `[T][K][A][M]`, flattened; -1 where undefined.
    pub recall: Vec<f64>,
    /// AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@1/10/100, AR small/medium/large.
    pub stats: [f64; 12],
    /// Detections skipped because their category is not one of the ground truth's (pycocotools skips them
    /// silently).
    pub skipped_detections: usize,
}

/// One (category, area range, image) of pycocotools' `evalImgs`: `None` there when the image has neither gt
/// nor detections of the category.
struct EvalImg {
    /// Scores of the kept detections, in score order.
    scores: Vec<f64>,
    /// `[T][D]`: whether the detection matched a gt (a gt id ≠ 0, as pycocotools tests it).
    matched: Vec<bool>,
    /// `[T][D]`
    ignored: Vec<bool>,
    /// Per gt (in the area-sorted order): ignored.
    gt_ignored: Vec<bool>,
}

/// IoU of detection `d` with gt `g` (`[x, y, w, h]`), pycocotools' `bbIou`: against a crowd gt the union is
/// the detection's area.
fn iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let (da, ga) = (d[2] * d[3], g[2] * g[3]);
    let u = if crowd { da } else { da + ga - i };
    i / u
}

/// Indices of `scores` sorted by descending score, ties in input order (`argsort(-s, kind='mergesort')`).
fn score_order(scores: impl Iterator<Item = f64>) -> Vec<usize> {
    let s: Vec<f64> = scores.collect();
    let mut idx: Vec<usize> = (0..s.len()).collect();
    idx.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).expect("scores are finite"));
    idx
}

/// pycocotools' `evaluateImg` for one (image, category), every area range at once: `gts` and `dets` in
/// annotation order, each detection with its 1-based id in the result list.
fn evaluate_img(
    p: &CocoParams,
    gts: &[&super::coco::CocoAnnotation],
    dets: &[(usize, &CocoDetection)],
) -> Vec<EvalImg> {
    let max_det = p.max_dets[2];
    let order = score_order(dets.iter().map(|(_, d)| d.score));
    let dt: Vec<&CocoDetection> = order.iter().take(max_det).map(|&i| dets[i].1).collect();
    // computeIoU: [D][G] over the gt in annotation order
    let ious: Vec<Vec<f64>> = dt
        .iter()
        .map(|d| {
            gts.iter()
                .map(|g| iou(&d.bbox, &g.bbox, g.iscrowd))
                .collect()
        })
        .collect();
    let t_n = p.iou_thrs.len();
    let d_n = dt.len();
    p.area_rngs
        .iter()
        .map(|&(lo, hi)| {
            let ign: Vec<bool> = gts
                .iter()
                .map(|g| g.iscrowd || g.area < lo || g.area > hi)
                .collect();
            // gt sorted with the ignored last (stable)
            let mut gind: Vec<usize> = (0..gts.len()).collect();
            gind.sort_by_key(|&i| ign[i]);
            let gt_ignored: Vec<bool> = gind.iter().map(|&i| ign[i]).collect();
            let crowd: Vec<bool> = gind.iter().map(|&i| gts[i].iscrowd).collect();
            let mut matched = vec![false; t_n * d_n];
            let mut ignored = vec![false; t_n * d_n];
            let mut matched_ids = vec![0i64; t_n * d_n];
            if !gts.is_empty() {
                for (t, &thr) in p.iou_thrs.iter().enumerate() {
                    let mut gt_taken = vec![false; gind.len()];
                    for d in 0..d_n {
                        let mut best = thr.min(1.0 - 1e-10);
                        let mut m: Option<usize> = None;
                        for (gi, &g) in gind.iter().enumerate() {
                            if gt_taken[gi] && !crowd[gi] {
                                continue;
                            }
                            if let Some(mm) = m {
                                if !gt_ignored[mm] && gt_ignored[gi] {
                                    break;
                                }
                            }
                            if ious[d][g] < best {
                                continue;
                            }
                            best = ious[d][g];
                            m = Some(gi);
                        }
                        if let Some(mm) = m {
                            ignored[t * d_n + d] = gt_ignored[mm];
                            matched_ids[t * d_n + d] = gts[gind[mm]].id;
                            gt_taken[mm] = true;
                        }
                    }
                }
            }
            for k in 0..t_n * d_n {
                matched[k] = matched_ids[k] != 0;
                let b = dt[k % d_n].bbox;
                let area = b[2] * b[3];
                if !matched[k] && (area < lo || area > hi) {
                    ignored[k] = true;
                }
            }
            EvalImg {
                scores: dt.iter().map(|d| d.score).collect(),
                matched,
                ignored,
                gt_ignored,
            }
        })
        .collect()
}

/// Evaluates `dets` against `gt` as pycocotools' `COCOeval(gt, dt, 'bbox')` with default parameters, then
/// `evaluate()`, `accumulate()` and `summarize()`.
pub fn evaluate(gt: &CocoDataset, dets: &[CocoDetection]) -> CocoEvaluation {
    evaluate_with(gt, dets, CocoParams::default())
}

/// [`evaluate`] with other parameters.
pub fn evaluate_with(gt: &CocoDataset, dets: &[CocoDetection], p: CocoParams) -> CocoEvaluation {
    let mut img_ids: Vec<i64> = gt.images.iter().map(|i| i.id).collect();
    img_ids.sort_unstable();
    img_ids.dedup();
    let mut cat_ids: Vec<i64> = gt.categories.iter().map(|c| c.id).collect();
    cat_ids.sort_unstable();
    cat_ids.dedup();
    let cat_pos: HashMap<i64, usize> = cat_ids.iter().enumerate().map(|(k, &c)| (c, k)).collect();
    let img_pos: HashMap<i64, usize> = img_ids.iter().enumerate().map(|(k, &c)| (c, k)).collect();
    let (k_n, i_n, a_n, m_n) = (cat_ids.len(), img_ids.len(), 4, 3);
    let (t_n, r_n) = (p.iou_thrs.len(), p.rec_thrs.len());

    // group by (category, image), in annotation / result order
    let mut g_by: HashMap<(usize, usize), Vec<&super::coco::CocoAnnotation>> = HashMap::new();
    for a in &gt.annotations {
        if let (Some(&k), Some(&i)) = (cat_pos.get(&a.category_id), img_pos.get(&a.image_id)) {
            g_by.entry((k, i)).or_default().push(a);
        }
    }
    let mut d_by: HashMap<(usize, usize), Vec<(usize, &CocoDetection)>> = HashMap::new();
    let mut skipped = 0;
    for (n, d) in dets.iter().enumerate() {
        match (cat_pos.get(&d.category_id), img_pos.get(&d.image_id)) {
            (Some(&k), Some(&i)) => d_by.entry((k, i)).or_default().push((n + 1, d)),
            _ => skipped += 1,
        }
    }
    // evalImgs[k][a][i]
    let mut eval_imgs: Vec<Option<EvalImg>> = (0..k_n * a_n * i_n).map(|_| None).collect();
    for k in 0..k_n {
        for i in 0..i_n {
            let g = g_by.get(&(k, i)).map(Vec::as_slice).unwrap_or(&[]);
            let d = d_by.get(&(k, i)).map(Vec::as_slice).unwrap_or(&[]);
            if g.is_empty() && d.is_empty() {
                continue;
            }
            for (a, e) in evaluate_img(&p, g, d).into_iter().enumerate() {
                eval_imgs[(k * a_n + a) * i_n + i] = Some(e);
            }
        }
    }

    let mut precision = vec![-1.0; t_n * r_n * k_n * a_n * m_n];
    let mut recall = vec![-1.0; t_n * k_n * a_n * m_n];
    for k in 0..k_n {
        for a in 0..a_n {
            for (m, &max_det) in p.max_dets.iter().enumerate() {
                let es: Vec<&EvalImg> = (0..i_n)
                    .filter_map(|i| eval_imgs[(k * a_n + a) * i_n + i].as_ref())
                    .collect();
                if es.is_empty() {
                    continue;
                }
                // (score, image, detection) of each image's first max_det, merged by score
                let mut all: Vec<(f64, usize, usize)> = vec![];
                for (e_i, e) in es.iter().enumerate() {
                    for d in 0..e.scores.len().min(max_det) {
                        all.push((e.scores[d], e_i, d));
                    }
                }
                let order = score_order(all.iter().map(|x| x.0));
                let npig = es
                    .iter()
                    .map(|e| e.gt_ignored.iter().filter(|&&x| !x).count())
                    .sum::<usize>();
                if npig == 0 {
                    continue;
                }
                let nd = order.len();
                for t in 0..t_n {
                    let (mut tp, mut fp) = (0.0f64, 0.0f64);
                    let mut rc = Vec::with_capacity(nd);
                    let mut pr = Vec::with_capacity(nd);
                    for &o in &order {
                        let (_, e_i, d) = all[o];
                        let e = es[e_i];
                        let dn = e.scores.len();
                        let (mt, ig) = (e.matched[t * dn + d], e.ignored[t * dn + d]);
                        if mt && !ig {
                            tp += 1.0;
                        }
                        if !mt && !ig {
                            fp += 1.0;
                        }
                        rc.push(tp / npig as f64);
                        pr.push(tp / (fp + tp + f64::EPSILON));
                    }
                    recall[((t * k_n + k) * a_n + a) * m_n + m] =
                        if nd > 0 { rc[nd - 1] } else { 0.0 };
                    for i in (1..nd).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    // searchsorted(rc, thr, side='left'); thresholds past the last recall reached keep 0
                    for (r, &thr) in p.rec_thrs.iter().enumerate() {
                        let pi = rc.partition_point(|&x| x < thr);
                        let at = (((t * r_n + r) * k_n + k) * a_n + a) * m_n + m;
                        precision[at] = if pi < nd { pr[pi] } else { 0.0 };
                    }
                }
            }
        }
    }

    let mean = |vals: Vec<f64>| -> f64 {
        let v: Vec<f64> = vals.into_iter().filter(|&x| x > -1.0).collect();
        if v.is_empty() {
            -1.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let ap = |t: Option<usize>, a: usize, m: usize| {
        let ts: Vec<usize> = t.map_or((0..t_n).collect(), |t| vec![t]);
        let mut v = vec![];
        for &t in &ts {
            for r in 0..r_n {
                for k in 0..k_n {
                    v.push(precision[(((t * r_n + r) * k_n + k) * a_n + a) * m_n + m]);
                }
            }
        }
        mean(v)
    };
    let ar = |a: usize, m: usize| {
        let mut v = vec![];
        for t in 0..t_n {
            for k in 0..k_n {
                v.push(recall[((t * k_n + k) * a_n + a) * m_n + m]);
            }
        }
        mean(v)
    };
    let t50 = p.iou_thrs.iter().position(|&x| x == 0.5);
    let t75 = p.iou_thrs.iter().position(|&x| x == 0.75);
    let at_thr = |t: Option<usize>| t.map_or(-1.0, |t| ap(Some(t), 0, 2));
    let stats = [
        ap(None, 0, 2),
        at_thr(t50),
        at_thr(t75),
        ap(None, 1, 2),
        ap(None, 2, 2),
        ap(None, 3, 2),
        ar(0, 0),
        ar(0, 1),
        ar(0, 2),
        ar(1, 2),
        ar(2, 2),
        ar(3, 2),
    ];
    CocoEvaluation {
        params: p,
        category_ids: cat_ids,
        precision,
        recall,
        stats,
        skipped_detections: skipped,
    }
}

impl CocoEvaluation {
    /// AP@[.5:.95] of each category (area all, 100 detections), in [`CocoEvaluation::category_ids`] order; -1
    /// for a category without ground truth.
    pub fn per_category_ap(&self) -> Vec<f64> {
        let (t_n, r_n, k_n) = (
            self.params.iou_thrs.len(),
            self.params.rec_thrs.len(),
            self.category_ids.len(),
        );
        (0..k_n)
            .map(|k| {
                let v: Vec<f64> = (0..t_n)
                    .flat_map(|t| (0..r_n).map(move |r| (t, r)))
                    .map(|(t, r)| self.precision[(((t * r_n + r) * k_n + k) * 4) * 3 + 2])
                    .filter(|&x| x > -1.0)
                    .collect();
                if v.is_empty() {
                    -1.0
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                }
            })
            .collect()
    }

    /// The twelve lines pycocotools' `summarize()` prints.
    pub fn summary(&self) -> String {
        let rows: [(bool, Option<&str>, &str, usize); 12] = [
            (true, None, "all", 100),
            (true, Some("0.50"), "all", 100),
            (true, Some("0.75"), "all", 100),
            (true, None, "small", 100),
            (true, None, "medium", 100),
            (true, None, "large", 100),
            (false, None, "all", 1),
            (false, None, "all", 10),
            (false, None, "all", 100),
            (false, None, "small", 100),
            (false, None, "medium", 100),
            (false, None, "large", 100),
        ];
        let mut s = String::new();
        for (k, (is_ap, thr, area, md)) in rows.iter().enumerate() {
            let (title, ty) = if *is_ap {
                ("Average Precision", "(AP)")
            } else {
                ("Average Recall", "(AR)")
            };
            let iou = thr.unwrap_or("0.50:0.95");
            s.push_str(&format!(
                " {:<18} {} @[ IoU={:<9} | area={:>6} | maxDets={:>3} ] = {:.3}\n",
                title, ty, iou, area, md, self.stats[k]
            ));
        }
        s
    }
}
