#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs every test and the lints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The experiment tests need Fashion-MNIST and the plots' font: without what setup.sh installs they would fail
# later and less clearly, so a failed install stops here.
bash scripts/setup.sh
cargo fmt --check
# clippy sees the `mpi` feature's code too
cargo clippy --all-targets --features mpi -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --lib --quiet
# The portable build: every x86 path compiled out (as on aarch64, whose targets cannot be downloaded here), no
# warnings. A separate target directory, so that it does not invalidate the main build's cache.
RUSTFLAGS="--cfg nv_portable_only -D warnings" CARGO_TARGET_DIR=target/portable-check cargo check --lib --bins --quiet
# One test build, with the `mpi` feature (a second build for tests/mpi.rs alone took 5.5 of CI's 34 minutes): it runs
# SyncBatchNorm over Open MPI under mpirun on 2-3 ranks, and every other test runs as it would without the
# feature, which only adds the MPI communicator (the build without it is checked above).
# Examples are not built here: clippy --all-targets above has type-checked them, and no test runs one.
cargo test --features mpi --no-fail-fast --lib --bins --tests 2>&1 | tee /tmp/normvision-test.log
cargo test --features mpi --doc 2>&1 | tee -a /tmp/normvision-test.log
