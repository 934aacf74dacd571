"""Fit an AUSteer steering state: ``python train.py [--config configs/X.yaml] [--model.k 50 ...]``.

See ``python train.py --help`` and the README. The logic lives in :mod:`austeer_pl.cli.train`.
"""

import sys

from austeer_pl.cli.train import train_main

if __name__ == "__main__":
    sys.exit(train_main())
