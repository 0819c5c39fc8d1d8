#!/usr/bin/env python3
"""Golden fixtures for normvision's detection parts, computed by torchvision on the CPU in float32.

    PY="$(bash tools/torch_env.sh)"; "$PY" tools/gen_detect_fixtures.py tests/fixtures/detect

One safetensors file per case (metadata "meta": JSON with the settings and the torch/torchvision versions):
- anchors_*: torchvision's AnchorGenerator on one feature map;
- box_coder: BoxCoder.encode_single / decode_single with the RPN's weights (1,1,1,1) and the box head's
  (10,10,5,5), deltas large enough to hit the log(1000/16) clamp;
- box_iou: ops.box_iou;
- nms: ops.nms at two thresholds with tied scores; ops.batched_nms on 300 boxes (torchvision's coordinate
  trick) and on 1200 boxes (one NMS per class);
- matcher: the RPN's Matcher(0.7, 0.3, allow_low_quality_matches=True) and the box head's Matcher(0.5, 0.5);
- roi_align_*: ops.roi_align forward and backward, aligned False and True, sampling ratio 2 and adaptive,
  regions inside, across and outside the map, degenerate and tiny.
"""
import json
import os
import sys

import numpy as np
import torch
import torchvision
from safetensors.numpy import save_file
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, box_iou, nms, roi_align

torch.set_num_threads(1)
OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/detect"
VERSIONS = {"torch": torch.__version__, "torchvision": torchvision.__version__}


def save(name, tensors, meta):
    arrays = {}
    for k, v in tensors.items():
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if v.dtype == np.int32 or v.dtype == np.bool_:
            v = v.astype(np.int64)
        arrays[k] = np.ascontiguousarray(v)
    save_file(arrays, os.path.join(OUT, f"{name}.safetensors"), metadata={"meta": json.dumps({**meta, **VERSIONS})})
    print(name, {k: list(a.shape) for k, a in arrays.items()})


def random_boxes(g, n, side, lo=2.0, hi=None):
    hi = hi or side / 2
    xy = torch.rand(n, 2, generator=g) * side
    wh = lo + torch.rand(n, 2, generator=g) * (hi - lo)
    return torch.cat([xy, xy + wh], dim=1)


def anchors(name, sizes, ratios, map_hw, image_hw):
    gen = AnchorGenerator(sizes=(tuple(sizes),), aspect_ratios=(tuple(ratios),))
    images = ImageList(torch.zeros(1, 3, *image_hw), [tuple(image_hw)])
    feats = [torch.zeros(1, 8, *map_hw)]
    a = gen(images, feats)[0]
    save(name, {"anchors": a, "cell": gen.cell_anchors[0]},
         {"sizes": sizes, "aspect_ratios": ratios, "map": list(map_hw), "image": list(image_hw)})


def box_coder():
    g = torch.Generator().manual_seed(1)
    p = random_boxes(g, 200, 128.0, 1.0, 60.0)
    gt = random_boxes(g, 200, 128.0, 1.0, 60.0)
    d = torch.randn(200, 4, generator=g)
    d[:20, 2:] = 6.0 + torch.rand(20, 2, generator=g) * 4  # past the clamp
    out = {"proposals": p, "gt": gt, "deltas": d}
    for tag, w in (("rpn", (1.0, 1.0, 1.0, 1.0)), ("head", (10.0, 10.0, 5.0, 5.0))):
        c = BoxCoder(w)
        out[f"enc_{tag}"] = c.encode_single(gt, p)
        out[f"dec_{tag}"] = c.decode_single(d, p)
    save("box_coder", out, {"weights_rpn": [1, 1, 1, 1], "weights_head": [10, 10, 5, 5]})


def iou_case():
    g = torch.Generator().manual_seed(2)
    a = random_boxes(g, 30, 64.0, 0.0, 40.0)
    b = random_boxes(g, 20, 64.0, 0.0, 40.0)
    b[0] = a[0]  # an exact duplicate
    save("box_iou", {"a": a, "b": b, "iou": box_iou(a, b)}, {})


