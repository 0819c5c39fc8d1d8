//! The command line: the global options and every subcommand with its flags (clap derive); `main.rs` runs them.

use crate::args::{CorruptionArgs, DataArgs, TorchModelArgs, TrainArgs};
use crate::detect::DetArgs;
use crate::segment::{SegTestArgs, SegTrainArgs, TaskArg};
use crate::{bench_kernels, choice, finetune};
use clap::{Parser, Subcommand};
use normvision::model::{ModelKind, NormKind};
use normvision::nn::ConvChoice;
use normvision::Isa;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "normvision",
    version,
    about = "Batch normalization and its alternatives: train, evaluate and benchmark vision models on the CPU",
    long_about = "normvision trains convolutional networks with batch normalization (or GroupNorm, LayerNorm, InstanceNorm, \
Batch-Channel Norm, frozen BN, or none) on Fashion-MNIST, IDX files or image folders, with hand-written fused kernels.\n\n\
Quick start:\n  normvision train                 # reference CNN + BN on Fashion-MNIST, 5 epochs\n  \
normvision compare               # BN vs no normalization, side by side\n  \
normvision eval --checkpoint runs/cnn-batch/model.safetensors\n  \
normvision predict --checkpoint runs/cnn-batch/model.safetensors shoe.png"
)]
pub struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// 3x3 convolution algorithm (Winograd is 1.4-1.9x faster than direct on the reference CNN's layers on
    /// AVX-512; without AVX-512 every choice runs the direct convolution).
    #[arg(long, global = true, value_parser = choice::conv(), default_value = "winograd")]
    pub conv: ConvChoice,
    /// Instruction set for the hand-written kernels [default: the best this CPU has].
    #[arg(long, global = true, value_parser = choice::isa())]
    pub isa: Option<Isa>,
    /// Run every layer on its own, without the plan's fusions (for measuring what they buy).
    #[arg(long, global = true, hide = true)]
    pub no_fusion: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

