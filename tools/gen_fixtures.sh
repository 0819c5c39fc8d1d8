#!/usr/bin/env bash
# Regenerate the golden PyTorch fixtures under tests/fixtures/.
#   bash tools/gen_fixtures.sh                 # every family
#   bash tools/gen_fixtures.sh --family norm   # one family
#   bash tools/gen_fixtures.sh --only bn1d_2x3 # one case
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/tools/torch_env.sh")"
exec "$PY" "$ROOT/tools/gen_fixtures.py" "$@"
