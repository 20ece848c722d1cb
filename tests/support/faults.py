"""Fault injection for the failure and resume tests: worker callbacks that only tests register, through
``run_training(config, worker_callbacks=[...])``.

The checkpoint faults fail once, at the first checkpoint at or past their step, and never in an attempt that
started from a checkpoint (after Ray Train restarts the workers, or on ``--resume``), like a node lost once.
:class:`PoisonLoss` makes the loss non-finite at its step in every attempt, like a diverging run.

Ray's workers import callbacks by module name; this module is pickled by value so that they need not have the
tests folder on their path.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray.cloudpickle

from orchestrator.train.callbacks import Callback, Run

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FailAfterCheckpoint(Callback):
    """Raise right after the checkpoint of the first step at or past ``step`` has been committed by Ray Train.

    With ``output.checkpoint_upload: async`` the report returns before the upload ends; the fault waits for this
    worker's checkpoint to be registered (``ray.train.get_checkpoint()`` changes), so the restart resumes from it
    as it would under ``sync`` (a failure during the upload is another fault: the run resumes from the one before).
    """

    def __init__(self, step: int):
        self.step = step
        self._before: Any = None

    def before_checkpoint(self, recipe: Run) -> None:
        self._before = _checkpoint_path()

    def after_checkpoint(self, recipe: Run) -> None:
        if not recipe.started_from_checkpoint and recipe.state.step >= self.step:
            deadline = time.monotonic() + 120
            while _checkpoint_path() == self._before and time.monotonic() < deadline:
                time.sleep(0.05)
            raise RuntimeError(f"injected fault after the checkpoint at step {recipe.state.step}")


def _checkpoint_path() -> str | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return checkpoint.path if checkpoint is not None else None


class FailWhileUploadingCheckpoint(Callback):
    """Rank 0 copies half of its files of the checkpoint at or past ``step`` into the run's storage, then dies
    inside Ray Train's report, as a node lost while writing a checkpoint would. Ray Train registers a checkpoint
    only once every rank has reported it, so a resume must never pick this partial folder."""

    def __init__(self, step: int):
        self.step = step

    def before_checkpoint(self, recipe: Run) -> None:
        if recipe.rank == 0 and not recipe.started_from_checkpoint and recipe.state.step >= self.step:
            recipe.checkpoint_upload_fn = upload_part_then_fail


def upload_part_then_fail(checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """Ray Train checkpoint upload function that writes half of the files, then fails."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    files = sorted(p for p in Path(checkpoint.path).rglob("*") if p.is_file())
    written = files[: len(files) // 2]
    for path in written:
        target = f"{destination}/{path.relative_to(checkpoint.path).as_posix()}"
        storage.storage_filesystem.create_dir(target.rsplit("/", 1)[0])
        with storage.storage_filesystem.open_output_stream(target) as out:
            out.write(path.read_bytes())
    raise RuntimeError(
        f"injected fault while uploading checkpoint {checkpoint_dir_name} ({len(written)} of {len(files)} files)"
    )


class PoisonLoss(Callback):
    """Make one rank's loss NaN at the micro-batches of optimizer step ``step`` (1-based, as logged), in every
    attempt: a loss that goes non-finite at the same point each time the run is restarted, as a diverging
    learning rate or a bad row does."""

    def __init__(self, step: int, *, rank: int = 0, value: float = float("nan")):
        self.step, self.rank, self.value = step, rank, value

    def after_loss(self, recipe: Run) -> None:
        if recipe.rank == self.rank and recipe.state.step + 1 == self.step and recipe.output is not None:
            recipe.output = replace(recipe.output, loss=recipe.output.loss * self.value)


class RecordPartitions(Callback):
    """Writes, per rank, each parameter's full size and the part of it this rank holds, before the first step
    (``partitions_rank<N>.json`` in the run folder): under ZeRO-3 no rank may hold a parameter whole."""

    def fit_start(self, recipe: Run) -> None:
        import json

        module = recipe.engine.module
        sizes = {name: [int(getattr(p, "ds_numel", p.numel())), int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor")
                        else int(p.numel())] for name, p in module.named_parameters()}
        path = Path(recipe.run_dir) / f"partitions_rank{recipe.rank}.json"
        path.write_text(json.dumps(sizes))