// parsed once per process: boxing the big variants would buy nothing
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Cmd {
    /// Train a model (defaults: reference CNN with BatchNorm on Fashion-MNIST, SGD momentum 0.9, lr 0.05, 5 epochs).
    Train {
        #[command(flatten)]
        task: TaskArg,
        #[command(flatten)]
        train: TrainArgs,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        seg: SegTrainArgs,
        #[command(flatten)]
        det: DetArgs,
        /// Checkpoint path [default: runs/<model>-<norm>/model.safetensors].
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Continue the run of this checkpoint (same losses as an uninterrupted run).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// JSON-lines log [default: next to the checkpoint, .jsonl].
        #[arg(long)]
        log: Option<PathBuf>,
        /// Print the final report as JSON.
        #[arg(long)]
        json: bool,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
        /// Test-only fault hook: die (SIGKILL) halfway through the N-th checkpoint or log rewrite.
        #[arg(long, hide = true, value_name = "N")]
        fault_kill_in_write: Option<u64>,
        /// Data-parallel training over the ranks of an MPI job (`mpirun -np N normvision train --distributed`):
        /// each rank takes its slice of every global batch of --batch-size images, gradients are summed over
        /// the ranks, rank 0 logs and writes checkpoints. Threads per rank default to the cores divided by the
        /// ranks on the machine. Needs a build with `--features mpi`. Classification, --task segment and --task
        /// detect (whose ranks average their gradients, as DDP does).
        #[arg(long)]
        distributed: bool,
        /// Test-only: the size of each rank's slice of a global batch (e.g. 17,15 or 32,0).
        #[arg(long, hide = true, value_delimiter = ',')]
        shard_sizes: Option<Vec<usize>>,
    },
    /// Train the same network with each normalization and print a comparison table (the README's main job).
    Compare {
        #[command(flatten)]
        train: TrainArgs,
        #[command(flatten)]
        data: DataArgs,
        /// Normalizations to compare.
        #[arg(long, value_parser = choice::norm(), value_delimiter = ',', default_values = ["batch", "none"])]
        norms: Vec<NormKind>,
        /// Accuracy for the "steps to" column.
        #[arg(long, default_value_t = 0.9)]
        target: f64,
        /// Where checkpoints and logs go.
        #[arg(long, default_value = "runs/compare")]
        out_dir: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Evaluate a checkpoint, a PyTorch state dict (--weights with its model flags) or an ONNX model (--onnx) on
    /// the test set.
    Eval {
        /// A normvision checkpoint.
        #[arg(long, required_unless_present_any = ["weights", "onnx"], conflicts_with_all = ["weights", "onnx"])]
        checkpoint: Option<PathBuf>,
        /// A PyTorch state dict (safetensors) of the zoo model --model --norm --input --num-classes describe.
        #[arg(long, conflicts_with = "onnx")]
        weights: Option<PathBuf>,
        /// An ONNX model (torch.onnx.export, either exporter, or `normvision export --onnx`); its input size comes
        /// from the file, the input normalization from the file's normvision metadata or --mean/--std.
        #[arg(long)]
        onnx: Option<PathBuf>,
        #[command(flatten)]
        torch: TorchModelArgs,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        task: TaskArg,
        #[command(flatten)]
        seg: SegTestArgs,
        #[command(flatten)]
        det: DetArgs,
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// Fold each BatchNorm that follows a convolution or linear layer into it before evaluating (inference-only; the same
        /// outputs up to f32 rounding, one pass less per block).
        #[arg(long)]
        fold_bn: bool,
        #[command(flatten)]
        corruption: CorruptionArgs,
        /// Adapt BatchNorm online: each test batch is normalized with the N/n mix of the source statistics
        /// (weight N = --prior) and the batch's own (n = its images), layer by layer, independently of the other
        /// batches.
        #[arg(long, conflicts_with = "fold_bn")]
        adapt_bn: bool,
        /// The prior N of --adapt-bn, in samples: 0 uses each batch's statistics alone.
        #[arg(long, default_value_t = 16.0, requires = "adapt_bn")]
        prior: f64,
        #[arg(long)]
        json: bool,
    },
    /// Classify PNG/JPEG images with a checkpoint, a PyTorch state dict or an ONNX model (top-k classes with
    /// probabilities).
    Predict {
        /// A normvision checkpoint.
        #[arg(long, required_unless_present_any = ["weights", "onnx"], conflicts_with_all = ["weights", "onnx"])]
        checkpoint: Option<PathBuf>,
        /// A PyTorch state dict (safetensors) of the zoo model --model --norm --input --num-classes describe.
        #[arg(long, conflicts_with = "onnx")]
        weights: Option<PathBuf>,
        /// An ONNX model (torch.onnx.export, either exporter, or `normvision export --onnx`); its input size comes
        /// from the file, the input normalization from the file's normvision metadata or --mean/--std.
        #[arg(long)]
        onnx: Option<PathBuf>,
        #[command(flatten)]
        torch: TorchModelArgs,
        /// Image files; they are converted to the model's channels and resized to its input size (--task
        /// segment: taken whole, and a colour mask NAME.mask.png and an overlay NAME.overlay.png are written
        /// beside each).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        task: TaskArg,
        #[arg(long, default_value_t = 3)]
        top_k: usize,
        /// Class names, comma-separated (default: Fashion-MNIST's for 10-class grayscale models).
        #[arg(long, value_delimiter = ',')]
        classes: Option<Vec<String>>,
        /// Fold each BatchNorm that follows a convolution or linear layer into it before evaluating (inference-only; the same
        /// outputs up to f32 rounding, one pass less per block).
        #[arg(long)]
        fold_bn: bool,
        #[arg(long)]
        json: bool,
    },
    /// Turn a PyTorch state dict of a zoo model's twin (tools/gen_zoo_twins.py) into a normvision checkpoint.
    Import {
        /// The PyTorch state dict (safetensors, as safetensors.torch.save_file writes it).
        #[arg(long, value_name = "FILE")]
        torch: PathBuf,
        #[command(flatten)]
        model: TorchModelArgs,
        /// The checkpoint to write.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Write a checkpoint's model for other tools: --torch, a PyTorch state dict (safetensors), or --onnx, an ONNX
    /// model (eval mode, dynamic batch) that ONNX Runtime and `normvision ... --onnx` run.
    Export {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Write a PyTorch state dict.
        #[arg(long, required_unless_present = "onnx", conflicts_with = "onnx")]
        torch: bool,
        /// Write an ONNX model.
        #[arg(long)]
        onnx: bool,
        /// ONNX opset (13-21).
        #[arg(long, default_value_t = 17, requires = "onnx")]
        opset: i64,
        /// Fold each BatchNorm into the convolution or linear layer before it (for deployment).
        #[arg(long)]
        fold_bn: bool,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Fine-tune a checkpoint (--from) or a PyTorch state dict (--weights with its model flags): BatchNorm
    /// trained, frozen or in eval mode, a new head, a frozen backbone, a subset of classes, N images per class.
    Finetune {
        /// A normvision checkpoint.
        #[arg(long, required_unless_present = "weights", conflicts_with = "weights")]
        from: Option<PathBuf>,
        /// A PyTorch state dict (safetensors) of the zoo model --model --norm --input --num-classes describe.
        #[arg(long)]
        weights: Option<PathBuf>,
        #[command(flatten)]
        torch: TorchModelArgs,
        #[command(flatten)]
        finetune: finetune::FinetuneArgs,
        #[command(flatten)]
        data: DataArgs,
        /// The fine-tuned checkpoint.
        #[arg(long, short)]
        out: PathBuf,
        /// JSON-lines log [default: next to the checkpoint, .jsonl].
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Re-estimate a checkpoint's BatchNorm statistics on target images, without labels: AdaBN (target
    /// statistics, layer by layer, exact over any number of batches) or the N/n mix with the source statistics.
    Adapt {
        #[arg(long)]
        checkpoint: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Which split of the data holds the target images.
        #[arg(long, default_value = "test")]
        split: String,
        #[command(flatten)]
        corruption: CorruptionArgs,
        /// adabn or mix.
        #[arg(long, default_value = "adabn")]
        method: String,
        /// For --method mix: the weight N of the source statistics, in samples (mean = N/(N+n)·source +
        /// n/(N+n)·target, n the target images).
        #[arg(long)]
        prior: Option<f64>,
        #[arg(long, default_value_t = 500)]
        batch_size: usize,
        /// Use only the first K target images.
        #[arg(long, value_name = "K")]
        limit: Option<usize>,
        /// The adapted checkpoint.
        #[arg(long, short)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Measure a published claim about BatchNorm, with the paper's number beside ours and a verdict:
    /// convergence, mlp-sigmoid, init, batch-size, regularization, landscape, shift, finetune, seg-norm,
    /// det-norm, or all of them (`all`). Writes NAME.md, NAME.json and NAME.png/.svg; each setting's result is cached under OUT/runs, so
    /// an interrupted run resumes.
    Experiment {
        /// convergence, mlp-sigmoid, init, batch-size, regularization, landscape, shift, finetune, seg-norm,
        /// det-norm or all.
        name: String,
        /// The short version (about a minute, on subsets).
        #[arg(long, conflicts_with = "full")]
        quick: bool,
        /// The full version (the default).
        #[arg(long)]
        full: bool,
        /// Seeds per setting (default: the experiment's).
        #[arg(long, default_value_t = 0)]
        seeds: usize,
        /// Output directory [default: runs/experiments].
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Fashion-MNIST directory [default: /usr/share/datasets/fashion-mnist].
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Assemble docs/RESULTS.md, the claim-by-claim table (the paper's number, ours, the verdict and why) with the
    /// plots, from the experiments' committed reports and docs/claims.json, without re-running anything.
    Report {
        /// The papers' numbers.
        #[arg(long, default_value = "docs/claims.json")]
        claims: PathBuf,
        /// The experiments' reports (NAME.json).
        #[arg(long, default_value = "docs/results/experiments")]
        results: PathBuf,
        /// Where to write the Markdown.
        #[arg(long, short, default_value = "docs/RESULTS.md")]
        out: PathBuf,
    },
    /// Write a corrupted copy of a data set as IDX files (MNIST layout; (N, C, H, W) for colour), the images
    /// `eval --corruption` evaluates; --list prints every corruption's five severity parameters.
    Corrupt {
        /// NAME:SEVERITY, severity 1-5.
        #[arg(long, value_name = "NAME:SEVERITY", required_unless_present = "list")]
        corruption: Option<String>,
        /// Seed of the corruption's random draws.
        #[arg(long, default_value_t = 0, value_name = "SEED")]
        corruption_seed: u64,
        #[command(flatten)]
        data: DataArgs,
        /// train, test or both.
        #[arg(long, default_value = "both")]
        split: String,
        /// The output directory (train-images-idx3-ubyte, t10k-images-idx3-ubyte and their labels).
        #[arg(long, short, required_unless_present = "list")]
        out: Option<PathBuf>,
        /// Print the severity table and exit.
        #[arg(long)]
        list: bool,
        #[arg(long)]
        json: bool,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Generate garment scenes for segmentation and detection: 1-4 Fashion-MNIST garments (scaled 0.75-1.5x,
    /// random positions and z-order) over a textured background; PNG images, Pascal-VOC-palette class masks
    /// (0 background, 1-10 garments, 255 the ignored edges) and a COCO annotations.json of the visible boxes.
    Scenes {
        /// The output directory (images/, masks/, annotations.json, scenes.json).
        #[arg(long, short)]
        out: PathBuf,
        /// Canvas side in pixels (at least 42).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Number of scenes.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Scene i is a function of (seed, i) only.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The Fashion-MNIST split the garments come from: train scenes from train, test scenes from test.
        #[arg(long, value_parser = ["train", "test"], default_value = "train")]
        split: String,
        /// Fashion-MNIST (or any MNIST-format IDX) directory [default: /usr/share/datasets/fashion-mnist].
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Evaluate box detections as COCO does (pycocotools' COCOeval, iouType bbox): AP@[.5:.95], AP50, AP75,
    /// AP small/medium/large, AR@1/10/100 and AR small/medium/large, printed in pycocotools' order.
    CocoEval {
        /// Ground truth: a COCO annotations.json (images, categories, annotations).
        #[arg(long)]
        gt: PathBuf,
        /// Detections in COCO's result format: a JSON list of {image_id, category_id, bbox [x,y,w,h], score}.
        #[arg(long)]
        dets: PathBuf,
        /// One JSON object (the twelve numbers by name, and AP per category) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Training and inference throughput (images/s) on synthetic 28x28 batches.
    Bench {
        #[command(flatten)]
        task: TaskArg,
        /// --task segment: image side (the default deeplabv3 on batch x 1 x side x side; --batch-size defaults
        /// to 8 there).
        #[arg(long, default_value_t = 64)]
        side: usize,
        #[arg(long, value_parser = choice::model(), default_value = "cnn")]
        model: ModelKind,
        #[arg(long, value_parser = choice::norm(), default_value = "batch")]
        norm: NormKind,
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
        /// Timed steps (median reported).
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// train, eval or both.
        #[arg(long, default_value = "both")]
        mode: String,
        /// Time eval with each BatchNorm folded into the convolution or linear layer before it (after the train timing).
        #[arg(long)]
        fold_bn: bool,
        /// Also print where a step's time goes: wall-clock milliseconds per step for each top-level layer's
        /// forward and backward (summed over the timed steps, divided by their number); with --inference, for
        /// each step of the inference plan, from a second series of calls.
        #[arg(long)]
        profile: bool,
        /// Time deployment inference instead: the model folded, at batch 1 and --batch-size, each call timed
        /// (throughput from the median call, latency p50/p99); batch 1 makes 10x --steps calls.
        #[arg(long)]
        inference: bool,
        /// Time an ONNX model's inference (implies --inference; --model and --norm are ignored).
        #[arg(long)]
        onnx: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print the plan the engine compiles for a zoo model: one line per step (its nodes, fusions and convolution
    /// algorithm), and the activation memory it plans.
    Plan {
        #[arg(long, value_parser = choice::model(), default_value = "cnn")]
        model: ModelKind,
        #[arg(long, value_parser = choice::norm(), default_value = "batch")]
        norm: NormKind,
        #[arg(long, default_value_t = 128)]
        batch_size: usize,
        /// train (batch statistics, activations kept for the backward), eval (running statistics, kept too) or
        /// inference (eval with the inference fusions, nothing kept).
        #[arg(long, default_value = "train")]
        mode: String,
        #[arg(long)]
        json: bool,
    },
    /// Time the normalization kernels (train forward, forward+backward, eval) on the benchmark shapes.
    BenchKernels {
        /// Comma-separated ops: batch_norm, group_norm, layer_norm, instance_norm.
        #[arg(long, value_delimiter = ',', default_values_t = bench_kernels::OPS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
        ops: Vec<String>,
        /// Comma-separated modes: train_fwd, train_fwd_bwd, eval_fwd.
        #[arg(long, value_delimiter = ',', default_values_t = bench_kernels::MODES.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
        modes: Vec<String>,
        /// Comma-separated shapes such as 64x32x28x28,512x1024 (default: the benchmark grid).
        #[arg(long, value_delimiter = ',')]
        shapes: Vec<String>,
        #[arg(long, default_value_t = 30)]
        reps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}
