#!/usr/bin/env bash
# The README's main job: train the reference CNN on Fashion-MNIST with BatchNorm and without normalization
# (SGD momentum 0.9, lr 0.05, batch 128, 5 epochs each) and print the comparison table.
# Extra arguments go to `normvision compare` (e.g. --epochs 1, --lr 0.2, --norms batch,group,none).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --release --quiet
exec ./target/release/normvision compare "$@"
