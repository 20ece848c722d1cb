"""Cluster entrypoint: ``ray job submit --working-dir . -- python jobs/sweep.py CONFIG [--set k=v]`` or
``python jobs/sweep.py --resume SWEEP_DIR``.

Runs from the uploaded working dir, so the package is imported from there (no pre-install needed).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["sweep", *sys.argv[1:]])
