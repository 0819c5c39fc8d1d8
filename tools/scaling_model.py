#!/usr/bin/env python3
"""The table and the paper model of tools/scaling.sh.

Reads the --json reports tools/scaling.sh wrote to OUT and the SyncBN run's checkpoint (for the BatchNorm
layers' channel counts), prints the measured table, then models data-parallel training of the same CNN on
8-64 ranks, each holding 64 images of the global batch (weak scaling), on two stated networks:

  compute per step   = the 2-rank SyncBN run's step time less its time in collectives (1 thread, 64 images)
  gradient all-reduce = 2(P-1)/P * V / BW + 2(P-1) * alpha          (ring; V = the gradient bytes)
  SyncBN exchanges    = per BatchNorm layer, forward and backward: an all-gather of P * (2C+1) f64
                        (recursive doubling: log2(P) * alpha + P(2C+1)*8 / BW)

No overlap of the all-reduce with the backward is modelled, because the engine does not overlap (see
docs/PERFORMANCE.md); the "overlapped" column is the bound an overlap could reach (the gradient all-reduce
hidden behind the backward, SyncBN's exchanges still on the critical path).

Usage: python3 tools/scaling_model.py OUT [--json]
"""
import json
import math
import struct
import sys
from pathlib import Path

NETWORKS = [
    ("100 Gb/s InfiniBand", 12.5e9, 2e-6),
    ("10 Gb/s Ethernet", 1.25e9, 20e-6),
]


def report(out, name):
    return json.loads((out / f"{name}.json").read_text())["report"]


def bn_channels(ckpt):
    b = ckpt.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8 : 8 + n])
    return [v["shape"][0] for k, v in header.items() if k.endswith("running_mean")]


def main():
    out = Path(sys.argv[1])
    as_json = "--json" in sys.argv
    rows = []
    for name, label in [
        ("single", "1 process x 2 threads"),
        ("mpi-1x2", "1 rank x 2 threads (mpirun)"),
        ("mpi-2x1-bn", "2 ranks x 1 thread, BN per rank"),
        ("mpi-2x1-syncbn", "2 ranks x 1 thread, SyncBN"),
    ]:
        r = report(out, name)
        steps = r["steps"]
        rows.append(
            {
                "layout": label,
                "img_s": r["train_img_s"],
                "epoch_s": 60000 / r["train_img_s"],
                "comm_ms_per_step": 1e3 * r["comm_secs"] / steps,
                "grad_ms_per_step": 1e3 * r["grad_all_reduce_secs"] / steps,
                "grad_values": r["grad_values_per_step"],
            }
        )
    sync = report(out, "mpi-2x1-syncbn")
    step_s = 128 / sync["train_img_s"]
    compute = step_s - sync["comm_secs"] / sync["steps"]
    grad_bytes = 4 * sync["grad_values_per_step"]
    chans = bn_channels(out / "mpi-2x1-syncbn" / "model.safetensors")
    model = []
    for net, bw, alpha in NETWORKS:
        for p in [8, 16, 32, 64]:
            grad = 2 * (p - 1) / p * grad_bytes / bw + 2 * (p - 1) * alpha
            sbn = sum(2 * (math.log2(p) * alpha + p * (2 * c + 1) * 8 / bw) for c in chans)
            eff = compute / (compute + grad + sbn)
            over = compute / (max(compute, grad) + sbn)
            model.append(
                {
                    "network": net,
                    "ranks": p,
                    "global_batch": 64 * p,
                    "compute_ms": 1e3 * compute,
                    "grad_ms": 1e3 * grad,
                    "syncbn_ms": 1e3 * sbn,
                    "efficiency": eff,
                    "efficiency_overlapped": over,
                    "img_s": 64 * p / (compute + grad + sbn),
                }
            )
    if as_json:
        print(json.dumps({"measured": rows, "model": model, "bn_channels": chans, "grad_bytes": grad_bytes}))
        return
    print(f"{'layout':<34} {'img/s':>7} {'s/epoch':>8} {'comm ms/step':>13} {'grad all-reduce ms/step':>24}")
    for r in rows:
        print(
            f"{r['layout']:<34} {r['img_s']:>7.0f} {r['epoch_s']:>8.1f} {r['comm_ms_per_step']:>13.2f} "
            f"{r['grad_ms_per_step']:>24.2f}"
        )
    print(
        f"\ngradient: {sync['grad_values_per_step']} f32 values ({grad_bytes / 1e6:.2f} MB) per step; "
        f"SyncBN layers: {len(chans)} with {chans} channels; compute per step (1 thread, 64 images): "
        f"{1e3 * compute:.1f} ms"
    )
    print(
        f"\n{'network':<22} {'ranks':>5} {'batch':>6} {'compute ms':>10} {'grad ms':>8} {'SyncBN ms':>9} "
        f"{'efficiency':>10} {'overlapped':>10} {'img/s':>8}"
    )
    for m in model:
        print(
            f"{m['network']:<22} {m['ranks']:>5} {m['global_batch']:>6} {m['compute_ms']:>10.1f} "
            f"{m['grad_ms']:>8.2f} {m['syncbn_ms']:>9.2f} {m['efficiency']:>10.1%} "
            f"{m['efficiency_overlapped']:>10.1%} {m['img_s']:>8.0f}"
        )


if __name__ == "__main__":
    main()
