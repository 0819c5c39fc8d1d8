//! COCO-format ground truth (`annotations.json`) and detection results (a JSON list in COCO's result format), read
//! with errors that name the file and the key.
//!
//! Only what box evaluation and detection training need is read: images (id, file name, size), categories,
//! and annotations' `bbox`, `area`, `iscrowd` and ids. Ids are JSON integers, as in COCO. A missing
//! `iscrowd` counts as 0 (pycocotools would raise a `KeyError`); a missing `area` is the box's `w·h`.

use crate::{NvError, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// An image of a COCO data set.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoImage {
    pub id: i64,
    pub file_name: String,
    pub width: usize,
    pub height: usize,
}

/// A category of a COCO data set.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoCategory {
    pub id: i64,
    pub name: String,
}

/// A ground-truth object: `bbox` is `[x, y, w, h]` in pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoAnnotation {
    pub id: i64,
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    /// What COCO's area ranges compare: the object's area (for the garment scenes its visible pixels), which
    /// need not be the box's.
    pub area: f64,
    pub iscrowd: bool,
}

/// A ground-truth data set (`annotations.json`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CocoDataset {
    pub images: Vec<CocoImage>,
    pub categories: Vec<CocoCategory>,
    pub annotations: Vec<CocoAnnotation>,
}

/// One detection in COCO's result format: `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CocoDetection {
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    pub score: f64,
}

fn bad(path: &Path, msg: impl Into<String>) -> NvError {
    NvError::Format {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| NvError::io(path, "read", e))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(path, format!("not valid JSON: {e}")))
}

fn int(path: &Path, v: &Value, key: &str, at: &str) -> Result<i64> {
    match v.get(key) {
        Some(x) => x
            .as_i64()
            .ok_or_else(|| bad(path, format!("{at}.{key}: expected an integer, got {x}"))),
        None => Err(bad(path, format!("{at}: missing key \"{key}\""))),
    }
}

fn finite(path: &Path, x: &Value, what: &str) -> Result<f64> {
    match x.as_f64() {
        Some(f) if f.is_finite() => Ok(f),
        _ => Err(bad(
            path,
            format!("{what}: expected a finite number, got {x}"),
        )),
    }
}

fn bbox(path: &Path, v: &Value, at: &str) -> Result<[f64; 4]> {
    let b = v
        .get("bbox")
        .ok_or_else(|| bad(path, format!("{at}: missing key \"bbox\"")))?;
    let arr = b
        .as_array()
        .filter(|a| a.len() == 4)
        .ok_or_else(|| bad(path, format!("{at}.bbox: expected [x, y, w, h], got {b}")))?;
    let mut out = [0.0; 4];
    for (k, x) in arr.iter().enumerate() {
        out[k] = finite(path, x, &format!("{at}.bbox[{k}]"))?;
    }
    if out[2] < 0.0 || out[3] < 0.0 {
        return Err(bad(
            path,
            format!("{at}.bbox: negative width or height in {b}"),
        ));
    }
    Ok(out)
}

fn list<'a>(path: &Path, root: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    root.get(key)
        .ok_or_else(|| bad(path, format!("missing key \"{key}\"")))?
        .as_array()
        .ok_or_else(|| bad(path, format!("\"{key}\" is not a list")))
}

impl CocoDataset {
    /// Reads a COCO `annotations.json`: `images`, `categories` and `annotations` must be present. Duplicate
    /// image, category or annotation ids, and annotations of unknown images or categories, are errors.
    pub fn load(path: &Path) -> Result<CocoDataset> {
        let root = read_json(path)?;
        Self::from_json(&root, path)
    }

