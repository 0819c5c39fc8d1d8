//! Semantic segmentation: a DeepLabV3-style network ([`crate::model::deeplab`]) trained on garment scenes drawn
//! on the fly or on a user's images and VOC-style masks, evaluated with mIoU, pixel accuracy and per-class IoU.
//!
//! ```text
//! SegSource (scenes | --images/--masks) ─► batches (scale, pad, crop, flip; SplitMix64 draws) ─► train
//!   ─► evaluate (whole images, confusion matrix) ─► checkpoint ─► predict (colour mask + overlay PNGs)
//! ```

pub mod batches;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod metrics;
pub mod pretrained;
pub mod render;
pub mod train;

pub use batches::{SegAugment, SegBatch};
pub use checkpoint::{load_checkpoint, SegCheckpoint, SegPosition};
pub use data::{SegSample, SegSource};
pub use metrics::{ConfusionMatrix, SegMetrics};
pub use pretrained::{load_backbone, load_backbone_state};
pub use train::{
    evaluate, train_segmentation, SegData, SegEval, SegReport, SegRunOptions, SegTrainConfig,
};
