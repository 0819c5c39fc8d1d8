#!/usr/bin/env python3
"""Generate the golden PyTorch fixtures that normvision's tests compare against.

Run it through the wrapper, which finds (or creates) a Python with torch:

    bash tools/gen_fixtures.sh                  # every family
    bash tools/gen_fixtures.sh --family norm    # one family
    bash tools/gen_fixtures.sh --only bn1d_2x3  # selected cases (repeatable)
    bash tools/gen_fixtures.sh --list           # print the case names

Output: tests/fixtures/<family>/<case>.safetensors, one file per case. The safetensors
files are written by hand (see `write_safetensors`), so only torch and numpy are needed.

All computations are float32 on the CPU with one thread, seeded per case from the case
name (crc32), so regenerating gives the same files for the same torch version.

Layout of a "step" fixture (the norm family; see tests/fixtures/norm/README.md):

    __metadata__["meta"] = JSON {"layer", "config", "input_shape_per_step", "steps", "torch_version"}
    init.<name>           every parameter and buffer before step 0 (PyTorch state-dict names)
    x.<k>, dy.<k>         input and upstream gradient of step k
    y.<k>                 forward output of step k in that step's mode ("train" / "eval")
    dx.<k>                d/dx of (y.<k> * dy.<k>).sum()
    grad.<k>.<param>      gradient of each parameter from step k alone (grads zeroed before each step)
    state.<k>.<buffer>    running_mean / running_var / num_batches_tracked after step k

Parameters are never updated between steps; only the buffers evolve.

To add a family (conv, pooling, linear, loss, whole networks): write a function that
returns a list of objects with a `.name` and a `.generate() -> (tensors, meta)` method
(`StepCase` below fits any module applied to a sequence of inputs) and register it in
FAMILIES.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures"

# --------------------------------------------------------------------------------------
# safetensors, written and read with numpy only
# --------------------------------------------------------------------------------------

_ST_DTYPES = {np.dtype("float32"): ("F32", "<f4"), np.dtype("int64"): ("I64", "<i8")}
_ST_NP = {"F32": "<f4", "I64": "<i8"}


def to_numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().contiguous().numpy()
    a = np.asarray(t)
    if a.dtype not in _ST_DTYPES:
        raise TypeError(f"unsupported dtype {a.dtype} (only float32 and int64 are written)")
    return a


def write_safetensors(path: Path, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Write `tensors` (name -> float32/int64 array) in the safetensors format.

    Format: u64 little-endian header length N, N bytes of JSON header (padded with spaces
    so that 8 + N is a multiple of 8), then the raw little-endian tensor data. The header maps
    each name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
    start of the data) and "__metadata__" to a string -> string map. Data is laid out with the
    8-byte dtypes first so every tensor is aligned to its element size.
    """
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("__metadata__ must map str -> str")
    names = list(tensors)
    names.sort(key=lambda n: -tensors[n].dtype.itemsize)  # stable: keeps insertion order within a dtype
    header: Dict[str, object] = {"__metadata__": dict(metadata)}
    chunks: List[bytes] = []
    offset = 0
    for name in names:
        a = tensors[name]
        st_dtype, np_dtype = _ST_DTYPES[a.dtype]
        data = np.ascontiguousarray(a, dtype=np_dtype).tobytes()
        header[name] = {
            "dtype": st_dtype,
            "shape": [int(s) for s in a.shape],
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((-len(hbytes)) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(hbytes).to_bytes(8, "little"))
        f.write(hbytes)
        for c in chunks:
            f.write(c)
    tmp.replace(path)


def read_safetensors(path: Path) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Read a file written by `write_safetensors` (used to verify what was written)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    data = raw[8 + n :]
    meta = header.pop("__metadata__", {}) or {}
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    pos = 0
    for b, e in spans:
        assert b == pos and e >= b, f"{path}: data offsets are not contiguous"
        pos = e
    assert pos == len(data), f"{path}: data length {len(data)} != {pos}"
    out = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype=_ST_NP[info["dtype"]]).reshape(info["shape"])
    return out, meta


# --------------------------------------------------------------------------------------
# Generic "one module, a sequence of steps" fixture
# --------------------------------------------------------------------------------------

