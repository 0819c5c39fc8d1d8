#!/usr/bin/env python3
"""The torchvision twin of normvision's Faster R-CNN (src/model/faster_rcnn.rs, src/detect/detector.rs): golden
fixtures, a side-by-side speed run, and the training recipe side by side.

    tools/.venv/bin/python tools/det_twin.py golden             # tests/fixtures/detect/faster_rcnn_*.safetensors
    tools/.venv/bin/python tools/det_twin.py bench [--threads 2] [--batch 2] [--side 128] [--json]
    tools/.venv/bin/python tools/det_twin.py compare [--seeds 0 1 2] [--scenes 800] [--epochs 4]
    tools/.venv/bin/python tools/det_twin.py train --init INIT --train DIR --test DIR

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
train    `train --task detect`'s recipe in torchvision from normvision's initial weights (`--save-init`, whose
         metadata holds the configuration, the input normalization and the seed) on scenes on disk: SGD with
         momentum and weight decay over the trainable parameters, the linear warm-up and the two ÷10 steps of
         DetTrainConfig::lr_at, flips with probability ½; pycocotools' twelve numbers on the test scenes after
         every epoch. Its own data order and samplers' draws (torch.randperm cannot be reproduced).
eval     a normvision checkpoint through torchvision's inference and pycocotools (same weights, both engines).
compare  the twin comparison of docs/results/detection-vs-torch.md: writes the scenes (`normvision scenes`),
         pre-trains the resnet14 BN classifier, then for each seed trains normvision (frozen BN backbone from
         the classifier, two-FC head) and the twin from the same initial weights; appends one JSON line per run
         to --results (seeds already there are skipped) and prints mean, std and spread of AP50 and AP.
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


# --------------------------------------------------------------------------------------------------------------
# the reference recipe: train --task detect in torchvision
# --------------------------------------------------------------------------------------------------------------

def read_coco(d: Path):
    """A scenes directory (`normvision scenes`): grayscale images as uint8 arrays, training targets (crowds
    dropped, as torchvision's references do; labels 1..K over the sorted category ids, as normvision numbers
    them), the category ids, and the pycocotools ground truth."""
    import contextlib
    import io
    import numpy as np
    from PIL import Image
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(d / "annotations.json"))
    cats = sorted(gt.getCatIds())
    label = {c: k + 1 for k, c in enumerate(cats)}
    ids = sorted(gt.getImgIds())
    imgs, targets = [], []
    for i in ids:
        info = gt.loadImgs(i)[0]
        imgs.append(np.array(Image.open(d / "images" / info["file_name"]).convert("L")))
        anns = [a for a in gt.loadAnns(gt.getAnnIds(imgIds=i)) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        targets.append({"boxes": boxes, "labels": torch.tensor([label[a["category_id"]] for a in anns],
                                                                  dtype=torch.int64)})
    return ids, imgs, targets, cats, gt


def coco_stats(model, ids, imgs, cats, gt, mean, std, batch=8):
    """pycocotools' twelve numbers for the model's detections of `imgs`."""
    import contextlib
    import io
    from pycocotools.cocoeval import COCOeval
    model.eval()
    dets = []
    with torch.inference_mode():
        for s0 in range(0, len(imgs), batch):
            xs = [(torch.from_numpy(im).float()[None] / 255.0 - mean) / std for im in imgs[s0:s0 + batch]]
            for i, out in zip(ids[s0:s0 + batch], model(xs)):
                for b, l, sc in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
                    dets.append({"image_id": i, "category_id": cats[l - 1], "bbox": [b[0], b[1], b[2] - b[0],
                                 b[3] - b[1]], "score": sc})
    if not dets:
        return [0.0] * 12
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def lr_at(step, total, lr, warmup, factor=1e-3, fractions=(2 / 3, 8 / 9), gamma=0.1):
    """DetTrainConfig::lr_at."""
    for f in fractions:
        if step >= f * total:
            lr *= gamma
    if step < warmup:
        a = step / warmup
        lr *= factor * (1 - a) + a
    return lr


def train(args) -> list:
    """Trains torchvision's twin from `args.init` (`normvision train --task detect --save-init`) with the
    recipe in its metadata; prints one line per epoch and returns the per-epoch records."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    torch.set_num_threads(args.threads)
    with safe_open(args.init, "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    norm = json.loads(meta["normalization"])
    seed = int(meta["seed"])
    mean, std = norm["mean"][0], norm["std"][0]
    ids, imgs, targets, cats, _ = read_coco(Path(args.train))
    tids, timgs, _, tcats, tgt = read_coco(Path(args.test))
    side = imgs[0].shape[0]
    model = build(cfg["detector"], side)
    model.load_state_dict(load_file(args.init), strict=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    g = torch.Generator().manual_seed(seed)
    n, bsz = len(imgs), cfg["batch_size"]
    per_epoch = (n + bsz - 1) // bsz
    total = per_epoch * cfg["epochs"]
    step, out = 0, []
    for e in range(cfg["epochs"]):
        model.train()
        order = torch.randperm(n, generator=g).tolist()
        t0 = time.perf_counter()
        sums = {}
        for b in range(per_epoch):
            idx = order[b * bsz:(b + 1) * bsz]
            xs, ts = [], []
            for i in idx:
                x = (torch.from_numpy(imgs[i]).float()[None] / 255.0 - mean) / std
                t = {k: v.clone() for k, v in targets[i].items()}
                if cfg["flip"] and torch.rand(1, generator=g).item() < 0.5:
                    x = x.flip(-1)
                    bx = t["boxes"]
                    t["boxes"] = torch.stack([side - bx[:, 2], bx[:, 1], side - bx[:, 0], bx[:, 3]], 1)
                xs.append(x)
                ts.append(t)
            lr = lr_at(step, total, cfg["lr"], cfg["warmup_steps"], cfg["warmup_factor"], cfg["lr_steps"],
                       cfg["gamma"])
            for grp in opt.param_groups:
                grp["lr"] = lr
            opt.zero_grad(set_to_none=True)
            losses = model(xs, ts)
            sum(losses.values()).backward()
            opt.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            step += 1
        secs = time.perf_counter() - t0
        stats = coco_stats(model, tids, timgs, tcats, tgt, mean, std)
        r = {"epoch": e + 1, "step": step, "losses": {k: v / per_epoch for k, v in sums.items()},
             "stats": stats, "train_img_s": n / secs, "secs": secs}
        out.append(r)
        print(json.dumps(r) if args.json else
              f"epoch {e + 1}: AP {stats[0]:.3f} AP50 {stats[1]:.3f} AP75 {stats[2]:.3f} ({secs:.0f} s, "
              f"{n / secs:.1f} img/s)", flush=True)
    return out


def evaluate_weights(args) -> None:
    """Evaluates a normvision detection checkpoint (or --save-init file) in torchvision on test scenes: the
    same weights through torchvision's inference and pycocotools, against normvision's own evaluation."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    torch.set_num_threads(args.threads)
    with safe_open(args.weights, "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    norm = json.loads(meta["normalization"])
    tids, timgs, _, tcats, tgt = read_coco(Path(args.test))
    model = build(cfg["detector"], timgs[0].shape[0])
    model.load_state_dict(load_file(args.weights), strict=True)
    stats = coco_stats(model, tids, timgs, tcats, tgt, norm["mean"][0], norm["std"][0])
    print(json.dumps({"weights": args.weights, "stats": dict(zip(STAT_KEYS, stats))}))


def compare(args) -> None:
    """For each seed: normvision trains (`train --task detect` from the pre-trained backbone, on the scenes on
    disk, writing its initial weights), then the twin trains from those weights. One JSON line per run is
    appended to --results; seeds already there are skipped, so that the comparison resumes."""
    nv = str(ROOT / "target/release/normvision")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    th = ["--threads", str(args.threads)]
    for split, seed, count in [("train", 0, args.scenes), ("test", 1, args.test_scenes)]:
        d = work / f"scenes-{split}"
        if not (d / "annotations.json").is_file():
            subprocess.run([nv, *th, "scenes", "--out", str(d), "--size", str(args.side), "--count", str(count),
                            "--seed", str(seed), "--split", split], check=True)
    pre = work / "resnet14-bn.safetensors"
    if not pre.is_file():
        subprocess.run([nv, *th, "train", "--model", "resnet14", "--norm", "batch", "--epochs",
                        str(args.pre_epochs), "--out", str(pre), "--quiet"], check=True)
    results = Path(args.results)
    done = set()
    if results.is_file():
        done = {(r["impl"], r["seed"]) for r in map(json.loads, results.read_text().splitlines()) if r.strip()}
    for seed in args.seeds:
        init = work / f"init-{seed}.safetensors"
        if ("normvision", seed) not in done:
            t0 = time.perf_counter()
            p = subprocess.run([nv, *th, "train", "--task", "detect", "--coco",
                                str(work / "scenes-train/annotations.json"), "--coco-images",
                                str(work / "scenes-train/images"), "--test-coco",
                                str(work / "scenes-test/annotations.json"), "--test-coco-images",
                                str(work / "scenes-test/images"), "--channels", "1", "--epochs", str(args.epochs),
                                "--seed", str(seed), "--backbone-from", str(pre), "--save-init", str(init),
                                "--out", str(work / f"nv-{seed}.safetensors"), "--json", "--quiet"],
                               check=True, capture_output=True, text=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rec = {"impl": "normvision", "seed": seed, "stats": [r["stats"][k] for k in STAT_KEYS],
                   "ap50_per_epoch": [e["stats"][1] for e in r["evals"]], "train_img_s": r["train_img_s"],
                   "seconds": time.perf_counter() - t0}
            with results.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(rec, flush=True)
        if ("torchvision", seed) not in done:
            t0 = time.perf_counter()
            targs = argparse.Namespace(init=str(init), train=str(work / "scenes-train"),
                                       test=str(work / "scenes-test"), threads=args.threads, json=True)
            eps = train(targs)
            rec = {"impl": "torchvision", "seed": seed, "stats": eps[-1]["stats"],
                   "ap50_per_epoch": [e["stats"][1] for e in eps],
                   "train_img_s": sum(e["train_img_s"] for e in eps) / len(eps),
                   "torch": torch.__version__, "seconds": time.perf_counter() - t0}
            with results.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(rec, flush=True)
    summarize(results)


STAT_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def summarize(results: Path) -> None:
    import statistics as st
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    print(f"{'':>12} {'seeds':>5} {'AP50 mean':>9} {'std':>6} {'spread':>6} {'AP mean':>8} {'std':>6} {'img/s':>6}")
    for impl in ["normvision", "torchvision"]:
        rs = [r for r in rows if r["impl"] == impl]
        if not rs:
            continue
        a50 = [100 * r["stats"][1] for r in rs]
        ap = [100 * r["stats"][0] for r in rs]
        sd = (lambda v: st.stdev(v) if len(v) > 1 else 0.0)
        print(f"{impl:>12} {len(rs):>5} {st.mean(a50):>9.2f} {sd(a50):>6.2f} {max(a50) - min(a50):>6.2f} "
              f"{st.mean(ap):>8.2f} {sd(ap):>6.2f} {st.mean(r['train_img_s'] for r in rs):>6.1f}")


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
    t = sub.add_parser("train")
    t.add_argument("--init", required=True)
    t.add_argument("--train", required=True, help="a scenes directory (annotations.json, images/)")
    t.add_argument("--test", required=True)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--json", action="store_true")
    e = sub.add_parser("eval")
    e.add_argument("--weights", required=True, help="a detection checkpoint or --save-init file of normvision")
    e.add_argument("--test", required=True, help="a scenes directory (annotations.json, images/)")
    e.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("--work", default="runs/det-twin")
    c.add_argument("--results", default=str(ROOT / "docs/results/detection-vs-torch.jsonl"))
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--scenes", type=int, default=800)
    c.add_argument("--test-scenes", type=int, default=200)
    c.add_argument("--side", type=int, default=128)
    c.add_argument("--epochs", type=int, default=4)
    c.add_argument("--pre-epochs", type=int, default=2)
    c.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "golden":
        golden(Path(args.out))
    elif args.cmd == "bench":
        bench(args)
    elif args.cmd == "train":
        train(args)
    elif args.cmd == "eval":
        evaluate_weights(args)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
