//! Faster R-CNN's training step and inference, as torchvision's `FasterRCNN` runs them (with its default
//! rules, scaled where noted): the networks of [`crate::model::faster_rcnn`], anchors, the RPN's proposals
//! and losses, proposal sampling, RoIAlign, the box head's losses and the post-processing.
//!
//! ```text
//! images ─► trunk ─► features, objectness, deltas
//!   RPN   : anchors; proposals = decode(deltas) per image: top pre_nms_top_n by objectness, sigmoid, clip,
//!           drop boxes under 1e-3, NMS 0.7, first post_nms_top_n
//!           loss: anchors matched to gt (IoU ≥ 0.7 positive, < 0.3 negative, each gt's best anchors positive),
//!           256 sampled per image (≤ half positive); BCE on the sampled + smooth L1 (β = 1/9) on the positives,
//!           both over the number sampled
//!   heads : proposals + gt boxes, matched (IoU ≥ 0.5 positive, else background), `box_per_image` sampled
//!           (≤ 25% positive); RoIAlign 7×7 (sampling 2, scale 1/8) ─► box head ─► logits, class deltas
//!           loss: cross-entropy over the sampled + smooth L1 (β = 1/9) of the gt class's deltas on the
//!           positives over the number sampled
//!   infer : softmax; per class decode, clip, score > 0.05, drop boxes under 1e-2, NMS 0.5 per class, the
//!           best `detections_per_image`
//! ```
//!
//! Proposals and targets are not differentiated (torchvision detaches them). The sampler's draws are a
//! function of (seed, step, image), so a step is reproducible.

use super::anchors::AnchorGenerator;
use super::boxes::{batched_nms, box_iou, clip_boxes, keep_large, nms, BoxCoder, BoxF};
use super::matcher::{Match, Matcher, Sampler};
use crate::model::faster_rcnn::FasterRcnnConfig;
use crate::model::Graph;
use crate::nn::RoiAlign;
use crate::{Ctx, NvError, Result};
use ndarray::{Array2, ArrayD, IxDyn};

/// The detector's rules (torchvision's `FasterRCNN` keyword arguments).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DetectorConfig {
    pub net: FasterRcnnConfig,
    pub anchor_sizes: Vec<f32>,
    pub aspect_ratios: Vec<f32>,
    /// RPN: proposals kept before and after NMS, in training and at test time.
    pub rpn_pre_nms_top_n_train: usize,
    pub rpn_post_nms_top_n_train: usize,
    pub rpn_pre_nms_top_n_test: usize,
    pub rpn_post_nms_top_n_test: usize,
    pub rpn_nms_thresh: f64,
    pub rpn_fg_iou: f32,
    pub rpn_bg_iou: f32,
    pub rpn_batch_per_image: usize,
    pub rpn_positive_fraction: f32,
    pub box_fg_iou: f32,
    pub box_bg_iou: f32,
    pub box_batch_per_image: usize,
    pub box_positive_fraction: f32,
    pub box_score_thresh: f32,
    pub box_nms_thresh: f64,
    pub detections_per_image: usize,
    /// RoIAlign's `aligned` (torchvision's `MultiScaleRoIAlign` uses false) and sampling ratio (2).
    pub roi_aligned: bool,
    pub roi_sampling_ratio: i32,
    /// Feature stride (8: the trunk's output stride).
    pub stride: usize,
}

