//! Box arithmetic as torchvision's `ops.boxes` and `models.detection._utils` do it, in f32 and in the same
//! order of operations: areas and IoU, the box coder (deltas to and from boxes), clipping, small-box removal,
//! and NMS (plain and per class).
//!
//! Boxes are `[x1, y1, x2, y2]` in pixels, corners exclusive of nothing: area = (x2 − x1)·(y2 − y1).

/// A box: x1, y1, x2, y2.
pub type BoxF = [f32; 4];

/// (x2 − x1)·(y2 − y1).
pub fn box_area(b: &BoxF) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// IoU of every box of `a` with every box of `b`, row-major `[a.len()][b.len()]` (torchvision's
/// `box_iou`: inter / (area_a + area_b − inter)).
pub fn box_iou(a: &[BoxF], b: &[BoxF]) -> Vec<f32> {
    let bareas: Vec<f32> = b.iter().map(box_area).collect();
    let mut out = Vec::with_capacity(a.len() * b.len());
    for p in a {
        let pa = box_area(p);
        for (q, &qa) in b.iter().zip(&bareas) {
            let w = (p[2].min(q[2]) - p[0].max(q[0])).max(0.0);
            let h = (p[3].min(q[3]) - p[1].max(q[1])).max(0.0);
            let inter = w * h;
            out.push(inter / (pa + qa - inter));
        }
    }
    out
}

/// Clamps each box to the image: x into [0, width], y into [0, height].
pub fn clip_boxes(boxes: &mut [BoxF], height: usize, width: usize) {
    let (h, w) = (height as f32, width as f32);
    for b in boxes {
        b[0] = b[0].clamp(0.0, w);
        b[1] = b[1].clamp(0.0, h);
        b[2] = b[2].clamp(0.0, w);
        b[3] = b[3].clamp(0.0, h);
    }
}

/// Indices of the boxes whose sides are both at least `min_size`.
pub fn keep_large(boxes: &[BoxF], min_size: f32) -> Vec<usize> {
    (0..boxes.len())
        .filter(|&i| {
            let b = &boxes[i];
            b[2] - b[0] >= min_size && b[3] - b[1] >= min_size
        })
        .collect()
}

/// torchvision's `BoxCoder`: box regression targets relative to a reference box, with per-coordinate weights
/// ((1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head) and the log-size deltas clamped at
/// `log(1000/16)` when decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxCoder {
    pub weights: [f32; 4],
    pub clip: f32,
}

impl BoxCoder {
    pub fn new(weights: [f32; 4]) -> BoxCoder {
        BoxCoder {
            weights,
            clip: (1000.0f64 / 16.0).ln() as f32,
        }
    }

    /// The deltas (dx, dy, dw, dh) that take `proposal` to `gt` (torchvision's `encode_boxes`).
    pub fn encode(&self, gt: &BoxF, proposal: &BoxF) -> [f32; 4] {
        let [wx, wy, ww, wh] = self.weights;
        let ex_w = proposal[2] - proposal[0];
        let ex_h = proposal[3] - proposal[1];
        let ex_cx = proposal[0] + 0.5 * ex_w;
        let ex_cy = proposal[1] + 0.5 * ex_h;
        let gt_w = gt[2] - gt[0];
        let gt_h = gt[3] - gt[1];
        let gt_cx = gt[0] + 0.5 * gt_w;
        let gt_cy = gt[1] + 0.5 * gt_h;
        [
            wx * (gt_cx - ex_cx) / ex_w,
            wy * (gt_cy - ex_cy) / ex_h,
            ww * (gt_w / ex_w).ln(),
            wh * (gt_h / ex_h).ln(),
        ]
    }

    /// The box that deltas `d` make of `reference` (torchvision's `decode_single`).
    pub fn decode(&self, d: &[f32; 4], reference: &BoxF) -> BoxF {
        let [wx, wy, ww, wh] = self.weights;
        let w = reference[2] - reference[0];
        let h = reference[3] - reference[1];
        let cx = reference[0] + 0.5 * w;
        let cy = reference[1] + 0.5 * h;
        let dx = d[0] / wx;
        let dy = d[1] / wy;
        let dw = (d[2] / ww).min(self.clip);
        let dh = (d[3] / wh).min(self.clip);
        let pcx = dx * w + cx;
        let pcy = dy * h + cy;
        let pw = dw.exp() * w;
        let ph = dh.exp() * h;
        let (hw, hh) = (0.5 * pw, 0.5 * ph);
        [pcx - hw, pcy - hh, pcx + hw, pcy + hh]
    }

    /// [`BoxCoder::decode`] of each delta against its reference box. Decoding is not differentiated: as in
    /// torchvision, proposals are detached and the losses are taken on the deltas.
    pub fn decode_all(&self, deltas: &[[f32; 4]], references: &[BoxF]) -> Vec<BoxF> {
        deltas
            .iter()
            .zip(references)
            .map(|(d, r)| self.decode(d, r))
            .collect()
    }
}

/// Greedy non-maximum suppression (torchvision's `ops.nms`): boxes visited by descending score, ties in input
/// order; a box is dropped when its IoU with a kept box is above `iou_threshold`. Returns the kept indices in
/// visiting order.
pub fn nms(boxes: &[BoxF], scores: &[f32], iou_threshold: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let areas: Vec<f32> = boxes.iter().map(box_area).collect();
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = vec![];
    for (oi, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = &boxes[i];
        for &j in &order[oi + 1..] {
            if suppressed[j] {
                continue;
            }
            let bj = &boxes[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            let ovr = inter / (areas[i] + areas[j] - inter);
            if ovr as f64 > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// NMS within each class of `classes` (torchvision's `ops.batched_nms`): the kept indices by descending score,
/// ties in input order.
///
/// Up to 1000 boxes torchvision offsets each class's boxes by `class · (max coordinate + 1)` and runs one
/// NMS (its "coordinate trick"); the offsets round in f32, which can move an IoU by an ulp, so that is what
/// runs here too. Above 1000 boxes it runs one NMS per class, as torchvision does.
pub fn batched_nms(
    boxes: &[BoxF],
    scores: &[f32],
    classes: &[usize],
    iou_threshold: f64,
) -> Vec<usize> {
    if boxes.is_empty() {
        return vec![];
    }
    if boxes.len() * 4 <= 4000 {
        let max = boxes
            .iter()
            .flat_map(|b| b.iter().copied())
            .fold(f32::NEG_INFINITY, f32::max);
        let shifted: Vec<BoxF> = boxes
            .iter()
            .zip(classes)
            .map(|(b, &c)| {
                let off = c as f32 * (max + 1.0);
                [b[0] + off, b[1] + off, b[2] + off, b[3] + off]
            })
            .collect();
        return nms(&shifted, scores, iou_threshold);
    }
    let mut keep = vec![];
    let mut ids: Vec<usize> = classes.to_vec();
    ids.sort_unstable();
    ids.dedup();
    for c in ids {
        let idx: Vec<usize> = (0..boxes.len()).filter(|&i| classes[i] == c).collect();
        let b: Vec<BoxF> = idx.iter().map(|&i| boxes[i]).collect();
        let s: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        keep.extend(nms(&b, &s, iou_threshold).into_iter().map(|k| idx[k]));
    }
    keep.sort_unstable();
    keep.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    keep
}
