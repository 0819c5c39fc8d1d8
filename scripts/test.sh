#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs every test and the lints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --no-fail-fast 2>&1 | tee /tmp/normvision-test.log
