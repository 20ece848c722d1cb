"""How long a run is and what it is judged by: the step budget and the metric that picks the best model.

Shared by the driver (sweeps size their schedulers from it, checkpoints are ranked by the metric) and the
workers (the step loop counts to it); it imports neither torch nor any worker module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.errors import TrainingError

if TYPE_CHECKING:
    from orchestrator.config import JobConfig
    from orchestrator.data.sources import PreparedData


def batches_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Micro-batches each worker runs per epoch (incomplete batches are dropped so all workers agree)."""
    return (n // world_size) // batch_size


@dataclass(frozen=True)
class StepBudget:
    total_steps: int
    batches_per_epoch: int

    @classmethod
    def for_job(cls, config: JobConfig, n_train: int, world_size: int) -> StepBudget:
        t = config.training
        per_epoch = batches_per_epoch(n_train, world_size, t.batch_size_per_worker)
        if per_epoch == 0:
            raise TrainingError(
                f"{n_train} training rows are too few for {world_size} workers x batch size "
                f"{t.batch_size_per_worker}; lower training.batch_size_per_worker or scaling.num_workers"
            )
        if t.max_steps is not None:
            total = t.max_steps
        else:
            total = max(1, int(t.epochs * per_epoch) // t.grad_accumulation)
        return cls(total_steps=total, batches_per_epoch=per_epoch)


def best_metric_name(config: JobConfig, data: PreparedData) -> tuple[str | None, str]:
    t = config.training
    if t.metric != "auto":
        mode = (
            t.metric_mode
            if t.metric_mode != "auto"
            else ("min" if t.metric.endswith(("loss", "perplexity")) else "max")
        )
        return t.metric, mode
    if not data.evals:
        return None, "max"
    first = data.evals[0].name
    if config.model.task == "causal-lm":
        return f"{first}/loss", "min"
    return f"{first}/accuracy", "max"
