"""Serve a steering state without austeer-pl: ``python export.py --steering DIR --out OUT [--format transformers|gguf|control-vector]``.

See ``python export.py --help`` and the README ("Serve it"). The logic lives in :mod:`austeer_pl.export.merged`.
"""

import sys

from austeer_pl.cli.export import export_main

if __name__ == "__main__":
    sys.exit(export_main())
