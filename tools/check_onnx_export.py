#!/usr/bin/env python3
"""ONNX Runtime runs what `normvision export --onnx` writes, and its logits match PyTorch's.

For every twin of tools/gen_zoo_twins.py (cnn, mlp, resnet with each norm PyTorch has, tests/fixtures/twins/):
`normvision import --torch` makes a checkpoint from the PyTorch state dict, `normvision export --onnx` writes it
(BatchNorm kept, and folded with --fold-bn; opset 17), and ONNX Runtime's logits on the twin's input are compared
with the eval logits PyTorch computed for the fixture.

    cargo build --release && tools/.venv/bin/python tools/check_onnx_export.py [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
TWINS = ROOT / "tests/fixtures/twins"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/release/normvision"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    worst = 0.0
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for io_path in sorted(TWINS.glob("*.io.safetensors")):
            name = io_path.name.removesuffix(".io.safetensors")
            model, norm = name.split("-")
            with safe_open(str(io_path), "np") as f:
                flags = json.loads(f.metadata()["flags"])
            t = load_file(str(io_path))
            ck = Path(tmp) / f"{name}.safetensors"
            subprocess.run([args.bin, "import", "--torch", str(TWINS / f"{name}.safetensors"), "--model", model,
                            "--norm", norm, "--groups", str(flags["groups"]), "--input", "1x8x8", "--mean", "0",
                            "--std", "1", "-o", str(ck)], check=True, capture_output=True)
            for fold in (False, True):
                out = Path(tmp) / f"{name}-{fold}.onnx"
                cmd = [args.bin, "export", "--onnx", "--checkpoint", str(ck), "-o", str(out)]
                if fold:
                    cmd.append("--fold-bn")
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"{name} fold={fold}: export failed: {r.stderr.strip()}")
                    failed += 1
                    continue
                onnx.checker.check_model(str(out))
                ops = sorted({n.op_type for n in onnx.load(str(out)).graph.node})
                sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                got = sess.run(None, {sess.get_inputs()[0].name: t["x"]})[0]
                d = float(np.abs(got - t["logits"]).max())
                worst = max(worst, d)
                ok = d <= 1e-4
                failed += not ok
                if args.json:
                    print(json.dumps({"twin": name, "fold_bn": fold, "max_abs_diff": d, "ok": ok, "ops": ops}))
                else:
                    print(f"{name:16} fold_bn={fold!s:5}  max |ORT - PyTorch| = {d:.2e}  {'ok' if ok else 'FAIL'}  {' '.join(ops)}")
    print(f"worst {worst:.2e}; {failed} failed" if not args.json else json.dumps({"worst": worst, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
