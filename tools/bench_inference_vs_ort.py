#!/usr/bin/env python3
"""Inference side by side, in one run: ONNX Runtime, PyTorch eval and normvision on the reference CNN (the zoo's
`cnn` with BatchNorm at 1x28x28, its PyTorch twin from tools/gen_zoo_twins.py), at batch 1 and 128.

    tools/.venv/bin/python tools/bench_inference_vs_ort.py --normvision target/release/normvision [--threads 2] [--json]

- ONNX Runtime at its best: the twin exported by torch.onnx.export (TorchScript exporter, opset 17, constant
  folding, so its BatchNorms are folded into the convolutions; dynamic batch), graph optimisation ALL, intra-op
  threads = --threads, inter-op 1, sequential execution, warm-up, then every call timed; throughput from the
  median call. Its per-call Python overhead is measured on a one-element Identity model and printed.
- PyTorch eval: torch.inference_mode, NCHW and channels_last, the faster reported.
- normvision: `normvision --threads T bench --onnx <the same .onnx file> --json`: the file ONNX Runtime runs,
  imported by normvision's ONNX importer (BatchNorm already folded by the exporter), through the library's
  inference plan, each call timed in-process the same way.

All three run the same weights, the same architecture and the same folding. The three are timed in --rounds paired
rounds (ORT, normvision, PyTorch back to back in each); the speedup is the median of the per-round ratios, with
their range, and the throughputs and latencies are medians over the rounds.
Prints a table, or with --json one line per batch size with the keys model, batch, threads, ort_img_s,
torch_img_s, normvision_img_s, speedup_vs_ort (and the latency percentiles).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_zoo_twins as twins  # noqa: E402


# Seconds each runtime waits before it starts, for the previous one's spinning worker threads to go idle.
IDLE_S = 0.5

def timed_calls(fn, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return sorted(out)


def pct(sorted_t: list[float], q: float) -> float:
    i = min(len(sorted_t) - 1, max(0, int(np.ceil(len(sorted_t) * q)) - 1))
    return sorted_t[i]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--normvision", default="target/release/normvision")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--calls", type=int, default=20, help="timed calls at batch > 1 (10x at batch 1)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="paired rounds (ORT, normvision, PyTorch back to back); ratios are per round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort
    import onnx
    from onnx import helper, TensorProto

    torch.set_num_threads(args.threads)
    twins.H = twins.W = 28
    net = twins.cnn("batch").eval()
    tmp = Path(tempfile.mkdtemp())
    onnx_path = tmp / "cnn.onnx"
    torch.onnx.export(net, torch.rand(1, 1, 28, 28), str(onnx_path), dynamo=False, opset_version=17,
                      do_constant_folding=True, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    # ORT's per-call Python overhead: a one-element Identity model
    ident = helper.make_model(helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "id",
                                               [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])]))
    id_path = tmp / "id.onnx"
    onnx.save(ident, str(id_path))
    id_sess = ort.InferenceSession(str(id_path), so, providers=["CPUExecutionProvider"])
    one = np.zeros(1, np.float32)
    overhead = statistics.median(timed_calls(lambda: id_sess.run(None, {"a": one}), 2000, 200))

    batches = [int(v) for v in args.batches.split(",")]
    xs = {b: np.random.default_rng(0).random((b, 1, 28, 28), dtype=np.float32) for b in batches}
    # Paired rounds: each round times ONNX Runtime, then normvision, then PyTorch, back to back, so that a
    # ratio compares runs seconds apart (this machine's speed drifts by up to 2x from minute to minute). Each
    # runtime starts IDLE_S after the previous one stopped: ORT's and PyTorch's worker threads spin for a while
    # after their last call, and on two cores they took the cores of the next runtime's first calls (its p99).
    per_round = {b: [] for b in batches}
    for _ in range(args.rounds):
        ort_t = {}
        time.sleep(IDLE_S)
        for b in batches:
            calls = args.calls * (10 if b == 1 else 1)
            ort_t[b] = timed_calls(lambda: sess.run(None, {"x": xs[b]}), calls, max(5, calls // 10))
        time.sleep(IDLE_S)
        nv = subprocess.run([args.normvision, "--threads", str(args.threads), "bench", "--onnx", str(onnx_path),
                             "--json", "--batch-size", str(max(batches)), "--steps", str(args.calls)],
                            check=True, capture_output=True, text=True)
        nv_rows = {}
        for line in nv.stdout.splitlines():
            if line.strip():
                r = json.loads(line)
                nv_rows[r["batch"]] = r
        time.sleep(IDLE_S)
        for b in batches:
            calls = args.calls * (10 if b == 1 else 1)
            xt = torch.from_numpy(xs[b])
            best_torch = None
            for fmt in (torch.contiguous_format, torch.channels_last):
                m = net.to(memory_format=fmt)
                xi = xt.contiguous(memory_format=fmt)
                with torch.inference_mode():
                    t = timed_calls(lambda: m(xi), calls, max(5, calls // 10))
                if best_torch is None or statistics.median(t) < statistics.median(best_torch):
                    best_torch = t
            r = nv_rows[b]
            ort_img_s = b / statistics.median(ort_t[b])
            per_round[b].append({
                "ort_img_s": ort_img_s, "torch_img_s": b / statistics.median(best_torch),
                "normvision_img_s": r["img_s"], "ratio": r["img_s"] / ort_img_s,
                "ort_p50": pct(ort_t[b], 0.5), "ort_p99": pct(ort_t[b], 0.99),
                "nv_p50": r["latency_ms_p50"] / 1e3, "nv_p99": r["latency_ms_p99"] / 1e3,
            })

    def med(b, key):
        return statistics.median(x[key] for x in per_round[b])

    rows = []
    for b in batches:
        ratios = [x["ratio"] for x in per_round[b]]
        rows.append({
            "model": "cnn", "batch": b, "threads": args.threads, "rounds": args.rounds,
            "ort_img_s": med(b, "ort_img_s"), "torch_img_s": med(b, "torch_img_s"),
            "normvision_img_s": med(b, "normvision_img_s"),
            "speedup_vs_ort": statistics.median(ratios),
            "speedup_vs_ort_min": min(ratios), "speedup_vs_ort_max": max(ratios),
            "ort_latency_ms_p50": med(b, "ort_p50") * 1e3, "ort_latency_ms_p99": med(b, "ort_p99") * 1e3,
            "normvision_latency_ms_p50": med(b, "nv_p50") * 1e3,
            "normvision_latency_ms_p99": med(b, "nv_p99") * 1e3,
            "ort_python_overhead_ms": overhead * 1e3,
        })
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"reference CNN + BN (folded), {args.threads} threads; ONNX Runtime {ort.__version__}, torch {torch.__version__}; "
          f"ORT per-call Python overhead {overhead * 1e3:.3f} ms (Identity model)")
    print(f"medians over {args.rounds} paired rounds; ÷ ORT is the median of the per-round ratios (min-max)")
    print(f"{'batch':>5} {'ORT img/s':>10} {'torch img/s':>11} {'normvision':>10} {'÷ ORT':>6} {'(min-max)':>11} "
          f"{'ORT p50/p99 ms':>15} {'nv p50/p99 ms':>14}")
    for r in rows:
        print(f"{r['batch']:>5} {r['ort_img_s']:>10.0f} {r['torch_img_s']:>11.0f} {r['normvision_img_s']:>10.0f} "
              f"{r['speedup_vs_ort']:>5.2f}x {r['speedup_vs_ort_min']:>5.2f}-{r['speedup_vs_ort_max']:<5.2f} "
              f"{r['ort_latency_ms_p50']:>7.3f}/{r['ort_latency_ms_p99']:<7.3f} "
              f"{r['normvision_latency_ms_p50']:>6.3f}/{r['normvision_latency_ms_p99']:<7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
