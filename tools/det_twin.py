#!/usr/bin/env python3
"""The torchvision twin of normvision's Faster R-CNN (src/model/faster_rcnn.rs, src/detect/detector.rs): golden
fixtures and a side-by-side speed run.

    tools/.venv/bin/python tools/det_twin.py golden             # tests/fixtures/detect/faster_rcnn_*.safetensors
    tools/.venv/bin/python tools/det_twin.py bench [--threads 2] [--batch 2] [--side 128] [--json]

The twin is torchvision's own `FasterRCNN` with normvision's parts: the backbone is seg_twin.py's ResNet-14
(last stage dilated, output stride 8) with `out_channels`, the RPN head torchvision's `RPNHead`, the anchors
`AnchorGenerator(((16, 32, 64),), ((0.5, 1, 2),))`, the pooler `MultiScaleRoIAlign(["0"], 7, 2)` (aligned=False,
scale 1/8 inferred), the box head `TwoMLPHead` (fc6, fc7) or `FastRCNNConvFCHead` with GroupNorm (4conv1fc), the
predictor `FastRCNNPredictor`. Images are fed normalized (image_mean 0, image_std 1) at min_size = max_size =
their side, so the transform resizes by exactly 1.

golden   one training step (the four losses, then the backward of their sum) of two small detectors (frozen-BN
         backbone + two-FC head; GroupNorm backbone + 4conv1fc GN head) on fixed random weights, with the
         samplers set to take every anchor and every proposal (batch per image 10^5, positive fraction 1), so
         that the step is deterministic: `init.<key>`, `x`, `boxes.<i>`, `labels.<i>`, `loss.<name>`,
         `grad.<param>`. Metadata `meta`: the FasterRcnnConfig/DetectorConfig normvision builds.
bench    a training step (zero_grad, forward with losses, backward) and inference of the default detector
         (frozen BN, two-FC head, 11 classes, 1 x side x side scenes with three boxes each) against
         `normvision bench --task detect --json` in the same run. Prints a table, or --json lines with the keys
         model, mode, batch, threads, torch_img_s, normvision_img_s, speedup.
"""
import argparse
import json
import math
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seg_twin import Backbone  # noqa: E402

