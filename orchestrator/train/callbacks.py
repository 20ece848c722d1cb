"""What hooks into the step loop: events, the callback protocol, and the callbacks every run may use.

The shape is composer's Event/Callback: the recipe (``orchestrator.train.recipe``) fires an :class:`Event` at
fixed points of a run, and each :class:`Callback` reacts to the events it names by defining a method of the
same name (``before_forward``, ``step_end``, ...), with the recipe as its only argument (typed as :class:`Run`:
what a callback may read and set). Callbacks that feed
the ``train`` record return their values from :meth:`Callback.log_values`, called once per logged step, in
registration order; a callback with state of its own that a restart must keep exposes ``state_dict()`` /
``load_state_dict()`` (none of the built-in ones needs it: unfreezing is a function of the step, the anchor
is re-captured from the weights the run starts from, windows restart empty).

Built in: :class:`NonFiniteLossGuard`, :class:`UnfreezeSchedule`, :class:`FreshAdamOnUnfreeze`,
:class:`WeightAnchorLoss`, :class:`DonorHyperparameters` (PBT), :class:`TuneStopSignal`, :class:`ThroughputLog` and
:class:`MemoryLog`. Tests add fault injection the same way (``tests/support/faults.py``), through
``run_training(..., worker_callbacks=[...])``.

A callback ends a run that cannot go on by raising :class:`StopRun` on every rank at the same step: the recipe
returns its error to the driver, which raises it, instead of failing the workers (Ray Train would restart them
from the last checkpoint, into the same failure).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from orchestrator.errors import TrainingError
from orchestrator.train.evaluation import all_reduce_sum
from orchestrator.train.memory import memory_mb, resident_tensor_mb
from orchestrator.train.unfreezing import groups_unfrozen_at, restart_optimizer_state

if TYPE_CHECKING:
    from orchestrator.budget import StepBudget
    from orchestrator.methods.base import TrainBatchOutput
    from orchestrator.tracking import Tracker
    from orchestrator.train.checkpointing import TrainState
    from orchestrator.train.unfreezing import Schedule, Unfreezing
    from orchestrator.train.weight_anchor import WeightAnchor


class Event(str, enum.Enum):
    """Points of a run where callbacks are called, in the order they happen."""

    AFTER_RESTORE = "after_restore"  # a checkpoint was loaded into the engine (not fired on a fresh start)
    FIT_START = "fit_start"  # before the first step of this attempt
    BEFORE_FORWARD = "before_forward"  # a micro-batch is on the device, before the method's forward
    AFTER_LOSS = "after_loss"  # ``recipe.output`` holds the method's loss; callbacks may replace it
    AFTER_MICRO_BATCH = "after_micro_batch"  # backward and engine.step done; ``recipe.micro_batch`` filled
    STEP_END = "step_end"  # an optimizer step is complete (``recipe.state.step`` counts it)
    FINAL_METRICS = "final_metrics"  # the last step's metrics are known, before its checkpoint
    BEFORE_CHECKPOINT = "before_checkpoint"  # callbacks may set ``recipe.checkpoint_upload_fn``
    AFTER_CHECKPOINT = "after_checkpoint"  # the checkpoint was handed to Ray Train
    STEP_REPORTED = "step_reported"  # eval and checkpoint of a step done; callbacks may ``recipe.request_stop``


class Run(Protocol):
    """What callbacks see of the run (``orchestrator.train.recipe.TrainRecipe`` is the one implementation)."""

    rank: int
    device: torch.device
    run_dir: Path  # the run's output folder
    engine: Any  # the DeepSpeed engine
    budget: StepBudget
    state: TrainState  # saved with every checkpoint
    tracker: Tracker  # metrics.jsonl and W&B (a no-op off rank 0)
    output: TrainBatchOutput | None  # the current micro-batch's loss; AFTER_LOSS callbacks may replace it
    micro_batch: Any  # what the last micro-batch contributed (loss, samples, tokens, extra terms)
    checkpoint_upload_fn: Callable | None  # Ray Train's upload function for the next checkpoint

    @property
    def started_from_checkpoint(self) -> bool: ...

    def request_stop(self) -> None: ...


class StopRun(Exception):
    """Raised by a callback, on every rank at the same step, to end the run at once: no further log, eval, export
    or checkpoint. The recipe catches it, cleans up and returns ``error`` (Ray Train hands rank 0's return value to
    the driver, which raises it); a failing worker would instead be restarted from the last checkpoint."""

    def __init__(self, error: TrainingError, step: int):
        super().__init__(str(error))
        self.error, self.step = error, step


class Callback:
    """Base of every callback: a no-op for every event; subclasses define the methods they need."""

    def run_event(self, event: Event, recipe: Run) -> None:
        handler = getattr(self, event.value, None)
        if handler is not None:
            handler(recipe)

    def log_values(self, recipe: Run) -> dict[str, Any]:
        """Values for this logged step's ``train`` record (and the start of a new window)."""
        return {}


