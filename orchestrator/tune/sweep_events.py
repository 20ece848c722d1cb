"""Driver-side Tune plug-ins of a sweep: early stopping on NaN / plateau, and the sweep's event log.

Every trial event (start, stop and why, complete, error) is appended to ``<sweep dir>/trial_events.jsonl``
(:func:`log_event`); the results read it back (:func:`read_events`) to tell why a trial ended early. A sweep on a
bucket appends to its local scratch copy and uploads the whole file after every event (a few per trial, each
one PUT), so a driver that dies loses none and a resume on another machine reads them from the bucket.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.run_outputs import publish_file, restore_file, scratch_dir
from orchestrator.tune.sweep_plan import EVENTS_FILE


def log_event(sweep_folder: str | Path, event: dict[str, Any]) -> None:
    """Append one event to the sweep's event log (``sweep_folder``: a local path, or the sweep's URI).

    Raises:
        StorageError: on a bucket, naming the log's URI when it cannot be uploaded.
    """
    remote = storage.join(str(sweep_folder), EVENTS_FILE) if storage.is_uri(sweep_folder) else None
    local = (scratch_dir(str(sweep_folder)) if remote else Path(sweep_folder)) / EVENTS_FILE
    if remote:
        restore_file(remote, local)  # the scratch was lost (or this is another machine): continue the bucket's
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=str) + "\n")
    if remote:
        publish_file(local, remote)


def read_events(sweep_folder: str | Path) -> list[dict[str, Any]]:
    """The sweep's event log, oldest first (empty when there is none yet); a bucket's copy for a URI."""
    path = storage.join(str(sweep_folder), EVENTS_FILE)
    if not storage.is_file(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


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
