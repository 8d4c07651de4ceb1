#!/usr/bin/env bash
# Install TTT Lens into .venv (if needed) and start the dashboard on the embedded default model.
#   bash scripts/run.sh                 → http://localhost:8501
#   bash scripts/run.sh --server.port 9000   (extra arguments go to `streamlit run`)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"
# OpenMP threads spin while waiting by default; on a busy 2-core machine that made runs ~15x slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Convert the embedded SmolLM2 GGUF to a safetensors cache once (≈30 s the first time, instant later).
.venv/bin/python -m ttt_core prepare
exec .venv/bin/python -m streamlit run app.py --server.headless true --browser.gatherUsageStats false "$@"
