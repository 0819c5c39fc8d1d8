#!/usr/bin/env python3
"""Side-by-side PyTorch vs normvision: end-to-end training/eval speed and Fashion-MNIST accuracy.

Part A, speed (`--part speed`, the default; about a minute):
    The reference CNN ("cnn-bn" of shared/reference/experiments.md, or "cnn-plain" for --norms none) on random
    1x28x28 batches. PyTorch is timed in NCHW and in channels_last (model.to(memory_format=channels_last) and
    the input too); normvision by `normvision bench --threads T --model cnn --norm N --batch-size B --steps S
    --warmup W --mode both --json`. Train = forward + cross-entropy + backward + SGD (momentum 0.9, lr 0.05)
    step, timed per step; eval = model.eval() forward under torch.no_grad(). Images/s = batch / median step
    time after the warm-up. Speedup = normvision img/s / torch img/s of its best layout.
    Targets (norm batch rows): train speedup >= 1.3 at 2 threads; eval speedup >= 1.3 (every thread count).

Part B, accuracy (`--part accuracy`; long: several minutes per run and engine):
    PyTorch trains the same recipe on Fashion-MNIST (IDX .gz files, inputs normalized with mean 0.28604 and
    std 0.35302, batch 128, SGD momentum 0.9, constant lr, reshuffled every epoch by a seeded generator, last
    partial batch kept like normvision's loader) for --epochs at every --lrs value, for every --norms entry;
    test accuracy is evaluated every --eval-every steps (for the steps-to-target column) and after every
    epoch. normvision runs `normvision compare --lr LR --epochs E --json -q --norms .. --threads T` (one
    process per lr). Divergence: a non-finite loss, a training loss stuck at ln(10) over the last 200 steps,
    or end-of-epoch test accuracy at chance (both after >= 400 steps), mirroring normvision's rules.

    bash tools/bench_train_vs_torch.sh                                # part A, threads 1,2, norm batch
    bash tools/bench_train_vs_torch.sh --norms batch,none --steps 30 --markdown
    bash tools/bench_train_vs_torch.sh --part accuracy                # ~5 epochs x 2 lrs x 2 norms x 2 engines
    bash tools/bench_train_vs_torch.sh --part accuracy --limit-train 2000 --limit-test 1000 --epochs 1  # smoke
    bash tools/bench_train_vs_torch.sh --json                         # one JSON object per row on stdout
    bash tools/bench_train_vs_torch.sh --normvision target/release/normvision   # skip cargo build
    bash tools/bench_train_vs_torch.sh --torch-only                   # PyTorch side only

PyTorch runs in a fresh subprocess per thread count (torch.set_num_threads(T), OMP/MKL_NUM_THREADS=T).
Noise: before timing, /proc/loadavg and a ~1 s /proc/stat sample are reported (warning when other
processes use a core); afterwards, the CPU time other processes used during the run is reported.
--rounds K repeats part A K times (fresh processes, interleaved) and keeps the best median per row.
--strict exits 1 if a part A target is FAIL or INCOMPLETE (a target not measured, e.g. no 2-thread
row, does not count).

The tables go to stdout, progress to stderr. With --json, stdout carries only JSON lines (each with a
"part" key: "speed" or "accuracy"); environment / load information then goes to stderr.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (RunLoadMeter, check_load_after, check_load_before, find_normvision,  # noqa: E402
                      fmt, fmt_x, format_load, json_lines, make_parser, parse_list, print_table,
                      ratio, run_normvision_cmd, run_torch_subprocess, time_reps, torch_setup,
                      write_header, write_run_warning)

ALL_NORMS = ["batch", "none"]
LAYOUTS = ["nchw", "channels_last"]
MODES = ["train", "eval"]
NUM_CLASSES = 10
LR_SPEED = 0.05
MOMENTUM = 0.9
FMNIST_MEAN = 0.28604
FMNIST_STD = 0.35302
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
# normvision's divergence rules (src/train/trainer.rs): loss stuck at ln(classes) over this many steps,
# and end-of-epoch test accuracy at chance, both only after 2 * window steps.
DIVERGENCE_WINDOW = 200
SPEEDUP_TARGET = 1.3
TARGET_NORMS = {"batch"}  # the targets are defined for the reference CNN with BatchNorm


def parse_ints(s):
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not v or any(t < 1 for t in v):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return v


def parse_floats(s):
    try:
        v = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    if not v or any(not (x > 0 and math.isfinite(x)) for x in v):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return v


# --------------------------------------------------------------------------------------
# PyTorch side (runs in a subprocess: `--_torch-worker`, spec as JSON on stdin)
# --------------------------------------------------------------------------------------

def build_torch_cnn(norm, nn, torch):
    """The reference CNN; norm "batch" = cnn-bn (no bias before BN), "none" = cnn-plain (biases).
    Kaiming-normal init (fan_in, ReLU gain), zero biases; BN weight 1, bias 0 (PyTorch defaults)."""
    bn = norm == "batch"

    def conv_block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
        return layers

    layers = []
    layers += conv_block(1, 32)
    layers += conv_block(32, 32)
    layers.append(nn.MaxPool2d(2))
    layers += conv_block(32, 64)
    layers += conv_block(64, 64)
    layers.append(nn.MaxPool2d(2))
    layers.append(nn.Flatten())
    layers.append(nn.Linear(64 * 7 * 7, 128, bias=not bn))
    if bn:
        layers.append(nn.BatchNorm1d(128))
    layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(128, NUM_CLASSES))
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _median_best(times_s, batch):
    med = statistics.median(times_s)
    return batch / med, batch / min(times_s), med * 1e3


def torch_speed_worker(spec):
    torch = torch_setup(spec["threads"])
    from torch import nn
    import torch.nn.functional as F

    B, steps, warmup = spec["batch"], spec["steps"], spec["warmup"]
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((B, 1, 28, 28), generator=g) * 2.0 - 1.0  # U(-1, 1) like `normvision bench`
    y = torch.arange(B) % NUM_CLASSES
    for norm in spec["norms"]:
        for layout in LAYOUTS:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            torch.manual_seed(0)
            model = build_torch_cnn(norm, nn, torch).to(memory_format=fmt)
            x = x0.contiguous(memory_format=fmt)
            opt = torch.optim.SGD(model.parameters(), lr=LR_SPEED, momentum=MOMENTUM)
            for mode in spec["modes"]:
                if mode == "train":
                    model.train()

                    def step():
                        opt.zero_grad(set_to_none=True)
                        loss = F.cross_entropy(model(x), y)
                        loss.backward()
                        opt.step()
                else:
                    model.eval()

                    def step():
                        with torch.no_grad():
                            model(x)
                times = time_reps(step, warmup, steps)
                img_s, best, ms = _median_best(times, B)
                print(json.dumps({"norm": norm, "mode": mode, "layout": layout, "batch": B,
                                  "threads": spec["threads"], "img_s": img_s, "img_s_best": best,
                                  "ms_median": ms}), flush=True)


def load_fashion_mnist(data_dir, train_limit, test_limit):
    import numpy as np

    def idx(path):
        with gzip.open(path, "rb") as f:
            raw = f.read()
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)

    d = Path(data_dir)

    def find(stem):
        for name in (stem + ".gz", stem):
            if (d / name).exists():
                return d / name
        raise SystemExit(f"error: {stem}(.gz) not found in {d}")

    out = []
    for prefix, limit in (("train", train_limit), ("t10k", test_limit)):
        ip, lp = find(f"{prefix}-images-idx3-ubyte"), find(f"{prefix}-labels-idx1-ubyte")
        if ip.suffix != ".gz" or lp.suffix != ".gz":
            raise SystemExit(f"error: expected gzip IDX files in {d}")
        xs, ys = idx(ip), idx(lp)
        if limit:
            xs, ys = xs[:limit], ys[:limit]
        x = ((xs.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD)[:, None, :, :]
        out.append((np.ascontiguousarray(x), ys.astype(np.int64)))
    return out


def torch_accuracy_worker(spec):
    torch = torch_setup(spec["threads"], spec["seed"])
    from torch import nn
    import torch.nn.functional as F

    (xtr, ytr), (xte, yte) = load_fashion_mnist(spec["data"], spec["train_limit"], spec["test_limit"])
    xtr, ytr = torch.from_numpy(xtr), torch.from_numpy(ytr)
    xte, yte = torch.from_numpy(xte), torch.from_numpy(yte)
    fmt = torch.channels_last if spec["layout"] == "channels_last" else torch.contiguous_format
    B, E, lr, every, target = spec["batch"], spec["epochs"], spec["lr"], spec["eval_every"], spec["target"]
    n = len(ytr)
    nb = (n + B - 1) // B  # last partial batch kept, like normvision's loader (drop_last = false)
    chance_loss = math.log(NUM_CLASSES)

    def evaluate(model):
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(yte), 1000):
                xb = xte[i:i + 1000].contiguous(memory_format=fmt)
                correct += (model(xb).argmax(1) == yte[i:i + 1000]).sum().item()
        model.train()
        return correct / len(yte)

    for norm in spec["norms"]:
        torch.manual_seed(spec["seed"])
        model = build_torch_cnn(norm, nn, torch).to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
        gen = torch.Generator().manual_seed(spec["seed"])
        step, train_s, train_imgs = 0, 0.0, 0
        evals, epoch_acc, diverged = [], [], None
        window = []
        t_run = time.time()
        model.train()
        for epoch in range(1, E + 1):
            perm = torch.randperm(n, generator=gen)
            for b in range(nb):
                idxs = perm[b * B:(b + 1) * B]
                xb = xtr[idxs].contiguous(memory_format=fmt)
                yb = ytr[idxs]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                train_s += time.perf_counter() - t0
                train_imgs += len(yb)
                step += 1
                lv = loss.item()
                if not math.isfinite(lv):
                    diverged = f"non-finite values at step {step} (loss {lv})"
                    break
                window.append(lv)
                if len(window) > DIVERGENCE_WINDOW:
                    window.pop(0)
                if step >= 2 * DIVERGENCE_WINDOW and len(window) == DIVERGENCE_WINDOW:
                    mean = sum(window) / len(window)
                    if abs(mean - chance_loss) < 0.01 * chance_loss:
                        diverged = (f"loss stuck at ln({NUM_CLASSES}) = {chance_loss:.4f} (chance level) for "
                                    f"the last {DIVERGENCE_WINDOW} steps (mean {mean:.4f})")
                        break
                if every and step % every == 0 and b + 1 < nb:
                    evals.append((step, evaluate(model)))
            if diverged:
                break
            acc = evaluate(model)
            evals.append((step, acc))
            epoch_acc.append(acc)
            print(f"[torch] lr {lr:g} norm {norm}: epoch {epoch}/{E} test acc {acc * 100:.2f}% "
                  f"(step {step}, {time.time() - t_run:.0f} s)", file=sys.stderr, flush=True)
            if acc <= 1.0 / NUM_CLASSES + 0.005 and step >= 2 * DIVERGENCE_WINDOW:
                diverged = f"test accuracy {acc * 100:.2f}% is chance level after epoch {epoch}"
                break
        if diverged and (not evals or evals[-1][0] != step):
            evals.append((step, evaluate(model)))  # the accuracy the run stopped at
        steps_to = next((s for s, a in evals if a >= target), None)
        print(json.dumps({"norm": norm, "lr": lr, "epoch_acc": epoch_acc, "steps_to_target": steps_to,
                          "target": target, "train_img_s": train_imgs / train_s if train_s > 0 else 0.0,
                          "diverged": diverged, "steps": step, "layout": spec["layout"],
                          "final_acc": evals[-1][1] if evals else None,
                          "wall_s": time.time() - t_run}), flush=True)


def run_torch_worker(spec, show_stderr=False):
    """Runs a worker subprocess; returns (list of JSON rows, meta)."""
    stdout = run_torch_subprocess(__file__, spec, spec["threads"], f"{spec['kind']}, threads={spec['threads']}",
                                  "tools/bench_train_vs_torch.sh", show_stderr=show_stderr)
    rows, meta = [], {}
    for line in stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if not isinstance(d, dict):
            continue
        if d.get("meta"):
            meta = d
        else:
            rows.append(d)
    return rows, meta


# --------------------------------------------------------------------------------------
# normvision side
# --------------------------------------------------------------------------------------

def _float_or_none(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def parse_bench_output(text, threads, batch):
    """`normvision bench --json` lines -> {(norm, mode, threads): {img_s, img_s_best, ms_median}}."""
    res = {}
    for d in json_lines(text, ("norm", "mode", "img_s")):
        if d.get("model", "cnn") != "cnn":
            continue
        if d.get("batch") is not None and int(d["batch"]) != batch:
            continue
        img_s = _float_or_none(d["img_s"])
        if img_s is None:
            continue
        best = _float_or_none(d.get("img_s_best"))
        key = (str(d["norm"]), str(d["mode"]), int(d.get("threads", threads)))
        res[key] = {"img_s": img_s, "img_s_best": best if best is not None else img_s,
                    "ms_median": _float_or_none(d.get("ms_median"))}
    return res


def run_normvision(cmd, what):
    t0 = time.time()
    stdout = run_normvision_cmd(cmd, f"cannot run normvision ({cmd[0]})")
    print(f"[normvision] {what} in {time.time() - t0:.1f} s", file=sys.stderr)
    return stdout


def normvision_bench(binary, threads, norm, batch, steps, warmup, modes):
    mode = modes[0] if len(modes) == 1 else "both"
    cmd = [str(binary), "bench", "--threads", str(threads), "--model", "cnn", "--norm", norm,
           "--batch-size", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--mode", mode, "--json"]
    out = run_normvision(cmd, f"bench --norm {norm} threads={threads}")
    res = parse_bench_output(out, threads, batch)
    # normvision reports its pool size; key on the requested thread count, warn on a mismatch.
    fixed = {}
    for (n, m, t), v in res.items():
        if t != threads:
            print(f"WARNING: normvision bench reported threads={t}, requested {threads}", file=sys.stderr)
        fixed[(n, m, threads)] = v
    return fixed


def parse_compare_output(text):
    """`normvision compare --json` lines -> {norm: row} (rows normalized)."""
    res = {}
    for d in json_lines(text, ("norm", "epoch_acc")):
        if d.get("model", "cnn") != "cnn":
            continue
        accs = d.get("epoch_acc") or []
        if not isinstance(accs, list):
            continue
        accs = [_float_or_none(a) for a in accs]
        st = d.get("steps_to_target")
        div = d.get("diverged")
        res[str(d["norm"])] = {
            "lr": _float_or_none(d.get("lr")),
            "epoch_acc": accs,
            "steps_to_target": int(st) if isinstance(st, (int, float)) and not isinstance(st, bool) else None,
            "target": _float_or_none(d.get("target")),
            "train_img_s": _float_or_none(d.get("train_img_s")),
            "diverged": str(div) if div not in (None, False, "") else None,
        }
    return res


def normvision_compare(binary, threads, lr, args, out_dir):
    cmd = [str(binary), "compare", "--threads", str(threads), "--model", "cnn", "--lr", repr(lr),
           "--epochs", str(args.epochs), "--batch-size", "128", "--json", "-q",
           "--norms", ",".join(args.norms), "--target", repr(args.target), "--eval-every", str(args.eval_every),
           "--seed", str(args.seed), "--out-dir", str(out_dir)]
    if args.data:
        cmd += ["--data", args.data]
    if args.limit_train:
        cmd += ["--train-limit", str(args.limit_train)]
    if args.limit_test:
        cmd += ["--test-limit", str(args.limit_test)]
    print(f"[normvision] {' '.join(cmd)}", file=sys.stderr)
    out = run_normvision(cmd, f"compare lr {lr:g}")
    return parse_compare_output(out)


# --------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------

def fmt_pct(v):
    return "-" if v is None else f"{v * 100:.2f}%"




# --------------------------------------------------------------------------------------
# Part A: speed
# --------------------------------------------------------------------------------------

def merge_best(acc, key, val):
    """Across rounds keep the measurement with the highest median img/s (best img/s = max of bests)."""
    old = acc.get(key)
    if old is None:
        acc[key] = dict(val)
        return
    best = max(old.get("img_s_best") or 0, val.get("img_s_best") or 0)
    if val["img_s"] > old["img_s"]:
        acc[key] = dict(val)
    acc[key]["img_s_best"] = best


def run_speed(args, binary):
    torch_res, nv_res, meta = {}, {}, {}
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for t in args.threads:
            t0 = time.time()
            spec = {"kind": "speed", "threads": t, "batch": args.batch_size, "steps": args.steps,
                    "warmup": args.warmup, "norms": args.norms, "modes": MODES}
            rows, meta = run_torch_worker(spec)
            for r in rows:
                merge_best(torch_res, (r["norm"], r["mode"], r["layout"], t), r)
            print(f"[torch] speed threads={t}: {len(rows)} rows in {time.time() - t0:.1f} s", file=sys.stderr)
            if binary is not None:
                for norm in args.norms:
                    for k, v in normvision_bench(binary, t, norm, args.batch_size, args.steps,
                                                 args.warmup, MODES).items():
                        merge_best(nv_res, k, v)
    return torch_res, nv_res, meta


def make_speed_rows(args, torch_res, nv_res, have_nv):
    rows, missing = [], []
    for t in args.threads:
        for norm in args.norms:
            for mode in MODES:
                lay = {L: torch_res.get((norm, mode, L, t)) for L in LAYOUTS}
                nv = nv_res.get((norm, mode, t))
                if have_nv and nv is None:
                    missing.append((norm, mode, t))
                avail = [L for L in LAYOUTS if lay[L] is not None]
                best_layout = max(avail, key=lambda L: lay[L]["img_s"]) if avail else None
                torch_img_s = lay[best_layout]["img_s"] if best_layout else None
                nv_img_s = nv["img_s"] if nv else None
                row = {"part": "speed", "model": "cnn", "norm": norm, "mode": mode, "batch": args.batch_size,
                       "threads": t, "torch_img_s": torch_img_s, "torch_layout": best_layout,
                       "normvision_img_s": nv_img_s, "speedup": ratio(nv_img_s, torch_img_s)}
                for L in LAYOUTS:
                    v = lay[L] or {}
                    row[f"torch_{L}_img_s"] = v.get("img_s")
                    row[f"torch_{L}_img_s_best"] = v.get("img_s_best")
                    row[f"torch_{L}_ms_median"] = v.get("ms_median")
                    row[f"speedup_vs_{L}"] = ratio(nv_img_s, v.get("img_s"))
                row["normvision_img_s_best"] = nv["img_s_best"] if nv else None
                row["normvision_ms_median"] = nv["ms_median"] if nv else None
                bests = [row[f"torch_{L}_img_s_best"] for L in LAYOUTS if row[f"torch_{L}_img_s_best"]]
                row["speedup_best"] = ratio(row["normvision_img_s_best"], max(bests) if bests else None)
                row["steps"], row["warmup"] = args.steps, args.warmup
                rows.append(row)
    return rows, missing


SPEED_HEADER = ["model", "norm", "mode", "batch", "thr", "torch NCHW img/s", "torch CL img/s", "best",
                "nv img/s", "speedup", "x NCHW", "x CL", "x (best-of)"]


def speed_cells(r):
    return [r["model"], r["norm"], r["mode"], str(r["batch"]), str(r["threads"]),
            fmt(r["torch_nchw_img_s"], ".0f"), fmt(r["torch_channels_last_img_s"], ".0f"),
            {"nchw": "NCHW", "channels_last": "CL"}.get(r["torch_layout"], "-"),
            fmt(r["normvision_img_s"], ".0f"), fmt_x(r["speedup"]),
            fmt_x(r["speedup_vs_nchw"]), fmt_x(r["speedup_vs_channels_last"]), fmt_x(r["speedup_best"])]


def evaluate_speed_targets(rows, threads):
    """[(name, status, details)] for the part A targets (norm batch rows)."""
    results = []
    defs = [(f"train speedup >= {SPEEDUP_TARGET}x vs best torch layout at 2 threads",
             lambda r: r["mode"] == "train" and r["threads"] == 2),
            (f"eval speedup >= {SPEEDUP_TARGET}x vs best torch layout (every thread count)",
             lambda r: r["mode"] == "eval")]
    for name, pred in defs:
        sel = [r for r in rows if r["norm"] in TARGET_NORMS and pred(r)]
        if not sel:
            why = "2 not in --threads" if "2 threads" in name else "no eval rows"
            if not any(r["norm"] in TARGET_NORMS for r in rows):
                why = "norm batch not in --norms"
            results.append((name, "NOT MEASURED", [why]))
            continue
        details = []
        if any(r["speedup"] is None for r in sel):
            status = "INCOMPLETE"
            details.append("no normvision number for: " + ", ".join(
                f"{r['norm']} {r['mode']} T={r['threads']}" for r in sel if r["speedup"] is None))
        else:
            fails = [r for r in sel if r["speedup"] < SPEEDUP_TARGET]
            status = "PASS" if not fails else "FAIL"
            best_fails = [r for r in sel if r["speedup_best"] is not None and r["speedup_best"] < SPEEDUP_TARGET]
            status += f" (best-of-steps: {'PASS' if not best_fails else 'FAIL'})"
        for r in sel:
            details.append(f"{r['norm']} {r['mode']} T={r['threads']}: normvision {fmt(r['normvision_img_s'], '.0f')} "
                           f"img/s vs torch {fmt(r['torch_img_s'], '.0f')} ({r['torch_layout']}) = "
                           f"{fmt_x(r['speedup'])}")
        results.append((name, status, details))
    return results


def print_summary(title, results, out, markdown):
    out.write(f"\n## {title}\n\n" if markdown else f"\n{title}:\n")
    for name, status, details in results:
        if markdown:
            head, sep, rest = status.partition(" (")
            rest = sep.strip() + rest if sep else ""
            out.write(f"- **{head}** {name} {rest}".rstrip() + "\n")
            for d in details:
                out.write(f"  - {d}\n")
        else:
            out.write(f"  [{status}] {name}\n")
            for d in details:
                out.write(f"      {d}\n")


# --------------------------------------------------------------------------------------
# Part B: accuracy
# --------------------------------------------------------------------------------------

def run_accuracy(args, binary, threads):
    torch_res, nv_res, meta = {}, {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="nv_bench_train_"))
    try:
        for lr in args.lrs:
            t0 = time.time()
            spec = {"kind": "accuracy", "threads": threads, "lr": lr, "epochs": args.epochs, "batch": 128,
                    "norms": args.norms, "eval_every": args.eval_every, "target": args.target,
                    "seed": args.seed, "data": args.data or DEFAULT_DATA, "train_limit": args.limit_train,
                    "test_limit": args.limit_test, "layout": args.acc_layout}
            rows, meta = run_torch_worker(spec, show_stderr=True)
            for r in rows:
                torch_res[(lr, r["norm"])] = r
            print(f"[torch] accuracy lr {lr:g}: {len(rows)} runs in {time.time() - t0:.1f} s", file=sys.stderr)
            if binary is not None:
                for norm, r in normvision_compare(binary, threads, lr, args, tmp / f"lr{lr:g}").items():
                    nv_res[(lr, norm)] = r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return torch_res, nv_res, meta


def _final(accs):
    accs = [a for a in (accs or []) if a is not None]
    return accs[-1] if accs else None


def make_accuracy_rows(args, threads, torch_res, nv_res, have_nv):
    rows, missing = [], []
    for lr in args.lrs:
        for norm in args.norms:
            tr = torch_res.get((lr, norm)) or {}
            nv = nv_res.get((lr, norm))
            if have_nv and nv is None:
                missing.append((lr, norm))
            nv = nv or {}
            # Final accuracy: after the last epoch; for a run that stopped early, torch's last evaluation
            # (normvision's JSON has only the per-epoch accuracies).
            t_final = tr.get("final_acc", _final(tr.get("epoch_acc")))
            n_final = _final(nv.get("epoch_acc"))
            rows.append({
                "part": "accuracy", "model": "cnn", "norm": norm, "lr": lr, "epochs": args.epochs,
                "batch": 128, "threads": threads, "target": args.target,
                "torch_final_acc": t_final, "normvision_final_acc": n_final,
                "acc_diff": (n_final - t_final) if t_final is not None and n_final is not None else None,
                "torch_steps_to_target": tr.get("steps_to_target"),
                "normvision_steps_to_target": nv.get("steps_to_target"),
                "torch_diverged": tr.get("diverged"), "normvision_diverged": nv.get("diverged"),
                "torch_epoch_acc": tr.get("epoch_acc"), "normvision_epoch_acc": nv.get("epoch_acc"),
                "torch_train_img_s": tr.get("train_img_s"), "normvision_train_img_s": nv.get("train_img_s"),
                "torch_layout": tr.get("layout"), "torch_steps": tr.get("steps"),
                "limit_train": args.limit_train or None, "limit_test": args.limit_test or None,
            })
    return rows, missing


ACC_HEADER = ["lr", "norm", "torch acc", "nv acc", "diff", "torch steps", "nv steps", "torch div", "nv div",
              "torch epochs", "nv epochs", "torch img/s", "nv img/s"]


def acc_cells(r):
    def steps(v, accs):
        if v is not None:
            return str(v)
        return "not reached" if accs else "-"

    def div(v, engine_ran):
        if v:
            return "DIVERGED"
        return "no" if engine_ran else "-"

    def epochs(accs):
        return "/".join(f"{a * 100:.1f}" for a in accs if a is not None) if accs else "-"

    t_ran = r["torch_epoch_acc"] is not None
    n_ran = r["normvision_epoch_acc"] is not None
    return [f"{r['lr']:g}", r["norm"], fmt_pct(r["torch_final_acc"]), fmt_pct(r["normvision_final_acc"]),
            "-" if r["acc_diff"] is None else f"{r['acc_diff'] * 100:+.2f}",
            steps(r["torch_steps_to_target"], t_ran), steps(r["normvision_steps_to_target"], n_ran),
            div(r["torch_diverged"], t_ran),
            div(r["normvision_diverged"], n_ran),
            epochs(r["torch_epoch_acc"]), epochs(r["normvision_epoch_acc"]),
            fmt(r["torch_train_img_s"], ".0f"), fmt(r["normvision_train_img_s"], ".0f")]


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_torch-worker":
        spec = json.load(sys.stdin)
        (torch_speed_worker if spec["kind"] == "speed" else torch_accuracy_worker)(spec)
        return 0

    p = make_parser(__doc__)
    p.add_argument("--part", choices=["speed", "accuracy", "all"], default="speed",
                   help="speed (part A, default), accuracy (part B, long) or all")
    p.add_argument("--threads", default=[1, 2], type=parse_ints,
                   help="comma-separated thread counts for part A (default 1,2)")
    p.add_argument("--norms", default=["batch"], type=lambda s: parse_list(s, ALL_NORMS, "norm", allow_empty=False),
                   help="comma-separated subset of batch,none (default: batch for speed; "
                        "batch,none for accuracy unless given)")
    p.add_argument("--batch-size", type=int, default=128, help="part A batch size (default 128)")
    p.add_argument("--steps", type=int, default=20, help="part A timed steps, median reported (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="part A warm-up steps (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="part A: measure each engine K times in fresh processes (interleaved) and keep "
                        "the best median per row (default 1)")
    p.add_argument("--epochs", type=int, default=5, help="part B epochs (default 5)")
    p.add_argument("--lrs", default=[0.05, 0.2], type=parse_floats, help="part B learning rates (default 0.05,0.2)")
    p.add_argument("--acc-threads", type=int, default=None,
                   help="part B thread count for both engines (default: the largest --threads value)")
    p.add_argument("--acc-layout", choices=LAYOUTS, default="channels_last",
                   help="part B PyTorch memory format (default channels_last, the faster one here)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="part B: also evaluate every K steps, for steps-to-target (default 100)")
    p.add_argument("--target", type=float, default=0.9, help="part B target test accuracy (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="part B seed (init and shuffling; default 0)")
    p.add_argument("--data", default=None, help=f"Fashion-MNIST IDX directory (default {DEFAULT_DATA})")
    p.add_argument("--limit-train", type=int, default=0, metavar="N",
                   help="part B: first N training images only (smoke runs; normvision --train-limit)")
    p.add_argument("--limit-test", type=int, default=0, metavar="N",
                   help="part B: first N test images only (normvision --test-limit)")
    p.add_argument("--normvision", metavar="PATH", default=None,
                   help="normvision binary to use (skips `cargo build --release`)")
    p.add_argument("--torch-only", action="store_true", help="PyTorch only (no cargo build, no normvision)")
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    p.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    p.add_argument("--strict", action="store_true", help="exit 1 if a part A target is FAIL or INCOMPLETE")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.rounds < 1:
        p.error("--steps, --batch-size and --rounds must be >= 1, --warmup >= 0")
    if args.epochs < 1 or args.eval_every < 0 or args.limit_train < 0 or args.limit_test < 0:
        p.error("--epochs must be >= 1; --eval-every, --limit-train, --limit-test >= 0")
    if not 0 < args.target <= 1:
        p.error("--target must be in (0, 1]")
    norms_given = any(a == "--norms" or a.startswith("--norms=") for a in argv)
    do_speed = args.part in ("speed", "all")
    do_acc = args.part in ("accuracy", "all")
    acc_threads = args.acc_threads or max(args.threads)
    acc_args = argparse.Namespace(**vars(args))
    if not norms_given:
        acc_args.norms = ["batch", "none"]
    if do_acc:
        data = Path(args.data or DEFAULT_DATA)
        if not data.is_dir():
            p.error(f"Fashion-MNIST directory not found: {data} (use --data)")

    # Build before the load check (cargo itself loads the machine).
    binary = find_normvision(args.normvision, args.torch_only)

    load = check_load_before(set((args.threads if do_speed else []) + ([acc_threads] if do_acc else [])),
                             lambda t, ncpu: f"{t} threads exceed the {ncpu} usable CPUs (oversubscribed)",
                             quiet=args.json)

    meter = RunLoadMeter()
    speed_rows, acc_rows, meta = [], [], {}
    if do_speed:
        torch_res, nv_res, meta = run_speed(args, binary)
        speed_rows, missing = make_speed_rows(args, torch_res, nv_res, binary is not None)
        if missing:
            print("WARNING: normvision reported nothing for: " + ", ".join(
                f"{n} {m} T={t}" for n, m, t in missing), file=sys.stderr)
    if do_acc:
        torch_res, nv_res, meta_b = run_accuracy(acc_args, binary, acc_threads)
        meta = meta or meta_b
        acc_rows, missing = make_accuracy_rows(acc_args, acc_threads, torch_res, nv_res, binary is not None)
        if missing:
            print("WARNING: normvision compare reported nothing for: " + ", ".join(
                f"lr {lr:g} {n}" for lr, n in missing), file=sys.stderr)

    check_load_after(load, meter, quiet=args.json)

    hdr = [f"normvision vs PyTorch {meta.get('torch_version', '?')} (CPU, f32), reference CNN; "
           f"binary: {binary if binary else '(torch only)'}"]
    if do_speed:
        hdr.append(f"speed: batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
                   f"median; rounds={args.rounds}; threads {','.join(map(str, args.threads))}; "
                   f"train = fwd+bwd+SGD step (momentum 0.9, lr {LR_SPEED}); eval = no_grad forward; "
                   f"speedup = normvision img/s / best torch layout img/s")
    if do_acc:
        lim = ""
        if args.limit_train or args.limit_test:
            lim = f"; LIMITED: train {args.limit_train or 'all'}, test {args.limit_test or 'all'} images"
        hdr.append(f"accuracy: Fashion-MNIST, {args.epochs} epoch(s), batch 128, SGD momentum 0.9, constant lr, "
                   f"eval every {args.eval_every} steps, target {args.target:g}, seed {args.seed}, "
                   f"{acc_threads} threads, torch layout {args.acc_layout}{lim}")
    hdr += format_load(load)
    if load.get("during_run"):
        hdr.append(load["during_run"])

    results = evaluate_speed_targets(speed_rows, args.threads) if (speed_rows and binary is not None) else []
    if args.json:
        write_header(hdr, sys.stderr, False)
        for r in speed_rows + acc_rows:
            print(json.dumps(r))
        if results:
            print_summary("Targets (median-based)", results, sys.stderr, False)
    else:
        out = sys.stdout
        write_header(hdr, out, args.markdown)
        if speed_rows:
            out.write("\n" + ("### Speed (images/s)\n\n" if args.markdown else "Speed (images/s):\n"))
            print_table(SPEED_HEADER, [speed_cells(r) for r in speed_rows], {0, 1, 2}, args.markdown, out,
                        group_of=lambda i: speed_rows[i]["threads"])
            if results:
                print_summary("Targets (median-based; best-of-steps in parentheses)", results, out, args.markdown)
        if acc_rows:
            out.write("\n" + ("### Accuracy (test)\n\n" if args.markdown else "Accuracy (test):\n"))
            print_table(ACC_HEADER, [acc_cells(r) for r in acc_rows], {1, 9, 10},
                        args.markdown, out, group_of=lambda i: acc_rows[i]["lr"])
            out.write(f"\nsteps = optimizer steps to {args.target * 100:g}% test accuracy (evaluated every "
                      f"{args.eval_every} steps and at epoch ends); epochs = test accuracy (%) after each epoch\n")
            for r in acc_rows:
                for eng in ("torch", "normvision"):
                    if r[f"{eng}_diverged"]:
                        out.write(f"{eng} lr {r['lr']:g} {r['norm']}: diverged: {r[f'{eng}_diverged']}\n")
        write_run_warning(load, out)
    if args.strict and any(s.startswith(("FAIL", "INCOMPLETE")) for _, s, _ in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
