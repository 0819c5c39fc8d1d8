//! Object detection (`--task detect`): COCO-format data and COCO's box evaluation, reproduced from
//! pycocotools.
//!
//! ```text
//! annotations.json (COCO) ─► CocoDataset ─┐
//! detections.json (results) ──────────────┴► coco_eval::evaluate ─► AP@[.5:.95], AP50, AP75, APs/m/l, AR…
//! ```

pub mod coco;
pub mod coco_eval;

pub use coco::{
    load_detections, CocoAnnotation, CocoCategory, CocoDataset, CocoDetection, CocoImage,
};
pub use coco_eval::{evaluate, evaluate_with, CocoEvaluation, CocoParams, STAT_NAMES};