# Buffers that are module *state* (written as state.<k>.<name> after each step). Other
# buffers (e.g. the fixed weight/bias of FrozenBatchNorm2d) appear only under init.*.
STATE_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def case_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def random_input(shape: Sequence[int], channel_axis: int) -> torch.Tensor:
    """randn * scale_c + offset_c with per-channel scale ~ U(0.5, 2) and offset ~ N(0, 1.5)."""
    c = shape[channel_axis]
    bshape = [1] * len(shape)
    bshape[channel_axis] = c
    scale = torch.empty(c).uniform_(0.5, 2.0).view(bshape)
    offset = (torch.randn(c) * 1.5).view(bshape)
    return torch.randn(*shape) * scale + offset


def randomize_affine(module: nn.Module) -> None:
    """weight ~ U(0.5, 1.5), bias ~ N(0, 0.5) for every parameter called weight / bias."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "weight":
                p.uniform_(0.5, 1.5)
            elif name == "bias":
                p.normal_(0.0, 0.5)


@dataclass
class StepCase:
    name: str
    layer: str
    config: dict
    build: Callable[[], nn.Module]
    steps: List[str]
    shape: Tuple[int, ...]
    forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
    init: Optional[Callable[[nn.Module], None]] = None  # runs after randomize_affine
    channel_axis: int = 1
    shapes: Optional[List[Tuple[int, ...]]] = None  # per step; defaults to [shape] * len(steps)
    extra_meta: dict = field(default_factory=dict)

    def generate(self) -> Tuple[Dict[str, np.ndarray], dict]:
        torch.manual_seed(case_seed(self.name))
        module = self.build()
        randomize_affine(module)
        if self.init is not None:
            with torch.no_grad():
                self.init(module)
        forward = self.forward or (lambda m, x: m(x))
        shapes = self.shapes or [self.shape] * len(self.steps)
        assert len(shapes) == len(self.steps)

        t: Dict[str, torch.Tensor] = {}
        params = dict(module.named_parameters())
        for n, p in params.items():
            t[f"init.{n}"] = p.detach().clone()
        for n, b in module.named_buffers():
            t[f"init.{n}"] = b.detach().clone()

        for k, (mode, shape) in enumerate(zip(self.steps, shapes)):
            assert mode in ("train", "eval"), mode
            module.train(mode == "train")
            x = random_input(shape, self.channel_axis).requires_grad_()
            dy = torch.randn(*shape)
            for p in params.values():
                p.grad = None
            y = forward(module, x)
            assert y.shape == x.shape, (y.shape, x.shape)
            (y * dy).sum().backward()
            t[f"x.{k}"] = x.detach().clone()
            t[f"dy.{k}"] = dy
            t[f"y.{k}"] = y.detach().clone()
            t[f"dx.{k}"] = x.grad.detach().clone()
            for n, p in params.items():
                if p.grad is None:
                    raise RuntimeError(f"{self.name}: step {k}: no gradient for {n}")
                t[f"grad.{k}.{n}"] = p.grad.detach().clone()
            for n, b in module.named_buffers():
                if n in STATE_BUFFERS:
                    t[f"state.{k}.{n}"] = b.detach().clone()

        meta = {
            "layer": self.layer,
            "config": self.config,
            "input_shape_per_step": [list(s) for s in shapes],
            "steps": list(self.steps),
            "torch_version": torch.__version__,
        }
        meta.update(self.extra_meta)
        return {k: to_numpy(v) for k, v in t.items()}, meta


# --------------------------------------------------------------------------------------
# Norm family: reference modules not in torch.nn
# --------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d, inlined (eps=1e-5 default, all four are buffers)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class BatchChannelNorm(nn.Module):
    """Batch-Channel Normalization (Khaled et al. 2023, arXiv:2312.00596).

    y = weight_c * (l_c * x_bn + (1 - l_c) * x_ln) + bias_c, where
      x_bn: per channel over (N, spatial); batch statistics (biased variance) in train,
            running statistics in eval; running stats follow PyTorch BatchNorm exactly
            (momentum, or 1/num_batches_tracked if None; unbiased running variance);
      x_ln: per sample over (C, spatial), biased variance, same eps, in both modes.
    l is not clamped.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1):
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.l = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        bshape = (1, c) + (1,) * (x.dim() - 2)
        bn_dims = [0] + list(range(2, x.dim()))
        ln_dims = list(range(1, x.dim()))
        if self.training:
            mean = x.mean(bn_dims, keepdim=True)
            var = x.var(bn_dims, correction=0, keepdim=True)
            with torch.no_grad():
                self.num_batches_tracked += 1
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                m = x.numel() // c
                self.running_mean.mul_(1 - f).add_(mean.reshape(c), alpha=f)
                self.running_var.mul_(1 - f).add_(var.reshape(c) * (m / (m - 1)), alpha=f)
        else:
            mean = self.running_mean.view(bshape)
            var = self.running_var.view(bshape)
        x_bn = (x - mean) / torch.sqrt(var + self.eps)
        ln_mean = x.mean(ln_dims, keepdim=True)
        ln_var = x.var(ln_dims, correction=0, keepdim=True)
        x_ln = (x - ln_mean) / torch.sqrt(ln_var + self.eps)
        l = self.l.view(bshape)
        return self.weight.view(bshape) * (l * x_bn + (1 - l) * x_ln) + self.bias.view(bshape)


