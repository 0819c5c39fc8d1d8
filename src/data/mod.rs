//! Data: IDX (MNIST-format) files, Fashion-MNIST, image folders, an in-memory [`Dataset`] with its
//! [`Normalization`], augmentation, and a prefetching, resumable [`DataLoader`].
//!
//! A test set can be corrupted ([`Corruption`], eight kinds at severities 1-5) to measure covariate shift.
//!
//! Pixels flow as `u8` → `x / 255` → [`Augment`] (training only) → `(x - mean) / std` → `(B, C, H, W)` `f32`.

pub mod augment;
pub mod corrupt;
pub mod dataset;
pub mod decode;
pub mod fashion_mnist;
pub mod idx;
pub mod image_folder;
pub mod loader;
pub mod scenes;

pub use augment::Augment;
pub use corrupt::{Corruption, CorruptionKind};
pub use dataset::{Dataset, Normalization};
pub use image_folder::{load_image_folder, load_image_for_model, stream_image_folder};
pub use loader::{Batch, DataLoader, EpochIter, LoaderConfig, Shard};
