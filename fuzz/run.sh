#!/usr/bin/env bash
# The long fuzz runs of docs/RELIABILITY.md: AFL++ (Debian's afl++, the `afl` crate) on each parser target,
# in-process (persistent mode), under a 2 GB address-space limit (afl-fuzz -m 2048 sets RLIMIT_AS), for at least
# EXECS executions each. Prints each target's executions, edge coverage and crashes; copies crash inputs to
# fuzz/crashes/<target>/ (replayed by tests/fuzz_replay.rs) and the minimised queue to fuzz/corpus/<target>/.
#   bash fuzz/run.sh [EXECS] [TARGETS...]      e.g. bash fuzz/run.sh 1000000 idx checkpoint image onnx coco
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
EXECS=${1:-1000000}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(idx checkpoint image onnx coco)
if ! command -v afl-fuzz >/dev/null; then apt-get update && apt-get install -y afl++; fi
if ! cargo afl --version >/dev/null 2>&1; then cargo install cargo-afl; fi
cargo afl build --release --quiet
mkdir -p out
for t in "${TARGETS[@]}"; do
  rm -rf "out/$t"
  AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1 \
    cargo afl fuzz -i "corpus/$t" -o "out/$t" -m 2048 -t 5000 -E "$EXECS" "target/release/$t" > "out-$t.log" 2>&1 || true
  stats="out/$t/default/fuzzer_stats"
  echo "$t: $(grep -E '^(execs_done|execs_per_sec|edges_found|total_edges|bitmap_cvg|corpus_count|saved_crashes|saved_hangs|run_time) ' "$stats" | tr -s ' ' | tr '\n' ' ')"
  mkdir -p "crashes/$t"
  find "out/$t/default/crashes" -type f -name 'id:*' -exec cp {} "crashes/$t/" \; 2>/dev/null || true
  # keep the corpus small: the inputs that reach distinct edges (Debian's afl-cmin.bash)
  rm -rf "cmin-$t"
  if AFL_SKIP_CPUFREQ=1 afl-cmin.bash -i "out/$t/default/queue" -o "cmin-$t" -m 2048 -t 5000 -- "target/release/$t" > /dev/null 2>&1; then
    rm -rf "corpus/$t" && mv "cmin-$t" "corpus/$t"
  fi
done
