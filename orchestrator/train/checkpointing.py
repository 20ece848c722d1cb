"""Checkpoints of a run: what is saved (DeepSpeed shards, each rank's RNG, the loop position), how it is handed
to Ray Train, and how a restart loads it back, on the same or another number of workers."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.train.reshard import convert_to_universal

logger = logging.getLogger(__name__)

DS_TAG = "ds"
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint so a restart continues exactly here."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None
    samples_seen: int = 0
    # The topology that wrote the checkpoint, so a resume on another world size can re-shard (train.reshard).
    world_size: int | None = None
    batch_size: int | None = None  # micro-batch per worker
    grad_accumulation: int | None = None
    zero_stage: int | None = None
    total_steps: int | None = None
    # The start_eval record (orchestrator.train.start_eval): a resumed run compares its end with the same start.
    start_metrics: dict[str, Any] | None = None


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values, so ``torch.load(weights_only=True)`` reads
    them back (no pickled numpy arrays: a checkpoint file must never run code when loaded)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, float or None): plain types already
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set this process's RNGs to a state taken by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine: Any,
    state: TrainState,
    *,
    rank: int,
    metrics: dict[str, Any],
    upload_fn: Callable | None = None,
    upload: str = "async",
) -> None:
    """Every rank writes its DeepSpeed shards to a local folder and hands it to Ray Train, which merges all ranks'
    files into one checkpoint folder in storage. Ray registers the folder only once every rank has reported (a
    crash mid-write leaves an unregistered folder that no resume picks) and then keeps the latest or best N
    (output.keep_checkpoints_by) plus, always, the latest.

    With ``upload="async"`` (``output.checkpoint_upload``) ``ray.train.report`` returns as soon as the upload is
    queued, and training goes on while Ray's one upload thread per worker copies the folder (in report order)
    and registers the checkpoint; Ray deletes the local folder after its upload and, when the training function
    returns, waits for every queued upload before the run ends. The folder is therefore a fresh ``mkdtemp`` that
    nothing here touches again (a ``TemporaryDirectory`` would be deleted under the upload). An upload that
    fails makes the worker fail at once (Ray raises it in the training thread). A failure before a queued
    upload finished resumes from the checkpoint before it: that is the price of not waiting. ``"sync"`` waits
    for the upload inside ``report``, then deletes the folder.

    Args:
        upload_fn: Ray Train's ``checkpoint_upload_fn`` for this rank (None: Ray's own upload).
        upload: ``"async"`` or ``"sync"``.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    folder = Path(tempfile.mkdtemp(prefix="orch-ckpt-"))
    handed_over = False
    try:
        engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=True)
        torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
        if rank == 0:
            (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
        asynchronous = upload == "async"
        mode = CheckpointUploadMode.ASYNC if asynchronous else CheckpointUploadMode.SYNC
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=asynchronous,
            checkpoint_upload_fn=upload_fn,
        )
        handed_over = asynchronous  # queued: Ray's upload thread owns the folder now (and deletes it)
    finally:
        if not handed_over:
            shutil.rmtree(folder, ignore_errors=True)


def checkpoint_at(path: str) -> Any:
    """A Ray Train checkpoint at a local folder or a URI (the bucket's pyarrow filesystem from
    ``orchestrator.storage``, the one client configuration every other read of the bucket uses)."""
    import ray.train

    import orchestrator.storage as storage

    if not storage.is_uri(path):
        return ray.train.Checkpoint(path)
    filesystem, inner = storage.resolve(path)
    return ray.train.Checkpoint(inner, filesystem=filesystem)


def load_checkpoint(
    engine: Any, checkpoint: Any, *, rank: int, local_rank: int, universal: bool, load_lr_scheduler: bool
) -> tuple[TrainState, bool]:
    """Load a Ray Train checkpoint into the engine, restore this rank's RNG; returns the saved loop position and
    whether this rank converted the checkpoint to the universal format.

    A checkpoint written by another number of workers is first converted to DeepSpeed's universal format, once per
    node (by its local rank 0, into a folder the node's ranks share; the others wait), not once per rank."""
    with checkpoint.as_directory() as ckpt_dir:
        converted = universal and local_rank == 0
        load_dir = _universal_once_per_node(checkpoint, ckpt_dir, local_rank) if universal else Path(ckpt_dir)
        try:
            engine.load_checkpoint(
                str(load_dir), tag=DS_TAG, load_module_strict=False, load_lr_scheduler_states=load_lr_scheduler
            )
        finally:
            if universal:
                _barrier()  # every rank of the node has read the converted folder
                if local_rank == 0:
                    shutil.rmtree(load_dir, ignore_errors=True)
        state = TrainState(**json.loads((Path(ckpt_dir) / STATE_FILE).read_text()))
        rng_file = Path(ckpt_dir) / f"rng_rank{rank}.pt"
        if rng_file.exists():
            try:
                rng = torch.load(rng_file, weights_only=True)  # tensors and plain values only
            except Exception as exc:  # written by an older version (numpy arrays): never unpickled
                logger.warning("not restoring RNG state from %s (%s); continuing with fresh RNG", rng_file, exc)
            else:
                restore_rng(rng)
    return state, converted


def _universal_once_per_node(checkpoint: Any, ckpt_dir: str, local_rank: int) -> Path:
    """The universal form of the checkpoint in a node-local folder named after the checkpoint (so every rank of the
    node finds it); converted by the node's local rank 0 while the others wait."""
    key = hashlib.sha256(str(checkpoint.path).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"orch-universal-{key}"
    if local_rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        convert_to_universal(ckpt_dir, DS_TAG, folder)
    _barrier()
    return folder


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
