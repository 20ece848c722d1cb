"""Cluster entrypoint of one retraining round: ``python jobs/retrain.py --registry R --round-id N`` (what
``orchestrator schedule`` submits) or ``python jobs/retrain.py configs/retrain.yaml``.

Runs from the uploaded working dir, so the package is imported from there (no pre-install needed).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["retrain", *sys.argv[1:]])
