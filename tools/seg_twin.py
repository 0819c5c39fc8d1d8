#!/usr/bin/env python3
"""The PyTorch twin of normvision's DeepLabV3 (src/model/deeplab.rs): golden fixtures, the reference recipe, and
a side-by-side speed run.

Run from the repository root with the project's venv (`bash tools/torch_env.sh` makes it):

    tools/.venv/bin/python tools/seg_twin.py golden            # tests/fixtures/model/deeplab_*.safetensors
    tools/.venv/bin/python tools/seg_twin.py bench [--threads 2] [--batch 8] [--side 64] [--rounds R] [--json]
    tools/.venv/bin/python tools/seg_twin.py train --init INIT.safetensors --scenes DIR --test-scenes DIR \\
        [--epochs 15] [--batch 8] [--lr 0.02] [--json]

The twin has normvision's state-dict names (torchvision's `deeplabv3_resnet50` layout): `backbone.*` (a
ResNet-14: 3x3 stem with stride 2, three stages of two basic blocks, the last stage's stride replaced by
dilation as `replace_stride_with_dilation` does: its first block keeps dilation 1, the second takes 2),
`classifier.0.convs.0-4` (ASPP: 1x1, three dilated 3x3, image pooling), `classifier.0.project`,
`classifier.1-3` (3x3 conv, norm, ReLU) and `classifier.4` (1x1 to the classes); the logits are resized to the
input with `F.interpolate(..., mode="bilinear", align_corners=False)`. A norm and its ReLU take two
`nn.Sequential` indices, a lone ReLU one (norm `none`: the convolutions get a bias instead).

golden   one training-mode forward/backward of two small networks (BatchNorm; GroupNorm) on fixed weights,
         in float32 and float64: `init.<key>` (the state dict), `x`, `targets` (with 255 = ignored pixels),
         `logits`/`logits64`, `loss`/`loss64`, `grad.<param>`/`grad64.<param>`, `state.<key>` (running
         statistics after the forward). Metadata `meta`: JSON with `config`, the DeepLabConfig normvision builds.
bench    a training step (zero_grad, forward, cross-entropy ignoring 255, backward, the recipe's SGD update at
         lr 1e-3, so that the weights change every step on both sides) and inference
         (torch.inference_mode) of the default network (1x64x64 inputs, 11 classes, BatchNorm) in NCHW and
         channels_last, the faster of the two reported, against `normvision bench --task segment --json` in
         the same run. With --rounds R, R rounds of PyTorch then normvision back to back (each ratio compares
         measurements taken under the same load), and the ratios' min / median / max. img/s and speedup come
         from each side's median step; speedup_of_min compares the fastest steps, the ones least disturbed on
         a shared machine. Prints a table, or --json lines with the keys model, mode, batch, threads,
         torch_img_s, normvision_img_s, speedup (and speedup_of_min, both layouts' numbers and the round).
train    the reference recipe of `normvision train --task segment` in PyTorch from the same initial weights
         (`--save-init` of that command) on the same scenes (`normvision scenes` writes the bytes the trainer
         draws on the fly) in the same order with the same augmentation: SGD momentum 0.9, weight decay 1e-4,
         poly(0.9) decay over the run, batch 8, crops of 64 scaled 0.75-1.5 and flipped, each draw a pure
         function of (seed, epoch, sample) through SplitMix64 (src/segment/batches.rs). Reports the test
         mIoU, pixel accuracy and per-class IoU after every epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
IGNORE = 255


# --------------------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------------------

def norm_layer(kind: str, c: int, groups: int):
    if kind == "none":
        return None
    if kind == "batch":
        return nn.BatchNorm2d(c)
    if kind == "group":
        return nn.GroupNorm(min(groups, c), c)
    if kind == "layer":
        return nn.GroupNorm(1, c)
    if kind == "frozen":
        from torchvision.ops import FrozenBatchNorm2d
        return FrozenBatchNorm2d(c)
    raise ValueError(f"no twin for norm {kind!r}")


def conv_norm_relu(kind: str, groups: int, conv: nn.Conv2d) -> list:
    layers = [conv]
    n = norm_layer(kind, conv.out_channels, groups)
    if n is not None:
        layers.append(n)
    layers.append(nn.ReLU())
    return layers


class Block(nn.Module):
    """Builder::basic_block: relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x)), with dilation."""

    def __init__(self, kind, groups, cin, cout, stride, dilation):
        super().__init__()
        bias = kind == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)
        self.bn1 = norm_layer(kind, cout, groups) or nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=bias)
        self.bn2 = norm_layer(kind, cout, groups) or nn.Identity()
        if stride != 1 or cin != cout:
            sc = [nn.Conv2d(cin, cout, 1, stride=stride, bias=bias)]
            n = norm_layer(kind, cout, groups)
            if n is not None:
                sc.append(n)
            self.shortcut = nn.Sequential(*sc)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        a = self.bn2(self.conv2(a))
        return torch.relu(a + self.shortcut(x))


class Backbone(nn.Module):
    """Builder::resnet14 with dilate_last (output stride 8)."""

    def __init__(self, kind, groups, cin, widths):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, widths[0], 3, stride=2, padding=1, bias=kind == "none")
        self.bn1 = norm_layer(kind, widths[0], groups) or nn.Identity()
        c = widths[0]
        for stage, cout in enumerate(widths):
            blocks = []
            for b in range(2):
                if stage == 2:
                    stride, dil = 1, (1 if b == 0 else 2)
                else:
                    stride, dil = (2 if b == 0 else 1), 1
                blocks.append(Block(kind, groups, c, cout, stride, dil))
                c = cout
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


class ASPPPooling(nn.Sequential):
    def __init__(self, kind, groups, cin, c):
        super().__init__(nn.AdaptiveAvgPool2d(1), *conv_norm_relu(kind, groups, nn.Conv2d(cin, c, 1, bias=kind == "none")))

    def forward(self, x):
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, kind, groups, cin, c, rates, dropout):
        super().__init__()
        bias = kind == "none"
        mods = [nn.Sequential(*conv_norm_relu(kind, groups, nn.Conv2d(cin, c, 1, bias=bias)))]
        for r in rates:
            mods.append(nn.Sequential(*conv_norm_relu(kind, groups, nn.Conv2d(cin, c, 3, padding=r, dilation=r, bias=bias))))
        mods.append(ASPPPooling(kind, groups, cin, c))
        self.convs = nn.ModuleList(mods)
        proj = conv_norm_relu(kind, groups, nn.Conv2d(5 * c, c, 1, bias=bias))
        if dropout > 0:
            proj.append(nn.Dropout(dropout))
        self.project = nn.Sequential(*proj)

    def forward(self, x):
        return self.project(torch.cat([m(x) for m in self.convs], dim=1))


class DeepLab(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        g = cfg["groups"]
        self.backbone = Backbone(cfg["backbone_norm"], g, cfg["in_channels"], cfg["widths"])
        hk, c = cfg["head_norm"], cfg["aspp_channels"]
        head = [ASPP(hk, g, cfg["widths"][2], c, cfg["rates"], cfg["dropout"])]
        head += conv_norm_relu(hk, g, nn.Conv2d(c, c, 3, padding=1, bias=hk == "none"))
        head.append(nn.Conv2d(c, cfg["num_classes"], 1))
        self.classifier = nn.Sequential(*head)

    def forward(self, x):
        y = self.classifier(self.backbone(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def default_config(norm="batch", in_channels=1, classes=11) -> dict:
    """DeepLabConfig::new(in_channels, classes, norm) (src/model/deeplab.rs)."""
    return {"in_channels": in_channels, "num_classes": classes, "backbone_norm": norm, "head_norm": norm,
            "groups": 8, "ghost_batch": 16, "widths": [32, 64, 128], "aspp_channels": 64, "rates": [2, 3, 4],
            "dropout": 0.0, "init": {"init": "kaiming_normal", "scale": 1.0}, "seed": 0}


# --------------------------------------------------------------------------------------------------------------
# golden fixtures
# --------------------------------------------------------------------------------------------------------------

def randomize(net: nn.Module, g: torch.Generator) -> None:
    """Weights N(0, sqrt(2/fan_in)); norm affines and running statistics away from their defaults."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                    m.num_batches_tracked.fill_(5)


