//! Object detection (`--task detect`): COCO-format data, COCO's box evaluation reproduced from pycocotools,
//! and the parts of a Faster R-CNN that are box arithmetic rather than layers (anchors, the box coder, NMS,
//! matching and sampling), reproduced from torchvision. RoIAlign is a layer: [`crate::nn::RoiAlign`].
//!
//! ```text
//! annotations.json (COCO) ─► CocoDataset ─┐
//! detections.json (results) ──────────────┴► coco_eval::evaluate ─► AP@[.5:.95], AP50, AP75, APs/m/l, AR…
//! ```

pub mod anchors;
pub mod boxes;
pub mod checkpoint;
pub mod coco;
pub mod coco_eval;
pub mod config;
pub mod data;
pub mod detector;
pub mod matcher;
pub mod render;
pub mod train;

pub use anchors::AnchorGenerator;
pub use boxes::{batched_nms, box_area, box_iou, clip_boxes, keep_large, nms, BoxCoder, BoxF};
pub use checkpoint::{load_checkpoint, save_checkpoint, DetCheckpoint};
pub use coco::{
    load_detections, CocoAnnotation, CocoCategory, CocoDataset, CocoDetection, CocoImage,
};
pub use coco_eval::{evaluate, evaluate_with, CocoEvaluation, CocoParams, STAT_NAMES};
pub use config::DetTrainConfig;
pub use data::{DetSample, DetSource};
pub use detector::{DetLosses, Detection, Detector, DetectorConfig, Target};
pub use matcher::{Match, Matcher, Sampler};
pub use train::{
    evaluate as evaluate_detector, train_detector, train_detector_distributed, DetEval, DetEvent,
    DetReport,
};