# --------------------------------------------------------------------------------------
# Norm family: the cases
# --------------------------------------------------------------------------------------

BN_STEPS = ["train", "train", "train", "eval", "eval"]
TRAIN_EVAL = ["train", "eval"]


def _bn_class(ndim: int):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def _in_class(ndim_no_batch: int):
    return {2: nn.InstanceNorm1d, 3: nn.InstanceNorm2d, 4: nn.InstanceNorm3d}[ndim_no_batch]


def bn_case(name, shape, steps=BN_STEPS, layer="batch_norm", forward=None, **kw) -> StepCase:
    cfg = {"num_features": shape[1], "eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True}
    cfg.update(kw)
    cls = _bn_class(len(shape))
    return StepCase(
        name, layer, cfg, lambda: cls(**cfg), list(steps), tuple(shape), forward=forward,
        extra_meta={"torch_module": cls.__name__},
    )


def gn_case(name, shape, num_groups, **kw) -> StepCase:
    cfg = {"num_groups": num_groups, "num_channels": shape[1], "eps": 1e-5, "affine": True}
    cfg.update(kw)
    return StepCase(name, "group_norm", cfg, lambda: nn.GroupNorm(**cfg), TRAIN_EVAL, tuple(shape),
                    extra_meta={"torch_module": "GroupNorm"})


def ln_case(name, shape, normalized_shape, **kw) -> StepCase:
    cfg = {"normalized_shape": list(normalized_shape), "eps": 1e-5, "elementwise_affine": True, "bias": True}
    cfg.update(kw)
    return StepCase(name, "layer_norm", cfg, lambda: nn.LayerNorm(**cfg), TRAIN_EVAL, tuple(shape),
                    extra_meta={"torch_module": "LayerNorm"})


def in_case(name, shape, steps=TRAIN_EVAL, batched=True, **kw) -> StepCase:
    c_axis = 1 if batched else 0
    cfg = {"num_features": shape[c_axis], "eps": 1e-5, "momentum": 0.1, "affine": False,
           "track_running_stats": False}
    cfg.update(kw)
    cls = _in_class(len(shape) - 1 if batched else len(shape))
    return StepCase(name, "instance_norm", cfg, lambda: cls(**cfg), list(steps), tuple(shape),
                    channel_axis=c_axis, extra_meta={"torch_module": cls.__name__})


def _frozen_init(m: FrozenBatchNorm2d) -> None:
    c = m.weight.numel()
    m.weight.uniform_(0.5, 1.5)
    m.bias.normal_(0.0, 0.5)
    m.running_mean.copy_(torch.randn(c))
    m.running_var.uniform_(0.5, 2.0)


def bcn_case(name, shape, random_l: bool) -> StepCase:
    cfg = {"num_features": shape[1], "eps": 1e-5, "momentum": 0.1}

    def init(m: BatchChannelNorm) -> None:
        if random_l:
            m.l.uniform_(0.0, 1.0)

    return StepCase(name, "batch_channel_norm", cfg, lambda: BatchChannelNorm(**cfg),
                    ["train", "train", "eval"], tuple(shape), init=init)


def norm_cases() -> List[StepCase]:
    s4 = (2, 3, 5, 7)
    g4 = (2, 6, 5, 7)
    return [
        # batch_norm: 3 train steps, then 2 eval steps
        bn_case("bn1d_2x3", (2, 3)),
        bn_case("bn1d_2x3x5", (2, 3, 5)),
        bn_case("bn2d_2x3x5x7", s4, momentum=0.1),
        bn_case("bn2d_momentum_none", s4, momentum=None),
        bn_case("bn2d_no_affine", s4, affine=False),
        bn_case("bn2d_no_track", s4, track_running_stats=False),
        bn_case("bn3d_2x3x2x3x4", (2, 3, 2, 3, 4)),
        bn_case("bn2d_eps_1e-3_mom_0.3", s4, eps=1e-3, momentum=0.3),
        # batch_norm_relu: BatchNorm2d followed by ReLU
        bn_case("bn_relu_2x3x5x7", s4, steps=["train", "train", "eval"], layer="batch_norm_relu",
                forward=lambda m, x: F.relu(m(x))),
        # group_norm
        gn_case("gn_g3_2x6x5x7", g4, 3),
        gn_case("gn_g1_2x6x5x7", g4, 1),
        gn_case("gn_g6_2x6x5x7", g4, 6),
        gn_case("gn_no_affine_g2_2x6x5x7", g4, 2, affine=False),
        gn_case("gn_g2_2x4x9", (2, 4, 9), 2),
        # layer_norm
        ln_case("ln_chw_2x3x5x7", s4, (3, 5, 7)),
        ln_case("ln_last_2x3x5x7", s4, (7,)),
        ln_case("ln_no_affine", s4, (5, 7), elementwise_affine=False),
        ln_case("ln_no_bias", (4, 10), (10,), bias=False),
        # instance_norm
        in_case("in2d_2x3x5x7", s4),
        in_case("in2d_affine", s4, affine=True),
        in_case("in2d_track", s4, steps=BN_STEPS, affine=True, track_running_stats=True),
        in_case("in1d_2x3x5", (2, 3, 5)),
        in_case("in2d_unbatched_3x5x7", (3, 5, 7), batched=False),
        # frozen_batch_norm (torchvision FrozenBatchNorm2d): same in both modes, grads to x only
        StepCase("frozen_2x3x5x7", "frozen_batch_norm", {"num_features": 3, "eps": 1e-5},
                 lambda: FrozenBatchNorm2d(3, eps=1e-5), ["train", "eval"], s4, init=_frozen_init),
        # batch_channel_norm
        bcn_case("bcn_2x3x5x7", s4, random_l=False),
        bcn_case("bcn_l_random_2x3x5x7", s4, random_l=True),
    ]


# --------------------------------------------------------------------------------------
# nn family: conv, linear, pooling, activations, cross-entropy (one forward + backward each)
# --------------------------------------------------------------------------------------
#
# Layout of a "layer" fixture (see tests/fixtures/nn/README.md):
#
#     __metadata__["meta"] = JSON {"layer", "config", "input_shape", "output_shape", "torch_module", "torch_version"}
#     init.<param>   parameters as initialised by PyTorch's default reset_parameters() (seeded), and buffers
#     x, dy          input ~ randn and upstream gradient ~ randn (shaped like y)
#     y              forward output
#     dx             d/dx of (y * dy).sum()
#     grad.<param>   gradient of each parameter
#
# A "loss" fixture (cross_entropy) holds logits (N, K) float32, target (N,) int64, loss (shape [])
# = F.cross_entropy(logits, target, label_smoothing=...) with mean reduction, dlogits = d loss / d logits,
# and pred (N,) int64 = logits.argmax(1).


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C): adaptive_avg_pool2d(x, 1).flatten(1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class ScaleShift(nn.Module):
    """x * scale + shift with constant (buffer) tensors broadcast over each sample: what an imported ONNX graph's
    Mul/Add by a constant becomes. The constants are in the case's config."""

    def __init__(self, scale, shift, shape):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).reshape(shape))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


