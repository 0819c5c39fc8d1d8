#!/usr/bin/env python3
"""Golden PyTorch fixtures for a whole network: the reference CNN of `Model::cnn` (src/model/mod.rs).

Run from the repository root:

    tools/.venv/bin/python tools/gen_model_fixture.py            # writes tests/fixtures/model/*.safetensors
    tools/.venv/bin/python tools/gen_model_fixture.py --out DIR  # elsewhere

(any Python with torch + numpy works; `bash tools/torch_env.sh` prints one). The Rust side is
tests/golden_model.rs. Deterministic for a given torch version (float32, CPU, one thread, fixed seeds);
the torch version is recorded in each file's metadata.

Cases
-----
cnn_bn     `Model::new(ModelConfig::fashion(Cnn, Batch))`: 1x28x28 inputs, 10 classes
           0 conv(1->32, no bias)  1 BatchNorm2d  2 ReLU  3 conv(32->32)  4 BN  5 ReLU  6 MaxPool2d(2)
           7 conv(32->64)  8 BN  9 ReLU  10 conv(64->64)  11 BN  12 ReLU  13 MaxPool2d(2)  14 Flatten
           15 Linear(3136->128, no bias)  16 BatchNorm1d(128)  17 ReLU  18 Linear(128->10)
           (normvision fuses each BN with the following ReLU but keeps the ReLU's index free, so the
           state-dict keys are those of this nn.Sequential).
cnn_plain  `--norm none` (`NormKind::None`): convs and the first linear WITH bias, no norm layers, on
           1x8x8 inputs (`ModelConfig { height: 8, width: 8, ..fashion(Cnn, None) }`) to keep the file
           small (the linear is 256->128 instead of 3136->128):
           0 conv  1 ReLU  2 conv  3 ReLU  4 MaxPool2d  5 conv  6 ReLU  7 conv  8 ReLU  9 MaxPool2d
           10 Flatten  11 Linear(256->128)  12 ReLU  13 Linear(128->10)

Each case is ONE training-mode forward of a batch of 8 with integer targets, mean cross-entropy, backward.

Trajectory cases (`generate_trajectory`): cnn_bn_sgd (BN, lr 0.2) and cnn_plain_sgd (no norm, lr 0.05), 8x8
inputs, 60 SGD steps (momentum 0.9) on batches of 32 of a learnable task from a training-like init. They store
`init.*`, all inputs `x` (BF16, (steps, batch, 1, 8, 8)), `targets` (steps, batch), `losses` (F32, one per
step), `eval_logits` (eval mode, first batch, after `eval_at` = 20 steps), `state.*` (the state dict after the
last step), and `losses_cl` / `eval_logits_cl` from the same run in channels_last.

File layout (safetensors; `__metadata__["meta"]` is a JSON string with the case description)
---------------------------------------------------------------------------------------------
init.<key>     the full state dict before the step (PyTorch names: `0.weight`, `1.running_mean`,
               `1.num_batches_tracked`, `15.weight`, ...). Float tensors are stored as **BF16**: every
               initial value is rounded to bfloat16 *before* the forward, so BF16 holds it exactly and
               the files stay small (the 3136x128 weight would otherwise be stored twice in f32).
               Widen with `f32::from_bits((b as u32) << 16)`. num_batches_tracked is I64.
x              the input batch (F32, (8, 1, H, W))
targets        class indices (I64, (8,))
logits         (F32, (8, 10))
loss           mean cross-entropy (F32, (1,))
grad.<key>     d loss / d parameter for every parameter (F32)
state.<key>    running_mean / running_var (F32) and num_batches_tracked (I64) after the forward

Initial values (non-trivial, so every code path matters): conv/linear weights kaiming-normal (fan_in,
ReLU gain) like normvision's default; biases N(0, 0.1); BN weight U(0.5, 1.5), bias N(0, 0.2),
running_mean N(0, 0.3), running_var U(0.5, 2), num_batches_tracked 5. Inputs N(0, 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "model"
BATCH = 8
CLASSES = 10

# The expected state-dict keys, spelled out so a change of numbering on either side is caught here too
# (tests/golden_model.rs compares them with normvision's `state_dict()`).
BN_KEYS = [
    f"{i}.{n}"
    for i, kind in [(0, "conv"), (1, "bn"), (3, "conv"), (4, "bn"), (7, "conv"), (8, "bn"), (10, "conv"),
                    (11, "bn"), (15, "lin_nobias"), (16, "bn"), (18, "lin")]
    for n in {"conv": ["weight"], "lin_nobias": ["weight"], "lin": ["weight", "bias"],
              "bn": ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]}[kind]
]
PLAIN_KEYS = [f"{i}.{n}" for i in (0, 2, 5, 7, 11, 13) for n in ("weight", "bias")]


# --------------------------------------------------------------------------------------
# safetensors writer (a copy of tools/gen_fixtures.py's, plus BF16)
# --------------------------------------------------------------------------------------

_ST_DTYPES = {np.dtype("float32"): "F32", np.dtype("int64"): "I64", np.dtype("uint16"): "BF16"}


def write_safetensors(path: Path, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """u64 LE header length N, N bytes of JSON header (space-padded to a multiple of 8), raw LE data.
    BF16 tensors are given as uint16 arrays of the bfloat16 bit patterns."""
    names = list(tensors)
    names.sort(key=lambda n: -tensors[n].dtype.itemsize)  # 8-byte dtypes first: every tensor aligned
    header: Dict[str, object] = {"__metadata__": dict(metadata)}
    chunks: List[bytes] = []
    offset = 0
    for name in names:
        a = tensors[name]
        st = _ST_DTYPES[a.dtype]
        data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": st, "shape": [int(s) for s in a.shape], "data_offsets": [offset, offset + len(data)]}
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


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().to(torch.float32).numpy()


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """The bfloat16 bit patterns of a tensor that is exactly representable in bfloat16."""
    b = t.detach().cpu().contiguous().to(torch.bfloat16)
    assert torch.equal(b.to(torch.float32), t.detach().to(torch.float32)), "value not bf16-exact"
    return b.view(torch.int16).numpy().view(np.uint16)


# --------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------


def build_cnn(norm: str, h: int, w: int) -> nn.Sequential:
    """nn.Sequential equal to normvision's `Model::cnn` for --norm batch / none (same indices)."""
    assert norm in ("batch", "none") and h % 4 == 0 and w % 4 == 0
    bias = norm == "none"
    layers: List[nn.Module] = []
    for k, (cin, cout) in enumerate([(1, 32), (32, 32), (32, 64), (64, 64)]):
        layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=bias))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        if k % 2 == 1:
            layers.append(nn.MaxPool2d(2))
    layers.append(nn.Flatten())
    layers.append(nn.Linear(64 * (h // 4) * (w // 4), 128, bias=bias))
    if norm == "batch":
        layers.append(nn.BatchNorm1d(128))
    layers.append(nn.ReLU())
    layers.append(nn.Linear(128, CLASSES))
    return nn.Sequential(*layers)


@torch.no_grad()
def randomize(net: nn.Sequential) -> None:
    """Non-trivial initial values, rounded to bfloat16 (see the module docs)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                m.bias.normal_(0.0, 0.1)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.running_mean.normal_(0.0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(5)
    for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
        t.copy_(t.to(torch.bfloat16).to(torch.float32))


def generate(name: str, norm: str, h: int, w: int, seed: int, out_dir: Path) -> Path:
    torch.manual_seed(seed)
    net = build_cnn(norm, h, w)
    randomize(net)
    keys = list(net.state_dict().keys())
    want = BN_KEYS if norm == "batch" else PLAIN_KEYS
    assert keys == want, f"{name}: state-dict keys {keys} != expected {want}"

    tensors: Dict[str, np.ndarray] = {}
    for k, v in net.state_dict().items():
        tensors[f"init.{k}"] = v.detach().numpy().astype(np.int64) if k.endswith("num_batches_tracked") else bf16_bits(v)

    x = torch.randn(BATCH, 1, h, w)
    targets = torch.randint(0, CLASSES, (BATCH,), dtype=torch.int64)
    net.train()
    net.zero_grad()
    logits = net(x)
    loss = F.cross_entropy(logits, targets)  # reduction="mean"
    loss.backward()

    tensors["x"] = f32(x)
    tensors["targets"] = targets.numpy().astype(np.int64)
    tensors["logits"] = f32(logits)
    tensors["loss"] = f32(loss.reshape(1))
    for k, p in net.named_parameters():
        assert p.grad is not None, k
        tensors[f"grad.{k}"] = f32(p.grad)
    for k, v in net.state_dict().items():
        if k.rsplit(".", 1)[1] in ("running_mean", "running_var"):
            tensors[f"state.{k}"] = f32(v)
        elif k.endswith("num_batches_tracked"):
            tensors[f"state.{k}"] = v.detach().numpy().astype(np.int64)

    meta = {
        "case": name,
        "model": "cnn",
        "norm": norm,
        "input_shape": [BATCH, 1, h, w],
        "num_classes": CLASSES,
        "mode": "train",
        "loss": "cross_entropy(mean)",
        "seed": seed,
        "init_dtype": "bf16",
        "keys": keys,
        "torch_version": torch.__version__,
    }
    path = out_dir / f"{name}.safetensors"
    write_safetensors(path, tensors, {"meta": json.dumps(meta)})
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB, loss {loss.item():.6f}", file=sys.stderr)
    return path


def _trajectory_net(norm: str, seed: int):
    torch.manual_seed(seed)
    net = build_cnn(norm, 8, 8)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
            t.copy_(t.to(torch.bfloat16).to(torch.float32))
    return net


EVAL_AT = 20  # eval-mode logits are taken after this many steps (before chaotic drift; see golden_model.rs)


def _train(net: nn.Sequential, xs: torch.Tensor, ys: torch.Tensor, lr: float, fmt=None):
    if fmt is not None:
        net = net.to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    losses = []
    eval_logits = None
    x0 = xs[0] if fmt is None else xs[0].contiguous(memory_format=fmt)
    for s in range(xs.shape[0]):
        if s == EVAL_AT:
            net.eval()
            with torch.no_grad():
                eval_logits = net(x0)
        net.train()
        x = xs[s] if fmt is None else xs[s].contiguous(memory_format=fmt)
        opt.zero_grad()
        loss = F.cross_entropy(net(x), ys[s])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, losses, eval_logits


def generate_trajectory(name: str, norm: str, lr: float, steps: int, batch: int, seed: int,
                        out_dir: Path) -> Path:
    """`steps` SGD steps (momentum 0.9, constant lr) of the 8x8 cnn from a training-like init: kaiming-normal
    conv/linear weights, zero biases, BN at its defaults (weight 1, bias 0, running stats 0/1). Inputs and
    initial values are bf16-exact. The task is learnable: the class of an image is the index of the largest of
    its first 10 pixels. Records the loss of every step, eval-mode logits of the first batch after EVAL_AT steps,
    and the state dict after the last step; and the same run in channels_last (`losses_cl`, `eval_logits_cl`), whose distance
    from the contiguous run is PyTorch's own sensitivity to summation order along this trajectory."""
    net = _trajectory_net(norm, seed)
    tensors: Dict[str, np.ndarray] = {}
    for k, v in net.state_dict().items():
        tensors[f"init.{k}"] = v.detach().numpy().astype(np.int64) if k.endswith("num_batches_tracked") else bf16_bits(v)
    g = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(steps, batch, 1, 8, 8, generator=g).to(torch.bfloat16).to(torch.float32)
    ys = xs.reshape(steps, batch, 64)[:, :, :CLASSES].argmax(dim=2)
    net, losses, eval_logits = _train(net, xs, ys, lr)
    _, losses_cl, eval_logits_cl = _train(_trajectory_net(norm, seed), xs, ys, lr, torch.channels_last)
    tensors["x"] = bf16_bits(xs)
    tensors["targets"] = ys.numpy().astype(np.int64)
    tensors["losses"] = np.array(losses, dtype=np.float32)
    tensors["losses_cl"] = np.array(losses_cl, dtype=np.float32)
    tensors["eval_logits"] = f32(eval_logits)
    tensors["eval_logits_cl"] = f32(eval_logits_cl)
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            tensors[f"state.{k}"] = v.detach().numpy().astype(np.int64)
        else:
            tensors[f"state.{k}"] = f32(v)
    meta = {
        "case": name, "model": "cnn", "norm": norm, "input_shape": [batch, 1, 8, 8],
        "num_classes": CLASSES, "mode": "train", "optimizer": "sgd", "lr": lr, "momentum": 0.9,
        "steps": steps, "eval_at": EVAL_AT, "seed": seed, "init_dtype": "bf16",
        "torch_version": torch.__version__,
    }
    path = out_dir / f"{name}.safetensors"
    write_safetensors(path, tensors, {"meta": json.dumps(meta)})
    dev = max(abs(a - b) / abs(a) for a, b in zip(losses, losses_cl))
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB, losses {losses[0]:.4f} .. {losses[-1]:.4f}, "
          f"channels_last max rel deviation {dev:.2e}", file=sys.stderr)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    generate("cnn_bn", "batch", 28, 28, seed=20240601, out_dir=args.out)
    generate("cnn_plain", "none", 8, 8, seed=20240602, out_dir=args.out)
    generate_trajectory("cnn_bn_sgd", "batch", lr=0.2, steps=60, batch=32, seed=20240603, out_dir=args.out)
    generate_trajectory("cnn_plain_sgd", "none", lr=0.05, steps=60, batch=32, seed=20240604, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
