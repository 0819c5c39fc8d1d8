#!/usr/bin/env bash
# Segmentation accuracy against the PyTorch twin (issue 17, "accuracy against the reference recipe"): for each
# seed, normvision trains DeepLabV3 with `train --task segment` and writes its initial weights (--save-init);
# tools/seg_twin.py trains the twin from those weights on the same scenes (written by `normvision scenes`, the
# bytes the trainer draws on the fly) in the same order with the same augmentation draws; both report the test
# mIoU after every epoch. Prints one JSON line per engine and seed, then a summary with each engine's mean and
# spread (min-max) over the seeds.
#
#   bash tools/seg_vs_torch.sh [SCENES [TEST_SCENES [EPOCHS [SEEDS]]]]     (defaults: 2000 500 10 "0 1 2")
#
# NORM (default batch) sets --norm. Needs the venv of tools/torch_env.sh. Files under ${OUT:-/tmp/seg_vs_torch}.
set -euo pipefail
SCENES="${1:-2000}"; TEST="${2:-500}"; EPOCHS="${3:-10}"; SEEDS="${4:-0 1 2}"; NORM="${NORM:-batch}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/seg_vs_torch}"; mkdir -p "$OUT"
PY="$(bash "$ROOT/tools/torch_env.sh")"
cd "$ROOT"
cargo build --release --quiet --bin normvision
NV="$ROOT/target/release/normvision"
# the scenes the trainer draws: training scenes of seed 1 (train split), test scenes of seed 2 (test split)
[ -f "$OUT/train-$SCENES/annotations.json" ] || "$NV" scenes --out "$OUT/train-$SCENES" --count "$SCENES" --seed 1 --split train -q
[ -f "$OUT/test-$TEST/annotations.json" ] || "$NV" scenes --out "$OUT/test-$TEST" --count "$TEST" --seed 2 --split test -q
for s in $SEEDS; do
    d="$OUT/$NORM-seed$s"; mkdir -p "$d"
    "$NV" --threads 2 train --task segment --norm "$NORM" --seed "$s" --scenes "$SCENES" --test-scenes "$TEST" \
        --epochs "$EPOCHS" --save-init "$d/init.safetensors" -o "$d/nv.safetensors" --json -q > "$d/nv.json"
    "$PY" tools/seg_twin.py train --init "$d/init.safetensors" --scenes "$OUT/train-$SCENES" \
        --test-scenes "$OUT/test-$TEST" --epochs "$EPOCHS" --threads 2 --json > "$d/torch.jsonl"
    python3 - "$d" "$s" "$NORM" <<'PYEOF'
import json, sys
d, seed, norm = sys.argv[1:]
nv = json.load(open(f"{d}/nv.json"))
nv_miou = [e["metrics"]["miou"] for e in nv["evals"]]
pt_miou = [json.loads(l)["miou"] for l in open(f"{d}/torch.jsonl")]
for engine, m in (("normvision", nv_miou), ("torch", pt_miou)):
    print(json.dumps({"engine": engine, "norm": norm, "seed": int(seed), "miou_per_epoch": m, "final_miou": m[-1]}))
PYEOF
done | tee "$OUT/$NORM-results.jsonl"
python3 - "$OUT/$NORM-results.jsonl" <<'PYEOF'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
for engine in ("normvision", "torch"):
    v = [100 * r["final_miou"] for r in rows if r["engine"] == engine]
    print(f"{engine:<11} final test mIoU over {len(v)} seeds: mean {statistics.mean(v):.2f}%, "
          f"min {min(v):.2f}, max {max(v):.2f} (spread {max(v) - min(v):.2f} points): {', '.join(f'{x:.2f}' for x in v)}")
PYEOF