impl DetectorConfig {
    /// torchvision's defaults, scaled to 128×128 garment scenes: anchors 16/32/64 × ratios 0.5/1/2 at stride
    /// 8 (garments are 21-42 pixels), 1000/500 proposals in training and 500/300 at test (torchvision:
    /// 2000/2000 and 1000/1000 over many levels), 128 sampled regions per image (torchvision: 512).
    pub fn new(net: FasterRcnnConfig) -> DetectorConfig {
        DetectorConfig {
            net,
            anchor_sizes: vec![16.0, 32.0, 64.0],
            aspect_ratios: vec![0.5, 1.0, 2.0],
            rpn_pre_nms_top_n_train: 1000,
            rpn_post_nms_top_n_train: 500,
            rpn_pre_nms_top_n_test: 500,
            rpn_post_nms_top_n_test: 300,
            rpn_nms_thresh: 0.7,
            rpn_fg_iou: 0.7,
            rpn_bg_iou: 0.3,
            rpn_batch_per_image: 256,
            rpn_positive_fraction: 0.5,
            box_fg_iou: 0.5,
            box_bg_iou: 0.5,
            box_batch_per_image: 128,
            box_positive_fraction: 0.25,
            box_score_thresh: 0.05,
            box_nms_thresh: 0.5,
            detections_per_image: 100,
            roi_aligned: false,
            roi_sampling_ratio: 2,
            stride: 8,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.net.validate()?;
        let a = AnchorGenerator::new(self.anchor_sizes.clone(), self.aspect_ratios.clone())?;
        if a.per_location() != self.net.anchors_per_location {
            return Err(NvError::Config(format!(
                "faster-rcnn: {} anchor sizes × {} ratios = {} anchors per location, but the RPN head has {}",
                self.anchor_sizes.len(),
                self.aspect_ratios.len(),
                a.per_location(),
                self.net.anchors_per_location
            )));
        }
        let unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(NvError::Config(format!(
                    "faster-rcnn: {name} must be in [0, 1], got {v}"
                )))
            }
        };
        unit("rpn_nms_thresh", self.rpn_nms_thresh)?;
        unit("box_nms_thresh", self.box_nms_thresh)?;
        unit("rpn_positive_fraction", self.rpn_positive_fraction as f64)?;
        unit("box_positive_fraction", self.box_positive_fraction as f64)?;
        if self.rpn_bg_iou > self.rpn_fg_iou || self.box_bg_iou > self.box_fg_iou {
            return Err(NvError::Config(
                "faster-rcnn: a background IoU above its foreground IoU".into(),
            ));
        }
        if self.rpn_batch_per_image == 0 || self.box_batch_per_image == 0 || self.stride == 0 {
            return Err(NvError::Config(
                "faster-rcnn: sample sizes and the stride must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// The ground truth of one image: boxes `[x1, y1, x2, y2]` and their classes (1-based; 0 is background).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Target {
    pub boxes: Vec<BoxF>,
    pub labels: Vec<usize>,
}

/// One detection: its box, class (1-based) and score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub bbox: BoxF,
    pub label: usize,
    pub score: f32,
}

/// The four losses of a training step (torchvision's `loss_objectness`, `loss_rpn_box_reg`,
/// `loss_classifier`, `loss_box_reg`), in f64.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct DetLosses {
    pub objectness: f64,
    pub rpn_box: f64,
    pub classifier: f64,
    pub box_reg: f64,
}

impl DetLosses {
    pub fn total(&self) -> f64 {
        self.objectness + self.rpn_box + self.classifier + self.box_reg
    }
}

/// The detector: both networks and the rules around them.
pub struct Detector {
    pub cfg: DetectorConfig,
    pub trunk: Graph,
    pub head: Graph,
    anchors: AnchorGenerator,
    roi: RoiAlign,
}

const BETA: f64 = 1.0 / 9.0;

/// Smooth L1 with β = 1/9 (torchvision's), and its derivative.
fn smooth_l1(d: f64) -> (f64, f64) {
    if d.abs() < BETA {
        (0.5 * d * d / BETA, d / BETA)
    } else {
        (d.abs() - 0.5 * BETA, d.signum())
    }
}

/// Per image, per anchor (location-major, then anchor): objectness and deltas read from the trunk's
/// (N, A, h, w) and (N, 4A, h, w) outputs, as torchvision's `concat_box_prediction_layers` orders them.
fn rpn_outputs(obj: &ArrayD<f32>, del: &ArrayD<f32>) -> (Vec<Vec<f32>>, Vec<Vec<[f32; 4]>>) {
    let (n, a, h, w) = (
        obj.shape()[0],
        obj.shape()[1],
        obj.shape()[2],
        obj.shape()[3],
    );
    let (o, d) = (
        obj.as_slice().expect("contiguous"),
        del.as_slice().expect("contiguous"),
    );
    let hw = h * w;
    let mut os = vec![];
    let mut ds = vec![];
    for i in 0..n {
        let mut oi = Vec::with_capacity(hw * a);
        let mut di = Vec::with_capacity(hw * a);
        for l in 0..hw {
            for k in 0..a {
                oi.push(o[(i * a + k) * hw + l]);
                let q = |c: usize| d[(i * 4 * a + 4 * k + c) * hw + l];
                di.push([q(0), q(1), q(2), q(3)]);
            }
        }
        os.push(oi);
        ds.push(di);
    }
    (os, ds)
}

/// Indices of the `k` largest of `v`, descending, ties in index order.
fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.truncate(k);
    idx
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl Detector {
    /// Builds both networks from `cfg` (weights from its seed).
    pub fn new(cfg: DetectorConfig) -> Result<Detector> {
        cfg.validate()?;
        let trunk = cfg.net.build_trunk()?;
        let head = cfg.net.build_box_head()?;
        Self::from_parts(cfg, trunk, head)
    }

    /// A detector around networks already built (loaded from a checkpoint).
    pub fn from_parts(cfg: DetectorConfig, trunk: Graph, head: Graph) -> Result<Detector> {
        cfg.validate()?;
        let anchors = AnchorGenerator::new(cfg.anchor_sizes.clone(), cfg.aspect_ratios.clone())?;
        let p = cfg.net.pool;
        let roi = RoiAlign::new(
            (p, p),
            1.0 / cfg.stride as f64,
            cfg.roi_sampling_ratio,
            cfg.roi_aligned,
        )?;
        Ok(Detector {
            cfg,
            trunk,
            head,
            anchors,
            roi,
        })
    }

    fn check_images(&self, images: &ArrayD<f32>) -> Result<()> {
        let s = images.shape();
        if s.len() != 4
            || s[1] != self.cfg.net.in_channels
            || s[2] < self.cfg.stride
            || s[3] < self.cfg.stride
        {
            return Err(NvError::Shape {
                layer: "FasterRCNN",
                msg: format!(
                    "expected images (N, {}, H, W) with H, W ≥ {}, got {s:?}",
                    self.cfg.net.in_channels, self.cfg.stride
                ),
            });
        }
        Ok(())
    }

    /// The RPN's proposals of each image (torchvision's `filter_proposals`).
    fn proposals(
        &self,
        obj: &[Vec<f32>],
        del: &[Vec<[f32; 4]>],
        anchors: &[BoxF],
        image_hw: (usize, usize),
        training: bool,
    ) -> Vec<Vec<BoxF>> {
        let coder = BoxCoder::new([1.0; 4]);
        let (pre, post) = if training {
            (
                self.cfg.rpn_pre_nms_top_n_train,
                self.cfg.rpn_post_nms_top_n_train,
            )
        } else {
            (
                self.cfg.rpn_pre_nms_top_n_test,
                self.cfg.rpn_post_nms_top_n_test,
            )
        };
        obj.iter()
            .zip(del)
            .map(|(o, d)| {
                let top = top_k(o, pre.min(o.len()));
                let mut boxes: Vec<BoxF> = top
                    .iter()
                    .map(|&i| coder.decode(&d[i], &anchors[i]))
                    .collect();
                let scores: Vec<f32> = top.iter().map(|&i| sigmoid(o[i])).collect();
                clip_boxes(&mut boxes, image_hw.0, image_hw.1);
                let keep = keep_large(&boxes, 1e-3);
                let (b, s): (Vec<BoxF>, Vec<f32>) = keep
                    .iter()
                    .filter(|&&i| scores[i] >= 0.0)
                    .map(|&i| (boxes[i], scores[i]))
                    .unzip();
                let mut kept = nms(&b, &s, self.cfg.rpn_nms_thresh);
                kept.truncate(post);
                kept.into_iter().map(|i| b[i]).collect()
            })
            .collect()
    }

    /// The RoIAlign'd features of `rois` (R, 5).
    fn pool(&self, features: &ArrayD<f32>, rois: &Array2<f32>) -> Result<ArrayD<f32>> {
        self.roi.forward(&features.view(), &rois.view())
    }

    /// One training step: forward, losses, and the backward of their sum, accumulating every parameter's
    /// gradient in both networks. `seed` and `step` drive the samplers.
    pub fn train_step(
        &mut self,
        images: &ArrayD<f32>,
        targets: &[Target],
        ctx: Ctx,
        seed: u64,
        step: u64,
    ) -> Result<DetLosses> {
        self.train_step_at(images, targets, ctx, seed, step, 0)
    }

    /// [`Detector::train_step`] of the images at positions `first..` of a global batch (a rank's slice in
    /// data-parallel training): each image's samplers draw from its global position, so that the ranks
    /// sample what one process sampling the whole batch would.
    pub fn train_step_at(
        &mut self,
        images: &ArrayD<f32>,
        targets: &[Target],
        ctx: Ctx,
        seed: u64,
        step: u64,
        first: usize,
    ) -> Result<DetLosses> {
        self.check_images(images)?;
        let n = images.shape()[0];
        if targets.len() != n {
            return Err(NvError::Shape {
                layer: "FasterRCNN",
                msg: format!("{} targets for {n} images", targets.len()),
            });
        }
        let image_hw = (images.shape()[2], images.shape()[3]);
        let outs = self.trunk.forward(&[images], ctx)?;
        let (features, obj, del) = (&outs[0], &outs[1], &outs[2]);
        let (fh, fw) = (features.shape()[2], features.shape()[3]);
        let anchors = self.anchors.grid(fh, fw, image_hw.0, image_hw.1);
        let (os, ds) = rpn_outputs(obj, del);
        let mut losses = DetLosses::default();

        // RPN loss and its gradient on the trunk's two RPN outputs
        let rpn_coder = BoxCoder::new([1.0; 4]);
        let matcher = Matcher {
            high: self.cfg.rpn_fg_iou,
            low: self.cfg.rpn_bg_iou,
            allow_low_quality: true,
        };
        let sampler = Sampler {
            per_image: self.cfg.rpn_batch_per_image,
            positive_fraction: self.cfg.rpn_positive_fraction,
        };
        let a = self.cfg.net.anchors_per_location;
        let hw = fh * fw;
        let mut dobj = ArrayD::<f32>::zeros(obj.raw_dim());
        let mut ddel = ArrayD::<f32>::zeros(del.raw_dim());
        // per image: (image, sampled positives, sampled negatives, every anchor's match)
        type Sampled = (usize, Vec<usize>, Vec<usize>, Vec<Match>);
        let mut sampled_rpn: Vec<Sampled> = vec![];
        let mut n_sampled = 0usize;
        for (i, t) in targets.iter().enumerate() {
            let iou = box_iou(&t.boxes, &anchors);
            let m = matcher.matches(&iou, t.boxes.len(), anchors.len());
            let (pos, neg) =
                sampler.sample(&m, seed, step.wrapping_mul(1 << 20) ^ (first + i) as u64);
            n_sampled += pos.len() + neg.len();
            sampled_rpn.push((i, pos, neg, m));
        }
        let inv = 1.0 / n_sampled.max(1) as f64;
        {
            let (dos, dds) = (
                dobj.as_slice_mut().expect("contiguous"),
                ddel.as_slice_mut().expect("contiguous"),
            );
            for (i, pos, neg, m) in &sampled_rpn {
                let t = &targets[*i];
                let mut bce = |j: usize, y: f64| {
                    let z = os[*i][j] as f64;
                    losses.objectness += (z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()) * inv;
                    let (l, k) = (j / a, j % a);
                    dos[(i * a + k) * hw + l] = ((1.0 / (1.0 + (-z).exp()) - y) * inv) as f32;
                };
                for &j in pos {
                    bce(j, 1.0);
                }
                for &j in neg {
                    bce(j, 0.0);
                }
                for &j in pos {
                    let Match::Gt(g) = m[j] else {
                        unreachable!("positives are matched")
                    };
                    let target = rpn_coder.encode(&t.boxes[g], &anchors[j]);
                    let (l, k) = (j / a, j % a);
                    for c in 0..4 {
                        let (v, dv) = smooth_l1(ds[*i][j][c] as f64 - target[c] as f64);
                        losses.rpn_box += v * inv;
                        dds[(i * 4 * a + 4 * k + c) * hw + l] = (dv * inv) as f32;
                    }
                }
            }
        }

        // proposals (detached), plus the gt boxes, matched and sampled for the box head
        let props = self.proposals(&os, &ds, &anchors, image_hw, true);
        let head_matcher = Matcher {
            high: self.cfg.box_fg_iou,
            low: self.cfg.box_bg_iou,
            allow_low_quality: false,
        };
        let head_sampler = Sampler {
            per_image: self.cfg.box_batch_per_image,
            positive_fraction: self.cfg.box_positive_fraction,
        };
        let head_coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
        let mut rois: Vec<[f32; 5]> = vec![];
        let mut labels: Vec<usize> = vec![];
        let mut reg_targets: Vec<Option<[f32; 4]>> = vec![];
        for (i, (p, t)) in props.iter().zip(targets).enumerate() {
            let mut cands = p.clone();
            cands.extend_from_slice(&t.boxes);
            let iou = box_iou(&t.boxes, &cands);
            let m = head_matcher.matches(&iou, t.boxes.len(), cands.len());
            let (pos, neg) = head_sampler.sample(
                &m,
                seed,
                (step.wrapping_mul(1 << 20) ^ (first + i) as u64) ^ (1 << 60),
            );
            let mut chosen: Vec<usize> = pos.iter().chain(&neg).copied().collect();
            chosen.sort_unstable();
            for j in chosen {
                let b = cands[j];
                rois.push([i as f32, b[0], b[1], b[2], b[3]]);
                match m[j] {
                    Match::Gt(g) => {
                        labels.push(t.labels[g]);
                        reg_targets.push(Some(head_coder.encode(&t.boxes[g], &b)));
                    }
                    _ => {
                        labels.push(0);
                        reg_targets.push(None);
                    }
                }
            }
        }
        let r = rois.len();
        let k = self.cfg.net.num_classes;
        let mut dfeatures = ArrayD::<f32>::zeros(features.raw_dim());
        if r > 0 {
            let rois = Array2::from_shape_vec((r, 5), rois.concat()).expect("shape");
            let pooled = self.pool(features, &rois)?;
            let h = self.head.forward(&[&pooled], ctx)?;
            let (logits, breg) = (&h[0], &h[1]);
            let (ls, bs) = (
                logits.as_slice().expect("contiguous"),
                breg.as_slice().expect("contiguous"),
            );
            let mut dlogits = vec![0f32; r * k];
            let mut dbreg = vec![0f32; r * 4 * k];
            let inv = 1.0 / r as f64;
            for q in 0..r {
                let row = &ls[q * k..(q + 1) * k];
                let mx = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let e: Vec<f64> = row.iter().map(|&v| (v as f64 - mx).exp()).collect();
                let s: f64 = e.iter().sum();
                let y = labels[q];
                losses.classifier += (mx + s.ln() - row[y] as f64) * inv;
                for c in 0..k {
                    let p = e[c] / s - if c == y { 1.0 } else { 0.0 };
                    dlogits[q * k + c] = (p * inv) as f32;
                }
                if let (Some(tg), true) = (reg_targets[q], y > 0) {
                    for (c, &tc) in tg.iter().enumerate() {
                        let at = q * 4 * k + 4 * y + c;
                        let (v, dv) = smooth_l1(bs[at] as f64 - tc as f64);
                        losses.box_reg += v * inv;
                        dbreg[at] = (dv * inv) as f32;
                    }
                }
            }
            let dl = ArrayD::from_shape_vec(IxDyn(&[r, k]), dlogits).expect("shape");
            let db = ArrayD::from_shape_vec(IxDyn(&[r, 4 * k]), dbreg).expect("shape");
            let dpooled = self.head.backward(&[&pooled], &[&dl, &db], ctx, true)?;
            let dpooled = dpooled
                .into_iter()
                .next()
                .flatten()
                .ok_or_else(|| NvError::Shape {
                    layer: "FasterRCNN",
                    msg: "the box head returned no input gradient".into(),
                })?;
            dfeatures = self
                .roi
                .backward(&dpooled.view(), &rois.view(), features.shape())?;
        }
        self.trunk
            .backward(&[images], &[&dfeatures, &dobj, &ddel], ctx, false)?;
        if !losses.total().is_finite() {
            return Err(NvError::NonFinite(format!("detection loss {losses:?}")));
        }
        Ok(losses)
    }

    /// Detections of each image (torchvision's inference: proposals, box head, `postprocess_detections`).
    pub fn detect(&mut self, images: &ArrayD<f32>) -> Result<Vec<Vec<Detection>>> {
        self.check_images(images)?;
        let image_hw = (images.shape()[2], images.shape()[3]);
        let outs = self.trunk.infer(&[images])?;
        let (features, obj, del) = (&outs[0], &outs[1], &outs[2]);
        let (fh, fw) = (features.shape()[2], features.shape()[3]);
        let anchors = self.anchors.grid(fh, fw, image_hw.0, image_hw.1);
        let (os, ds) = rpn_outputs(obj, del);
        let props = self.proposals(&os, &ds, &anchors, image_hw, false);
        let rois: Vec<[f32; 5]> = props
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.iter().map(move |b| [i as f32, b[0], b[1], b[2], b[3]]))
            .collect();
        let n = images.shape()[0];
        let mut out = vec![vec![]; n];
        if rois.is_empty() {
            return Ok(out);
        }
        let r = rois.len();
        let rois_a = Array2::from_shape_vec((r, 5), rois.concat()).expect("shape");
        let pooled = self.pool(features, &rois_a)?;
        let h = self.head.infer(&[&pooled])?;
        let (ls, bs) = (
            h[0].as_slice().expect("contiguous"),
            h[1].as_slice().expect("contiguous"),
        );
        let k = self.cfg.net.num_classes;
        let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
        let mut per_image: Vec<(Vec<BoxF>, Vec<f32>, Vec<usize>)> =
            vec![(vec![], vec![], vec![]); n];
        for (q, roi) in rois.iter().enumerate() {
            let row = &ls[q * k..(q + 1) * k];
            let mx = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let e: Vec<f32> = row.iter().map(|&v| (v - mx).exp()).collect();
            let s: f32 = e.iter().sum();
            let reference = [roi[1], roi[2], roi[3], roi[4]];
            let img = roi[0] as usize;
            for c in 1..k {
                let score = e[c] / s;
                if score <= self.cfg.box_score_thresh {
                    continue;
                }
                let d = &bs[q * 4 * k + 4 * c..q * 4 * k + 4 * c + 4];
                let mut b = [coder.decode(&[d[0], d[1], d[2], d[3]], &reference)];
                clip_boxes(&mut b, image_hw.0, image_hw.1);
                let e = &mut per_image[img];
                e.0.push(b[0]);
                e.1.push(score);
                e.2.push(c);
            }
        }
        for (i, (b, s, c)) in per_image.into_iter().enumerate() {
            let big = keep_large(&b, 1e-2);
            let b: Vec<BoxF> = big.iter().map(|&j| b[j]).collect();
            let s: Vec<f32> = big.iter().map(|&j| s[j]).collect();
            let c: Vec<usize> = big.iter().map(|&j| c[j]).collect();
            let mut keep = batched_nms(&b, &s, &c, self.cfg.box_nms_thresh);
            keep.truncate(self.cfg.detections_per_image);
            out[i] = keep
                .into_iter()
                .map(|j| Detection {
                    bbox: b[j],
                    label: c[j],
                    score: s[j],
                })
                .collect();
        }
        Ok(out)
    }
}
