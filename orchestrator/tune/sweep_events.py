"""Driver-side Tune plug-ins of a sweep: early stopping on NaN / plateau, and the sweep's event log.

Every trial event (start, stop and why, complete, error) is appended to ``<sweep dir>/trial_events.jsonl``
(:func:`log_event`); the results read it back (:func:`read_events`) to tell why a trial ended early.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from orchestrator.tune.sweep_plan import EVENTS_FILE


def log_event(sweep_dir: str | Path, event: dict[str, Any]) -> None:
    """Append one event to the sweep's event log."""
    with open(Path(sweep_dir) / EVENTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=str) + "\n")


def read_events(sweep_dir: Path) -> list[dict[str, Any]]:
    """The sweep's event log, oldest first (empty when there is none yet)."""
    path = sweep_dir / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


try:
    from ray.tune import Callback as _TuneCallback
    from ray.tune import Stopper as _TuneStopper
except ImportError:  # pragma: no cover - ray is a dependency
    _TuneCallback = _TuneStopper = object  # type: ignore[misc,assignment]


class MetricStopper(_TuneStopper):
    """Stops a trial whose metric is NaN/infinite, or (optionally) has stopped moving; logs why."""

    def __init__(self, *, metric: str, mode: str, stop_on_nan: bool, plateau: dict[str, Any] | None, sweep_dir: str):
        from ray.tune.stopper import TrialPlateauStopper

        self.metric = metric
        self.stop_on_nan = stop_on_nan
        self.sweep_dir = sweep_dir
        self._plateau = (
            TrialPlateauStopper(
                metric=metric,
                std=plateau["std"],
                num_results=plateau["num_results"],
                grace_period=plateau["grace_period"],
                mode=mode,
            )
            if plateau
            else None
        )

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        value = result.get(self.metric)
        reason = None
        if self.metric in result and self.stop_on_nan and not finite(value):
            reason = "nan"
        elif self._plateau is not None and finite(value) and self._plateau(trial_id, result):
            reason = "plateau"
        if reason is None:
            return False
        log_event(self.sweep_dir, {"event": "stop", "trial_id": trial_id, "reason": reason, "time": time.time()})
        return True

    def stop_all(self) -> bool:
        return False


class SweepLog(_TuneCallback):
    """Prints a line per trial event and appends it to the sweep's event log."""

    def __init__(self, sweep_dir: str, metric: str, *, verbose: bool):
        self.sweep_dir = sweep_dir
        self.metric = metric
        self.verbose = verbose

    def _emit(self, trial: Any, event: str, text: str, **extra: Any) -> None:
        log_event(self.sweep_dir, {"event": event, "trial_id": trial.trial_id, "time": time.time(), **extra})
        if self.verbose:
            print(f"trial {trial.trial_id}: {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(trial.config.items()))
        self._emit(trial, "start", f"started ({params})", params=trial.config)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.verbose:
            print(f"trial {trial.trial_id}: step {result.get('step')} {self.metric} {_short(result.get(self.metric))}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = bool((trial.last_result or {}).get("train_done"))
        self._emit(trial, "complete", "finished" if done else "stopped early", finished=done)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._emit(trial, "error", "failed (recorded; the sweep goes on)")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