@dataclass
class LayerCase:
    name: str
    layer: str
    config: dict
    build: Callable[[], nn.Module]
    shape: Tuple[int, ...]
    input_scale: float = 1.0

    def generate(self) -> Tuple[Dict[str, np.ndarray], dict]:
        torch.manual_seed(case_seed(self.name))
        module = self.build()  # PyTorch's default initialisation, from the seeded generator
        params = dict(module.named_parameters())
        x = (torch.randn(*self.shape) * self.input_scale).requires_grad_()
        y = module(x)
        dy = torch.randn(*y.shape)
        (y * dy).sum().backward()
        t: Dict[str, torch.Tensor] = {"x": x.detach(), "dy": dy, "y": y.detach(), "dx": x.grad}
        for n, p in params.items():
            t[f"init.{n}"] = p.detach()
            t[f"grad.{n}"] = p.grad
        for n, b in module.named_buffers():  # constants (ScaleShift), loaded like the parameters
            t[f"init.{n}"] = b
        meta = {
            "layer": self.layer,
            "config": self.config,
            "input_shape": list(self.shape),
            "output_shape": list(y.shape),
            "torch_module": type(module).__name__,
            "torch_version": torch.__version__,
        }
        meta = json.loads(json.dumps(meta))  # tuples (kernel_size=(3, 2)) become lists, as read back
        return {k: to_numpy(v) for k, v in t.items()}, meta


