"""The worker process itself: quiet library logs, seeded generators, and where each rank runs."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def quiet_libraries() -> None:
    """Keep worker logs to what a user needs: our progress lines and real warnings/errors.

    Unless ``ORCHESTRATOR_VERBOSE`` (``-v``) is set, also notices a user cannot act on: torch's FutureWarnings
    about deprecated ``torch.distributed`` names (which DeepSpeed calls, once per worker), and Ray Train's
    "Reporting training result ..." line (every report's metrics, once per rank).
    """
    import warnings

    import transformers

    from orchestrator.tracking import verbose_output

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("ray.train", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if verbose_output():
        return
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:  # Ray Train V2 names this logger after its file, so the "ray.train" level above does not reach it
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: its line stays
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def worker_places(world_size: int) -> list[tuple[Any, int]]:
    """(Ray node id, process id) of each rank, in rank order (placement checks, multi-node debugging, per-rank
    memory read from /proc by the benchmarks); collective: every rank calls."""
    import os

    import ray

    here = (ray.get_runtime_context().get_node_id(), os.getpid())
    places: list[Any] = [here]
    if dist.is_available() and dist.is_initialized():
        places = [None] * world_size
        dist.all_gather_object(places, here)
    return [tuple(p) for p in places]


def set_seed(seed: int) -> None:
    """The same seed for Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def log_start(recipe: Any) -> None:
    """The run's ``start`` record (``TrainRecipe.train``): topology, precision, parameter counts, setup times, data
    summary. Collective (where the workers run is gathered); rank 0 writes it."""
    places = worker_places(recipe.world_size)  # collective: every rank takes part
    if recipe.rank != 0:
        return
    # ZeRO-3 leaves each parameter empty on the module; ds_numel is its full size.
    params = list(recipe.model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
    unfreezing = {"unfreeze/groups_frozen_for_run": sorted(recipe.frozen_for_run)} if recipe.unfreezing else {}
    recipe.tracker.log(
        "start",
        recipe.state.step,
        {
            "total_steps": recipe.budget.total_steps,
            "resumed_from_step": recipe.state.step if recipe.start_checkpoint is not None else None,
            "world_size": recipe.world_size,
            "worker_nodes": [node for node, _ in places],
            "worker_pids": [pid for _, pid in places],
            "precision": recipe.precision,
            "params_total": total,
            "params_trainable": trainable,  # groups frozen for the whole run excluded
            "zero3/params_partitioned_at_load": recipe.partitioned_at_load,
            **unfreezing,
            "memory/rss_before_model_mb": recipe.memory_at_start,
            **recipe.resharded,
            "torch_threads": torch.get_num_threads(),
            **{f"setup/{k}": v for k, v in recipe.setup_times.items()},
            "data": recipe.data.summary(),
        },
    )
