#!/usr/bin/env bash
# The paper protocol end to end on the embedded model, offline: local rows in each hub schema
# (tests/fixtures/paper_rows.py), then train.py and evaluate.py under --data.protocol paper for the
# five tasks. Results: benchmarks/results/paper_protocol/TASK.json (evaluate.py's report) and the
# example dumps (the exact prompts, answer strings and read token of every test example).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${N:-40}
OUT=benchmarks/results/paper_protocol
ROWS=runs/paper_rows
mkdir -p "$OUT"
$PY tests/fixtures/paper_rows.py --out "$ROWS" --n "$N" > /dev/null
for task in boolq copa winogrande svamp mawps; do
  split=test; [ "$task" = boolq ] || [ "$task" = winogrande ] && split=validation
  files="$ROWS/${task}_train.jsonl,$ROWS/${task}_${split}.jsonl"
  start=$(date +%s)
  $PY train.py --data.task "$task" --data.protocol paper --data.task_files "$files" --model.site attention \
    --model.k "[10, 50]" --model.alpha "[4, 16]" --model.sign both --data.max_test_examples null \
    --run_dir "runs/paper-$task" --export_dir "runs/paper-$task/state" --overwrite true --wandb_mode disabled > "$OUT/$task-train.log" 2>&1
  $PY evaluate.py --steering "runs/paper-$task/state" --report "$OUT/$task.json" --overwrite > "$OUT/$task-evaluate.log" 2>&1
  $PY evaluate.py --task "$task" --protocol paper --task_files "$files" --split test --dump_examples "$OUT/$task-examples.jsonl" --overwrite > /dev/null 2>&1
  echo "$task: $(( $(date +%s) - start )) s; $(grep -h 'unsteered\|steered' "$OUT/$task-evaluate.log" | tr -s ' ' | head -2 | tr '\n' ' ')"
done