@dataclass
class LossCase:
    name: str
    n: int
    k: int
    label_smoothing: float = 0.0
    scale: float = 1.0

    def generate(self) -> Tuple[Dict[str, np.ndarray], dict]:
        torch.manual_seed(case_seed(self.name))
        logits = (torch.randn(self.n, self.k) * self.scale).requires_grad_()
        target = torch.randint(0, self.k, (self.n,))
        loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        loss.backward()
        t = {
            "logits": logits.detach(),
            "target": target,
            "loss": loss.detach(),
            "dlogits": logits.grad,
            "pred": logits.detach().argmax(1),
        }
        meta = {
            "layer": "cross_entropy",
            "config": {"label_smoothing": self.label_smoothing, "reduction": "mean"},
            "input_shape": [self.n, self.k],
            "torch_module": "CrossEntropyLoss",
            "torch_version": torch.__version__,
        }
        return {k: to_numpy(v) for k, v in t.items()}, meta


@dataclass
class PixelLossCase:
    """Per-pixel cross-entropy (segmentation): logits (N, K, H, W), target (N, H, W) int64 with a fraction of
    `ignore_index` pixels, optional class weights; loss = F.cross_entropy(..., weight, ignore_index), mean."""
    name: str
    shape: Tuple[int, ...]
    weighted: bool
    ignore_fraction: float = 0.2
    scale: float = 2.0

    def generate(self) -> Tuple[Dict[str, np.ndarray], dict]:
        torch.manual_seed(case_seed(self.name))
        n, k, h, w = self.shape
        logits = (torch.randn(n, k, h, w) * self.scale).requires_grad_()
        target = torch.randint(0, k, (n, h, w))
        target[torch.rand(n, h, w) < self.ignore_fraction] = 255
        weight = torch.rand(k) * 2 + 0.1 if self.weighted else None
        loss = F.cross_entropy(logits, target, weight=weight, ignore_index=255)
        loss.backward()
        t = {"logits": logits.detach(), "target": target, "loss": loss.detach(), "dlogits": logits.grad}
        if weight is not None:
            t["weight"] = weight
        meta = {
            "layer": "pixel_cross_entropy",
            "config": {"ignore_index": 255, "weighted": self.weighted, "reduction": "mean"},
            "input_shape": list(self.shape),
            "torch_module": "CrossEntropyLoss",
            "torch_version": torch.__version__,
        }
        return {k: to_numpy(v) for k, v in t.items()}, meta


