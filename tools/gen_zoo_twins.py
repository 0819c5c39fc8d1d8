#!/usr/bin/env python3
"""The PyTorch twins of normvision's model zoo (src/model/zoo.rs), with every `--norm` that PyTorch has, saved as
the state dicts users have (`safetensors.torch.save_file(model.state_dict(), ...)`) and their eval logits.

Run from the repository root (`bash tools/torch_env.sh` makes the venv):

    tools/.venv/bin/python tools/gen_zoo_twins.py            # writes tests/fixtures/twins/

For each twin <model>-<norm>:
  <model>-<norm>.safetensors     the state dict, exactly as PyTorch saves it (no metadata). Float tensors are
                                 BF16 (cnn, resnet) or F16 (mlp), so that half-precision
                                 loading is tested; their values are rounded to that type before the forward (F32 loading is tested by tests/golden_model.rs).
  <model>-<norm>.io.safetensors  x (4, 1, 8, 8) and the eval-mode logits PyTorch computes, F32; metadata: the
                                 normvision flags (model, norm, groups, channels, image size, classes).

The twins use 1x8x8 inputs (the cnn's linear layer is then 256->128) to keep the files small; the
architectures are the zoo's at any size. The Rust side is tests/torch_twins.rs. Norms: batch (BatchNorm2d after
convolutions, BatchNorm1d after linear layers), group (GroupNorm(8, C), GroupNorm(4, 100) in the mlp), layer
(GroupNorm(1, C) after convolutions, LayerNorm(C) after linear layers), instance (InstanceNorm2d(affine=True)
after convolutions, nothing after linear layers) and none (a bias on the layer before instead).
"""
from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

H = W = 8
CLASSES = 10
GROUPS = 8


def norm(kind: str, c: int, spatial: bool, groups: int = GROUPS):
    if kind == "none":
        return None
    if kind == "batch":
        return nn.BatchNorm2d(c) if spatial else nn.BatchNorm1d(c)
    if kind == "group":
        return nn.GroupNorm(min(groups, c), c)
    if kind == "layer":
        return nn.GroupNorm(1, c) if spatial else nn.LayerNorm(c)
    if kind == "instance":
        return nn.InstanceNorm2d(c, affine=True) if spatial else None
    raise ValueError(kind)


def cnn(kind: str) -> nn.Module:
    """zoo.rs `cnn`: nn.Sequential numbering, a norm and its ReLU taking two indices, a lone ReLU one."""
    bias = kind == "none"
    layers = []

    def norm_relu(c, spatial):
        n = norm(kind, c, spatial)
        if n is not None:
            layers.append(n)
        layers.append(nn.ReLU())

    for k, (cin, cout) in enumerate([(1, 32), (32, 32), (32, 64), (64, 64)]):
        layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=bias))
        norm_relu(cout, True)
        if k % 2 == 1:
            layers.append(nn.MaxPool2d(2))
    layers.append(nn.Flatten())
    layers.append(nn.Linear(64 * (H // 4) * (W // 4), 128, bias=bias or kind == "instance"))
    norm_relu(128, False)
    layers.append(nn.Linear(128, CLASSES))
    return nn.Sequential(*layers)


def mlp(kind: str) -> nn.Module:
    """zoo.rs `mlp`: three hidden layers of 100 sigmoid units, groups capped at 4."""
    bias = kind == "none"
    layers = [nn.Flatten()]
    fin = H * W
    for _ in range(3):
        layers.append(nn.Linear(fin, 100, bias=bias))
        n = norm(kind, 100, False, groups=min(GROUPS, 4))
        if n is not None:
            layers.append(n)
        layers.append(nn.Sigmoid())
        fin = 100
    layers.append(nn.Linear(100, CLASSES))
    return nn.Sequential(*layers)


class Block(nn.Module):
    """zoo.rs `basic_block`: relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))."""

    def __init__(self, kind: str, cin: int, cout: int, stride: int):
        super().__init__()
        bias = kind == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = norm(kind, cout, True) or nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.bn2 = norm(kind, cout, True) or nn.Identity()
        if stride != 1 or cin != cout:
            sc = [nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)]
            n = norm(kind, cout, True)
            if n is not None:
                sc.append(n)
            self.shortcut = nn.Sequential(*sc)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        a = self.bn2(self.conv2(a))
        return torch.relu(a + self.shortcut(x))


class ResNet(nn.Module):
    """zoo.rs `resnet`: a CIFAR-style ResNet-20 (16/32/64 channels, three blocks per stage)."""

    def __init__(self, kind: str):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=kind == "none")
        self.bn1 = norm(kind, 16, True) or nn.Identity()
        cin = 16
        for stage, cout in enumerate([16, 32, 64]):
            blocks = []
            for b in range(3):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(Block(kind, cin, cout, stride))
                cin = cout
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


TWINS = {
    "cnn": (cnn, ["batch", "group", "layer", "instance", "none"], torch.bfloat16),
    "mlp": (mlp, ["batch", "group", "layer", "none"], torch.float16),
    "resnet": (ResNet, ["batch", "group", "none"], torch.bfloat16),
}


def randomize(net: nn.Module, g: torch.Generator, dtype: torch.dtype) -> None:
    """Non-trivial affine parameters and running statistics, every value representable in `dtype`."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                    m.num_batches_tracked.fill_(7)
        for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
            t.copy_(t.to(dtype).to(torch.float32))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/twins"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for model, (make, norms, dtype) in TWINS.items():
        for kind in norms:
            g = torch.Generator().manual_seed(zlib.crc32(f"{model}-{kind}".encode()))
            torch.manual_seed(1234)
            net = make(kind)
            randomize(net, g, dtype)
            net.eval()
            x = torch.rand((4, 1, H, W), generator=g)
            with torch.no_grad():
                logits = net(x)
            sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
            name = f"{model}-{kind}"
            save_file(sd, str(args.out / f"{name}.safetensors"))
            flags = {"model": model, "norm": kind, "groups": GROUPS, "channels": 1, "image_size": H,
                     "classes": CLASSES, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__}
            save_file({"x": x.contiguous(), "logits": logits.contiguous()}, str(args.out / f"{name}.io.safetensors"),
                      metadata={"flags": json.dumps(flags)})
            print(f"{name}: {len(sd)} tensors, logits {tuple(logits.shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
