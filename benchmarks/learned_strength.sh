#!/usr/bin/env bash
# Learned strength on the embedded model: train.py then evaluate.py for each variant, then one table.
#
#   bash benchmarks/learned_strength.sh [OUTDIR]        # default runs/learned_strength; ~14 min a variant on 2 cores
#
# Each variant is the default config (rotten_tomatoes, 256 pairs, 100 validation, 500 test examples, grid
# k in {10, 50} x alpha in {4, 16, 64}) plus the flags below. The table (markdown) goes to stdout and
# OUTDIR/table.md; each variant's evaluate.py report is OUTDIR/NAME.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-runs/learned_strength}"
mkdir -p "$OUT"
variants=(
  "scalar_nll     --model.strength scalar --model.strength_loss nll"
  "gate_nll       --model.strength gate --model.strength_loss nll"
  "scalar_choice  --model.strength scalar --model.strength_loss choice"
  "gate_choice    --model.strength gate --model.strength_loss choice"
  "scalar_choice_kl0.1 --model.strength scalar --model.strength_loss choice --model.kl_weight 0.1"
  "gate_choice_kl0.1   --model.strength gate --model.strength_loss choice --model.kl_weight 0.1"
)
for v in "${variants[@]}"; do
  read -r name args <<<"$v"
  [ -f "$OUT/$name.json" ] && continue
  start=$(date +%s)
  # shellcheck disable=SC2086
  $PY train.py --run_dir "$OUT/$name.run" --export_dir "$OUT/$name.state" --wandb_mode disabled --model.strength_epochs 3 $args || exit 1
  fit=$(( $(date +%s) - start ))
  $PY evaluate.py --steering "$OUT/$name.state" --report "$OUT/$name.json" --overwrite || exit 1
  echo "$name $fit" >> "$OUT/fit_seconds.txt"
done
$PY - "$OUT" <<'PY' | tee "$OUT/table.md"
import glob, json, os, sys
out = sys.argv[1]
fit_s = dict(line.split() for line in open(os.path.join(out, "fit_seconds.txt")))
print("| variant | val: alpha*m -> learned (best epoch) | test unsteered | test alpha*m | test learned | state bytes | fit s |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name in fit_s:
    r = json.load(open(os.path.join(out, f"{name}.json")))["by_scoring"]["loglik"]
    state = os.path.join(out, f"{name}.state")
    meta = json.load(open(os.path.join(state, "steering_config.json")))["metadata"]["fit"]
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(state, "*")))
    acc = lambda x: f"{x['accuracy']:.3f} [{x['ci_low']:.3f}, {x['ci_high']:.3f}]"
    print(f"| {name} | {meta['val_accuracy_momentum_rule']:.3f} -> {meta['val_accuracy']:.3f} ({meta['strength_best_epoch']}) | "
          f"{acc(r['unsteered'])} | {acc(r['momentum_rule'])} | {acc(r['steered'])} | {size:,} | {fit_s[name]} |")
PY
