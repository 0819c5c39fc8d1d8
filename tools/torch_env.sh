#!/usr/bin/env bash
# Print the path of a Python interpreter that has the reference packages installed: torch (the PyPI build),
# torchvision, onnx, onnxscript, onnxruntime, pycocotools and numpy.
#
#   PY="$(bash tools/torch_env.sh)"
#
# - If $TORCH_PYTHON is set, it is printed as is (no checks, nothing installed).
# - Otherwise tools/.venv is created if needed (python3 -m venv) and the packages are pip-installed into it
#   if any is missing; then its absolute python path is printed.
#   Extra pip arguments (for example a CPU-only index:
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu") go in $TORCH_PIP_ARGS.
#
# Idempotent. stdout carries only the path; progress goes to stderr.
set -euo pipefail

if [[ -n "${TORCH_PYTHON:-}" ]]; then
    echo "$TORCH_PYTHON"
    exit 0
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/tools/.venv"
PY="$VENV/bin/python"

PACKAGES=(torch torchvision onnx onnxscript onnxruntime pycocotools numpy safetensors)
MODULES="torch torchvision onnx onnxscript onnxruntime pycocotools numpy safetensors"

has_torch() {
    # find_spec does not import the modules, so this check is fast.
    "$PY" -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in '$MODULES'.split()) else 1)" \
        >/dev/null 2>&1
}

if [[ ! -x "$PY" ]]; then
    echo "torch_env: creating virtual environment $VENV" >&2
    python3 -m venv "$VENV" >&2
fi

if ! has_torch; then
    echo "torch_env: installing ${PACKAGES[*]} into $VENV (large download)" >&2
    # shellcheck disable=SC2086
    "$PY" -m pip install ${TORCH_PIP_ARGS:-} "${PACKAGES[@]}" >&2
    has_torch || { echo "torch_env: $MODULES not all importable from $PY" >&2; exit 1; }
fi

echo "$PY"
