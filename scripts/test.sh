#!/usr/bin/env bash
# Set up and run the whole test suite (unit tests, then the Ray/DeepSpeed end-to-end tests).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