def conv_case(name, shape, in_channels, out_channels, kernel_size, **kw) -> LayerCase:
    cfg = {"in_channels": in_channels, "out_channels": out_channels, "kernel_size": kernel_size,
           "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True}
    cfg.update(kw)
    return LayerCase(name, "conv2d", cfg, lambda: nn.Conv2d(**cfg), tuple(shape))


def linear_case(name, shape, in_features, out_features, bias=True) -> LayerCase:
    cfg = {"in_features": in_features, "out_features": out_features, "bias": bias}
    return LayerCase(name, "linear", cfg, lambda: nn.Linear(**cfg), tuple(shape))


def maxpool_case(name, shape, kernel_size, **kw) -> LayerCase:
    cfg = {"kernel_size": kernel_size, "stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
    cfg.update(kw)
    return LayerCase(name, "max_pool2d", cfg, lambda: nn.MaxPool2d(**cfg), tuple(shape))


def avgpool_case(name, shape, kernel_size, **kw) -> LayerCase:
    cfg = {"kernel_size": kernel_size, "stride": None, "padding": 0, "ceil_mode": False,
           "count_include_pad": True, "divisor_override": None}
    cfg.update(kw)
    return LayerCase(name, "avg_pool2d", cfg, lambda: nn.AvgPool2d(**cfg), tuple(shape))


def upsample_case(name, shape, size=None, scale_factor=None, align_corners=False) -> LayerCase:
    cfg = {"size": list(size) if size else None, "scale_factor": list(scale_factor) if scale_factor else None,
           "align_corners": align_corners}
    return LayerCase(name, "upsample_bilinear", cfg,
                     lambda: nn.Upsample(size=size, scale_factor=scale_factor, mode="bilinear",
                                         align_corners=align_corners), tuple(shape))


def nn_cases() -> list:
    return [
        # conv2d (PyTorch default init; kernel_size/stride/padding/dilation as int or [h, w])
        conv_case("conv_3x3_pad1", (2, 3, 6, 5), 3, 4, 3, padding=1),
        conv_case("conv_k3x2_stride2_pad1", (2, 3, 7, 6), 3, 4, (3, 2), stride=2, padding=1),
        conv_case("conv_dilation2_pad2", (2, 2, 7, 8), 2, 3, 3, padding=2, dilation=2),
        conv_case("conv_groups2_no_bias", (2, 4, 5, 5), 4, 6, 3, padding=1, groups=2, bias=False),
        conv_case("conv_depthwise", (2, 4, 5, 6), 4, 4, 3, padding=1, groups=4),
        conv_case("conv_1x1", (2, 8, 4, 3), 8, 5, 1),
        conv_case("conv_mixed_k2x3_s2x1_p0x2_d1x2_g2", (3, 4, 6, 5), 4, 6, (2, 3), stride=(2, 1),
                  padding=(0, 2), dilation=(1, 2), groups=2),
        conv_case("conv_1to32_8x8", (2, 1, 8, 8), 1, 32, 3, padding=1),
        conv_case("conv_32to16_5x5", (2, 32, 5, 5), 32, 16, 3, padding=1),
        # linear
        linear_case("linear_5to3", (4, 5), 5, 3),
        linear_case("linear_rank3_no_bias", (2, 3, 7), 7, 4, bias=False),
        linear_case("linear_64to10", (8, 64), 64, 10),
        # pooling
        maxpool_case("maxpool_k2", (2, 3, 6, 5), 2),
        maxpool_case("maxpool_k3_s2_p1", (2, 3, 7, 6), 3, stride=2, padding=1),
        maxpool_case("maxpool_k2_s1_d2", (2, 2, 6, 6), 2, stride=1, dilation=2),
        maxpool_case("maxpool_k2_ceil", (2, 2, 7, 7), 2, ceil_mode=True),
        avgpool_case("avgpool_k2", (2, 3, 6, 5), 2),
        avgpool_case("avgpool_k3_s2_p1", (2, 3, 7, 6), 3, stride=2, padding=1),
        avgpool_case("avgpool_k3_s2_p1_exclude_pad", (2, 3, 7, 6), 3, stride=2, padding=1,
                     count_include_pad=False),
        avgpool_case("avgpool_k2_ceil", (2, 2, 7, 7), 2, ceil_mode=True),
        avgpool_case("avgpool_k3_s2_p1_ceil", (2, 2, 6, 6), 3, stride=2, padding=1, ceil_mode=True),
        avgpool_case("avgpool_k2x3_s1_divisor4", (2, 2, 5, 6), (2, 3), stride=1, divisor_override=4),
        LayerCase("global_avg_pool", "global_avg_pool", {}, GlobalAvgPool, (2, 3, 4, 5)),
        # bilinear resampling (segmentation: ASPP's image pooling and the decoder's up-sampling)
        upsample_case("upsample_bilinear_size_x2", (2, 3, 4, 5), size=(8, 10)),
        upsample_case("upsample_bilinear_size_align", (2, 3, 4, 5), size=(7, 9), align_corners=True),
        upsample_case("upsample_bilinear_scale2.5", (2, 2, 3, 4), scale_factor=(2.5, 2.5)),
        upsample_case("upsample_bilinear_scale3_align", (1, 2, 3, 3), scale_factor=(3.0, 3.0),
                      align_corners=True),
        upsample_case("upsample_bilinear_down", (2, 2, 7, 6), size=(3, 2)),
        upsample_case("upsample_bilinear_1x1_to_8x8", (2, 4, 1, 1), size=(8, 8)),
        upsample_case("upsample_bilinear_8x8_to_64x64", (2, 3, 8, 8), size=(64, 64)),
        # per-pixel cross-entropy with ignored pixels and class weights (segmentation)
        PixelLossCase("pixel_cross_entropy_2x11x5x6", (2, 11, 5, 6), weighted=False),
        PixelLossCase("pixel_cross_entropy_weighted_3x4x7x5", (3, 4, 7, 5), weighted=True),
        PixelLossCase("pixel_cross_entropy_weighted_large_2x11x16x16", (2, 11, 16, 16), weighted=True,
                      ignore_fraction=0.5, scale=8.0),
        # activations
        LayerCase("relu", "relu", {}, nn.ReLU, (2, 3, 4, 5)),
        LayerCase("sigmoid", "sigmoid", {}, nn.Sigmoid, (2, 3, 4, 5), input_scale=4.0),
        LayerCase("flatten", "flatten", {"start_dim": 1, "end_dim": -1}, nn.Flatten, (2, 3, 2, 2)),
        # the layers ONNX import needs (Clip, Softmax, Reshape, Mul/Add by a constant)
        LayerCase("hardtanh_relu6", "clamp", {"min_val": 0.0, "max_val": 6.0}, lambda: nn.ReLU6(), (2, 3, 4, 5),
                  input_scale=5.0),
        LayerCase("hardtanh_m1_p0.5", "clamp", {"min_val": -1.0, "max_val": 0.5},
                  lambda: nn.Hardtanh(-1.0, 0.5), (3, 7), input_scale=2.0),
        LayerCase("softmax_last", "softmax", {"dim": -1}, lambda: nn.Softmax(dim=-1), (4, 7), input_scale=3.0),
        LayerCase("softmax_rank4_large", "softmax", {"dim": -1}, lambda: nn.Softmax(dim=-1), (2, 3, 2, 5),
                  input_scale=30.0),
        LayerCase("unflatten_12_to_3x2x2", "reshape", {"shape": [3, 2, 2]}, lambda: nn.Unflatten(1, (3, 2, 2)),
                  (2, 12)),
        LayerCase("scale_shift_per_channel", "scale_shift",
                  {"scale": [0.5, -2.0, 3.0], "shift": [0.25, 1.0, -4.0], "shape": [3, 1, 1]},
                  lambda: ScaleShift([0.5, -2.0, 3.0], [0.25, 1.0, -4.0], (3, 1, 1)), (2, 3, 4, 5)),
        # cross entropy (mean reduction)
        LossCase("cross_entropy_8x5", 8, 5),
        LossCase("cross_entropy_smooth0.1_8x5", 8, 5, label_smoothing=0.1),
        LossCase("cross_entropy_smooth0.3_16x10", 16, 10, label_smoothing=0.3, scale=3.0),
        LossCase("cross_entropy_large_logits_6x4", 6, 4, scale=40.0),
    ]


# --------------------------------------------------------------------------------------
# Families and main
# --------------------------------------------------------------------------------------

FAMILIES: Dict[str, Callable[[], list]] = {
    "norm": norm_cases,
    "nn": nn_cases,
    # "net": network_cases,  -- future families
}


def write_case(out_dir: Path, family: str, case) -> Path:
    tensors, meta = case.generate()
    path = out_dir / family / f"{case.name}.safetensors"
    write_safetensors(path, tensors, {"meta": json.dumps(meta)})
    back, back_meta = read_safetensors(path)  # verify the round trip
    assert json.loads(back_meta["meta"]) == meta
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures root (default: tests/fixtures)")
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="families to generate")
    ap.add_argument("--only", action="append", help="generate only these case names")
    ap.add_argument("--list", action="store_true", help="print case names and exit")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)

    written = []
    for family in args.family or sorted(FAMILIES):
        cases = FAMILIES[family]()
        names = [c.name for c in cases]
        assert len(names) == len(set(names)), f"duplicate case names in {family}"
        for case in cases:
            if args.only and case.name not in args.only:
                continue
            if args.list:
                print(f"{family}/{case.name}")
                continue
            written.append(write_case(args.out, family, case))
    if args.list:
        return 0
    if args.only:
        missing = set(args.only) - {p.stem for p in written}
        if missing:
            print(f"unknown case(s): {sorted(missing)}", file=sys.stderr)
            return 1
    total = 0
    for p in written:
        size = p.stat().st_size
        total += size
        print(f"{size:8d}  {p.relative_to(ROOT) if ROOT in p.parents else p}")
    print(f"{total:8d}  total, {len(written)} files (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
