"""The paper's analyses of activation units: ``python analyze.py NAME [options]``.

NAME is one of ``sweep``, ``combinations``, ``strength``, ``tokens``, ``sign``; see
``python analyze.py NAME --help`` and :mod:`austeer_pl.analyses.main`.
"""

import sys

from austeer_pl.analyses.main import analyze_main

if __name__ == "__main__":
    sys.exit(analyze_main())
