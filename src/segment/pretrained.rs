//! `--backbone-from CKPT`: a classification checkpoint of the backbone's architecture (`normvision train
//! --model resnet14`, any `--norm` that matches `--backbone-norm`) initializes the segmentation network's
//! backbone, as torchvision's `deeplabv3_resnet50(weights_backbone=...)` loads ImageNet weights: every tensor
//! of the classifier but its head (`fc.*`) goes to `backbone.<name>`. Loading is strict both ways (a backbone
//! tensor the file lacks, or a file tensor the backbone has no slot for, is an error naming the key), except
//! that a BatchNorm's `num_batches_tracked` is dropped where the backbone's norm is FrozenBatchNorm, which
//! keeps only the statistics and the affine.

use crate::model::Graph;
use crate::state::{StateDict, Stateful};
use crate::train::checkpoint;
use crate::{NvError, Result};
use std::path::Path;

/// Loads the classifier checkpoint at `path` into the `backbone.*` tensors of `graph`; returns how many
/// tensors were loaded.
pub fn load_backbone(graph: &mut Graph, path: &Path) -> Result<usize> {
    let ck = checkpoint::load(path)?;
    load_backbone_state(graph, &ck.model_state, &path.display().to_string())
}

/// [`load_backbone`] from a classifier's state dict in memory (`source` names it in errors).
pub fn load_backbone_state(graph: &mut Graph, sd: &StateDict, source: &str) -> Result<usize> {
    let own = graph.state_dict();
    let backbone: Vec<&String> = own.keys().filter(|k| k.starts_with("backbone.")).collect();
    let mut mapped = StateDict::new();
    let mut unexpected = vec![];
    for (k, v) in &sd.tensors {
        if k.starts_with("fc.") {
            continue;
        }
        let key = format!("backbone.{k}");
        if own.get(&key).is_some() {
            mapped.tensors.insert(key, v.clone());
        } else if !k.ends_with("num_batches_tracked") {
            unexpected.push(k.clone());
        }
    }
    let missing: Vec<&&String> = backbone
        .iter()
        .filter(|k| mapped.get(k).is_none())
        .collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(NvError::State(format!(
            "{source}: not a classifier of this backbone (train one with `normvision train --model resnet14 \
             --norm` matching --backbone-norm): {} backbone tensors missing from the file{}; {} tensors of \
             the file have no place in the backbone{}",
            missing.len(),
            list(missing.iter().map(|k| k.as_str())),
            unexpected.len(),
            list(unexpected.iter().map(|k| k.as_str()))
        )));
    }
    for (k, v) in &mapped.tensors {
        let want = own.get(k).expect("mapped keys exist").shape();
        if v.shape() != want {
            return Err(NvError::State(format!(
                "{source}: {k} has shape {:?} in the file, the backbone's is {want:?} (a classifier with \
                 other widths or input channels?)",
                v.shape()
            )));
        }
    }
    // the rest of the network keeps its own tensors
    let mut full = own.clone();
    for (k, v) in mapped.tensors.iter() {
        full.tensors.insert(k.clone(), v.clone());
    }
    graph.load_strict(&full)?;
    Ok(mapped.tensors.len())
}

fn list<'a>(keys: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = keys.take(6).collect();
    if v.is_empty() {
        String::new()
    } else {
        format!(
            " ({}{})",
            v.join(", "),
            if v.len() == 6 { ", ..." } else { "" }
        )
    }
}
