#!/usr/bin/env bash
# Data-parallel scaling on this machine, for docs/PERFORMANCE.md: the reference CNN with BatchNorm on
# Fashion-MNIST, global batch 128, trained for STEPS steps in each of these layouts:
#   1 process  x 2 threads (no MPI)
#   1 rank     x 2 threads under mpirun (--bind-to none)
#   2 ranks    x 1 thread, BatchNorm per rank
#   2 ranks    x 1 thread, SyncBN
# and prints, per layout: training img/s, seconds per epoch (469 steps) at that rate, and the seconds per step
# spent in collectives (all of them, waiting for the other rank included) and in the gradient all-reduce.
# Then a paper model of 8-64 ranks from these numbers (tools/scaling_model.py).
#
# Usage: bash tools/scaling.sh [STEPS=200] [OUT=/tmp/nv-scaling]   (builds with --features mpi)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEPS=${1:-200}
OUT=${2:-/tmp/nv-scaling}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo build --release --features mpi --quiet
NV=target/release/normvision
MPI=(mpirun --oversubscribe --mca btl_vader_single_copy_mechanism none)
rm -rf "$OUT" && mkdir -p "$OUT"
ARGS=(--batch-size 128 --max-steps "$STEPS" --epochs 1 --test-limit 1000 --quiet --json)
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
# run NAME "TRAIN FLAGS" LAUNCHER...
run() {
    local name=$1 flags=$2
    shift 2
    # shellcheck disable=SC2086
    "$@" train "${ARGS[@]}" $flags --out "$OUT/$name/model.safetensors" | grep '^{' > "$OUT/$name.json"
}
run single "" $NV --threads 2
run mpi-1x2 "--distributed" "${MPI[@]}" -np 1 --bind-to none $NV --threads 2
run mpi-2x1-bn "--distributed" "${MPI[@]}" -np 2 $NV --threads 1
run mpi-2x1-syncbn "--distributed --sync-bn" "${MPI[@]}" -np 2 $NV --threads 1
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 tools/scaling_model.py "$OUT"
