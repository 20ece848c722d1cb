"""Fault injection for the failure and resume tests: worker callbacks that only tests register, through
``run_training(config, worker_callbacks=[...])``.

Each fails once, at the first checkpoint at or past its step, and never in an attempt that started from a
checkpoint (after Ray Train restarts the workers, or on ``--resume``), like a node lost once.

Ray's workers import callbacks by module name; this module is pickled by value so that they need not have the
tests folder on their path.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ray.cloudpickle

from orchestrator.train.callbacks import Callback, Run

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FailAfterCheckpoint(Callback):
    """Raise right after the checkpoint of the first step at or past ``step`` has been handed to Ray Train."""

    def __init__(self, step: int):
        self.step = step

    def after_checkpoint(self, recipe: Run) -> None:
        if not recipe.started_from_checkpoint and recipe.state.step >= self.step:
            raise RuntimeError(f"injected fault after the checkpoint at step {recipe.state.step}")


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
