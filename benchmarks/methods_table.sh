#!/usr/bin/env bash
# The methods table (issue 25): every method of --compare, the prompting and calibration baselines and the
# random-unit control on four tasks x three split seeds, each tuned on validation only, with side effects.
#
#   bash benchmarks/methods_table.sh            # run the missing cells, then rebuild the table and the plot
#   TASKS="rotten_tomatoes" SEEDS="0" bash benchmarks/methods_table.sh   # a subset
#   TASKS=sentiment SEEDS=2 ONLY_PARTS="3 4" bash benchmarks/methods_table.sh   # some parts of a split cell
#
# Resumable cell by cell: a cell is one evaluate.py --compare report in benchmarks/results/methods_table/,
# written atomically when the cell ends; cells whose report exists are skipped. Sizes (two CPU cores, the
# embedded SmolLM2-135M): 128 training pairs, up to 200 validation and 500 test examples (implicatures has
# 492 rows: 98 and 98 under the default fractions), the quick grids for ITI, SADI, CAA and block-level AUSteer
# (4 points each), train.py's default grid for AUSteer (site attention or ffn, k 3-100, alpha 4-16; also on
# top of the prompt) and the same grid for the random units (3 draws each), few-shot prompts of 2 or 4
# demonstrations, 200 side-task examples.
# The learned-strength variants are left out (see benchmarks/learned_strength.sh).
# The cells of SPLIT_TASKS (default: sentiment and implicatures, one to two hours a cell) run as four processes
# with the methods split in parts of a quarter to a half hour each, each resumable (reports in $OUT/parts/), and
# merge into the cell's report (methods_table.py --merge: a method's row does not depend on the other methods of
# its run). Each part repeats only the unsteered row and the shared pass, a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/methods_table
BB=${BIGBENCH:-../shared/data/bigbench}
TASKS=${TASKS:-"rotten_tomatoes sentiment strategyqa implicatures"}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=unsteered,iti,sadi,caa,austeer_block,austeer,random_units,zero_shot,few_shot,calibrated,prompted_austeer
SPLIT_TASKS=${SPLIT_TASKS:-"sentiment implicatures"}
ONLY_PARTS=${ONLY_PARTS:-}  # e.g. "3 4": run only these parts of a split cell (two cores or machines share a cell;
                            # the cells of other tasks run whole, so give such processes TASKS of split tasks only)
PARTS=(
  "unsteered,iti,sadi,caa,austeer_block"
  "unsteered,austeer,zero_shot,few_shot,calibrated"
  "unsteered,random_units"
  "unsteered,prompted_austeer"
)
for p in $ONLY_PARTS; do
  if [[ ! "$p" =~ ^[0-9]+$ ]] || ((p < 1 || p > ${#PARTS[@]})); then
    echo "error: ONLY_PARTS='$ONLY_PARTS' names a part that does not exist; give part numbers 1 to ${#PARTS[@]}, separated by spaces" >&2
    exit 2
  fi
done
mkdir -p "$OUT" "$OUT/parts"
holds() {  # part_report methods: the report's methods (rows and refusals) are exactly these
  $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); names = {m["name"] for m in r["methods"]} | set(r.get("omitted") or {})
sys.exit(names != set(sys.argv[2].split(",")))' "$1" "$2"
}
spec() {  # a task's --task value
  case "$1" in
    strategyqa|implicatures) echo "$BB/$1/task.json" ;;
    *) echo "$1" ;;
  esac
}
side() {  # the side task: one the methods are not fitted for, from another source
  case "$1" in
    rotten_tomatoes|sentiment) echo "$BB/implicatures/task.json" ;;
    *) echo rotten_tomatoes ;;
  esac
}
compare() {  # task seed methods report run_dir
  $PY evaluate.py --compare --task "$(spec "$1")" --seed "$2" --methods "$3" --grid quick \
    --site attention,ffn --k 3,10,30,100 --alpha 4,8,16 --shots 2,4 --max_train_pairs 128 --max_val_examples 200 --max_test_examples 500 \
    --side_task "$(side "$1")" --side_examples 200 --report "$4" --wandb_mode disabled --run_dir "$5"
}
for seed in $SEEDS; do
  for task in $TASKS; do
    report="$OUT/$task-seed$seed.json"
    if [[ -f "$report" ]]; then echo "skip $report (done)"; continue; fi
    if [[ " $SPLIT_TASKS " != *" $task "* ]]; then
      echo "cell $task seed $seed: $(date -u +%H:%M:%S)"
      compare "$task" "$seed" "$METHODS" "$report" "runs/methods_table/$task-seed$seed" > "$OUT/$task-seed$seed.log" 2>&1
      continue
    fi
    parts=() waiting=()
    for i in "${!PARTS[@]}"; do  # parts written under another split are refused before anything runs
      part="$OUT/parts/$task-seed$seed-part$((i + 1)).json"
      if [[ -f "$part" ]] && ! holds "$part" "${PARTS[$i]}"; then
        echo "error: $part is not part $((i + 1)) of this split (${PARTS[$i]}): it is from another split; move it away and rerun" >&2
        exit 1
      fi
    done
    for i in "${!PARTS[@]}"; do
      part="$OUT/parts/$task-seed$seed-part$((i + 1))"
      parts+=("$part.json")
      if [[ -f "$part.json" ]]; then echo "skip $part.json (done)"; continue; fi
      if [[ -n "$ONLY_PARTS" && " $ONLY_PARTS " != *" $((i + 1)) "* ]]; then continue; fi
      echo "cell $task seed $seed, part $((i + 1)) of ${#PARTS[@]}: $(date -u +%H:%M:%S)"
      compare "$task" "$seed" "${PARTS[$i]}" "$part.json" "runs/methods_table/$task-seed$seed-part$((i + 1))" > "$part.log" 2>&1
    done
    # Checked after the loop: a process sharing the cell may have written the other parts meanwhile.
    for i in "${!parts[@]}"; do [[ -f "${parts[$i]}" ]] || waiting+=("$((i + 1))"); done
    if ((${#waiting[@]})); then echo "cell $task seed $seed waits for parts ${waiting[*]}"; continue; fi
    $PY benchmarks/methods_table.py --merge "${parts[@]}" --into "$report" --order "$METHODS"
    cat "$OUT"/parts/"$task-seed$seed"-part*.log > "$OUT/$task-seed$seed.log"
  done
done
$PY benchmarks/methods_table.py --results "$OUT" --markdown docs/methods_table.md --plot docs/methods_table.png \
  --readme benchmarks/README.md
