#!/usr/bin/env python3
"""One epoch of the reference CNN with BatchNorm in PyTorch (SGD momentum 0.9, batch 128, constant lr), then the
test accuracy: to tell seed-to-seed variation from a difference between the engines.

With --weights and --order, PyTorch starts from normvision's initial weights and visits normvision's batches:
    normvision train --seed S --max-steps 1 --lr 0 --out /tmp/ckS     # initial weights (lr 0 leaves them as drawn)
    cargo run --release --example epoch_order -- S 0 > /tmp/orderS.txt
    tools/.venv/bin/python tools/torch_one_epoch.py --seed S --weights /tmp/ckS --order /tmp/orderS.txt
Without them, PyTorch draws its own initialisation (Kaiming normal) and order (randperm) from --seed.
Running stats start at PyTorch's defaults either way. Uses the venv of tools/torch_env.sh.
"""
import argparse
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_vs_torch as bench  # noqa: E402  (the same data loader and network definition)


def load_parameters(path, model, torch, np):
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise SystemExit(f"error: {path}: not a safetensors file (too short)")
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as e:
        raise SystemExit(f"error: {path}: corrupt safetensors header ({e})")
    data = raw[8 + n:]
    sd = model.state_dict()
    loaded = 0
    for key in sd:
        if not (key.endswith("weight") or key.endswith("bias")) or key not in header:
            continue
        meta = header[key]
        if meta.get("dtype") != "F32" or list(meta["shape"]) != list(sd[key].shape):
            raise SystemExit(f"error: {path}: {key} is {meta.get('dtype')} {meta['shape']}, "
                             f"PyTorch expects F32 {list(sd[key].shape)}")
        a, b = meta["data_offsets"]
        sd[key] = torch.from_numpy(np.frombuffer(data[a:b], dtype=np.float32).reshape(meta["shape"]).copy())
        loaded += 1
    model.load_state_dict(sd)
    return loaded


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", help="normvision checkpoint (safetensors) to start from")
    p.add_argument("--order", help="file of comma-separated sample indices (examples/epoch_order.rs)")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    a = p.parse_args()

    import numpy as np
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    (xtr, ytr), (xte, yte) = bench.load_fashion_mnist(a.data, 0, 0)
    xtr, ytr, xte, yte = map(torch.from_numpy, (xtr, ytr, xte, yte))
    model = bench.build_torch_cnn("batch", nn, torch)
    if a.weights:
        n = load_parameters(a.weights, model, torch, np)
        print(f"loaded {n} parameter tensors from {a.weights}", file=sys.stderr)
    if a.order:
        order = [int(v) for v in Path(a.order).read_text().strip().split(",")]
        if sorted(order) != list(range(len(ytr))):
            raise SystemExit(f"error: {a.order}: not a permutation of the {len(ytr)} training samples")
        order = torch.tensor(order)
    else:
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(a.seed))
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    model.train()
    for i in range(0, len(ytr), 128):
        idx = order[i:i + 128]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(yte), 1000):
            correct += (model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum().item()
    start = "normvision's weights and order" if a.weights and a.order else "PyTorch's own init and order"
    print(f"seed {a.seed}, lr {a.lr:g}, {start}: test accuracy {100 * correct / len(yte):.2f}%")


if __name__ == "__main__":
    main()
