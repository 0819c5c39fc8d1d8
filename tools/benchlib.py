"""Shared helpers for the PyTorch vs normvision benchmark scripts.

Used by tools/bench_norm_vs_torch.py and tools/bench_train_vs_torch.py (both run as
`python tools/<script>.py`, so this module is importable from tools/):

- machine load check: `machine_load` before timing, `RunLoadMeter` during the run,
  `format_load` for the report header, plus the start/finish wrappers both scripts use;
- the PyTorch worker subprocess: thread-pinned environment, `torch_setup` inside the
  worker, `time_reps` for the timed loop;
- the normvision side: `cargo build --release` / binary discovery and running it;
- output helpers: JSON-lines parsing, number formatting, plain/Markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def make_parser(doc):
    """ArgumentParser whose description is the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="See the module docstring for details.")


def parse_list(s, allowed, what, allow_empty=True):
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad)} (allowed: {', '.join(allowed)})")
    if not items and not allow_empty:
        raise argparse.ArgumentTypeError(f"empty {what} list")
    return items


# --------------------------------------------------------------------------------------
# Machine load check
# --------------------------------------------------------------------------------------

def _read_proc_stat():
    cpus = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                continue
            parts = line.split()
            vals = [int(v) for v in parts[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
            steal = vals[7] if len(vals) > 7 else 0
            # guest/guest_nice (fields 9,10) are already included in user/nice
            total = sum(vals[:8])
            cpus[parts[0]] = (total, idle, steal)
    return cpus


def machine_load(sample_s=1.0):
    info = {"ncpu": os.cpu_count()}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["affinity_cpus"] = info["ncpu"]
    try:
        with open("/proc/loadavg") as f:
            la = f.read().split()
        info["loadavg"] = [float(la[0]), float(la[1]), float(la[2])]
        info["runnable"] = la[3]
    except OSError:
        info["loadavg"] = None
    try:
        a = _read_proc_stat()
        time.sleep(sample_s)
        b = _read_proc_stat()
        busy = {}
        dt_all = b["cpu"][0] - a["cpu"][0]
        info["steal_pct"] = 100.0 * (b["cpu"][2] - a["cpu"][2]) / dt_all if dt_all > 0 else 0.0
        for k in b:
            if k not in a:
                continue
            dt = b[k][0] - a[k][0]
            di = b[k][1] - a[k][1]
            busy[k] = 100.0 * (dt - di) / dt if dt > 0 else 0.0
        info["busy_pct"] = busy.get("cpu")
        info["per_cpu_busy_pct"] = [busy[k] for k in sorted(busy, key=lambda s: (len(s), s)) if k != "cpu"]
    except (OSError, ValueError, IndexError, KeyError):
        info["busy_pct"] = None
        info["per_cpu_busy_pct"] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    warnings = []
    busy = info.get("busy_pct")
    per = info.get("per_cpu_busy_pct") or []
    if busy is not None and (busy >= 10.0 or (per and max(per) >= 30.0)):
        warnings.append(
            f"machine looks loaded: CPU busy {busy:.0f}% over {sample_s:.0f} s "
            f"(per CPU: {', '.join(f'{p:.0f}%' for p in per)}); other processes are using "
            f"cores, timings (especially multi-threaded ones) will be noisy")
    steal = info.get("steal_pct")
    if steal is not None and steal >= 5.0:
        warnings.append(f"hypervisor steal time is {steal:.0f}% (VM vCPUs are being descheduled); "
                        f"timings will be noisy")
    la = info.get("loadavg")
    # The load average lags by minutes; only use it when the /proc/stat sample is unavailable.
    if la and la[0] >= 0.75 and busy is None:
        warnings.append(f"1-min load average is {la[0]:.2f} (something ran recently); "
                        f"timings may be noisy")
    info["warnings"] = warnings
    return info


class RunLoadMeter:
    """CPU time used by OTHER processes while the benchmark runs: system busy time from
    /proc/stat minus this process's and its (waited-for) children's CPU time."""

    def __init__(self):
        self.ok = True
        try:
            self.stat0 = _read_proc_stat()["cpu"]
        except (OSError, KeyError, ValueError, IndexError):
            self.ok = False
        self.times0 = os.times()
        self.wall0 = time.perf_counter()

    def others_cores(self):
        """Average number of cores used by other processes since construction (None if unknown)."""
        if not self.ok:
            return None
        try:
            st = _read_proc_stat()["cpu"]
        except (OSError, KeyError, ValueError, IndexError):
            return None
        t = os.times()
        wall = time.perf_counter() - self.wall0
        if wall <= 0:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = ((st[0] - st[1]) - (self.stat0[0] - self.stat0[1])) / hz
        ours = sum(t[:4]) - sum(self.times0[:4])
        return max(0.0, (busy - ours) / wall)


def format_load(info):
    lines = []
    cpu = info.get("cpu_model", "unknown CPU")
    lines.append(f"CPU: {cpu}; {info['ncpu']} logical CPUs ({info['affinity_cpus']} usable)")
    la = info.get("loadavg")
    busy = info.get("busy_pct")
    per = info.get("per_cpu_busy_pct") or []
    s = "load: "
    s += f"loadavg {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} (runnable {info.get('runnable')})" if la else "loadavg n/a"
    if busy is not None:
        s += f"; CPU busy {busy:.1f}% over ~1 s (per CPU: {', '.join(f'{p:.0f}%' for p in per)})"
    if info.get("steal_pct") is not None:
        s += f"; steal {info['steal_pct']:.1f}%"
    lines.append(s)
    for w in info["warnings"]:
        lines.append(f"WARNING: {w}")
    return lines


def check_load_before(threads, oversubscribed, quiet):
    """Samples the machine load (~1 s) before timing. For every thread count in `threads` above
    the usable CPUs, adds the warning `oversubscribed(t, ncpu)`. Unless `quiet` (--json, where
    the header goes to stderr at the end anyway), prints the warnings to stderr. Returns the info."""
    load = machine_load(1.0)
    ncpu = load["affinity_cpus"] or load["ncpu"] or 1
    for t in threads:
        if t > ncpu:
            load["warnings"].append(oversubscribed(t, ncpu))
    if not quiet:
        for w in load["warnings"]:
            print(f"WARNING: {w}", file=sys.stderr)
    return load


def check_load_after(load, meter, quiet):
    """Records in `load` how many cores other processes used while `meter` ran
    ("others_cores_during_run", and the report line "during_run"); warns on stderr unless `quiet`."""
    others = meter.others_cores()
    if others is not None:
        load["others_cores_during_run"] = others
        msg = f"other processes used on average {others:.2f} cores while the benchmark ran"
        if others >= 0.15:
            msg = ("WARNING: " + msg + "; the timings (especially multi-threaded ones) are not "
                   "trustworthy, re-run on an idle machine")
            if not quiet:
                print(msg, file=sys.stderr)
        load["during_run"] = msg


# --------------------------------------------------------------------------------------
# PyTorch worker subprocess
# --------------------------------------------------------------------------------------

def run_torch_subprocess(script, spec, threads, what, sh_script, show_stderr=False):
    """Runs `python <script> --_torch-worker` with `spec` as JSON on stdin, pinned to `threads`
    (OMP/MKL/OpenBLAS). Exits with an error naming `what` and `sh_script` if the worker fails.
    Returns the worker's stdout."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--_torch-worker"],
                          input=json.dumps(spec), stdout=subprocess.PIPE,
                          stderr=None if show_stderr else subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        if proc.stderr:
            sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"error: PyTorch worker ({what}) failed with exit code "
                         f"{proc.returncode} (python: {sys.executable}; is torch installed? "
                         f"use {sh_script} or set TORCH_PYTHON)")
    return proc.stdout


def torch_setup(threads, seed=0):
    """In the worker: imports torch, pins its thread pools, seeds it and prints the meta line."""
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(seed)
    print(json.dumps({"meta": True, "torch_version": torch.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    return torch


def time_reps(fn, warmup, reps, before=None):
    """Calls `fn` `warmup` times, then `reps` timed times with the garbage collector off;
    `before` (untimed) runs before every call. Returns the per-call times in seconds."""
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            times.append(t1 - t0)
    finally:
        if gc_was:
            gc.enable()
    return times


# --------------------------------------------------------------------------------------
# normvision side
# --------------------------------------------------------------------------------------

def build_normvision():
    target_dir = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    if not target_dir.is_absolute():
        target_dir = REPO_ROOT / target_dir
    print("[normvision] cargo build --release ...", file=sys.stderr)
    proc = subprocess.run(["cargo", "build", "--release"], cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SystemExit("error: cargo build --release failed")
    return target_dir / "release" / "normvision"


def find_normvision(path, torch_only):
    """The normvision binary: None with --torch-only, `path` (--normvision) if given, else the
    one `cargo build --release` produces. Exits if it does not exist."""
    if torch_only:
        return None
    binary = Path(path) if path else build_normvision()
    if not binary.exists():
        raise SystemExit(f"error: normvision binary not found: {binary}")
    return binary


def run_normvision_cmd(cmd, cannot_run):
    """Runs a normvision command, capturing its output; exits with `error: <cannot_run>: <e>` if
    it cannot start, or with its output tail if it fails. Returns its stdout."""
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise SystemExit(f"error: {cannot_run}: {e}")
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"error: `{' '.join(cmd)}` failed with exit code {proc.returncode}")
    return proc.stdout


def json_lines(text, required):
    """JSON objects (one per line) that have all `required` keys; other lines are ignored."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and set(required) <= d.keys():
            out.append(d)
    return out


# --------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------

def fmt(v, spec, na="-"):
    return na if v is None else format(v, spec)


def fmt_x(v):
    return "-" if v is None else f"{v:.2f}x"


def ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def print_table(header, cells, left, markdown, out, group_of=None):
    """A plain (aligned) or Markdown table; columns in `left` are left-aligned, the rest right.
    In the plain table a blank line separates rows whose `group_of(row index)` differs."""
    if markdown:
        out.write("| " + " | ".join(header) + " |\n")
        out.write("|" + "|".join(":---" if i in left else "---:" for i in range(len(header))) + "|\n")
        for c in cells:
            out.write("| " + " | ".join(c) + " |\n")
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(c):
        return "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))

    out.write(line(header).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    prev = None
    for i, c in enumerate(cells):
        grp = group_of(i) if group_of else None
        if prev is not None and grp != prev:
            out.write("\n")
        prev = grp
        out.write(line(c).rstrip() + "\n")


def write_header(hdr, out, markdown):
    """The report header lines: plain, or as Markdown quote lines."""
    for line in hdr:
        out.write(f"> {line}  \n" if markdown else line + "\n")


def write_run_warning(load, out):
    """Repeats the during-run load warning (if any) at the end of the report."""
    if load.get("during_run", "").startswith("WARNING"):
        out.write("\n" + load["during_run"] + "\n")
