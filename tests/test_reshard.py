"""Resuming on another world size: the data position and the decisions around it (no Ray, no DeepSpeed)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data.readers import train_batch_indices
from orchestrator.train.reshard import global_batch_warning, needs_universal, resume_position


def _consumed_rows(n: int, *, epoch: int, world_size: int, batch_size: int, batches: int) -> list[int]:
    rows = []
    for rank in range(world_size):
        for batch in train_batch_indices(
            n, epoch=epoch, seed=7, shuffle=True, rank=rank, world_size=world_size, batch_size=batch_size
        )[:batches]:
            rows.extend(int(i) for i in batch)
    return rows


@pytest.mark.parametrize(
    ("old_ws", "old_bs", "done", "new_ws", "new_bs"),
    [(2, 8, 3, 1, 8), (1, 8, 3, 2, 8), (4, 4, 5, 3, 4), (2, 8, 0, 1, 8), (3, 2, 7, 2, 5)],
)
def test_resumed_position_neither_repeats_nor_skips_more_than_a_global_batch(old_ws, old_bs, done, new_ws, new_bs):
    n = 400
    before = _consumed_rows(n, epoch=1, world_size=old_ws, batch_size=old_bs, batches=done)
    position = resume_position(done, old_world_size=old_ws, old_batch_size=old_bs, world_size=new_ws, batch_size=new_bs)
    after = []
    for rank in range(new_ws):
        for batch in train_batch_indices(
            n, epoch=1, seed=7, shuffle=True, rank=rank, world_size=new_ws, batch_size=new_bs
        )[position.batch_in_epoch :]:
            after.extend(int(i) for i in batch)
    assert not set(before) & set(after)  # no row of the epoch twice
    epoch_rows = {int(i) for i in np.random.default_rng([7, 1]).permutation(n)}
    never = epoch_rows - set(before) - set(after)
    # What is never seen: the skipped rows plus the tail the new world size drops (incomplete batches).
    tail = n - (n // new_ws // new_bs) * new_ws * new_bs
    assert len(never) == position.skipped_rows + tail
    assert position.skipped_rows < new_ws * new_bs


def test_two_workers_to_one_continues_exactly():
    position = resume_position(3, old_world_size=2, old_batch_size=8, world_size=1, batch_size=8)
    assert (position.batch_in_epoch, position.skipped_rows) == (6, 0)


def test_universal_conversion_only_for_zero_shards_of_another_world_size():
    assert needs_universal({"world_size": 2, "zero_stage": 2}, world_size=1)
    assert needs_universal({"world_size": 2, "zero_stage": 3}, world_size=4)
    assert not needs_universal({"world_size": 2, "zero_stage": 0}, world_size=1)  # one optimizer file: loads as is
    assert not needs_universal({"world_size": 2, "zero_stage": 2}, world_size=2)
    assert not needs_universal({"step": 4}, world_size=1)  # a checkpoint from before world sizes were recorded
    assert not needs_universal(None, world_size=1)


def test_global_batch_warning_names_the_grad_accumulation_that_keeps_it():
    saved = {"world_size": 2, "batch_size": 8, "grad_accumulation": 1}
    message = global_batch_warning(saved, world_size=1, batch_size=8, grad_accumulation=1)
    assert "from 16 to 8" in message and "training.grad_accumulation=2" in message
    assert global_batch_warning(saved, world_size=1, batch_size=8, grad_accumulation=2) is None
