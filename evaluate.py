"""Evaluate a steering state: ``python evaluate.py --steering DIR --task SPEC --split test --report r.json``.

See ``python evaluate.py --help`` and the README. The logic lives in :mod:`austeer_pl.cli.evaluate`.
"""

import sys

from austeer_pl.cli.evaluate import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
