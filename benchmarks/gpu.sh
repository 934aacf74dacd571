#!/usr/bin/env bash
# The GPU campaign behind results/gpu_h100/: the benchmarks with --device cuda, then train.py and
# evaluate.py on the GPU with the default config (and a learned gate).
#
#   bash benchmarks/gpu.sh [OUTDIR]      # default benchmarks/results/gpu; needs a CUDA build of torch
#
# Every script writes its JSON to OUTDIR; `python benchmarks/report.py --results OUTDIR --before /none`
# prints the tables. On the lent H100 each step ran under a time limit (the lease was 15 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
R="${1:-benchmarks/results/gpu}"
mkdir -p "$R"
bench() { local out=$1 name=$2; shift 2; echo "=== $out"; $PY -u "benchmarks/$name.py" --device cuda "$@" --out "$R/$out.json"; }
bench fit_throughput fit_throughput
bench steer_generate steer_generate
bench shared_prefix shared_prefix
bench fit_throughput_bf16_b64 fit_throughput --dtype bfloat16 --pairs 1024 --batch_size 64
bench steer_generate_bf16 steer_generate --dtype bfloat16
bench fit_memory fit_memory
bench fit_memory_shared fit_memory --mode shared
bench state_io state_io
bench scaling scaling
bench vs_paper vs_paper
for kind in default gate; do
  extra=(); [ "$kind" = gate ] && extra=(--model.strength gate --model.strength_epochs 3)
  $PY train.py --trainer.accelerator gpu --wandb_mode disabled --export_dir "$R/state_$kind" "${extra[@]}"
  $PY evaluate.py --steering "$R/state_$kind" --report "$R/evaluate_$kind.json" --overwrite
done
