#!/usr/bin/env python3
"""Golden PyTorch fixture for the branching model of tests/branching.rs.

Run from the repository root:

    tools/.venv/bin/python tools/gen_branching_fixture.py            # writes tests/fixtures/model/branching.safetensors
    tools/.venv/bin/python tools/gen_branching_fixture.py --out DIR  # elsewhere

It also writes examples/data/branching_pytorch.safetensors for `cargo run --example load_pytorch`: the model
after 200 Adam steps on a small task, saved as `safetensors.torch.save_file(model.state_dict())` would save it
(PyTorch names, F32, num_batches_tracked I64), and examples/data/branching_pytorch_io.safetensors: a batch of
inputs with the model's eval-mode outputs (`x`, `cls`, `aux`), to check a port against.

Deterministic for a given torch version (CPU, one thread, fixed seed); the version is in the file's metadata.

The model (an ASPP-like block with a residual and two heads; the state-dict names are PyTorch's):

    x (N, 1, H, W)
    stem     : Conv2d(1, 8, 3, padding=1, bias=False) -> BatchNorm2d(8) -> ReLU -> MaxPool2d(2)        = s
    aspp.0   : Conv2d(8, 8, 1, bias=False) -> BatchNorm2d(8) -> ReLU                                    = a
    aspp.1   : Conv2d(8, 8, 3, padding=2, dilation=2, bias=False) -> BatchNorm2d(8) -> ReLU             = b
    project  : cat([a, b], dim=1) -> Conv2d(16, 8, 1, bias=False) -> BatchNorm2d(8)                     = p
    r        = relu(p + s)                        (s fans out three ways: aspp.0, aspp.1 and the residual)
    cls      = classifier(r.mean((2, 3)))         Linear(8, 10)           output 0: logits (N, 10)
    aux      = aux(r)                             Conv2d(8, 1, 1)         output 1: a map (N, 1, H/2, W/2)
    loss     = 1.0 * cross_entropy(cls, targets) + 0.5 * mse_loss(aux, aux_target)

One training-mode forward and backward of a batch, in float32 and in float64 from the same initial values
(every initial value and input is rounded to bfloat16 first, so both precisions start from identical numbers),
then an eval-mode forward with the updated running statistics.

File layout (safetensors; `__metadata__["meta"]` is a JSON string with the case description)
---------------------------------------------------------------------------------------------
init.<key>              the state dict before the step (F32; num_batches_tracked I64 = 5)
x, aux_target           inputs (F32), targets (I64)
<p>.cls, <p>.aux        the two outputs of the training forward, p = f32 (F32 tensors) or f64 (F64 tensors)
<p>.loss                (loss_cls, loss_aux, loss) as a (3,) tensor
<p>.grad.x              d loss / d x
<p>.grad.<key>          d loss / d parameter, every parameter
<p>.state.<key>         running_mean / running_var after the forward
<p>.eval_cls/eval_aux   the eval-mode outputs after the step
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_model_fixture as gm  # noqa: E402  (the safetensors writer)

gm._ST_DTYPES[np.dtype("float64")] = "F64"

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "model"
N, H, W, CLASSES = 4, 12, 10, 10
WEIGHTS = (1.0, 0.5)


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.aspp = nn.ModuleList([
            nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        ])
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.classifier = nn.Linear(8, CLASSES)
        self.aux = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor):
        s = self.stem(x)
        a = torch.cat([branch(s) for branch in self.aspp], dim=1)
        r = F.relu(self.project(a) + s)
        return self.classifier(r.mean((2, 3))), self.aux(r)


@torch.no_grad()
def randomize(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                m.bias.normal_(0.0, 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.running_mean.normal_(0.0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(5)
    for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
        t.copy_(t.to(torch.bfloat16).to(torch.float32))


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def run(net: nn.Module, dtype: torch.dtype, x: torch.Tensor, targets: torch.Tensor, aux_target: torch.Tensor,
        p: str, out: Dict[str, np.ndarray]) -> None:
    net = copy.deepcopy(net).to(dtype)
    net.train()
    xd = x.detach().clone().to(dtype).requires_grad_()
    cls, aux = net(xd)
    l_cls = F.cross_entropy(cls, targets)
    l_aux = F.mse_loss(aux, aux_target.to(dtype))
    loss = WEIGHTS[0] * l_cls + WEIGHTS[1] * l_aux
    loss.backward()
    out[f"{p}.cls"] = arr(cls)
    out[f"{p}.aux"] = arr(aux)
    out[f"{p}.loss"] = arr(torch.stack([l_cls, l_aux, loss]))
    out[f"{p}.grad.x"] = arr(xd.grad)
    for k, prm in net.named_parameters():
        out[f"{p}.grad.{k}"] = arr(prm.grad)
    for k, v in net.state_dict().items():
        if k.endswith("running_mean") or k.endswith("running_var"):
            out[f"{p}.state.{k}"] = arr(v)
    net.eval()
    with torch.no_grad():
        ec, ea = net(x.to(dtype))
    out[f"{p}.eval_cls"] = arr(ec)
    out[f"{p}.eval_aux"] = arr(ea)


def example_weights(out_dir: Path) -> None:
    """A briefly trained model's state dict, and a batch with its eval-mode outputs."""
    torch.manual_seed(7)
    net = Branching()
    protos = torch.randn(CLASSES, 1, H, W)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    for _ in range(200):
        t = torch.randint(0, CLASSES, (32,))
        x = protos[t] + 0.3 * torch.randn(32, 1, H, W)
        cls, aux = net(x)
        loss = WEIGHTS[0] * F.cross_entropy(cls, t) + WEIGHTS[1] * F.mse_loss(aux, F.avg_pool2d(x, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    t = torch.arange(8) % CLASSES
    x = protos[t] + 0.3 * torch.randn(8, 1, H, W)
    with torch.no_grad():
        cls, aux = net(x)
    sd = {k: arr(v) for k, v in net.state_dict().items()}
    meta = {"format": "pt", "torch": torch.__version__}
    gm.write_safetensors(out_dir / "branching_pytorch.safetensors", sd, meta)
    io = {"x": arr(x), "targets": arr(t).astype(np.int64), "cls": arr(cls), "aux": arr(aux)}
    gm.write_safetensors(out_dir / "branching_pytorch_io.safetensors", io, {"torch": torch.__version__})
    print(f"wrote {out_dir}/branching_pytorch*.safetensors (accuracy on the batch "
          f"{(cls.argmax(1) == t).float().mean().item():.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--examples", type=Path, default=ROOT / "examples" / "data")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(20261203)
    net = Branching()
    randomize(net)
    tensors: Dict[str, np.ndarray] = {}
    for k, v in net.state_dict().items():
        tensors[f"init.{k}"] = arr(v).astype(np.int64) if k.endswith("num_batches_tracked") else arr(v)
    x = bf16(torch.randn(N, 1, H, W))
    targets = torch.randint(0, CLASSES, (N,), dtype=torch.int64)
    aux_target = bf16(torch.randn(N, 1, H // 2, W // 2))
    tensors["x"] = arr(x)
    tensors["targets"] = arr(targets).astype(np.int64)
    tensors["aux_target"] = arr(aux_target)
    run(net, torch.float32, x, targets, aux_target, "f32", tensors)
    run(net, torch.float64, x, targets, aux_target, "f64", tensors)
    meta = {
        "torch": torch.__version__,
        "model": "branching (see tools/gen_branching_fixture.py)",
        "shape": [N, 1, H, W],
        "loss_weights": list(WEIGHTS),
        "keys": list(net.state_dict().keys()),
    }
    path = args.out / "branching.safetensors"
    gm.write_safetensors(path, tensors, {"meta": json.dumps(meta)})
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(tensors)} tensors)")
    example_weights(args.examples)


if __name__ == "__main__":
    main()
