#!/usr/bin/env python3
"""ONNX parity fixtures: PyTorch models exported by both of torch.onnx's exporters, with an input batch and the
logits PyTorch computes (and ONNX Runtime's, as a cross-check), for tests/onnx_import.rs.

Run from the repository root (`bash tools/torch_env.sh` makes the venv):

    tools/.venv/bin/python tools/gen_onnx_fixtures.py          # writes tests/fixtures/onnx/

Files, for each <name>:
  <name>.onnx [+ <name>.onnx.data]  the exported model (the dynamo exporter writes its weights to .onnx.data)
  <name>.io.safetensors             x (3, C, H, W) (export used batch 2: the batch is dynamic) and
                                    logits = PyTorch eval logits; ort_logits = ONNX Runtime's on the same file;
                                    metadata: exporter, opset, ops (the op types in the file)

Models: the `cnn` and `resnet` twins of tests/fixtures/twins (tools/gen_zoo_twins.py, --norm batch), and `ops`,
a network that uses what a plain CNN exporter writes beyond our zoo: RGB input, a dilated convolution, a
depthwise (grouped) convolution, a residual Add, ReLU6 (Clip), padded max and average pooling, x.view(N, -1),
Linear without bias + BatchNorm1d, a multiplication by a constant and Softmax.
  *-ts13   TorchScript exporter, opset 13, do_constant_folding=False: BatchNormalization nodes kept
  *-ts17   TorchScript exporter, opset 17, default constant folding: BN folded into Conv by the exporter
  *-dynamo torch.export-based exporter (torch 2.15 default, opset 20), external data
  ops-dynamo-noopt  the same with optimize=False: BN nodes kept, Shape/Expand/CastLike subgraphs for biases
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import gen_zoo_twins as tw  # noqa: E402


class Ops(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=2, dilation=2, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.fc1 = nn.Linear(16 * 6 * 6, 32, bias=False)
        self.bn2 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        a = torch.relu(self.bn0(self.stem(x)))
        b = nn.functional.relu6(self.bn1(self.dw(a)))
        a = torch.relu(a + self.pw(b))
        a = self.avg(self.pool(a))
        a = a.view(a.size(0), -1)
        a = torch.relu(self.bn2(self.fc1(a))) * 0.5
        return torch.softmax(self.fc2(a), dim=1)


def randomize(net: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def export(net, x, path: Path, mode: str) -> None:
    if mode.startswith("ts"):
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=int(mode[2:4]),
                          do_constant_folding=(mode != "ts13"), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    else:
        kw = {"optimize": False} if mode == "dynamo-noopt" else {}
        torch.onnx.export(net, (x,), str(path), dynamic_shapes=({0: torch.export.Dim("batch")},),
                          input_names=["x"], output_names=["logits"], **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/onnx"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    cases = [
        ("cnn", lambda: tw.cnn("batch"), (1, 8, 8), ["ts13", "dynamo"]),
        ("resnet", lambda: tw.ResNet("batch"), (1, 8, 8), ["ts17", "dynamo"]),
        ("ops", Ops, (3, 12, 12), ["ts13", "ts17", "dynamo", "dynamo-noopt"]),
    ]
    for model, make, chw, modes in cases:
        g = torch.Generator().manual_seed(zlib.crc32(model.encode()))
        torch.manual_seed(1234)
        net = make()
        randomize(net, g)
        net.eval()
        x2 = torch.rand((2, *chw), generator=g)
        x = torch.rand((3, *chw), generator=g)
        with torch.no_grad():
            logits = net(x)
        for mode in modes:
            name = f"{model}-{mode}"
            path = args.out / f"{name}.onnx"
            for old in (path, path.with_name(path.name + ".data")):
                old.unlink(missing_ok=True)
            export(net, x2, path, mode)
            m = onnx.load(str(path), load_external_data=False)
            ops = sorted(collections.Counter(n.op_type for n in m.graph.node).items())
            opset = [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")][0]
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            ort_logits = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            diff = float(np.abs(ort_logits - logits.numpy()).max())
            meta = {"exporter": mode, "opset": str(opset), "ops": json.dumps(dict(ops)),
                    "torch": torch.__version__, "onnxruntime": ort.__version__}
            save_file({"x": x.contiguous(), "logits": logits.contiguous(),
                       "ort_logits": torch.from_numpy(ort_logits).contiguous()},
                      str(args.out / f"{name}.io.safetensors"), metadata=meta)
            print(f"{name}: opset {opset}, ops {dict(ops)}, |ort - torch| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
