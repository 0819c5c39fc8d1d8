#!/usr/bin/env python3
"""Fixtures for normvision's COCO box evaluation: ground truth, detections and pycocotools' numbers.

    PY="$(bash tools/torch_env.sh)"; "$PY" tools/gen_coco_fixtures.py tests/fixtures/coco

For each case it writes CASE.gt.json (a COCO annotations file), CASE.dets.json (COCO's result format) and
CASE.expected.json: pycocotools' twelve `stats`, the AP@[.5:.95] of each category, and sums of
`eval['precision']` and `eval['recall']` over their defined entries (to catch a difference the means hide).

The cases cover what COCOeval's rules turn on:
- score ties (scores quantized to 0.05) and detections in arbitrary order;
- crowd ground truth (matched by intersection over the detection's area, and ignored);
- gt `area` unlike the box's (as in the garment scenes, where it counts visible pixels), across all three area
  ranges; detections outside a range;
- images without ground truth, images without detections, an image with 130 detections (maxDets 100);
- a category with ground truth and no detection, a category with detections and no ground truth (-1 entries),
  category and image ids that are neither contiguous nor sorted;
- a gt annotation with id 0 (pycocotools records a match by gt id, so it counts as unmatched);
- perfect detections.
"""
import json
import os
import sys

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def rbox(rng, size, lo, hi):
    w = float(rng.uniform(lo, hi))
    h = float(w * rng.uniform(0.5, 2.0))
    h = min(h, size - 1.0)
    x = float(rng.uniform(0, size - w))
    y = float(rng.uniform(0, size - h))
    return [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]


def jitter(rng, b, amount):
    x, y, w, h = b
    dx, dy = rng.normal(0, amount * w), rng.normal(0, amount * h)
    sw, sh = np.exp(rng.normal(0, amount)), np.exp(rng.normal(0, amount))
    return [round(float(x + dx), 2), round(float(y + dy), 2), round(float(w * sw), 2), round(float(h * sh), 2)]


def random_case(seed, n_images, cats, gt_cats, det_only_cats, *, crowd=0.1, recall=0.8, wrong=0.1,
                fps=2, dense_image=None, first_ann_id=1, amount=0.12, max_gt=6, no_det_cats=()):
    rng = np.random.RandomState(seed)
    det_cats = [c for c in cats if c not in no_det_cats]
    size = 256
    image_ids = [int(i) for i in rng.permutation(np.arange(1, 3 * n_images))[:n_images]]
    images = [{"id": i, "file_name": f"{i:06}.png", "width": size, "height": size} for i in image_ids]
    categories = [{"id": c, "name": f"class{c}"} for c in cats]
    anns, dets = [], []
    ann_id = first_ann_id
    for k, img in enumerate(image_ids):
        n_gt = 0 if k in (1, 4) else int(rng.randint(1, max_gt + 1))
        for _ in range(n_gt):
            c = int(rng.choice(gt_cats))
            lo, hi = [(6, 30), (30, 90), (90, 200)][rng.randint(0, 3)]
            b = rbox(rng, size, lo, hi)
            area = round(float(b[2] * b[3] * rng.uniform(0.55, 1.0)), 1)
            iscrowd = int(rng.uniform() < crowd)
            anns.append({"id": ann_id, "image_id": img, "category_id": c, "bbox": b, "area": area,
                         "iscrowd": iscrowd})
            ann_id += 1
            if k == 6 or c in no_det_cats:
                continue  # an image without detections; a category never detected
            if rng.uniform() < recall:
                dc = c if rng.uniform() >= wrong else int(rng.choice(det_cats))
                dets.append({"image_id": img, "category_id": dc, "bbox": jitter(rng, b, amount),
                             "score": round(float(rng.randint(6, 21)) * 0.05, 2)})
                if rng.uniform() < 0.3:  # a duplicate
                    dets.append({"image_id": img, "category_id": dc, "bbox": jitter(rng, b, 2 * amount),
                                 "score": round(float(rng.randint(0, 21)) * 0.05, 2)})
        if k != 6:
            for _ in range(int(rng.randint(0, fps + 1))):
                c = int(rng.choice(det_cats + det_only_cats))
                dets.append({"image_id": img, "category_id": c, "bbox": rbox(rng, size, 6, 120),
                             "score": round(float(rng.randint(0, 15)) * 0.05, 2)})
    if dense_image is not None:
        img = image_ids[dense_image]
        for _ in range(130):
            dets.append({"image_id": img, "category_id": int(rng.choice(det_cats)),
                         "bbox": rbox(rng, size, 6, 120), "score": round(float(rng.uniform(0, 0.5)), 3)})
    order = rng.permutation(len(dets))
    dets = [dets[i] for i in order]
    gt = {"images": images, "categories": categories, "annotations": anns}
    return gt, dets


def perfect_case():
    gt, _ = random_case(7, 6, [1, 2, 3], [1, 2, 3], [], crowd=0.0)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    return gt, dets


def evaluate(gt_path, dets_path):
    coco = COCO(gt_path)
    res = coco.loadRes(dets_path)
    ev = COCOeval(coco, res, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    prec, rec = ev.eval["precision"], ev.eval["recall"]
    per_cat = []
    for k in range(prec.shape[2]):
        s = prec[:, :, k, 0, 2]
        per_cat.append(float(np.mean(s[s > -1])) if (s > -1).any() else -1.0)
    return {"stats": [float(x) for x in ev.stats], "per_category_ap": per_cat,
            "category_ids": [int(c) for c in ev.params.catIds],
            "precision_sum": float(prec[prec > -1].sum()), "precision_defined": int((prec > -1).sum()),
            "recall_sum": float(rec[rec > -1].sum()), "recall_defined": int((rec > -1).sum())}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/coco"
    os.makedirs(out, exist_ok=True)
    cases = {
        # id 0 for the first gt; category 9 has gt and no detections, 7 detections and no gt
        "mixed": random_case(0, 14, [5, 1, 9, 2], [1, 2, 5, 9], [7], dense_image=3, first_ann_id=0, amount=0.06,
                             no_det_cats=(9,)),
        # crowded, overlapping boxes and many ties
        "dense": random_case(1, 10, [1, 2, 3], [1, 2, 3], [], crowd=0.2, recall=0.95, fps=6, amount=0.15,
                             max_gt=12),
        # few detections, mostly wrong classes
        "sparse": random_case(2, 12, [3, 4, 8, 11, 12], [3, 4, 8, 11], [], recall=0.4, wrong=0.5, fps=1),
        "perfect": perfect_case(),
    }
    for name, (gt, dets) in cases.items():
        gp, dp = os.path.join(out, f"{name}.gt.json"), os.path.join(out, f"{name}.dets.json")
        with open(gp, "w") as f:
            json.dump(gt, f)
        with open(dp, "w") as f:
            json.dump(dets, f)
        expected = evaluate(gp, dp)
        expected["pycocotools"] = __import__("pycocotools").__version__ if hasattr(
            __import__("pycocotools"), "__version__") else "unknown"
        expected["numpy"] = np.__version__
        with open(os.path.join(out, f"{name}.expected.json"), "w") as f:
            json.dump(expected, f, indent=1)
        print(name, len(gt["annotations"]), "gt,", len(dets), "dets; AP", round(expected["stats"][0], 4))


if __name__ == "__main__":
    main()
