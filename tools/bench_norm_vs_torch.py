#!/usr/bin/env python3
"""Side-by-side CPU benchmark: PyTorch vs normvision normalization kernels.

Runs PyTorch (NCHW and channels_last) and `normvision bench-kernels` on the same
op x shape x mode x threads grid in ONE invocation and prints the ratios.

    bash tools/bench_norm_vs_torch.sh                         # everything, threads 1,2
    bash tools/bench_norm_vs_torch.sh --ops batch_norm --threads 2 --reps 50
    bash tools/bench_norm_vs_torch.sh --markdown > /tmp/perf.md   # table for docs/PERFORMANCE.md
    bash tools/bench_norm_vs_torch.sh --json                  # one JSON object per line
    bash tools/bench_norm_vs_torch.sh --torch-only --reps 3 --shapes 64x32x28x28

Ops:    batch_norm (nn.BatchNorm2d / nn.BatchNorm1d for 2-D shapes, defaults),
        group_norm (nn.GroupNorm(8, C)), layer_norm (nn.LayerNorm((C,H,W)), or
        nn.LayerNorm((C,)) for 2-D shapes), instance_norm (nn.InstanceNorm2d(C), defaults).
Modes:  train_fwd      module.train(), forward under torch.no_grad()
        train_fwd_bwd  module.train(), y = m(x); y.backward(dy) (dy preallocated,
                       x.grad / parameter grads set to None between reps, outside the timed region)
        eval_fwd       module.eval(), forward under torch.no_grad()

PyTorch is measured in a fresh subprocess per thread count (torch.set_num_threads(T),
OMP/MKL_NUM_THREADS=T) so the thread setting takes effect cleanly. normvision is measured
by running `<binary> bench-kernels --json --threads T --reps R --warmup W --ops .. --modes ..
[--shapes ..]` and parsing its JSON lines (non-JSON lines are ignored).

Speedups are torch_time / normvision_time (> 1 means normvision is faster). Effective bytes
(see EFFECTIVE_BYTES_FACTOR) are defined once here and used for both engines' GB/s.

Shapes: 4-D shapes run for every op; 2-D (N, C) shapes run for batch_norm (required) and
layer_norm over (C,) (optional: dropped if normvision does not report it).
Noise: before timing, /proc/loadavg and a ~1 s /proc/stat sample are reported (warning if
other processes use a core); after timing, the CPU time used by other processes during the
run is reported. Rows whose median > 1.5x min are marked in the `noisy` column. --rounds K
repeats each engine in K fresh processes and keeps the best median per row.
--strict exits 1 if any target is not PASS (median-based).

The table and summary go to stdout; progress goes to stderr. With --json, stdout carries
only JSON lines (environment / load information then goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (RunLoadMeter, check_load_after, check_load_before, find_normvision,  # noqa: E402
                      fmt, fmt_x, format_load, json_lines, make_parser, parse_list, print_table,
                      ratio, run_normvision_cmd, run_torch_subprocess, time_reps, torch_setup,
                      write_header, write_run_warning)

ALL_OPS = ["batch_norm", "group_norm", "layer_norm", "instance_norm"]
ALL_MODES = ["train_fwd", "train_fwd_bwd", "eval_fwd"]
DEFAULT_SHAPES_4D = [
    (64, 32, 28, 28),
    (64, 64, 14, 14),
    (128, 128, 7, 7),
    (32, 64, 56, 56),
    (256, 16, 32, 32),
]
DEFAULT_SHAPES_2D = [(512, 1024)]
GROUP_NORM_GROUPS = 8

# Effective memory traffic in units of numel * sizeof(f32), defined once for both engines:
#   forward (train or eval): read x, write y                         -> 2
#   forward + backward:      fwd read x + write y; bwd read x, dy, write dx -> 5
EFFECTIVE_BYTES_FACTOR = {"train_fwd": 2, "eval_fwd": 2, "train_fwd_bwd": 5}
F32_BYTES = 4

# Ops that accept 2-D (N, C) shapes, and whether a 2-D row is required to have
# normvision data (batch_norm: required; layer_norm: optional extra, dropped if the
# binary does not report it). group_norm / instance_norm only run on 4-D shapes.
OPS_2D = {"batch_norm": True, "layer_norm": False}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def effective_bytes(shape, mode):
    return EFFECTIVE_BYTES_FACTOR[mode] * numel(shape) * F32_BYTES


def gbps(shape, mode, ms):
    if ms is None or ms <= 0:
        return None
    return effective_bytes(shape, mode) / (ms * 1e-3) / 1e9


def shape_str(shape):
    return "x".join(str(d) for d in shape)


def parse_shape(s):
    try:
        shape = tuple(int(p) for p in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {s!r}; expected e.g. 64x32x28x28 or 512x1024")
    if len(shape) not in (2, 4) or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"shape {s!r}: need 2-D (N,C) or 4-D (N,C,H,W) positive dims")
    return shape


# --------------------------------------------------------------------------------------
# Job list
# --------------------------------------------------------------------------------------

def build_jobs(ops, modes, shapes):
    """Returns [(op, shape, mode, required)] in a stable order."""
    jobs = []
    for op in ops:
        for shape in shapes:
            if len(shape) == 2:
                if op not in OPS_2D:
                    continue
                # Default grid: the 2-D shape is a batch_norm (BatchNorm1d) shape; layer_norm
                # over (C,) is an optional extra row (kept only if normvision reports it).
                required = OPS_2D[op]
            else:
                required = True
            if op == "group_norm" and shape[1] % GROUP_NORM_GROUPS != 0:
                print(f"note: skipping group_norm {shape_str(shape)}: C not divisible by "
                      f"{GROUP_NORM_GROUPS}", file=sys.stderr)
                continue
            for mode in modes:
                jobs.append((op, shape, mode, required))
    return jobs


# --------------------------------------------------------------------------------------
# PyTorch worker (runs in a subprocess, one per thread count)
# --------------------------------------------------------------------------------------

def _time_calls(fn, warmup, reps, before=None):
    times = [dt * 1e3 for dt in time_reps(fn, warmup, reps, before)]
    return min(times), statistics.median(times)


def torch_worker(spec):
    threads = spec["threads"]
    torch = torch_setup(threads)  # torch is imported only in the worker
    from torch import nn

    warmup, reps = spec["warmup"], spec["reps"]
    for op, shape, mode in spec["jobs"]:
        shape = tuple(shape)
        C = shape[1]
        if op == "batch_norm":
            m = nn.BatchNorm2d(C) if len(shape) == 4 else nn.BatchNorm1d(C)
        elif op == "group_norm":
            m = nn.GroupNorm(GROUP_NORM_GROUPS, C)
        elif op == "layer_norm":
            m = nn.LayerNorm(tuple(shape[1:]))
        elif op == "instance_norm":
            m = nn.InstanceNorm2d(C)
        else:
            raise ValueError(op)
        if mode == "eval_fwd":
            m.eval()
        else:
            m.train()

        x0 = torch.randn(shape, dtype=torch.float32)
        dy0 = torch.randn(shape, dtype=torch.float32)
        layouts = [("nchw", torch.contiguous_format)]
        if len(shape) == 4:
            layouts.append(("cl", torch.channels_last))
        for layout, fmt in layouts:
            x = x0.contiguous(memory_format=fmt)
            dy = dy0.contiguous(memory_format=fmt)
            if mode == "train_fwd_bwd":
                x = x.detach().clone().requires_grad_(True)  # clone preserves the layout

                def clear():
                    x.grad = None
                    m.zero_grad(set_to_none=True)

                def fn():
                    y = m(x)
                    y.backward(dy)

                mn, med = _time_calls(fn, warmup, reps, before=clear)
                clear()
            else:
                def fn():
                    with torch.no_grad():
                        m(x)

                mn, med = _time_calls(fn, warmup, reps)
            print(json.dumps({"op": op, "shape": list(shape), "mode": mode, "layout": layout,
                              "threads": threads, "min_ms": mn, "median_ms": med}), flush=True)


def run_torch(jobs, threads, reps, warmup):
    """Returns ({key: {"nchw": (min, med), "cl": (min, med)}}, meta)."""
    spec = {"threads": threads, "reps": reps, "warmup": warmup,
            "jobs": [[op, list(shape), mode] for op, shape, mode, _ in jobs]}
    t0 = time.time()
    stdout = run_torch_subprocess(__file__, spec, threads, f"threads={threads}",
                                  "tools/bench_norm_vs_torch.sh")
    res, meta = {}, {}
    for line in stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("meta"):
            meta = d
            continue
        key = (d["op"], tuple(d["shape"]), d["mode"], threads)
        res.setdefault(key, {})[d["layout"]] = (d["min_ms"], d["median_ms"])
    print(f"[torch] threads={threads}: {len(res)} rows in {time.time() - t0:.1f} s", file=sys.stderr)
    return res, meta


# --------------------------------------------------------------------------------------
# normvision side
# --------------------------------------------------------------------------------------

def parse_normvision_output(text, threads):
    """Parse `bench-kernels --json` output: one JSON object per line; non-JSON lines ignored."""
    res = {}
    for d in json_lines(text, ("op", "shape", "mode", "median_ms")):
        try:
            key = (str(d["op"]), tuple(int(s) for s in d["shape"]), str(d["mode"]),
                   int(d.get("threads", threads)))
            med = float(d["median_ms"])
            mn = float(d["min_ms"]) if d.get("min_ms") is not None else med
        except (TypeError, ValueError):
            continue
        res[key] = (mn, med)
    return res


def run_normvision(binary, threads, reps, warmup, ops, modes, shapes_arg):
    cmd = [str(binary), "bench-kernels", "--json", "--threads", str(threads), "--reps", str(reps),
           "--warmup", str(warmup), "--ops", ",".join(ops), "--modes", ",".join(modes)]
    if shapes_arg:
        cmd += ["--shapes", ",".join(shape_str(s) for s in shapes_arg)]
    t0 = time.time()
    stdout = run_normvision_cmd(cmd, f"cannot run normvision binary {binary}")
    res = parse_normvision_output(stdout, threads)
    print(f"[normvision] threads={threads}: {len(res)} rows in {time.time() - t0:.1f} s",
          file=sys.stderr)
    return res


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

NOISY_MEDIAN_OVER_MIN = 1.5


def merge_best(acc, new):
    """Across rounds keep, per key, the (min, median) pair with the lowest median; min = min of mins."""
    for k, v in new.items():
        old = acc.get(k)
        acc[k] = v if old is None else (min(old[0], v[0]), min(old[1], v[1]))


def is_noisy(pair):
    return pair is not None and pair[0] is not None and pair[0] > 0 and \
        pair[1] > NOISY_MEDIAN_OVER_MIN * pair[0]


def make_rows(jobs, threads_list, torch_res, nv_res, have_nv):
    rows, dropped, missing = [], [], []
    for t in threads_list:
        for op, shape, mode, required in jobs:
            key = (op, shape, mode, t)
            tr = torch_res.get(key, {})
            nv = nv_res.get(key)
            if have_nv and nv is None:
                if not required:
                    dropped.append(key)
                    continue
                missing.append(key)
            t_min, t_med = tr.get("nchw", (None, None))
            cl_min, cl_med = tr.get("cl", (None, None))
            nv_min, nv_med = nv if nv else (None, None)
            noisy = [name for name, pair in (("torch_nchw", tr.get("nchw")), ("torch_cl", tr.get("cl")),
                                             ("normvision", nv)) if is_noisy(pair)]
            rows.append({
                "op": op, "shape": list(shape), "mode": mode, "threads": t,
                "torch_ms": t_med, "normvision_ms": nv_med,
                "speedup": ratio(t_med, nv_med),
                "normvision_gbps": gbps(shape, mode, nv_med),
                "torch_cl_ms": cl_med,
                "speedup_cl": ratio(cl_med, nv_med),
                "torch_min_ms": t_min, "normvision_min_ms": nv_min,
                "speedup_min": ratio(t_min, nv_min),
                "torch_cl_min_ms": cl_min,
                "speedup_cl_min": ratio(cl_min, nv_min),
                "torch_gbps": gbps(shape, mode, t_med),
                "torch_cl_gbps": gbps(shape, mode, cl_med),
                "bytes": effective_bytes(shape, mode),
                "noisy": noisy,
            })
    extra = sorted(set(nv_res) - {(op, s, m, t) for op, s, m, _ in jobs for t in threads_list})
    return rows, dropped, missing, extra


TABLE_HEADER = ["op", "shape", "mode", "thr", "torch NCHW ms", "torch CL ms", "nv ms",
                "x NCHW", "x CL", "x NCHW (min)", "x CL (min)", "nv GB/s", "torch GB/s", "noisy"]


def table_cells(r):
    return [r["op"], shape_str(r["shape"]), r["mode"], str(r["threads"]),
            fmt(r["torch_ms"], ".3f"), fmt(r["torch_cl_ms"], ".3f"), fmt(r["normvision_ms"], ".3f"),
            fmt_x(r["speedup"]), fmt_x(r["speedup_cl"]),
            fmt_x(r["speedup_min"]), fmt_x(r["speedup_cl_min"]),
            fmt(r["normvision_gbps"], ".1f"), fmt(r["torch_gbps"], ".1f"),
            ",".join(n.replace("torch_", "").replace("normvision", "nv") for n in r["noisy"])]


def print_rows_table(rows, markdown, out):
    print_table(TABLE_HEADER, [table_cells(r) for r in rows], {0, 1, 2}, markdown, out,
                group_of=lambda i: (rows[i]["threads"], rows[i]["op"]))


# Targets: (name, op, modes, [(column, min-column, threshold, label)], best_layout)
def target_defs():
    return [
        ("BatchNorm train_fwd: >=2x torch NCHW and >=1x channels_last", "batch_norm", ["train_fwd"],
         [("speedup", "speedup_min", 2.0, "vs NCHW"), ("speedup_cl", "speedup_cl_min", 1.0, "vs CL")]),
        ("BatchNorm train_fwd_bwd: >=2x torch NCHW and >=1x channels_last", "batch_norm", ["train_fwd_bwd"],
         [("speedup", "speedup_min", 2.0, "vs NCHW"), ("speedup_cl", "speedup_cl_min", 1.0, "vs CL")]),
        ("BatchNorm eval_fwd: >=1x torch (best layout)", "batch_norm", ["eval_fwd"],
         [("speedup_best", "speedup_best_min", 1.0, "vs best layout")]),
        ("GroupNorm: >=1x torch NCHW", "group_norm", ALL_MODES, [("speedup", "speedup_min", 1.0, "vs NCHW")]),
        ("LayerNorm: >=1x torch NCHW", "layer_norm", ALL_MODES, [("speedup", "speedup_min", 1.0, "vs NCHW")]),
        ("InstanceNorm: >=1x torch NCHW", "instance_norm", ALL_MODES, [("speedup", "speedup_min", 1.0, "vs NCHW")]),
    ]


def _best_layout(r):
    def best(a, b):
        vals = [v for v in (a, b) if v is not None]
        return min(vals) if vals else None
    r = dict(r)
    r["speedup_best"] = ratio(best(r["torch_ms"], r["torch_cl_ms"]), r["normvision_ms"])
    r["speedup_best_min"] = ratio(best(r["torch_min_ms"], r["torch_cl_min_ms"]), r["normvision_min_ms"])
    return r


def evaluate_targets(rows):
    """Returns [(name, status, detail_lines)] for targets whose op/mode was measured."""
    results = []
    for name, op, modes, checks in target_defs():
        sel = [_best_layout(r) for r in rows if r["op"] == op and r["mode"] in modes]
        if not sel:
            continue
        missing = [r for r in sel if r["normvision_ms"] is None]
        have = [r for r in sel if r["normvision_ms"] is not None]
        ok_med, ok_min = True, True
        details = []
        for col, col_min, thr, label in checks:
            applicable = [r for r in have if r[col] is not None]  # e.g. no CL for 2-D shapes
            if not applicable:
                continue
            worst = min(applicable, key=lambda r: r[col])
            fails = [r for r in applicable if r[col] < thr]
            fails_min = [r for r in applicable if r[col_min] is not None and r[col_min] < thr]
            ok_med &= not fails
            ok_min &= not fails_min
            details.append(
                f"{label} (need >= {thr:g}x): worst {worst[col]:.2f}x at {worst['mode']} "
                f"{shape_str(worst['shape'])} T={worst['threads']}; "
                f"{len(applicable) - len(fails)}/{len(applicable)} rows pass (median), "
                f"{len(applicable) - len(fails_min)}/{len(applicable)} (min)")
            for r in fails:
                details.append(f"    below: {r['mode']} {shape_str(r['shape'])} T={r['threads']}: "
                               f"{r[col]:.2f}x (min-based {fmt_x(r[col_min])})")
        if missing:
            status = "INCOMPLETE"
            details.append(f"no normvision data for {len(missing)} row(s): " + ", ".join(
                f"{r['mode']} {shape_str(r['shape'])} T={r['threads']}" for r in missing))
        else:
            status = "PASS" if ok_med else "FAIL"
        status += f" (min-based: {'PASS' if ok_min else 'FAIL'})" if have else ""
        results.append((name, status, details))
    return results


def print_summary(results, out, markdown):
    out.write("\n## Targets (median-based; min-based in parentheses)\n\n" if markdown
              else "\nTargets (median-based verdict; min-based in parentheses):\n")
    for name, status, details in results:
        if markdown:
            out.write(f"- **{status.split()[0]}** {name} {' '.join(status.split()[1:])}\n")
            for d in details:
                indent = "    " if d.startswith(" ") else "  "
                out.write(f"{indent}- {d.strip()}\n")
        else:
            out.write(f"  [{status}] {name}\n")
            for d in details:
                out.write(f"      {d}\n")


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_torch-worker":
        torch_worker(json.load(sys.stdin))
        return 0

    p = make_parser(__doc__)
    p.add_argument("--threads", default="1,2",
                   type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                   help="comma-separated thread counts (default 1,2)")
    p.add_argument("--reps", type=int, default=30, help="timed reps per case (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up reps per case (default 5)")
    p.add_argument("--ops", default=",".join(ALL_OPS), type=lambda s: parse_list(s, ALL_OPS, "op"),
                   help=f"comma-separated subset of {','.join(ALL_OPS)}")
    p.add_argument("--modes", default=",".join(ALL_MODES), type=lambda s: parse_list(s, ALL_MODES, "mode"),
                   help=f"comma-separated subset of {','.join(ALL_MODES)}")
    p.add_argument("--shapes", default=None,
                   type=lambda s: [parse_shape(x.strip()) for x in s.split(",") if x.strip()],
                   help="comma-separated NxCxHxW or NxC shapes (default: the 5 standard 4-D shapes "
                        "+ 512x1024, which runs for batch_norm (BatchNorm1d) and layer_norm over (C,); "
                        "the layer_norm 2-D row is dropped if normvision does not report it)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each engine K times in fresh processes (interleaved) and keep, per "
                        "row, the round with the lowest median (default 1); helps on VMs where "
                        "a whole process can land in a slow multi-threaded state")
    p.add_argument("--interleave", action="store_true",
                   help="alternate the engines shape by shape (fresh processes per shape) instead of "
                        "running every shape of one engine, then the other: slower to run (~1 s of "
                        "process start per shape and thread count), but each ratio compares "
                        "timings taken seconds apart, which matters on a machine whose memory "
                        "bandwidth drifts")
    p.add_argument("--normvision", metavar="PATH", default=None,
                   help="normvision binary to use (skips `cargo build --release`)")
    p.add_argument("--torch-only", action="store_true",
                   help="measure PyTorch only (no cargo build, no normvision)")
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target is not PASS")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.reps < 1 or args.warmup < 0 or not args.threads or any(t < 1 for t in args.threads):
        p.error("--reps must be >= 1, --warmup >= 0, --threads positive")

    shapes = args.shapes if args.shapes is not None else DEFAULT_SHAPES_4D + DEFAULT_SHAPES_2D
    jobs = build_jobs(args.ops, args.modes, shapes)
    if not jobs:
        p.error("nothing to run for this --ops/--shapes combination")

    info_out = sys.stderr if args.json else sys.stdout

    # Build before the load check (cargo itself loads the machine).
    binary = find_normvision(args.normvision, args.torch_only)

    # With --json the whole header goes to stderr at the end anyway.
    load = check_load_before(args.threads, lambda t, ncpu: f"--threads {t} exceeds the {ncpu} usable CPUs "
                             f"(oversubscribed)", quiet=args.json)

    torch_res, torch_meta = {}, {}
    nv_res = {}
    meter = RunLoadMeter()
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
        # one group = every shape (the default), or one shape at a time with --interleave
        groups = [[s] for s in shapes] if args.interleave else [args.shapes]
        for t in args.threads:
            for group in groups:
                gjobs = jobs if group is None else [j for j in jobs if j[1] in group]
                if not gjobs:
                    continue
                r, torch_meta = run_torch(gjobs, t, args.reps, args.warmup)
                for key, layouts in r.items():
                    merge_best(torch_res.setdefault(key, {}), layouts)
                if binary is not None:
                    merge_best(nv_res, run_normvision(binary, t, args.reps, args.warmup, args.ops,
                                                      args.modes, group))

    check_load_after(load, meter, quiet=args.json)

    rows, dropped, missing, extra = make_rows(jobs, args.threads, torch_res, nv_res, binary is not None)
    if dropped:
        print(f"note: normvision reported no data for {len(dropped)} optional row(s) "
              f"(e.g. layer_norm 2-D); dropped", file=sys.stderr)
    if extra:
        print(f"note: ignored {len(extra)} normvision row(s) not in the job list: "
              + ", ".join(f"{o} {shape_str(s)} {m} T={t}" for o, s, m, t in extra[:6])
              + (" ..." if len(extra) > 6 else ""), file=sys.stderr)

    hdr = [f"normvision vs PyTorch {torch_meta.get('torch_version', '?')} (CPU, f32); "
           f"reps={args.reps} warmup={args.warmup} rounds={args.rounds}"
           f"{' interleaved by shape' if args.interleave else ''}; threads {','.join(map(str, args.threads))}; "
           f"binary: {binary if binary else '(torch only)'}"]
    hdr += format_load(load)
    if load.get("during_run"):
        hdr.append(load["during_run"])
    hdr.append("speedup = torch time / normvision time; GB/s from effective bytes: "
               "fwd = 2*numel*4, fwd+bwd = 5*numel*4 (median time)")
    hdr.append(f"noisy = engines whose median > {NOISY_MEDIAN_OVER_MIN}x their min on that row "
               f"(re-run, or use --rounds)")

    if args.json:
        write_header(hdr, sys.stderr, False)
        for r in rows:
            print(json.dumps(r))
        results = evaluate_targets(rows) if binary is not None else []
        if results:
            print_summary(results, sys.stderr, False)
    else:
        out = sys.stdout
        write_header(hdr, out, args.markdown)
        out.write("\n")
        print_rows_table(rows, args.markdown, out)
        results = evaluate_targets(rows) if binary is not None else []
        if results:
            print_summary(results, out, args.markdown)
        write_run_warning(load, out)
        n_noisy = sum(1 for r in rows if r["noisy"])
        if n_noisy:
            out.write(f"\nnote: {n_noisy}/{len(rows)} rows are noisy (median > "
                      f"{NOISY_MEDIAN_OVER_MIN}x min); compare min-based columns or re-run\n")
    if args.strict and any(not s.startswith("PASS") for _, s, _ in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
