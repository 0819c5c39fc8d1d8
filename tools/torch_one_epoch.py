#!/usr/bin/env python3
"""Epochs of the reference CNN (with BatchNorm, or plain with --norm none) in PyTorch (SGD momentum 0.9, batch 128,
constant lr), then the test accuracy after each: to tell seed-to-seed variation from a difference between the engines.

With --weights and --order, PyTorch starts from normvision's initial weights and visits normvision's batches:
    normvision train --seed S --max-steps 1 --lr 0 --out /tmp/ckS     # initial weights (lr 0 leaves them as drawn)
    cargo run --release --example epoch_order -- S 0 > /tmp/orderS.txt
    tools/.venv/bin/python tools/torch_one_epoch.py --seed S --weights /tmp/ckS --order /tmp/orderS.txt
For several epochs (--epochs E), --order is a path with "{epoch}" in it, one file per 0-based epoch
(tools/fair_baseline.sh writes them). Without --weights and --order, PyTorch draws its own initialisation (Kaiming
normal) and order (randperm, one per epoch) from --seed.
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
    p.add_argument("--norm", choices=["batch", "none"], default="batch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: whole epochs)")
    p.add_argument("--print-losses", type=int, default=0, metavar="N",
                   help="print the first N steps' training losses (to compare with normvision's log, step by step)")
    p.add_argument("--json", action="store_true", help="print one JSON line with the accuracy after each epoch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", help="normvision checkpoint (safetensors) to start from")
    p.add_argument("--order", help="file of comma-separated sample indices (examples/epoch_order.rs)")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="float64 runs the same training in double precision: the answer both f32 engines round")
    p.add_argument("--losses", metavar="FILE", help="write every step's training loss to FILE (a JSON list)")
    a = p.parse_args()

    import numpy as np
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    (xtr, ytr), (xte, yte) = bench.load_fashion_mnist(a.data, 0, 0)
    xtr, ytr, xte, yte = map(torch.from_numpy, (xtr, ytr, xte, yte))
    model = bench.build_torch_cnn(a.norm, nn, torch)
    if a.weights:
        n = load_parameters(a.weights, model, torch, np)
        print(f"loaded {n} parameter tensors from {a.weights}", file=sys.stderr)
    if a.dtype == "float64":
        model = model.double()
        xtr, xte = xtr.double(), xte.double()
    def epoch_order(epoch):
        if not a.order:
            g = torch.Generator().manual_seed(a.seed + 1000 * epoch)
            return torch.randperm(len(ytr), generator=g)
        path = a.order.replace("{epoch}", str(epoch))
        if a.epochs > 1 and path == a.order:
            raise SystemExit(f"error: --order {a.order}: several epochs need a path with {{epoch}} in it")
        order = [int(v) for v in Path(path).read_text().strip().split(",")]
        if sorted(order) != list(range(len(ytr))):
            raise SystemExit(f"error: {path}: not a permutation of the {len(ytr)} training samples")
        return torch.tensor(order)

    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    accs, losses = [], []
    for epoch in range(a.epochs):
        order = epoch_order(epoch)
        model.train()
        for i in range(0, len(ytr), 128):
            idx = order[i:i + 128]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            step = epoch * ((len(ytr) + 127) // 128) + i // 128 + 1
            losses.append(loss.item())
            if step <= a.print_losses:
                print(f"step {step} loss {loss.item():.6f}", file=sys.stderr)
            if a.max_steps and step >= a.max_steps:
                break
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(yte), 1000):
                correct += (model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum().item()
        accs.append(100 * correct / len(yte))
        print(f"epoch {epoch + 1}: test accuracy {accs[-1]:.2f}%", file=sys.stderr)
        if a.max_steps and len(losses) >= a.max_steps:
            break
    if a.losses:
        Path(a.losses).write_text(json.dumps(losses))
    start = "normvision's weights and order" if a.weights and a.order else "PyTorch's own init and order"
    if a.json:
        print(json.dumps({"engine": "pytorch", "norm": a.norm, "seed": a.seed, "lr": a.lr, "start": start,
                          "dtype": a.dtype, "epoch_acc": accs}))
    else:
        print(f"seed {a.seed}, lr {a.lr:g}, norm {a.norm}, {start}: test accuracy {accs[-1]:.2f}% "
              f"after {a.epochs} epoch(s)")


if __name__ == "__main__":
    main()
