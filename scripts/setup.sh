#!/usr/bin/env bash
# Installs what normvision's main job and tests need on a fresh Debian machine of this project's kind:
# the Fashion-MNIST package (read from /usr/share/datasets/fashion-mnist), the DejaVu fonts (the text of the
# experiments' PNG plots), and Open MPI with libclang (the `mpi` feature: mpirun, the MPI headers and library,
# and the bindings' generator). Idempotent and quiet when done.
set -euo pipefail
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
command -v mpirun > /dev/null || need+=(openmpi-bin)
command -v mpicc > /dev/null || need+=(libopenmpi-dev)
ls /usr/lib/llvm-*/lib/libclang.so > /dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need[*]} with apt-get" >&2
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
# The test command lints with rustfmt and clippy: add them if this toolchain lacks them.
if command -v rustup > /dev/null && ! { cargo fmt --version && cargo clippy --version; } > /dev/null 2>&1; then
  echo "setup: adding the rustfmt and clippy components with rustup" >&2
  rustup component add rustfmt clippy >&2
fi