def golden(out_dir: Path) -> None:
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    for name, norm, groups in [("deeplab_bn", "batch", 4), ("deeplab_gn", "group", 4)]:
        cfg = default_config(norm, in_channels=2, classes=4)
        cfg.update({"widths": [8, 12, 16], "aspp_channels": 8, "groups": groups, "rates": [2, 3, 4]})
        g = torch.Generator().manual_seed(1 + len(name))
        net = DeepLab(cfg)
        randomize(net, g)
        init = {k: v.detach().clone() for k, v in net.state_dict().items()}
        x = torch.randn((3, 2, 28, 36), generator=g)
        targets = torch.randint(0, 4, (3, 28, 36), generator=g)
        targets[torch.rand((3, 28, 36), generator=g) < 0.1] = IGNORE
        tensors = {f"init.{k}": v.contiguous() for k, v in init.items()}
        tensors["x"] = x
        tensors["targets"] = targets
        for dtype, suffix in [(torch.float32, ""), (torch.float64, "64")]:
            net_d = DeepLab(cfg).to(dtype)
            net_d.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in init.items()})
            net_d.train()
            logits = net_d(x.to(dtype))
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE)
            loss.backward()
            tensors[f"logits{suffix}"] = logits.detach().float().contiguous() if suffix == "" else logits.detach().contiguous()
            tensors[f"loss{suffix}"] = loss.detach().reshape(1).to(dtype)
            for k, p in net_d.named_parameters():
                tensors[f"grad{suffix}.{k}"] = p.grad.detach().contiguous()
            if suffix == "":
                for k, v in net_d.state_dict().items():
                    if "running" in k or "num_batches" in k:
                        tensors[f"state.{k}"] = v.contiguous()
        meta = {"meta": json.dumps({"config": cfg, "torch": torch.__version__,
                "about": "tools/seg_twin.py golden: one training-mode forward/backward, cross-entropy ignoring 255"})}
        out = out_dir / f"{name}.safetensors"
        save_file(tensors, str(out), metadata=meta)
        print(f"{out}: loss {tensors['loss'].item():.6f}, {sum(1 for k in tensors if k.startswith('grad.'))} gradients")


