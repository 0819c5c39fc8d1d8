#!/usr/bin/env bash
# Side-by-side PyTorch vs normvision normalization benchmark (see tools/bench_norm_vs_torch.py).
#   bash tools/bench_norm_vs_torch.sh                          # all ops/shapes/modes, threads 1,2
#   bash tools/bench_norm_vs_torch.sh --ops batch_norm --threads 2
#   bash tools/bench_norm_vs_torch.sh --markdown               # table for docs/PERFORMANCE.md
#   bash tools/bench_norm_vs_torch.sh --json                   # JSON lines
#   bash tools/bench_norm_vs_torch.sh --normvision target/release/normvision   # skip cargo build
# The Python with torch comes from tools/torch_env.sh ($TORCH_PYTHON or the tools/.venv venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/torch_env.sh" | tail -n 1)"
exec "$PY" "$ROOT/tools/bench_norm_vs_torch.py" "$@"
