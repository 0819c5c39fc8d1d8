#!/usr/bin/env bash
# How far do the two f32 engines stray from the float64 answer, step by step? Run after tools/fair_baseline.sh
# SEED (it reuses that run's initial weights, batch order and normvision log). Trains PyTorch's twin from
# normvision's initial weights on normvision's batches for STEPS steps in float32 and in float64, then prints, for
# normvision (f32) and PyTorch (f32), the relative difference of each step's training loss from float64's: its
# median and maximum over windows of steps, and the first step where it passes 1% and 10%.
#
#   bash tools/trajectory_vs_f64.sh [SEED [STEPS [NORM]]]      (defaults: 0 500 none)
#
# LR, CONV and OUT as for tools/fair_baseline.sh. The last line is JSON. Needs the venv of tools/torch_env.sh.
set -euo pipefail
SEED="${1:-0}"; STEPS="${2:-500}"; NORM="${3:-none}"; LR="${LR:-0.05}"; CONV="${CONV:-winograd}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/fair_baseline/seed$SEED-lr$LR-$CONV}"
for f in init.safetensors nv.jsonl order0.txt; do
    [[ -f "$OUT/$f" ]] || { echo "error: $OUT/$f is missing: run tools/fair_baseline.sh $SEED first" >&2; exit 1; }
done
PY="$(bash "$ROOT/tools/torch_env.sh")"
cd "$ROOT"
for dt in float32 float64; do
    "$PY" tools/torch_one_epoch.py --norm "$NORM" --seed "$SEED" --lr "$LR" --epochs 5 --max-steps "$STEPS" \
        --weights "$OUT/init.safetensors" --order "$OUT/order{epoch}.txt" --dtype "$dt" \
        --losses "$OUT/torch-$dt.json" 2>/dev/null >/dev/null
done
python3 - "$OUT" "$STEPS" "$SEED" <<'PYEOF'
import json, sys
out, steps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
nv = [e["loss"] for e in map(json.loads, open(f"{out}/nv.jsonl")) if e.get("event") == "step"][:steps]
t32 = json.load(open(f"{out}/torch-float32.json"))[:steps]
t64 = json.load(open(f"{out}/torch-float64.json"))[:steps]
n = min(len(nv), len(t32), len(t64))
def rel(a):
    return [abs(a[i] - t64[i]) / abs(t64[i]) for i in range(n)]
res = {"seed": seed, "steps": n}
edges = [1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
windows = [(a, b) for a, b in zip(edges, edges[1:]) if a <= n]
print(f"seed {seed}: relative difference of the step loss from PyTorch float64's, same weights and batches")
print(f"{'steps':>12} | {'normvision f32 median':>21} {'max':>9} | {'PyTorch f32 median':>18} {'max':>9}")
for name, d in (("normvision", rel(nv)), ("pytorch", rel(t32))):
    res[name] = {"first_over_1pct": next((i + 1 for i, v in enumerate(d) if v > 0.01), None),
                 "first_over_10pct": next((i + 1 for i, v in enumerate(d) if v > 0.10), None),
                 "windows": []}
    for a, b in windows:
        w = sorted(d[a - 1:min(b, n)])
        res[name]["windows"].append({"from": a, "to": min(b, n), "median": w[len(w) // 2], "max": w[-1]})
for i, (a, b) in enumerate(windows):
    wn, wt = res["normvision"]["windows"][i], res["pytorch"]["windows"][i]
    print(f"{a:>5}-{min(b, n):<6} | {wn['median']:>21.2e} {wn['max']:>9.2e} | {wt['median']:>18.2e} {wt['max']:>9.2e}")
for name in ("normvision", "pytorch"):
    print(f"{name}: first step over 1%: {res[name]['first_over_1pct']}, over 10%: {res[name]['first_over_10pct']}")
print(json.dumps(res))
PYEOF
