#!/usr/bin/env bash
# Set up and run the test suite: every unit test plus the end-to-end Ray/DeepSpeed tests marked `ci`
# (about 20-25 minutes on 2 quiet CPUs). Extra arguments go to pytest and replace the default selection:
#   bash scripts/test.sh -m "not slow"    # unit tests only (a minute)
#   bash scripts/test.sh -m ""            # everything, every end-to-end variant included
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- -m "not slow or ci"
fi
exec .venv/bin/python -m pytest "$@"
