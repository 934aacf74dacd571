#!/usr/bin/env bash
# Behaviour steering on the embedded model (sentiment), AUSteer vs. CAA vs. ITI at matched fluency.
#   1. train.py on the sentiment pairs: the grid is chosen by the VADER judge under the 1.5x
#      perplexity budget on validation prompts (selection auto -> judge for a behaviour task);
#   2. an ITI state for the same pairs (evaluate.py --compare --methods iti, quick grid);
#   3. analyze.py behaviour: judge score and perplexity against the strength for the three
#      methods on the same held-out prompts (JSON + PNG), and evaluate.py's judge report.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/behaviour
RUN=runs/behaviour
mkdir -p "$OUT"
$PY train.py --data.task sentiment --data.max_train_pairs 128 --model.k "[10, 50]" --model.alpha "[2, 8]" \
  --model.max_judge_prompts 24 --run_dir "$RUN/fit" --export_dir "$RUN/austeer" --overwrite true --wandb_mode disabled | tee "$OUT/train.log"
$PY evaluate.py --compare --task sentiment --methods iti --grid quick --max_train_pairs 128 --max_val_examples 100 \
  --max_test_examples 100 --export_dir "$RUN/compare" --overwrite --report "$OUT/iti-compare.json" --wandb_mode disabled > "$OUT/iti-compare.log" 2>&1
$PY analyze.py behaviour --steering "$RUN/austeer" --iti "$RUN/compare/iti" --split test --max_prompts 24 --max_new_tokens 32 \
  --alphas 0,2,8,32 --caa_multipliers 0,2,4,8 --iti_alphas 0,5,15,30 --max_train_pairs 128 \
  --out "$OUT/curve.json" --plot docs/behaviour_curve.png --overwrite --wandb_mode disabled | tee "$OUT/curve.log"
$PY evaluate.py --steering "$RUN/austeer" --scoring judge --limit 24 --report "$OUT/evaluate.json" --overwrite | tee "$OUT/evaluate.log"
