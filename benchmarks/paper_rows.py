"""Local rows in the hub schemas of the paper's five tasks, for running the paper protocol offline.

The machines that build this project reach no dataset hub, so these rows are written here: each
task gets ``--n`` training rows and ``--n`` test rows in its hub dataset's own schema (BoolQ
``question, passage, answer``; COPA ``premise, choice1, choice2, question, label``; Winogrande
``sentence, option1, option2, answer``; SVAMP ``Body, Question, Answer``; MAWPS ``question, answer``),
one JSONL file per split with the split in its name, as ``--data.task_files`` reads them.

    python benchmarks/paper_rows.py --out runs/paper_rows [--n 40]
    python train.py --data.task boolq --data.protocol paper --data.task_files runs/paper_rows/boolq_train.jsonl,runs/paper_rows/boolq_test.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana"]
THINGS = ["apples", "pencils", "stamps", "marbles", "cards", "shells"]


def boolq(rng: random.Random, i: int) -> dict:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    passage = f"{NAMES[i % 8]} counted {a} {THINGS[i % 6]} in the morning and {b} in the evening."
    return {"question": f"did {NAMES[i % 8].lower()} count more in the morning than in the evening", "passage": passage, "answer": a > b}


def copa(rng: random.Random, i: int) -> dict:
    cases = [
        ("The ground was wet.", "It had rained overnight.", "The sun was shining.", "cause"),
        ("The glass fell off the table.", "It shattered on the floor.", "It floated to the ceiling.", "effect"),
        ("The man was thirsty.", "He drank a glass of water.", "He put on his coat.", "effect"),
        ("The room went dark.", "The bulb burnt out.", "The window was clean.", "cause"),
        ("The child laughed.", "Her friend told a joke.", "Her shoe was untied.", "cause"),
        ("The ice cream melted.", "It was left in the sun.", "It was kept in the freezer.", "cause"),
    ]
    premise, right, wrong, question = cases[i % len(cases)]
    label = rng.randint(0, 1)
    choice1, choice2 = (right, wrong) if label == 0 else (wrong, right)
    return {"premise": f"{premise} ({NAMES[i % 8]})", "choice1": choice1, "choice2": choice2, "question": question, "label": label}


def winogrande(rng: random.Random, i: int) -> dict:
    a, b = NAMES[i % 8], NAMES[(i + 3) % 8]
    answer = rng.randint(1, 2)
    sentence = f"{a} lent a book to {b} because _ had finished reading it." if answer == 1 else f"{a} lent a book to {b} because _ wanted to read it."
    return {"sentence": sentence, "option1": a, "option2": b, "answer": str(answer)}


def svamp(rng: random.Random, i: int) -> dict:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return {"Body": f"{NAMES[i % 8]} had {a} {THINGS[i % 6]}. A friend gave {NAMES[i % 8]} {b} more.",
            "Question": f"How many {THINGS[i % 6]} does {NAMES[i % 8]} have now?", "Answer": float(a + b)}


def mawps(rng: random.Random, i: int) -> dict:
    a, b = rng.randint(2, 30), rng.randint(2, 9)
    return {"question": f"{NAMES[i % 8]} buys {b} boxes with {a} {THINGS[i % 6]} each. How many {THINGS[i % 6]} are there?",
            "answer": f"{a} * {b} = {a * b} #### {a * b}"}


TASKS = {"boolq": (boolq, "validation"), "copa": (copa, "test"), "winogrande": (winogrande, "validation"), "svamp": (svamp, "test"), "mawps": (mawps, "test")}


def write_rows(out: Path, n: int = 40, seed: int = 0) -> dict[str, list[Path]]:
    """``{task: [train file, test file]}`` written under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for task, (make, test_split) in TASKS.items():
        rng = random.Random(f"{seed}:{task}")
        paths = []
        for split, offset in (("train", 0), (test_split, 1000)):
            path = out / f"{task}_{split}.jsonl"
            with open(path, "w") as f:
                for i in range(n):
                    f.write(json.dumps(make(rng, offset + i)) + "\n")
            paths.append(path)
        files[task] = paths
    return files


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/paper_rows")
    p.add_argument("--n", type=int, default=40)
    args = p.parse_args()
    for task, paths in write_rows(Path(args.out), args.n).items():
        print(task, ",".join(str(p) for p in paths))
