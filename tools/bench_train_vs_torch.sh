#!/usr/bin/env bash
# Side-by-side PyTorch vs normvision training benchmark (see tools/bench_train_vs_torch.py).
#   bash tools/bench_train_vs_torch.sh                          # part A: train/eval img/s, threads 1,2, norm batch
#   bash tools/bench_train_vs_torch.sh --norms batch,none --threads 2 --steps 30
#   bash tools/bench_train_vs_torch.sh --markdown               # tables for docs/PERFORMANCE.md
#   bash tools/bench_train_vs_torch.sh --json                   # JSON lines
#   bash tools/bench_train_vs_torch.sh --part accuracy          # part B: Fashion-MNIST accuracy (long)
#   bash tools/bench_train_vs_torch.sh --part accuracy --limit-train 2000 --limit-test 1000 --epochs 1  # smoke
#   bash tools/bench_train_vs_torch.sh --normvision target/release/normvision   # skip cargo build
# The Python with torch comes from tools/torch_env.sh ($TORCH_PYTHON or the tools/.venv venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/torch_env.sh" | tail -n 1)"
exec "$PY" "$ROOT/tools/bench_train_vs_torch.py" "$@"
