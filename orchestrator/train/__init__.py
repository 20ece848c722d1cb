"""What runs on each Ray Train worker: the recipe (``recipe.py``) and the parts it assembles: the DeepSpeed
engine, callbacks, evaluation, checkpoints, unfreezing, export and resharding.

Driver-side code refers to this package only through :func:`train_loop_per_worker`, the function Ray Train
runs on every worker; importing the package imports no torch.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(payload: dict[str, Any]) -> Any:
    """Entry point run by every Ray Train worker (see ``orchestrator.cluster.launcher``). Returns the error that
    ended training without a worker failure (a non-finite loss), which Ray Train hands to the driver as rank 0's
    ``Result.return_value``; None otherwise."""
    from orchestrator.train.recipe import TrainRecipe

    return TrainRecipe(payload).run()