    /// [`CocoDataset::load`] from parsed JSON; `path` only names the source in errors.
    pub fn from_json(root: &Value, path: &Path) -> Result<CocoDataset> {
        let mut ds = CocoDataset::default();
        let mut seen = std::collections::HashSet::new();
        for (i, im) in list(path, root, "images")?.iter().enumerate() {
            let at = format!("images[{i}]");
            let id = int(path, im, "id", &at)?;
            if !seen.insert(id) {
                return Err(bad(path, format!("{at}: duplicate image id {id}")));
            }
            let dim = |key: &str| -> Result<usize> {
                match im.get(key) {
                    None => Ok(0),
                    Some(x) => x
                        .as_u64()
                        .map(|v| v as usize)
                        .ok_or_else(|| bad(path, format!("{at}.{key}: expected a size, got {x}"))),
                }
            };
            ds.images.push(CocoImage {
                id,
                file_name: im
                    .get("file_name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                width: dim("width")?,
                height: dim("height")?,
            });
        }
        let mut cats = std::collections::HashSet::new();
        for (i, c) in list(path, root, "categories")?.iter().enumerate() {
            let at = format!("categories[{i}]");
            let id = int(path, c, "id", &at)?;
            if !cats.insert(id) {
                return Err(bad(path, format!("{at}: duplicate category id {id}")));
            }
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            ds.categories.push(CocoCategory {
                id,
                name: name.to_string(),
            });
        }
        let mut anns = std::collections::HashSet::new();
        for (i, a) in list(path, root, "annotations")?.iter().enumerate() {
            let at = format!("annotations[{i}]");
            let id = int(path, a, "id", &at)?;
            if !anns.insert(id) {
                return Err(bad(path, format!("{at}: duplicate annotation id {id}")));
            }
            let image_id = int(path, a, "image_id", &at)?;
            if !seen.contains(&image_id) {
                return Err(bad(
                    path,
                    format!("{at}: image_id {image_id} is not in \"images\""),
                ));
            }
            let category_id = int(path, a, "category_id", &at)?;
            if !cats.contains(&category_id) {
                return Err(bad(
                    path,
                    format!("{at}: category_id {category_id} is not in \"categories\""),
                ));
            }
            let bbox = bbox(path, a, &at)?;
            let area = match a.get("area") {
                Some(x) => finite(path, x, &format!("{at}.area"))?,
                None => bbox[2] * bbox[3],
            };
            let iscrowd = match a.get("iscrowd") {
                None => false,
                Some(x) => match (x.as_u64(), x.as_bool()) {
                    (Some(v), _) => v != 0,
                    (_, Some(b)) => b,
                    _ => return Err(bad(path, format!("{at}.iscrowd: expected 0 or 1, got {x}"))),
                },
            };
            ds.annotations.push(CocoAnnotation {
                id,
                image_id,
                category_id,
                bbox,
                area,
                iscrowd,
            });
        }
        Ok(ds)
    }

    /// The position of each image id in [`CocoDataset::images`].
    pub fn image_index(&self) -> HashMap<i64, usize> {
        self.images
            .iter()
            .enumerate()
            .map(|(k, im)| (im.id, k))
            .collect()
    }
}

/// Reads detections in COCO's result format (a JSON list). As in pycocotools' `loadRes`, every `image_id` must
/// be an image of `gt`; a detection of a category that `gt` does not have is kept here and skipped by the
/// evaluation, as pycocotools skips it.
pub fn load_detections(path: &Path, gt: &CocoDataset) -> Result<Vec<CocoDetection>> {
    detections_from_json(&read_json(path)?, path, gt)
}

/// [`load_detections`] from parsed JSON; `path` only names the source in errors.
pub fn detections_from_json(
    root: &Value,
    path: &Path,
    gt: &CocoDataset,
) -> Result<Vec<CocoDetection>> {
    let arr = root.as_array().ok_or_else(|| {
        bad(
            path,
            "expected a JSON list of detections (COCO's result format)",
        )
    })?;
    let images = gt.image_index();
    let mut out = Vec::with_capacity(arr.len());
    for (i, d) in arr.iter().enumerate() {
        let at = format!("[{i}]");
        let image_id = int(path, d, "image_id", &at)?;
        if !images.contains_key(&image_id) {
            return Err(bad(
                path,
                format!("{at}: image_id {image_id} is not an image of the ground truth"),
            ));
        }
        let category_id = int(path, d, "category_id", &at)?;
        let bbox = bbox(path, d, &at)?;
        let score = finite(
            path,
            d.get("score")
                .ok_or_else(|| bad(path, format!("{at}: missing key \"score\"")))?,
            &format!("{at}.score"),
        )?;
        out.push(CocoDetection {
            image_id,
            category_id,
            bbox,
            score,
        });
    }
    Ok(out)
}