class Callbacks:
    """An ordered list of callbacks that the recipe fires together."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def fire(self, event: Event, recipe: Run) -> None:
        for callback in self.callbacks:
            callback.run_event(event, recipe)

    def log_values(self, recipe: Run) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for callback in self.callbacks:
            values.update(callback.log_values(recipe))
        return values


class UnfreezeSchedule(Callback):
    """Moves the backward stop up as groups unfreeze, and logs how many groups train.

    The optimizer side of unfreezing (groups frozen for the run, LR 0 until a group's step) is decided once
    when the engine is built (``orchestrator.train.unfreezing``); this is the part that changes per step."""

    def __init__(self, unfreezing: Unfreezing):
        self.unfreezing = unfreezing

    def before_forward(self, recipe: Run) -> None:
        self.unfreezing.stop.update(recipe.state.step)

    def log_values(self, recipe: Run) -> dict[str, Any]:
        return self.unfreezing.log_values(recipe.state.step - 1)


class FreshAdamOnUnfreeze(Callback):
    """A group that becomes trainable after step 0 starts its optimizer state afresh, so its first update is a fresh
    AdamW's rather than one bias-corrected for all the LR-0 steps it sat through (``orchestrator.train.unfreezing``).

    The restart happens at the end of the step before (``step_end``, so the checkpoint of that step already holds
    it) and again after a restore at exactly that step (a checkpoint written otherwise, e.g. converted to a
    universal one on another world size, gets the same state)."""

    def __init__(self, schedule: Schedule, optimizer: torch.optim.Optimizer):
        self.schedule, self.optimizer = schedule, optimizer

    def step_end(self, recipe: Run) -> None:
        self._restart(recipe)

    def after_restore(self, recipe: Run) -> None:
        self._restart(recipe)

    def _restart(self, recipe: Run) -> None:
        groups = groups_unfrozen_at(self.schedule, recipe.state.step)  # the groups the next step trains first
        if groups:
            engine_optimizer = getattr(recipe.engine, "optimizer", None)
            restart_optimizer_state(self.optimizer, groups, engine_optimizer=engine_optimizer)


class NonFiniteLossGuard(Callback):
    """Ends the run at the first NaN or inf loss, naming the step, without a restart and without writing anything
    after it.

    Each micro-batch's loss is checked on the device, with no host sync. The result is read back only at the steps
    that log, evaluate or checkpoint (and the last, which exports), before any of that (``step_end`` is the first
    thing of a step's end), and before every checkpoint whatever the schedule: so no checkpoint, eval or export ever
    follows a non-finite loss, and the last checkpoint before it is kept. The ranks agree with one all-gather of
    four numbers, which names the earliest bad micro-batch of any rank; the run then stops on every rank
    (:class:`StopRun`).
    """

    def __init__(self, *, log_every: int, eval_every: int | None, checkpoint_every: int | None):
        self.log_every, self.eval_every, self.checkpoint_every = log_every, eval_every, checkpoint_every
        self.checked_at: int | None = None  # the last step read back
        self.last_checkpoint: int | None = None
        self._first: torch.Tensor | None = None  # this rank's first bad micro-batch: step, epoch, batch, loss

    def after_restore(self, recipe: Run) -> None:
        self.last_checkpoint = recipe.state.step

    def after_micro_batch(self, recipe: Run) -> None:
        state = recipe.state
        loss = torch.as_tensor(recipe.micro_batch.loss).detach().to(torch.float64).reshape(())
        if self._first is None:
            self._first = torch.full((4,), math.inf, dtype=torch.float64, device=loss.device)  # step inf: none yet
        new = ~torch.isfinite(loss) & torch.isinf(self._first[0])
        # The step being taken (1-based, as logged) and the micro-batch's place in its epoch.
        for i, value in enumerate((state.step + 1, state.epoch, state.batch_in_epoch - 1)):
            self._first[i] = torch.where(new, float(value), self._first[i])
        self._first[3] = torch.where(new, loss, self._first[3])

    def step_end(self, recipe: Run) -> None:
        step, total = recipe.state.step, recipe.budget.total_steps
        reads = (
            step >= total
            or step % self.log_every == 0
            or bool(self.eval_every and step % self.eval_every == 0)
            or bool(self.checkpoint_every and step % self.checkpoint_every == 0)
        )
        if reads:
            self._check(recipe)

    def before_checkpoint(self, recipe: Run) -> None:
        if self.checked_at != recipe.state.step:
            self._check(recipe)

    def after_checkpoint(self, recipe: Run) -> None:
        self.last_checkpoint = recipe.state.step

    def _check(self, recipe: Run) -> None:
        self.checked_at = recipe.state.step
        if self._first is None:
            return
        rows = _gather_from_ranks(self._first).tolist()  # the one host sync
        bad = [(row, rank) for rank, row in enumerate(rows) if math.isfinite(row[0])]
        if not bad:
            return
        (step, epoch, batch, value), rank = min(bad, key=lambda found: (found[0][0], found[1]))
        kept = (f"the last checkpoint (step {self.last_checkpoint}) is kept" if self.last_checkpoint is not None
                else "no checkpoint was written")
        error = TrainingError(
            f"loss became {value} at step {int(step)} (epoch {int(epoch)}, batch {int(batch)}, rank {rank}); lower "
            f"training.lr, enable training.max_grad_norm, or check the data. Training stopped without a restart; "
            f"{kept}"
        )
        recipe.tracker.log("error", int(step), {"message": str(error)})
        recipe.tracker.summary({"error": str(error)})
        raise StopRun(error, int(step))


def _gather_from_ranks(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` (on the device: NCCL gathers CUDA tensors), stacked in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return local.unsqueeze(0)
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    return torch.stack(rows)


class WeightAnchorLoss(Callback):
    """Adds the L2 pull toward the starting weights to every micro-batch's loss (``regularization.l2_to_start``)."""

    def __init__(self, anchor: WeightAnchor):
        self.anchor = anchor

    def after_loss(self, recipe: Run) -> None:
        recipe.output = self.anchor.add_to(recipe.output)


class DonorHyperparameters(Callback):
    """PBT: a trial that continues another trial's checkpoint keeps the donor's weights and optimizer moments
    but its own learning rate, weight decay, betas and LR schedule (taken at the donor's step)."""

    def __init__(self, optimizer: Any, scheduler: Any):
        self.optimizer, self.scheduler = optimizer, scheduler
        self.own_settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]

    def after_restore(self, recipe: Run) -> None:
        for group, settings in zip(self.optimizer.param_groups, self.own_settings):
            group.update(settings)  # this trial's lr, weight decay and betas, not the donor's
        self.scheduler.last_epoch = recipe.state.step - 1
        self.scheduler.step()  # this trial's schedule, at the donor's step


class TuneStopSignal(Callback):
    """Sweeps: ends the run after the current step once Ray Tune stopped the trial (ASHA, a stopper, PBT), so the
    workers leave cleanly and the W&B run is closed; records how the trial ended in the W&B summary.

    ``signal`` is an actor whose ``is_set()`` turns true when Tune stops the trial. Rank 0 asks it; one tiny
    all-reduce gives every rank the same answer, so all of them leave the loop after the same step."""

    def __init__(self, signal: Any):
        self.signal = signal

    def final_metrics(self, recipe: Run) -> None:
        recipe.tracker.summary({"sweep/status": "completed", "sweep/steps": recipe.state.step})

    def step_reported(self, recipe: Run) -> None:
        if self._stop_requested(recipe):
            recipe.tracker.summary({"sweep/status": "early_stopped", "sweep/steps": recipe.state.step})
            recipe.request_stop()

    def _stop_requested(self, recipe: Run) -> bool:
        import ray

        flag = torch.zeros(1, device=recipe.device)
        if recipe.rank == 0:
            flag += float(ray.get(self.signal.is_set.remote()))
        return bool(all_reduce_sum(flag).item() > 0)


class ThroughputLog(Callback):
    """The training window between two logged steps: mean loss (and the method's extra terms), learning rate,
    samples and real (non-padding) tokens per second, fractional epoch.

    Losses come as device tensors and are summed there; the sum is read back once per logged step."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.loss: torch.Tensor | float = 0.0
        self.batches, self.samples, self.tokens = 0, 0, 0
        self.extra: dict[str, torch.Tensor | float] = {}
        self.started = time.perf_counter()

    def fit_start(self, recipe: Run) -> None:
        self._reset()

    def after_micro_batch(self, recipe: Run) -> None:
        micro = recipe.micro_batch
        for key, value in micro.extra.items():
            self.extra[key] = self.extra.get(key, 0.0) + value
        self.loss += micro.loss
        self.batches += 1
        self.samples += micro.samples
        self.tokens += micro.tokens

    def log_values(self, recipe: Run) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        state, budget = recipe.state, recipe.budget
        values = {
            "train/loss": float(self.loss) / max(self.batches, 1),
            **{f"train/{k}": float(v) / max(self.batches, 1) for k, v in self.extra.items()},
            "train/lr": recipe.engine.get_lr()[0],
            "train/samples_per_s": self.samples / max(elapsed, 1e-9),
            "train/tokens_per_s": self.tokens / max(elapsed, 1e-9),
            "train/epoch": state.epoch + state.batch_in_epoch / budget.batches_per_epoch,
            "total_steps": budget.total_steps,
        }
        self._reset()
        return values


class MemoryLog(Callback):
    """Peak memory of the worker with every ``train`` record, and once, after the first step (when the optimizer
    state exists), the memory held by live tensors: the model states the ZeRO paper models."""

    def __init__(self) -> None:
        self.once: dict[str, float] = {}

    def step_end(self, recipe: Run) -> None:
        if recipe.state.step == 1:
            self.once["memory/resident_tensors_mb"] = resident_tensor_mb(recipe.device)

    def log_values(self, recipe: Run) -> dict[str, Any]:
        values = {**memory_mb(recipe.device), **self.once}
        self.once.clear()
        return values