from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.rpn import RPNHead  # noqa: E402
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def build(cfg: dict, side: int, take_all: bool = False) -> FasterRCNN:
    net, d = cfg["net"], cfg
    backbone = Backbone(net["backbone_norm"], net["groups"], net["in_channels"], net["widths"])
    c = net["widths"][2]
    backbone.out_channels = c
    p, rep = net["pool"], net["representation"]
    if net["box_head"] == "two_fc":
        head = TwoMLPHead(c * p * p, rep)
    else:
        hc = net["head_channels"]
        head = FastRCNNConvFCHead((c, p, p), [hc] * 4, [rep], norm_layer=partial(nn.GroupNorm, net["groups"]))
    big = 100000
    model = FasterRCNN(
        backbone, num_classes=None, min_size=side, max_size=side, image_mean=[0.0] * net["in_channels"],
        image_std=[1.0] * net["in_channels"],
        rpn_anchor_generator=AnchorGenerator((tuple(d["anchor_sizes"]),), (tuple(d["aspect_ratios"]),)),
        rpn_head=RPNHead(c, net["anchors_per_location"]),
        rpn_pre_nms_top_n_train=d["rpn_pre_nms_top_n_train"], rpn_pre_nms_top_n_test=d["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_train=d["rpn_post_nms_top_n_train"],
        rpn_post_nms_top_n_test=d["rpn_post_nms_top_n_test"], rpn_nms_thresh=d["rpn_nms_thresh"],
        rpn_fg_iou_thresh=d["rpn_fg_iou"], rpn_bg_iou_thresh=d["rpn_bg_iou"],
        rpn_batch_size_per_image=big if take_all else d["rpn_batch_per_image"],
        rpn_positive_fraction=1.0 if take_all else d["rpn_positive_fraction"],
        box_roi_pool=MultiScaleRoIAlign(["0"], p, d["roi_sampling_ratio"]),
        box_head=head, box_predictor=FastRCNNPredictor(rep, net["num_classes"]),
        box_score_thresh=d["box_score_thresh"], box_nms_thresh=d["box_nms_thresh"],
        box_detections_per_img=d["detections_per_image"], box_fg_iou_thresh=d["box_fg_iou"],
        box_bg_iou_thresh=d["box_bg_iou"],
        box_batch_size_per_image=big if take_all else d["box_batch_per_image"],
        box_positive_fraction=1.0 if take_all else d["box_positive_fraction"],
    )
    return model


def default_config(backbone_norm="frozen", box_head="two_fc", classes=11, in_channels=1) -> dict:
    """DetectorConfig::new(FasterRcnnConfig::new(..)) of normvision, as JSON."""
    return {
        "net": {"in_channels": in_channels, "num_classes": classes, "backbone_norm": backbone_norm,
                "box_head": box_head, "groups": 8, "widths": [32, 64, 128], "anchors_per_location": 9,
                "pool": 7, "head_channels": 64, "representation": 256, "seed": 0},
        "anchor_sizes": [16.0, 32.0, 64.0], "aspect_ratios": [0.5, 1.0, 2.0],
        "rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 500, "rpn_pre_nms_top_n_test": 500,
        "rpn_post_nms_top_n_test": 300, "rpn_nms_thresh": 0.7, "rpn_fg_iou": 0.7, "rpn_bg_iou": 0.3,
        "rpn_batch_per_image": 256, "rpn_positive_fraction": 0.5, "box_fg_iou": 0.5, "box_bg_iou": 0.5,
        "box_batch_per_image": 128, "box_positive_fraction": 0.25, "box_score_thresh": 0.05,
        "box_nms_thresh": 0.5, "detections_per_image": 100, "roi_aligned": False, "roi_sampling_ratio": 2,
        "stride": 8,
    }


def randomize(model: nn.Module, g: torch.Generator) -> None:
    """Every weight random (so that no layer hides behind a zero init), frozen statistics away from identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(1.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, FrozenBatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def targets_for(g: torch.Generator, n: int, side: int, classes: int):
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * side * 0.6
        wh = 12 + torch.rand(k, 2, generator=g) * side * 0.35
        boxes = torch.cat([xy, (xy + wh).clamp(max=side)], 1)
        labels = torch.randint(1, classes, (k,), generator=g)
        out.append({"boxes": boxes, "labels": labels})
    return out


def golden(out_dir: Path) -> None:
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    side = 64
    for name, norm, head in [("faster_rcnn_frozen_2fc", "frozen", "two_fc"),
                             ("faster_rcnn_gn_4conv", "group", "four_conv_gn")]:
        cfg = default_config(norm, head, classes=4)
        cfg["net"].update({"widths": [8, 12, 16], "groups": 4, "head_channels": 8, "representation": 32})
        cfg.update({"rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 60})
        g = torch.Generator().manual_seed(7 + len(name))
        model = build(cfg, side, take_all=True)
        randomize(model, g)
        model.train()
        x = torch.randn(2, 1, side, side, generator=g)
        targets = targets_for(g, 2, side, 4)
        tensors = {f"init.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        losses = model(list(x), targets)
        total = sum(losses.values())
        total.backward()
        tensors["x"] = x
        for i, t in enumerate(targets):
            tensors[f"boxes.{i}"] = t["boxes"].contiguous()
            tensors[f"labels.{i}"] = t["labels"].contiguous()
        for k, v in losses.items():
            tensors[f"loss.{k}"] = v.detach().reshape(1)
        for k, p in model.named_parameters():
            if p.grad is not None:
                tensors[f"grad.{k}"] = p.grad.detach().contiguous()
        meta = {"meta": json.dumps({"config": cfg, "torch": torch.__version__,
                                    "about": "tools/det_twin.py golden: one training step, samplers taking all"})}
        out = out_dir / f"{name}.safetensors"
        save_file(tensors, str(out), metadata=meta)
        print(out, {k: round(v.item(), 6) for k, v in losses.items()})


def bench(args) -> None:
    torch.set_num_threads(args.threads)
    cfg = default_config()
    model = build(cfg, args.side)
    # the input `normvision bench --task detect` uses, so that both run the same proposals' worth of work
    n, i, j = torch.meshgrid(torch.arange(args.batch), torch.arange(args.side), torch.arange(args.side),
                             indexing="ij")
    x = (((n * 13 + i * 7 + j * 3) % 17).float() / 8.0 - 1.0).unsqueeze(1)
    s = float(args.side)
    targets = [{"boxes": torch.tensor([[0.1 * s, 0.1 * s, 0.35 * s, 0.4 * s], [0.5 * s, 0.2 * s, 0.8 * s, 0.45 * s],
                                       [0.3 * s + n, 0.6 * s, 0.55 * s, 0.9 * s]]),
                "labels": torch.tensor([1 + n % 10, 3, 7])} for n in range(args.batch)]

    def timed(fn, reps, warm):
        for _ in range(warm):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        return ts[len(ts) // 2]

    def step():
        model.zero_grad(set_to_none=True)
        losses = model(list(x), targets)
        sum(losses.values()).backward()

    model.train()
    t_train = timed(step, args.steps, args.warmup)
    model.eval()

    def infer():
        with torch.inference_mode():
            model(list(x))
    t_inf = timed(infer, args.steps, args.warmup)
    nv = subprocess.run([str(ROOT / "target/release/normvision"), "--threads", str(args.threads), "bench", "--task",
                         "detect", "--batch-size", str(args.batch), "--side", str(args.side), "--steps",
                         str(args.steps), "--warmup", str(args.warmup), "--json"],
                        check=True, capture_output=True, text=True)
    r = json.loads(nv.stdout.strip().splitlines()[-1])
    rows = [("train", args.batch / t_train, r["train_img_s"]), ("inference", args.batch / t_inf, r["infer_img_s"])]
    for mode, t, n in rows:
        rec = {"model": "faster-rcnn", "mode": mode, "batch": args.batch, "threads": args.threads,
               "torch_img_s": t, "normvision_img_s": n, "speedup": n / t}
        if args.json:
            print(json.dumps(rec))
        else:
            print(f"{mode:>9}: torchvision {t:8.1f} img/s, normvision {n:8.1f} img/s, speedup {n / t:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("golden")
    g.add_argument("--out", default=str(ROOT / "tests/fixtures/detect"))
    b = sub.add_parser("bench")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--side", type=int, default=128)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.cmd == "golden":
        golden(Path(args.out))
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