def nms_case():
    g = torch.Generator().manual_seed(3)
    centres = torch.rand(12, 2, generator=g) * 100
    idx = torch.randint(0, 12, (300,), generator=g)
    jit = torch.randn(300, 4, generator=g) * 4
    half = 6 + torch.rand(300, 2, generator=g) * 10
    boxes = torch.cat([centres[idx] - half, centres[idx] + half], 1) + jit
    scores = (torch.rand(300, generator=g) * 20).floor() / 20  # many ties
    boxes[7] = boxes[3]  # identical boxes, and a tie
    scores[7] = scores[3]
    classes = torch.randint(0, 4, (300,), generator=g)
    out = {"boxes": boxes, "scores": scores, "classes": classes,
           "keep_05": nms(boxes, scores, 0.5), "keep_07": nms(boxes, scores, 0.7),
           "batched_05": batched_nms(boxes, scores, classes, 0.5)}
    # > 1000 boxes: torchvision runs one NMS per class and sorts the kept by score (not stably: distinct scores)
    big = torch.cat([random_boxes(g, 1200, 200.0, 4.0, 50.0)])
    big_scores = torch.randperm(1200, generator=g).float() / 1200
    big_classes = torch.randint(0, 5, (1200,), generator=g)
    out.update({"big_boxes": big, "big_scores": big_scores, "big_classes": big_classes,
                "big_batched_05": batched_nms(big, big_scores, big_classes, 0.5)})
    save("nms", out, {})


def matcher_case():
    g = torch.Generator().manual_seed(4)
    gt = random_boxes(g, 6, 128.0, 12.0, 50.0)
    gt[5] = torch.tensor([300.0, 300.0, 310.0, 310.0])  # overlaps nothing: its best IoU is 0
    anchors = AnchorGenerator(sizes=((16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),))(
        ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)]), [torch.zeros(1, 8, 16, 16)])[0]
    iou = box_iou(gt, anchors)
    rpn = Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
    head = Matcher(0.5, 0.5, allow_low_quality_matches=False)(iou)
    save("matcher", {"gt": gt, "anchors": anchors, "iou": iou, "rpn": rpn, "head": head}, {})


def roi_case(name, aligned, sampling, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 12, 14, generator=g, requires_grad=True)
    side = 14 / scale
    boxes = random_boxes(g, 10, side, 1.0, side / 2)
    extra = torch.tensor([
        [-10.0, -8.0, 6.0, 5.0],          # across the top-left corner
        [side - 4, side - 6, side + 9, side + 12],  # across the bottom-right
        [side + 20, side + 20, side + 40, side + 30],  # outside
        [5.0, 5.0, 5.0, 5.0],             # degenerate
        [3.2, 4.1, 3.7, 4.4],             # tiny
        [0.0, 0.0, side, 12 / scale],     # the whole map
    ])
    boxes = torch.cat([boxes, extra])
    batch = torch.randint(0, 2, (boxes.shape[0], 1), generator=g).float()
    rois = torch.cat([batch, boxes], 1)
    y = roi_align(x, rois, (7, 7), spatial_scale=scale, sampling_ratio=sampling, aligned=aligned)
    dy = torch.randn(y.shape, generator=g)
    (y * dy).sum().backward()
    save(name, {"x": x, "rois": rois, "y": y, "dy": dy, "dx": x.grad},
         {"output_size": [7, 7], "spatial_scale": scale, "sampling_ratio": sampling, "aligned": aligned})


def main():
    os.makedirs(OUT, exist_ok=True)
    anchors("anchors_garment", [16.0, 32.0, 64.0], [0.5, 1.0, 2.0], (16, 16), (128, 128))
    anchors("anchors_odd", [24.0, 40.0, 11.0], [0.7, 1.3], (9, 13), (75, 110))
    box_coder()
    iou_case()
    nms_case()
    matcher_case()
    roi_case("roi_align_plain", False, 2, 0.5, 10)
    roi_case("roi_align_aligned", True, 2, 0.5, 11)
    roi_case("roi_align_adaptive", False, -1, 0.125, 12)
    roi_case("roi_align_adaptive_aligned", True, 0, 0.25, 13)


if __name__ == "__main__":
    main()
