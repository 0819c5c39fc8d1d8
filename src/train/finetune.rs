//! Fine-tuning a trained model: what happens to its BatchNorms, which parameters stay frozen, and a new
//! classifier head. The data side (`--classes`, `--per-class`) is [`crate::data::Dataset::select_classes`] and
//! [`crate::data::Dataset::per_class`]; the run itself is [`crate::train::train_model`].
//!
//! | `--bn` | forward in training | running statistics | weight, bias | PyTorch equivalent |
//! |---|---|---|---|---|
//! | `train` | batch statistics | updated | trained | `model.train()` |
//! | `frozen` | running statistics | fixed | fixed | torchvision `FrozenBatchNorm2d` |
//! | `eval-stats` | running statistics | fixed | trained | `bn.eval()` for every BN, rest in train mode |
//!
//! `frozen` and `eval-stats` replace every BatchNorm by a [`crate::norm::FrozenBatchNorm`] (with a trainable
//! affine for `eval-stats`), so a checkpoint of the result records them in its architecture, and a resumed or
//! evaluated model behaves the same. `freeze_backbone` freezes every node with parameters or buffers but the classifier
//! ([`Graph::set_frozen`]): its parameters are not optimized and get no gradient; BatchNorms under `--bn train`
//! still update their statistics, as in PyTorch with `requires_grad_(False)`.

use crate::model::Graph;
use crate::nn::{Linear, LinearConfig};
use crate::{NvError, Result};
use serde::{Deserialize, Serialize};

/// What fine-tuning does to the BatchNorms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BnMode {
    Train,
    Frozen,
    EvalStats,
}

impl std::str::FromStr for BnMode {
    type Err = NvError;
    fn from_str(s: &str) -> Result<BnMode> {
        match s {
            "train" => Ok(BnMode::Train),
            "frozen" => Ok(BnMode::Frozen),
            "eval-stats" => Ok(BnMode::EvalStats),
            o => Err(NvError::Config(format!(
                "--bn must be train, frozen or eval-stats, got {o:?}"
            ))),
        }
    }
}

impl BnMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BnMode::Train => "train",
            BnMode::Frozen => "frozen",
            BnMode::EvalStats => "eval-stats",
        }
    }
}

/// How a fine-tuned model was made; stored in its checkpoints' run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneRecord {
    /// The source checkpoint or state dict.
    pub from: String,
    pub bn: BnMode,
    pub freeze_backbone: bool,
    /// The classes of the new head, when one was made.
    pub new_head: Option<usize>,
    /// The original label ids the model was fine-tuned on (`--classes`), in output order.
    pub classes: Option<Vec<usize>>,
    /// Their names, in output order.
    pub class_names: Vec<String>,
    pub per_class: Option<usize>,
    /// The BatchNorms turned into FrozenBatchNorms and the nodes frozen, by name.
    pub converted_batch_norms: Vec<String>,
    pub frozen_nodes: Vec<String>,
}

/// What [`prepare`] changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub converted_batch_norms: Vec<String>,
    pub frozen_nodes: Vec<String>,
    /// The classifier node.
    pub head: String,
}

/// Prepares `graph` for fine-tuning: a fresh classifier of `new_head` classes (PyTorch's default `nn.Linear`
/// initialization, drawn from `seed`), the BatchNorms per `bn`, and every node but the classifier frozen when
/// `freeze_backbone`. `--bn frozen` or `eval-stats` on a model without BatchNorm is an error, as is a graph
/// whose output is not computed by a Linear classifier when a new head or a frozen backbone is asked for.
pub fn prepare(
    graph: &mut Graph,
    bn: BnMode,
    freeze_backbone: bool,
    new_head: Option<usize>,
    seed: u64,
) -> Result<Prepared> {
    let head = graph.classifier().map(str::to_string);
    let need_head = || {
        head.clone().ok_or_else(|| {
            NvError::Config(
                "the model's output does not come from a Linear classifier, so --new-head and \
                 --freeze-backbone have no head to work on"
                    .into(),
            )
        })
    };
    if let Some(k) = new_head {
        if k == 0 {
            return Err(NvError::Config(
                "--new-head must be at least 1 class".into(),
            ));
        }
        let name = need_head()?;
        let old = graph
            .node(&name)
            .and_then(|n| n.layer_as::<Linear>())
            .expect("classifier() found a Linear");
        let cfg = LinearConfig::new(old.config().in_features, k).bias(old.config().bias);
        let mut rng = crate::rng::derive_rng(seed, 0, 0x6865_6164);
        graph.replace_layer(&name, Box::new(cfg.build::<f32>(&mut rng)?))?;
    }
    let converted = match bn {
        BnMode::Train => vec![],
        BnMode::Frozen | BnMode::EvalStats => {
            let c = graph.freeze_batch_norms(bn == BnMode::EvalStats)?;
            if c.is_empty() {
                return Err(NvError::Config(format!(
                    "--bn {}: the model has no BatchNorm to freeze",
                    bn.as_str()
                )));
            }
            c
        }
    };
    let mut frozen = vec![];
    if freeze_backbone {
        let head = need_head()?;
        let names: Vec<String> = graph
            .nodes()
            .iter()
            .filter(|n| n.name() != head)
            .filter(|n| n.has_state())
            .map(|n| n.name().to_string())
            .collect();
        for n in names {
            graph.set_frozen(&n, true)?;
            frozen.push(n);
        }
    }
    Ok(Prepared {
        converted_batch_norms: converted,
        frozen_nodes: frozen,
        head: head.unwrap_or_default(),
    })
}
