#!/usr/bin/env bash
# Measure an older commit ("before") and this checkout ("after") with the same scripts, back to back.
#
#   bash benchmarks/before_after.sh [BEFORE_COMMIT=690f9a2] [THREADS=2]
#   ONLY="state_io" EXTRA=0 QUICK=1 RESULTS=/tmp/smoke bash benchmarks/before_after.sh   # a smoke run
#
# The older commit is checked out in a temporary worktree, this checkout's benchmarks/ is copied into
# it (the scripts skip what the old code lacks, e.g. the shared-prefix reader), and each script runs
# there and then here. Results: benchmarks/results/before/NAME.json and benchmarks/results/NAME.json.
set -euo pipefail
BEFORE=${1:-690f9a2}
THREADS=${2:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY="$HERE/.venv/bin/python"
RESULTS=${RESULTS:-$HERE/benchmarks/results}
ONLY=${ONLY:-fit_throughput steer_generate vs_paper state_io scaling}
EXTRA=${EXTRA:-1}
Q=${QUICK:+--quick}
WT=$(mktemp -d)/before
git -C "$HERE" worktree add --detach "$WT" "$BEFORE" > /dev/null
trap 'git -C "$HERE" worktree remove --force "$WT"' EXIT
cp -r "$HERE/benchmarks" "$WT/" && rm -rf "$WT/benchmarks/results"
mkdir -p "$RESULTS/before"
for b in $ONLY; do
  echo "=== $b: before ($BEFORE)"
  (cd "$WT" && "$PY" benchmarks/$b.py --threads "$THREADS" $Q --out "$RESULTS/before/$b.json")
  echo "=== $b: after"
  (cd "$HERE" && "$PY" benchmarks/$b.py --threads "$THREADS" $Q --out "$RESULTS/$b.json")
done
if [ "$EXTRA" = 1 ]; then
  echo "=== shared_prefix and fit_memory (this checkout only)"
  (cd "$HERE" && "$PY" benchmarks/shared_prefix.py --threads "$THREADS" $Q --out "$RESULTS/shared_prefix.json")
  (cd "$HERE" && "$PY" benchmarks/fit_memory.py --mode shared --threads "$THREADS" $Q --out "$RESULTS/fit_memory_shared.json")
  (cd "$HERE" && "$PY" benchmarks/fit_memory.py --mode full --threads "$THREADS" $Q --out "$RESULTS/fit_memory.json")
  (cd "$HERE" && MALLOC_MMAP_THRESHOLD_=131072 "$PY" benchmarks/fit_memory.py --mode full --threads "$THREADS" $Q --out "$RESULTS/fit_memory_full_mmap.json")
fi
"$PY" "$HERE/benchmarks/report.py" --results "$RESULTS" --before "$RESULTS/before"
