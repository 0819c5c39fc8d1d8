//! The integration tests, in one binary (one build and link instead of one per file; CI's test build is most
//! of its time). Each file of `tests/` is a module here, named as the file: `cargo test --test suite
//! engine_baseline::` runs one file's tests. Three files stay binaries of their own: `mpi.rs` (it starts itself
//! under `mpirun`, with the `mpi` feature), `fuzz_replay.rs` (it limits the process's address space) and
//! `resources.rs` (it reads the process's resident memory).

mod common;

#[path = "adapt.rs"]
mod adapt;

#[path = "api_hygiene.rs"]
mod api_hygiene;

#[path = "branching.rs"]
mod branching;

#[path = "cli.rs"]
mod cli;

#[path = "coco_eval.rs"]
mod coco_eval;

#[path = "corrupt.rs"]
mod corrupt;

#[path = "crash_safety.rs"]
mod crash_safety;

#[path = "data.rs"]
mod data;

#[path = "data_parallel.rs"]
mod data_parallel;

#[path = "defects.rs"]
mod defects;

#[path = "detection.rs"]
mod detection;

#[path = "engine_baseline.rs"]
mod engine_baseline;

#[path = "errors_norm.rs"]
mod errors_norm;

#[path = "experiment.rs"]
mod experiment;

#[path = "finetune.rs"]
mod finetune;

#[path = "fold.rs"]
mod fold;

#[path = "fused_layers.rs"]
mod fused_layers;

#[path = "golden_detect.rs"]
mod golden_detect;

#[path = "golden_model.rs"]
mod golden_model;

#[path = "golden_nn.rs"]
mod golden_nn;

#[path = "golden_norm.rs"]
mod golden_norm;

#[path = "gradcheck_nn.rs"]
mod gradcheck_nn;

#[path = "gradcheck_norm.rs"]
mod gradcheck_norm;

#[path = "layering.rs"]
mod layering;

#[path = "models.rs"]
mod models;

#[path = "numerics_eval.rs"]
mod numerics_eval;

#[path = "numerics_norm.rs"]
mod numerics_norm;

#[path = "numerics_streaming.rs"]
mod numerics_streaming;

#[path = "onnx_import.rs"]
mod onnx_import;

#[path = "optim.rs"]
mod optim;

#[path = "properties_nn.rs"]
mod properties_nn;

#[path = "properties_detect.rs"]
mod properties_detect;

#[path = "properties_norm.rs"]
mod properties_norm;

#[path = "renorm_ghost.rs"]
mod renorm_ghost;

#[path = "scenes.rs"]
mod scenes;

#[path = "segmentation.rs"]
mod segmentation;

#[path = "segmentation_ranks.rs"]
mod segmentation_ranks;

#[path = "sync_bn.rs"]
mod sync_bn;

#[path = "torch_twins.rs"]
mod torch_twins;

#[path = "train_e2e.rs"]
mod train_e2e;
