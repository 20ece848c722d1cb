"""Resuming a run on a different number of workers (``--resume`` with ``scaling.num_workers`` changed).

DeepSpeed's ``load_checkpoint`` refuses ZeRO optimizer shards written by a different data-parallel world
size. The design here keeps everything a resume normally keeps, moments included:

- **Weights and optimizer state**: the checkpoint's ZeRO shards (stage 1-3) are converted into a
  DeepSpeed *universal checkpoint* (``deepspeed.checkpoint.ds_to_universal``: one fp32 file per parameter
  for the weights and each Adam moment) in a local temporary folder, and the engine is built with
  ``"checkpoint": {"load_universal": true}``, which re-partitions them for the new world size. Every rank
  converts for itself (ranks on different nodes share no local disk); that costs one read of the
  shards per rank, once per topology change. Stage 0 checkpoints hold the whole optimizer state in one
  file and load on any world size as they are. Parameters outside the optimizer (frozen LoRA bases, a
  distillation teacher) are not in a universal checkpoint; they keep the values the model was built
  with, which are the values they had when saved. Buffers are not restored (the supported models hold
  only constants in them).
- **Step budget and LR schedule**: unchanged. The run keeps the checkpoint's ``total_steps`` (the
  restored LR scheduler counts to it), so a job that counts epochs ends at the same step it would have;
  the global batch per step is now ``num_workers x batch_size_per_worker x grad_accumulation`` of the new
  config: a warning says so, and which ``grad_accumulation`` keeps the old one.
- **Data position**: an epoch's permutation is the same for every world size and rank ``r`` of ``W`` takes
  positions ``r, r+W, r+2W, ...`` of it, so the first ``k`` micro-batches of all ranks are exactly the
  first ``k * W * B`` rows of the permutation. The new run continues at the first global batch boundary
  of the new world size at or after that many rows: no row of the epoch is seen twice, and fewer than
  one new global micro-batch of rows (``W' * B'``) is skipped (none when the old count divides evenly, as
  when going from 2 workers to 1).
- **RNG**: rank ``r`` restores ``rng_rank{r}.pt`` when the old run had that rank; new ranks keep their
  seeded state.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePosition:
    """Where a resharded run continues in the current epoch."""

    batch_in_epoch: int  # micro-batches per worker of the new world size already consumed
    skipped_rows: int  # rows of the epoch passed over to reach a global batch boundary


def resume_position(
    batch_in_epoch: int, *, old_world_size: int, old_batch_size: int, world_size: int, batch_size: int
) -> ResumePosition:
    """The position in the current epoch for a new world size / micro-batch size (see the module docstring)."""
    consumed = batch_in_epoch * old_world_size * old_batch_size
    per_global_batch = world_size * batch_size
    batches = math.ceil(consumed / per_global_batch)
    return ResumePosition(batch_in_epoch=batches, skipped_rows=batches * per_global_batch - consumed)


def read_saved_state(checkpoint: Any, state_file: str) -> dict[str, Any] | None:
    """The train state JSON of a Ray Train checkpoint, read through its filesystem before the engine is built
    (one small file; the shards are not downloaded for this)."""
    path = f"{checkpoint.path.rstrip('/')}/{state_file}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read().decode("utf-8"))
    except (FileNotFoundError, OSError):
        return None


def needs_universal(saved: dict[str, Any] | None, *, world_size: int) -> bool:
    """Whether a checkpoint's ZeRO shards were written by a different world size (stage 1-3 only)."""
    if not saved or saved.get("world_size") in (None, world_size):
        return False
    return (saved.get("zero_stage") or 0) >= 1


def convert_to_universal(checkpoint_dir: str | Path, tag: str, destination: str | Path) -> Path:
    """Convert ``checkpoint_dir/tag`` (ZeRO shards of any world size) to a universal checkpoint.

    Returns:
        The folder to pass to ``engine.load_checkpoint(folder, tag=tag)``.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    destination = Path(destination)
    args = Namespace(
        input_folder=str(Path(checkpoint_dir) / tag),
        output_folder=str(destination / tag),
        num_extract_workers=1,  # no process pools inside a Ray worker
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # plain (non-Megatron) models carry no universal-checkpoint info
    )
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):  # progress bars
            ds_to_universal(args)
    except Exception as exc:
        raise RuntimeError(
            f"converting {args.input_folder} to a universal checkpoint failed:\n{output.getvalue()}"
        ) from exc
    return destination


def weights_l2(engine: Any) -> float:
    """L2 norm of all module parameters (float64), the same on every rank. Every rank must call this:
    under ZeRO-3 each parameter is gathered in turn."""
    import deepspeed

    total = 0.0
    zero3 = engine.zero_optimization_partition_weights()
    for param in engine.module.parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=zero3):
            total += float(param.detach().double().pow(2).sum())
    return math.sqrt(total)


def global_batch_warning(
    saved: dict[str, Any], *, world_size: int, batch_size: int, grad_accumulation: int
) -> str | None:
    """A warning when the new topology changes the number of samples per optimizer step."""
    old = saved["world_size"] * (saved.get("batch_size") or batch_size) * (saved.get("grad_accumulation") or 1)
    new = world_size * batch_size * grad_accumulation
    if old == new:
        return None
    workers = f"{world_size} worker" + ("s" if world_size > 1 else "")
    message = (
        f"resuming a {saved['world_size']}-worker checkpoint on {workers}: the global batch changes from {old} to "
        f"{new} samples per optimizer step (step budget and LR schedule unchanged)"
    )
    if old % (world_size * batch_size) == 0:
        message += f"; set training.grad_accumulation={old // (world_size * batch_size)} to keep {old}"
    return message
