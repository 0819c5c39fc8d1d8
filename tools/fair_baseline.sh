#!/usr/bin/env bash
# Is the plain network's gap to PyTorch (issue 15, "the baseline is fair") an engine difference or seed noise?
# Trains the reference CNN without normalization (--norm none) for E epochs at lr 0.05 in normvision, then trains
# PyTorch's twin from normvision's initial weights on normvision's batch order (every epoch), and prints both
# test accuracies after each epoch; with no --weights, also PyTorch from its own initialisation and order.
#
#   bash tools/fair_baseline.sh [SEED [EPOCHS [NORM]]]      (defaults: 0 5 none)
#
# OWN=0 skips PyTorch's run from its own initialisation and order. LR (default 0.05, the main job's) sets the
# learning rate; CONV (default winograd) normvision's 3x3 convolution (`--conv`: winograd, winograd2, direct).
# Needs the venv of tools/torch_env.sh. Writes its files under ${OUT:-/tmp/fair_baseline}; the last lines are
# JSON (one per engine and start).
set -euo pipefail
SEED="${1:-0}"; EPOCHS="${2:-5}"; NORM="${3:-none}"; LR="${LR:-0.05}"; CONV="${CONV:-winograd}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/fair_baseline/seed$SEED-lr$LR-$CONV}"; mkdir -p "$OUT"
PY="$(bash "$ROOT/tools/torch_env.sh")"
cd "$ROOT"
cargo build --release --quiet --bin normvision --example epoch_order
NV="$ROOT/target/release/normvision"
# initial weights: lr 0 leaves them as drawn
"$NV" --threads 2 train --norm "$NORM" --seed "$SEED" --max-steps 1 --lr 0 --out "$OUT/init.safetensors" -q >/dev/null
for ((e = 0; e < EPOCHS; e++)); do
    "$ROOT/target/release/examples/epoch_order" "$SEED" "$e" > "$OUT/order$e.txt"
done
"$NV" --threads 2 train --norm "$NORM" --seed "$SEED" --epochs "$EPOCHS" --lr "$LR" --conv "$CONV" \
    --out "$OUT/nv.safetensors" --log "$OUT/nv.jsonl" -q >/dev/null
python3 - "$OUT/nv.jsonl" "$NORM" "$SEED" "$LR" "$CONV" <<'PYEOF'
import json, sys
accs = [100 * e["eval"]["test_acc"] for e in map(json.loads, open(sys.argv[1]))
        if e.get("event") == "eval" and e["eval"]["end_of_epoch"]]
print(json.dumps({"engine": "normvision", "norm": sys.argv[2], "seed": int(sys.argv[3]), "lr": float(sys.argv[4]),
                  "conv": sys.argv[5], "start": "normvision's own init and order", "epoch_acc": accs}))
PYEOF
"$PY" tools/torch_one_epoch.py --norm "$NORM" --seed "$SEED" --lr "$LR" --epochs "$EPOCHS" \
    --weights "$OUT/init.safetensors" --order "$OUT/order{epoch}.txt" --json
if [[ "${OWN:-1}" != 0 ]]; then
    "$PY" tools/torch_one_epoch.py --norm "$NORM" --seed "$SEED" --lr "$LR" --epochs "$EPOCHS" --json
fi
