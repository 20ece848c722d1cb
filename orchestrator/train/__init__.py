"""What runs on each Ray Train worker: the recipe (``recipe.py``) and the parts it assembles: the DeepSpeed
engine, callbacks, evaluation, checkpoints, unfreezing, export and resharding.

Driver-side code refers to this package only through :func:`train_loop_per_worker`, the function Ray Train
runs on every worker; importing the package imports no torch.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Entry point run by every Ray Train worker (see ``orchestrator.cluster.launcher``)."""
    from orchestrator.train.recipe import TrainRecipe

    TrainRecipe(payload).run()
