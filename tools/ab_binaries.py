#!/usr/bin/env python3
"""A/B of two normvision binaries on the same machine, in alternating runs.

    python3 tools/ab_binaries.py OLD NEW [--rounds 3] [--threads 1,2] [--steps 20] [--kernels] [--markdown] [--json]

Each round runs, for every thread count, `OLD bench` and `NEW bench` (the reference CNN with BatchNorm, batch
128: training and eval img/s, each the median of --steps timed steps), in the order OLD NEW in odd rounds and
NEW OLD in even ones, so drift in the machine's speed falls on both. With --kernels it also runs
`bench-kernels` (every normalization kernel on the benchmark shapes) for each binary, alternating the same way.
Reports per row the median and best over rounds of each binary and the ratio NEW/OLD of the medians, with the
machine load before and during the run. Needs no Python packages.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402


def run(binary: str, args: list[str]) -> list[dict]:
    p = subprocess.run([binary, *args, "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {binary} {' '.join(args)} failed ({p.returncode}):\n{p.stderr}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kernels", action="store_true", help="also the normalization kernel table")
    ap.add_argument("--kernel-reps", type=int, default=30)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", action="store_true", help="one JSON object per row instead of tables")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    load = bl.check_load_before(threads, lambda t, n: f"{t} threads on {n} CPUs", a.json)
    meter = bl.RunLoadMeter()
    bins = {"old": a.old, "new": a.new}
    # (threads, mode) -> which -> [img/s per round]
    e2e: dict = {}
    kern: dict = {}
    for r in range(a.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for t in threads:
            for which in order:
                for row in run(bins[which], ["--threads", str(t), "bench", "--steps", str(a.steps)]):
                    e2e.setdefault((t, row["mode"]), {}).setdefault(which, []).append(row["img_s"])
            if a.kernels:
                for which in order:
                    rows = run(bins[which], ["bench-kernels", "--threads", str(t), "--reps", str(a.kernel_reps)])
                    for row in rows:
                        key = (t, row["op"], "x".join(map(str, row["shape"])), row["mode"])
                        kern.setdefault(key, {}).setdefault(which, []).append(row["median_ms"])
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    bl.check_load_after(load, meter, a.json)

    out = sys.stdout
    if a.json:
        for (t, mode), v in sorted(e2e.items()):
            out.write(json.dumps({"kind": "bench", "threads": t, "mode": mode, "old_img_s": v["old"],
                                  "new_img_s": v["new"]}) + "\n")
        for (t, op, shape, mode), v in sorted(kern.items()):
            out.write(json.dumps({"kind": "kernel", "threads": t, "op": op, "shape": shape, "mode": mode,
                                  "old_median_ms": v["old"], "new_median_ms": v["new"]}) + "\n")
        out.write(json.dumps({"kind": "load", **{k: v for k, v in load.items() if k != "warnings"}}) + "\n")
        return
    hdr = [f"A/B: old = {a.old}, new = {a.new}; {a.rounds} alternating rounds",
           *bl.format_load(load), load.get("during_run", "")]
    bl.write_header([h for h in hdr if h], out, a.markdown)
    out.write("\n")
    cells = []
    for (t, mode), v in sorted(e2e.items()):
        mo, mn = statistics.median(v["old"]), statistics.median(v["new"])
        cells.append([mode, str(t), f"{mo:.0f}", f"{max(v['old']):.0f}", f"{mn:.0f}", f"{max(v['new']):.0f}",
                      bl.fmt_x(mn / mo), " / ".join(f"{x:.0f}" for x in v["old"]),
                      " / ".join(f"{x:.0f}" for x in v["new"])])
    bl.print_table(["reference CNN + BN", "threads", "old img/s (median)", "old best", "new img/s (median)",
                    "new best", "new/old", "old per round", "new per round"], cells, {0}, a.markdown, out)
    if kern:
        out.write("\n")
        cells = []
        ratios = []
        for (t, op, shape, mode), v in sorted(kern.items()):
            mo, mn = statistics.median(v["old"]), statistics.median(v["new"])
            ratios.append(mo / mn)
            cells.append([op, shape, mode, str(t), f"{mo:.3f}", f"{mn:.3f}", bl.fmt_x(mo / mn)])
        bl.print_table(["op", "shape", "mode", "threads", "old ms", "new ms", "speed new/old"], cells,
                       {0, 1, 2}, a.markdown, out)
        ratios.sort()
        out.write(f"\nkernel rows: {len(ratios)}; speed new/old median {statistics.median(ratios):.3f}, "
                  f"min {ratios[0]:.3f}, max {ratios[-1]:.3f}\n")
    bl.write_run_warning(load, out)


if __name__ == "__main__":
    main()
