//! An image classification dataset, its per-channel statistics and the normalization built from them.
//!
//! Pixels stay `u8` in memory (Fashion-MNIST's 60 000 training images take 47 MB), or, for an image folder
//! larger than memory, stay on disk: a streaming dataset holds the file list and decodes each sample when a
//! batch is made ([`Dataset::from_files`]). Batches are converted to `f32` as `x / 255`, augmented in that
//! `[0, 1]` range, then normalized as `(x / 255 - mean) / std`.

use crate::{NvError, Result};
use ndarray::Array4;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

/// Images `(N, C, H, W)` as `u8`, one label per image, and the class names labels index into.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `N * C * H * W` pixels, sample-major, then channel, row, column.
    pub images: Vec<u8>,
    /// One label per sample, each `< classes.len()`.
    pub labels: Vec<usize>,
    /// Class names; label `k` is `classes[k]`.
    pub classes: Vec<String>,
    /// `(C, H, W)` of every sample.
    pub shape: [usize; 3],
    /// When set, sample `i` is image file `files[i]`, decoded (converted and resized to `shape`) when a batch
    /// is made, and `images` is empty: the dataset streams from disk.
    pub files: Option<Arc<Vec<PathBuf>>>,
}

impl Dataset {
    /// Builds a dataset, checking the pixel count, the label count and the label range.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<usize>,
        classes: Vec<String>,
        shape: [usize; 3],
    ) -> Result<Dataset> {
        if shape.contains(&0) {
            return Err(NvError::Config(format!(
                "dataset: sample shape (C, H, W) = {shape:?} must be positive"
            )));
        }
        if classes.is_empty() {
            return Err(NvError::Config("dataset: no classes".into()));
        }
        let per = shape.iter().product::<usize>();
        if images.len() != labels.len() * per {
            return Err(NvError::Config(format!(
                "dataset: {} labels of shape {shape:?} need {} pixels, got {}",
                labels.len(),
                labels.len() * per,
                images.len()
            )));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= classes.len()) {
            return Err(NvError::Config(format!(
                "dataset: label {l} at index {i} is out of range for {} classes",
                classes.len()
            )));
        }
        Ok(Dataset {
            images,
            labels,
            classes,
            shape,
            files: None,
        })
    }

    /// A streaming dataset: sample `i` is the PNG/JPEG file `files[i]` with label `labels[i]`, decoded when a
    /// batch is made. Nothing is read here; a file that cannot be decoded is an error of the batch (or of
    /// [`Dataset::mean_std`], which reads every file once).
    pub fn from_files(
        files: Vec<PathBuf>,
        labels: Vec<usize>,
        classes: Vec<String>,
        shape: [usize; 3],
    ) -> Result<Dataset> {
        if files.len() != labels.len() {
            return Err(NvError::Config(format!(
                "dataset: {} files but {} labels",
                files.len(),
                labels.len()
            )));
        }
        let mut d = Dataset::new(vec![], vec![], classes, shape)?;
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l >= d.classes.len())
        {
            return Err(NvError::Config(format!(
                "dataset: label {l} at index {i} is out of range for {} classes",
                d.classes.len()
            )));
        }
        d.labels = labels;
        d.files = Some(Arc::new(files));
        Ok(d)
    }

    /// Whether the samples are decoded from files as batches are made.
    pub fn is_streaming(&self) -> bool {
        self.files.is_some()
    }

    /// The pixels of sample `i` (`C * H * W`, channel-major): borrowed from memory, or decoded from its file.
    pub fn sample(&self, i: usize) -> Result<Cow<'_, [u8]>> {
        if i >= self.len() {
            return Err(NvError::Config(format!(
                "dataset: index {i} out of range for {} samples",
                self.len()
            )));
        }
        match &self.files {
            None => Ok(Cow::Borrowed(self.image(i))),
            Some(f) => {
                let [c, h, w] = self.shape;
                Ok(Cow::Owned(super::decode::load_image(&f[i], c, h, w)?))
            }
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
    pub fn channels(&self) -> usize {
        self.shape[0]
    }
    /// Pixels per sample, `C * H * W`.
    pub fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }
    /// The pixels of in-memory sample `i` (`C * H * W`, channel-major). Panics if `i >= len()`, like slice
    /// indexing, and on a streaming dataset (use [`Dataset::sample`]).
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(
            self.files.is_none(),
            "Dataset::image on a streaming dataset: use sample()"
        );
        let s = self.sample_len();
        &self.images[i * s..(i + 1) * s]
    }
    /// How many samples each class has.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for &l in &self.labels {
            c[l] += 1;
        }
        c
    }

    /// A new dataset holding the samples at `indices`, in that order (repeats allowed).
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        if let Some(&i) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(NvError::Config(format!(
                "dataset: index {i} out of range for {} samples",
                self.len()
            )));
        }
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        if let Some(f) = &self.files {
            let files = indices.iter().map(|&i| f[i].clone()).collect();
            return Dataset::from_files(files, labels, self.classes.clone(), self.shape);
        }
        let s = self.sample_len();
        let mut images = Vec::with_capacity(indices.len() * s);
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Ok(Dataset {
            images,
            labels,
            classes: self.classes.clone(),
            shape: self.shape,
            files: None,
        })
    }

    /// Samples `start..end`.
    pub fn slice(&self, start: usize, end: usize) -> Result<Dataset> {
        if start > end || end > self.len() {
            return Err(NvError::Config(format!(
                "dataset: slice {start}..{end} out of range for {} samples",
                self.len()
            )));
        }
        let idx: Vec<usize> = (start..end).collect();
        self.subset(&idx)
    }

    /// The first `min(k, len)` samples (`--limit k`).
    pub fn take(&self, k: usize) -> Dataset {
        self.slice(0, k.min(self.len())).expect("in range")
    }

    /// The samples whose label is in `keep`. Labels keep their original ids and the class list is unchanged,
    /// so a model's outputs still line up with `classes`. An out-of-range class id is an error.
    pub fn filter_classes(&self, keep: &[usize]) -> Result<Dataset> {
        if let Some(&k) = keep.iter().find(|&&k| k >= self.num_classes()) {
            return Err(NvError::Config(format!(
                "dataset: class {k} out of range for {} classes",
                self.num_classes()
            )));
        }
        let idx: Vec<usize> = (0..self.len())
            .filter(|&i| keep.contains(&self.labels[i]))
            .collect();
        self.subset(&idx)
    }

    /// The samples of classes `classes` (original label ids, in the order given), relabelled `0..K` in that
    /// order, with the class names to match (fine-tuning on a subset: `--classes 8,9`). A repeated or
    /// missing class, or a class with no sample, is an error naming it.
    pub fn select_classes(&self, classes: &[usize]) -> Result<Dataset> {
        if classes.is_empty() {
            return Err(NvError::Config("--classes: no class given".into()));
        }
        let mut counts = vec![0usize; self.num_classes()];
        for &l in &self.labels {
            counts[l] += 1;
        }
        for (i, &k) in classes.iter().enumerate() {
            if k >= self.num_classes() {
                return Err(NvError::Config(format!(
                    "--classes: class {k} does not exist: the data has {} classes (0..{})",
                    self.num_classes(),
                    self.num_classes() - 1
                )));
            }
            if classes[..i].contains(&k) {
                return Err(NvError::Config(format!(
                    "--classes: class {k} is given twice"
                )));
            }
            if counts[k] == 0 {
                return Err(NvError::Config(format!(
                    "--classes: class {k} ({}) has no sample in the data",
                    self.classes[k]
                )));
            }
        }
        let mut new_label = vec![usize::MAX; self.num_classes()];
        for (j, &k) in classes.iter().enumerate() {
            new_label[k] = j;
        }
        let idx: Vec<usize> = (0..self.len())
            .filter(|&i| new_label[self.labels[i]] != usize::MAX)
            .collect();
        let mut d = self.subset(&idx)?;
        d.labels.iter_mut().for_each(|l| *l = new_label[*l]);
        d.classes = classes.iter().map(|&k| self.classes[k].clone()).collect();
        Ok(d)
    }

    /// `n` samples of every class, chosen uniformly without replacement by `seed` (kept in data-set order); a
    /// class with fewer than `n` samples is an error naming it (`--per-class N`).
    pub fn per_class(&self, n: usize, seed: u64) -> Result<Dataset> {
        use rand::seq::SliceRandom;
        let mut by_class: Vec<Vec<usize>> = vec![vec![]; self.num_classes()];
        for (i, &l) in self.labels.iter().enumerate() {
            by_class[l].push(i);
        }
        let mut keep = vec![];
        for (k, idx) in by_class.iter_mut().enumerate() {
            if idx.is_empty() {
                continue;
            }
            if idx.len() < n {
                return Err(NvError::Config(format!(
                    "--per-class {n}: class {k} ({}) has only {} samples",
                    self.classes[k],
                    idx.len()
                )));
            }
            let mut rng = crate::rng::derive_rng(seed, k as u64, 0x7065_7263);
            idx.shuffle(&mut rng);
            keep.extend_from_slice(&idx[..n]);
        }
        keep.sort_unstable();
        self.subset(&keep)
    }

    /// Per-channel mean and (population) standard deviation of `x / 255` over every pixel of every sample,
    /// accumulated in `f64`. Compute it on the training set only. An empty dataset is an error.
    pub fn mean_std(&self) -> Result<Normalization> {
        if self.is_empty() {
            return Err(NvError::Config(
                "dataset: cannot compute mean/std of an empty dataset".into(),
            ));
        }
        let c = self.channels();
        let hw = self.shape[1] * self.shape[2];
        // Integer histogram per channel: exact, fast, independent of summation order.
        let add = |hist: &mut Vec<[u64; 256]>, img: &[u8]| {
            for (ch, plane) in img.chunks_exact(hw).enumerate() {
                let h = &mut hist[ch];
                for &p in plane {
                    h[p as usize] += 1;
                }
            }
        };
        let mut hist = vec![[0u64; 256]; c];
        if self.is_streaming() {
            // every file decoded once, in parallel, holding one image per thread
            hist = (0..self.len())
                .into_par_iter()
                .try_fold(
                    || vec![[0u64; 256]; c],
                    |mut h, i| -> Result<_> {
                        add(&mut h, &self.sample(i)?);
                        Ok(h)
                    },
                )
                .try_reduce(
                    || vec![[0u64; 256]; c],
                    |mut a, b| {
                        for (x, y) in a.iter_mut().zip(&b) {
                            x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                        }
                        Ok(a)
                    },
                )?;
        } else {
            for img in self.images.chunks_exact(c * hw) {
                add(&mut hist, img);
            }
        }
        let mut mean = Vec::with_capacity(c);
        let mut std = Vec::with_capacity(c);
        for h in &hist {
            let n: u64 = h.iter().sum();
            let m = h
                .iter()
                .enumerate()
                .map(|(v, &k)| v as f64 / 255.0 * k as f64)
                .sum::<f64>()
                / n as f64;
            let var = h
                .iter()
                .enumerate()
                .map(|(v, &k)| (v as f64 / 255.0 - m).powi(2) * k as f64)
                .sum::<f64>()
                / n as f64;
            mean.push(m as f32);
            std.push(var.sqrt() as f32);
        }
        Normalization::new(mean, std)
    }

    /// Copies samples `indices` into a `(B, C, H, W)` array of `x / 255` (no normalization). A streaming
    /// dataset decodes them in parallel (on the calling thread's rayon pool).
    pub fn batch_unit(&self, indices: &[usize]) -> Result<Array4<f32>> {
        let [c, h, w] = self.shape;
        let s = self.sample_len();
        let mut out = Array4::<f32>::zeros((indices.len(), c, h, w));
        let dst = out.as_slice_mut().expect("fresh array");
        let put = |d: &mut [f32], px: &[u8]| {
            for (d, &p) in d.iter_mut().zip(px) {
                *d = p as f32 / 255.0;
            }
        };
        if self.is_streaming() {
            dst.par_chunks_mut(s).zip(indices.par_iter()).try_for_each(
                |(d, &i)| -> Result<()> {
                    put(d, &self.sample(i)?);
                    Ok(())
                },
            )?;
        } else {
            for (k, &i) in indices.iter().enumerate() {
                put(&mut dst[k * s..(k + 1) * s], self.image(i));
            }
        }
        Ok(out)
    }

    /// Samples `indices` as a normalized `(B, C, H, W)` batch with their labels (no augmentation).
    pub fn batch(
        &self,
        indices: &[usize],
        norm: &Normalization,
    ) -> Result<(Array4<f32>, Vec<usize>)> {
        if let Some(&i) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(NvError::Config(format!(
                "dataset: index {i} out of range for {} samples",
                self.len()
            )));
        }
        let mut x = self.batch_unit(indices)?;
        norm.normalize(&mut x)?;
        Ok((x, indices.iter().map(|&i| self.labels[i]).collect()))
    }
}