# --------------------------------------------------------------------------------------------------------------
# speed, side by side
# --------------------------------------------------------------------------------------------------------------

# the learning rate of the benchmark's updates (normvision's `BENCH_LR`, src/bin/normvision/segment.rs)
BENCH_LR = 1e-3


def bench(args) -> None:
    import subprocess
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = DeepLab(default_config())
    b, s = args.batch, args.side
    x = torch.randn(b, 1, s, s)
    t = torch.randint(0, 11, (b, s, s))

    def timed(fn, reps, warm):
        for _ in range(warm):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        return ts[len(ts) // 2], ts[0]

    def torch_round():
        out = {}
        for layout in ["nchw", "channels_last"]:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            m = net.to(memory_format=fmt)
            xi = x.contiguous(memory_format=fmt)
            m.train()
            # foreach: the multi-tensor update, the faster one on CPU (not the default there)
            opt = torch.optim.SGD(m.parameters(), lr=BENCH_LR, momentum=0.9, weight_decay=1e-4, foreach=True)

            def step():
                m.zero_grad(set_to_none=True)
                loss = F.cross_entropy(m(xi), t, ignore_index=IGNORE)
                loss.backward()
                opt.step()

            out[("train", layout)] = timed(step, args.steps, 3)
            m.eval()

            def infer():
                with torch.inference_mode():
                    m(xi)

            out[("inference", layout)] = timed(infer, args.steps, 3)
        return out

    cmd = [args.normvision, "--threads", str(args.threads), "bench", "--task", "segment", "--batch-size", str(b),
           "--side", str(s), "--steps", str(args.steps), "--json"]

    def normvision_round():
        nv = {}
        for line in subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines():
            r = json.loads(line)
            nv[r["mode"]] = (r["median_ms"] / 1e3, r["min_ms"] / 1e3)
        return nv

    # Each round measures PyTorch and then normvision back to back, so that a ratio compares two measurements
    # taken under the same load (the machine is shared); the rounds' ratios give min / median / max.
    rows = []
    for rnd in range(args.rounds):
        torch_img_s = torch_round()
        nv = normvision_round()
        for mode in ["train", "inference"]:
            # img/s from the median step; the fastest step (min) is the one least disturbed by the machine's
            # other tenants, so the ratio of the minima is reported beside the ratio of the medians
            best = min(["nchw", "channels_last"], key=lambda l: torch_img_s[(mode, l)][0])
            (tmed, tmin), (nmed, nmin) = torch_img_s[(mode, best)], nv[mode]
            rows.append({"model": "deeplabv3", "mode": mode, "batch": b, "threads": args.threads, "side": s,
                         "torch_img_s": b / tmed, "torch_layout": best,
                         "torch_nchw_img_s": b / torch_img_s[(mode, "nchw")][0],
                         "torch_channels_last_img_s": b / torch_img_s[(mode, "channels_last")][0],
                         "normvision_img_s": b / nmed, "speedup": tmed / nmed,
                         "torch_min_ms": tmin * 1e3, "normvision_min_ms": nmin * 1e3, "speedup_of_min": tmin / nmin,
                         "round": rnd, "torch": torch.__version__})
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(f"{'round':>5} {'mode':<10} {'batch':>5} {'threads':>7} {'torch img/s':>12} {'layout':>14} "
              f"{'normvision':>11} {'speedup':>8} {'of min':>7}")
        for r in rows:
            print(f"{r['round']:>5} {r['mode']:<10} {r['batch']:>5} {r['threads']:>7} {r['torch_img_s']:>12.1f} "
                  f"{r['torch_layout']:>14} {r['normvision_img_s']:>11.1f} {r['speedup']:>7.2f}x "
                  f"{r['speedup_of_min']:>6.2f}x")
        if args.rounds > 1:
            for mode in ["train", "inference"]:
                for key in ["speedup", "speedup_of_min"]:
                    sp = sorted(r[key] for r in rows if r["mode"] == mode)
                    print(f"{mode}: {key} over {len(sp)} rounds min {sp[0]:.2f}x / median "
                          f"{sp[len(sp) // 2]:.2f}x / max {sp[-1]:.2f}x")


# --------------------------------------------------------------------------------------------------------------
# the reference recipe, batch for batch
# --------------------------------------------------------------------------------------------------------------

MASK = (1 << 64) - 1


def splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def draw(seed, k, e, i):
    return splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ k) ^ e) ^ i)


