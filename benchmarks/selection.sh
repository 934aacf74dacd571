#!/usr/bin/env bash
# The regret table of benchmarks/README.md ("Choosing well"): each configuration's statistics, then the report.
# About 4 hours on 2 CPU cores (sizes cut to fit one session; larger --val/--test give tighter numbers); each configuration is written as soon as it is done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BB=../shared/data/bigbench
$PY benchmarks/selection.py score --task rotten_tomatoes --seed 0 --pairs 256 --val 150 --test 150 --generations
$PY benchmarks/selection.py score --task rotten_tomatoes --seed 1 --pairs 256 --val 150 --test 100 --generations
$PY benchmarks/selection.py score --task rotten_tomatoes --seed 2 --pairs 256 --val 100 --test 60 --generations
$PY benchmarks/selection.py score --task $BB/implicatures/task.json --seed 0 --pairs 256 --val 60 --test 60
$PY benchmarks/selection.py score --task $BB/strategyqa/task.json --seed 0 --pairs 256 --val 60 --test 60
$PY benchmarks/selection.py score --task $BB/cause_and_effect/one_sentence/task.json --seed 0 --pairs 256
$PY benchmarks/selection.py score --task $BB/hhh_alignment/helpful/task.json --seed 0 --pairs 256
$PY benchmarks/selection.py score --task rotten_tomatoes --seed 0 --pairs 512 --stability_only --out benchmarks/results/selection/stability-rotten_tomatoes-seed0.json
$PY benchmarks/selection.py report
# The learned strengths from the default rule's point (needs the seed-0 statistics above).
$PY benchmarks/selection_learned.py score --task rotten_tomatoes --seed 0 --pairs 256 --val 150 --test 150
$PY benchmarks/selection_learned.py report