/// Per-channel `mean` and `std` applied as `(x - mean) / std` to values already scaled to `[0, 1]`.
/// Saved with the model so evaluation and `predict` use the training set's statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// Checks one mean and one finite, positive std per channel.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Normalization> {
        let n = Normalization { mean, std };
        n.validate()?;
        Ok(n)
    }
    /// No-op normalization (mean 0, std 1) for `channels` channels.
    pub fn identity(channels: usize) -> Normalization {
        Normalization {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }
    /// Validates after deserialization.
    pub fn validate(&self) -> Result<()> {
        if self.mean.is_empty() || self.mean.len() != self.std.len() {
            return Err(NvError::Config(format!(
                "normalization: need one mean and one std per channel, got {} and {}",
                self.mean.len(),
                self.std.len()
            )));
        }
        if self.mean.iter().any(|m| !m.is_finite())
            || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(NvError::Config(format!(
                "normalization: mean must be finite and std finite and positive, got mean {:?} std {:?}",
                self.mean, self.std
            )));
        }
        Ok(())
    }
    pub fn channels(&self) -> usize {
        self.mean.len()
    }
    /// Normalizes a `(B, C, H, W)` batch of `[0, 1]` values in place.
    pub fn normalize(&self, x: &mut Array4<f32>) -> Result<()> {
        let c = x.shape()[1];
        if c != self.channels() {
            return Err(NvError::Channels {
                layer: "Normalization",
                expected: self.channels(),
                got: c,
                shape: x.shape().to_vec(),
            });
        }
        for ch in 0..c {
            let (m, s) = (self.mean[ch], self.std[ch]);
            x.index_axis_mut(ndarray::Axis(1), ch)
                .mapv_inplace(|v| (v - m) / s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Dataset {
        // 4 samples, 2 channels of 1x2 pixels
        Dataset::new(
            vec![
                0, 255, 10, 20, 255, 255, 30, 40, 0, 0, 50, 60, 51, 51, 70, 80,
            ],
            vec![0, 1, 2, 1],
            vec!["a".into(), "b".into(), "c".into()],
            [2, 1, 2],
        )
        .unwrap()
    }

    #[test]
    fn construction_checks() {
        assert!(Dataset::new(vec![0; 3], vec![0], vec!["a".into()], [1, 2, 2]).is_err());
        assert!(Dataset::new(vec![0; 4], vec![1], vec!["a".into()], [1, 2, 2]).is_err());
        assert!(Dataset::new(vec![], vec![], vec!["a".into()], [1, 0, 2]).is_err());
    }

    #[test]
    fn subsets() {
        let d = toy();
        assert_eq!(d.take(2).labels, vec![0, 1]);
        assert_eq!(d.take(10).len(), 4);
        let s = d.slice(1, 3).unwrap();
        assert_eq!(s.image(1), &[0, 0, 50, 60]);
        assert!(d.slice(3, 5).is_err());
        let f = d.filter_classes(&[1]).unwrap();
        assert_eq!(f.labels, vec![1, 1]);
        assert_eq!(f.image(1), &[51, 51, 70, 80]);
        assert_eq!(f.classes.len(), 3);
        assert!(d.filter_classes(&[3]).is_err());
        assert_eq!(d.class_counts(), vec![1, 2, 1]);
    }

    #[test]
    fn mean_std_and_normalize() {
        let d = toy();
        let n = d.mean_std().unwrap();
        let ch0: Vec<f64> = [0., 255., 255., 255., 0., 0., 51., 51.]
            .iter()
            .map(|v| v / 255.)
            .collect();
        let m0 = ch0.iter().sum::<f64>() / 8.0;
        let s0 = (ch0.iter().map(|v| (v - m0).powi(2)).sum::<f64>() / 8.0).sqrt();
        assert!((n.mean[0] as f64 - m0).abs() < 1e-7 && (n.std[0] as f64 - s0).abs() < 1e-7);
        let (x, y) = d.batch(&[2, 0], &n).unwrap();
        assert_eq!(y, vec![2, 0]);
        assert_eq!(x.shape(), &[2, 2, 1, 2]);
        let want = (50.0 / 255.0 - n.mean[1]) / n.std[1];
        assert!((x[[0, 1, 0, 0]] - want).abs() < 1e-6);
        assert!(Normalization::new(vec![0.5], vec![0.0]).is_err());
        let mut bad = Array4::zeros((1, 3, 1, 1));
        assert!(matches!(
            n.normalize(&mut bad),
            Err(NvError::Channels { .. })
        ));
        let empty = d.take(0);
        assert!(empty.mean_std().is_err());
    }
}
