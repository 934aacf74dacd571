"""Generate with and without a steering state, side by side:
``python generate.py --steering DIR (--prompt TEXT | --prompts FILE) [--alpha A] [--max_new_tokens N] [--out FILE.jsonl]``.

See ``python generate.py --help`` and the README. The logic lives in :mod:`austeer_pl.cli.generate`.
"""

import sys

from austeer_pl.cli.generate import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
