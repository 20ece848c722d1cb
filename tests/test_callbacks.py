"""Specs for the step-loop callbacks, each alone on a stand-in for the run (no engine, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from orchestrator.budget import StepBudget
from orchestrator.methods.base import TrainBatchOutput
from orchestrator.train.callbacks import (
    Callback,
    Callbacks,
    DonorHyperparameters,
    Event,
    MemoryLog,
    ThroughputLog,
    UnfreezeSchedule,
    WeightAnchorLoss,
)
from orchestrator.train.checkpointing import TrainState
from orchestrator.train.recipe import MicroBatch
from orchestrator.train.weight_anchor import WeightAnchor


class _Engine:
    def get_lr(self) -> list[float]:
        return [0.5]


@dataclass
class FakeRun:
    """The attributes of ``train.callbacks.Run`` that the callbacks read and set."""

    rank: int = 0
    device: torch.device = torch.device("cpu")
    engine: Any = field(default_factory=_Engine)
    budget: StepBudget = field(default_factory=lambda: StepBudget(total_steps=10, batches_per_epoch=4))
    state: TrainState = field(default_factory=TrainState)
    tracker: Any = None
    output: TrainBatchOutput | None = None
    micro_batch: MicroBatch = field(default_factory=MicroBatch)
    checkpoint_upload_fn: Any = None
    started_from_checkpoint: bool = False
    stopped: bool = False

    def request_stop(self) -> None:
        self.stopped = True


def test_a_callback_reacts_only_to_the_events_it_defines_and_in_registration_order() -> None:
    seen: list[str] = []

    class First(Callback):
        def step_end(self, run: Any) -> None:
            seen.append("first")

        def log_values(self, run: Any) -> dict[str, Any]:
            return {"a": 1, "shared": "first"}

    class Second(Callback):
        def step_end(self, run: Any) -> None:
            seen.append("second")

        def log_values(self, run: Any) -> dict[str, Any]:
            return {"b": 2, "shared": "second"}

    callbacks = Callbacks([First(), Second()])
    run = FakeRun()
    callbacks.fire(Event.BEFORE_FORWARD, run)  # neither defines it
    assert seen == []
    callbacks.fire(Event.STEP_END, run)
    assert seen == ["first", "second"]
    values = callbacks.log_values(run)
    assert list(values) == ["a", "shared", "b"] and values["shared"] == "second"


def test_throughput_log_averages_its_window_and_starts_a_new_one_when_logged() -> None:
    log, run = ThroughputLog(), FakeRun()
    run.state.epoch, run.state.batch_in_epoch = 1, 2
    for loss, kd in ((1.0, 0.2), (3.0, 0.4)):
        run.micro_batch = MicroBatch(loss=loss, samples=8, tokens=100, extra={"loss_kd": kd})
        log.after_micro_batch(run)
    values = log.log_values(run)
    assert values["train/loss"] == 2.0
    assert values["train/loss_kd"] == pytest.approx(0.3)
    assert values["train/lr"] == 0.5
    assert values["train/epoch"] == 1.5  # epoch 1, 2 of 4 batches
    assert values["total_steps"] == 10
    assert values["train/samples_per_s"] > 0 and values["train/tokens_per_s"] > values["train/samples_per_s"]
    assert log.log_values(run)["train/loss"] == 0.0  # the window restarted empty


def test_memory_log_counts_resident_tensors_once_after_the_first_step() -> None:
    log, run = MemoryLog(), FakeRun()
    model_states = torch.zeros(2**20)  # 4 MiB alive between steps
    run.state.step = 1
    log.step_end(run)
    first = log.log_values(run)
    assert first["memory/resident_tensors_mb"] >= 4 and first["memory/peak_rss_mb"] > 0
    del model_states
    run.state.step = 2
    log.step_end(run)
    assert "memory/resident_tensors_mb" not in log.log_values(run)


def test_the_weight_anchor_adds_its_pull_to_the_loss() -> None:
    layer = torch.nn.Linear(2, 1)
    anchor = WeightAnchor.capture(layer, weight=2.0)
    assert anchor is not None
    with torch.no_grad():
        layer.weight.add_(1.0)  # moved by 1 in both weights: penalty = 0.5 * 2 * (1 + 1) = 2
    run = FakeRun(output=TrainBatchOutput(loss=torch.tensor(1.0), logits=torch.zeros(1)))
    WeightAnchorLoss(anchor).after_loss(run)
    assert run.output.loss.item() == pytest.approx(3.0)
    assert run.output.extra == {"l2_to_start": pytest.approx(2.0)}


def test_unfreezing_moves_the_backward_stop_with_the_step_and_logs_the_trainable_groups() -> None:
    calls: list[int] = []

    class Stop:
        def update(self, step: int) -> int:
            calls.append(step)
            return step

    class Unfreezing:
        stop = Stop()

        def log_values(self, step: int) -> dict[str, float]:
            return {"unfreeze/at": step}

    callback, run = UnfreezeSchedule(Unfreezing()), FakeRun()  # type: ignore[arg-type]
    run.state.step = 3
    callback.before_forward(run)
    assert calls == [3]
    run.state.step = 4  # logged after step 4 completed: the schedule of the step just taken
    assert callback.log_values(run) == {"unfreeze/at": 3}


def test_a_pbt_trial_keeps_its_own_hyperparameters_and_schedule_at_the_donors_step() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    callback = DonorHyperparameters(optimizer, scheduler)  # taken before the donor's checkpoint is loaded
    optimizer.param_groups[0].update(lr=0.9, weight_decay=0.3, initial_lr=0.9)  # what the donor's state brings
    run = FakeRun()
    run.state.step = 4
    callback.after_restore(run)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 5)  # this trial's LR at the donor's step 4
    assert scheduler.last_epoch == 4