def uniform(d):
    return (d >> 11) / float(1 << 53)


def read_scenes(d: Path, limit: int | None):
    from PIL import Image
    names = sorted(p.name for p in (d / "images").glob("*.png"))
    if limit:
        names = names[:limit]
    imgs = np.stack([np.array(Image.open(d / "images" / n)) for n in names])
    masks = np.stack([np.array(Image.open(d / "masks" / n)) for n in names])  # palette indices
    return imgs, masks


def augmented(img, mask, seed, e, i, crop, lo, hi, mean, std):
    h, w = mask.shape
    sc = lo + (hi - lo) * uniform(draw(seed, 1, e, i))
    nh, nw = max(1, math.floor(h * sc + 0.5)), max(1, math.floor(w * sc + 0.5))
    x = torch.from_numpy(img).float()[None, None] / 255.0
    if (nh, nw) != (h, w):
        x = F.interpolate(x.double(), size=(nh, nw), mode="bilinear", align_corners=False).float()
    x = x[0, 0].numpy()
    sy = (np.arange(nh) * h) // nh
    sx = (np.arange(nw) * w) // nw
    m = mask[sy][:, sx]
    ph, pw = max(nh, crop), max(nw, crop)
    xp = np.zeros((ph, pw), np.float32)
    mp = np.full((ph, pw), IGNORE, np.int64)
    xp[:nh, :nw] = x
    mp[:nh, :nw] = m
    top = math.floor(uniform(draw(seed, 2, e, i)) * (ph - crop + 1))
    left = math.floor(uniform(draw(seed, 3, e, i)) * (pw - crop + 1))
    xc, mc = xp[top:top + crop, left:left + crop], mp[top:top + crop, left:left + crop]
    if uniform(draw(seed, 4, e, i)) < 0.5:
        xc, mc = xc[:, ::-1], mc[:, ::-1]
    xc = (xc - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(xc), np.ascontiguousarray(mc)


def confusion_metrics(cm: np.ndarray):
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = [float(tp[k] / union[k]) if union[k] > 0 else None for k in range(len(tp))]
    present = [v for v in iou if v is not None]
    return {"miou": float(np.mean(present)) if present else 0.0, "pixel_acc": float(tp.sum() / max(cm.sum(), 1)),
            "iou": iou}


def train(args) -> None:
    from safetensors.torch import load_file
    from safetensors import safe_open
    torch.set_num_threads(args.threads)
    with safe_open(args.init, "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["model"])
    norm = json.loads(meta["normalization"])
    seed = int(meta["seed"])
    net = DeepLab(cfg)
    net.load_state_dict(load_file(args.init), strict=True)
    imgs, masks = read_scenes(Path(args.scenes), args.limit)
    timgs, tmasks = read_scenes(Path(args.test_scenes), args.test_limit)
    mean, std = norm["mean"][0], norm["std"][0]
    n = len(imgs)
    per_epoch = n // args.batch
    total = per_epoch * args.epochs + 1
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 - min(t, total) / total) ** 0.9)
    k = cfg["num_classes"]
    step = 0
    for e in range(args.epochs):
        net.train()
        order = sorted(range(n), key=lambda i: (draw(seed, 0, e, i), i))
        t0 = time.perf_counter()
        losses = []
        for b in range(per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            parts = [augmented(imgs[i], masks[i], seed, e, i, args.crop, args.scale[0], args.scale[1], mean, std)
                     for i in idx]
            x = torch.from_numpy(np.stack([p[0] for p in parts]))[:, None]
            t = torch.from_numpy(np.stack([p[1] for p in parts]))
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), t, ignore_index=IGNORE)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
        net.eval()
        cm = np.zeros((k, k), np.int64)
        with torch.inference_mode():
            for s0 in range(0, len(timgs), 32):
                x = (torch.from_numpy(timgs[s0:s0 + 32]).float()[:, None] / 255.0 - mean) / std
                pred = net(x).argmax(1).numpy()
                lab = tmasks[s0:s0 + 32].astype(np.int64)
                keep = lab != IGNORE
                cm += np.bincount(lab[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
        r = {"epoch": e + 1, "step": step, "train_loss": float(np.mean(losses)),
             "secs": time.perf_counter() - t0, **confusion_metrics(cm)}
        print(json.dumps(r) if args.json else
              f"epoch {e + 1}: loss {r['train_loss']:.4f}, test mIoU {100 * r['miou']:.2f}%, "
              f"pixel acc {100 * r['pixel_acc']:.2f}% ({r['secs']:.0f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("golden")
    g.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "model")
    b = sub.add_parser("bench")
    b.add_argument("--normvision", default=str(ROOT / "target" / "release" / "normvision"))
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--side", type=int, default=64)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--rounds", type=int, default=1,
                   help="measure PyTorch then normvision this many times (one ratio per round)")
    b.add_argument("--json", action="store_true")
    t = sub.add_parser("train")
    t.add_argument("--init", required=True)
    t.add_argument("--scenes", required=True)
    t.add_argument("--test-scenes", required=True)
    t.add_argument("--limit", type=int)
    t.add_argument("--test-limit", type=int)
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=0.02)
    t.add_argument("--crop", type=int, default=64)
    t.add_argument("--scale", type=float, nargs=2, default=[0.75, 1.5])
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.cmd == "golden":
        golden(a.out)
    elif a.cmd == "bench":
        bench(a)
    else:
        train(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
