"""The results of a sweep: one record per trial, the best trial, the table, the learning curves.

A finished (or restored) Tune experiment is collected into :class:`TrialRecord` s (params, metric, steps, how
the trial ended and why); they become ``results.csv`` / ``results.json`` (every trial), ``learning_curves.png``
(every trial's metric per step) and ``best_model/`` (the best trial's model as an HF folder), gathered in a
:class:`SweepResult`. W&B logging of the same is in :mod:`orchestrator.tune.sweep_wandb`. On a bucket, each file
is written in the driver's scratch and published (:meth:`SweepPlan.publish`); the result then names the URIs.
"""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.run_outputs import EXPORT_MARKER, is_published
from orchestrator.tracking import read_metrics
from orchestrator.tune.sweep_events import finite, read_events
from orchestrator.tune.sweep_plan import BEST_MODEL_DIR, TRIALS_DIR, SweepPlan
from orchestrator.tune.trial import trial_job_name


@dataclass
class TrialRecord:
    """One trial as it ended."""

    trial_id: str
    status: str  # completed, early_stopped or error
    params: dict[str, Any]
    best_metric: float | None
    last_metric: float | None
    steps: int | None
    stop_reason: str | None = None
    error: str | None = None
    run_dir: str | None = None  # the trial's run folder: a local path or a URI
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) per eval


@dataclass
class SweepResult:
    """What a sweep left; every location a ``Path`` for a local sweep folder, the URI string on a bucket."""

    sweep_dir: Path | str
    metric: str
    mode: str
    trials: list[TrialRecord]
    best: TrialRecord | None
    best_model: Path | str | None
    results_csv: Path | str
    results_json: Path | str
    plot: Path | str | None
    wandb: str | None


def collect_trials(plan: SweepPlan, grid: Any) -> list[TrialRecord]:
    """One record per trial of a finished (or restored) Tune experiment."""
    events = read_events(plan.folder)
    stop_reasons = {e["trial_id"]: e["reason"] for e in events if e.get("event") == "stop"}
    budget_ends = [
        e["time"] + plan.tune.time_budget_s
        for e in events
        if e.get("event") == "sweep_start" and plan.tune.time_budget_s
    ]
    completed_at = {e["trial_id"]: e["time"] for e in events if e.get("event") == "complete"}
    started = {e["trial_id"]: e.get("params") or {} for e in events if e.get("event") == "start"}
    records = []
    for result in grid:
        trial_id = Path(result.path).name
        history = _history(result.metrics_dataframe, plan.metric)
        last = result.metrics or {}
        values = [v for _, v in history if finite(v)]
        best = (max(values) if plan.mode == "max" else min(values)) if values else None
        run_dir = plan.location(TRIALS_DIR, trial_job_name(plan.name, trial_id))
        trained = [r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
        steps = max(trained) if trained else (int(last["step"]) if finite(last.get("step")) else None)
        record = TrialRecord(
            trial_id=trial_id,
            status="completed",
            params=dict(result.config or started.get(trial_id, {})),
            best_metric=best,
            last_metric=history[-1][1] if history else None,
            steps=steps,
            run_dir=run_dir,
            history=history,
        )
        if result.error is not None:
            record.status, record.error = "error", error_text(result.error)
            if "loss became" in (record.error or ""):
                record.stop_reason = "nan"
        elif not last.get("train_done"):
            record.status = "early_stopped"
            ended = completed_at.get(trial_id)
            if trial_id in stop_reasons:
                record.stop_reason = stop_reasons[trial_id]
            elif ended is not None and any(ended >= end for end in budget_ends):
                record.stop_reason = "time budget"
            else:
                record.stop_reason = plan.tune.scheduler if plan.tune.scheduler != "none" else "stopped"
        records.append(record)
    return sorted(records, key=lambda r: r.trial_id)


def _history(frame: Any, metric: str) -> list[tuple[int, float]]:
    if frame is None or metric not in getattr(frame, "columns", ()) or "step" not in frame.columns:
        return []
    rows = frame[["step", metric]].dropna(subset=["step"])
    return [(int(step), float(value)) for step, value in rows.itertuples(index=False)]


def error_text(error: BaseException) -> str:
    """The root cause of a trial failure, short (Ray wraps worker errors several times)."""
    text = str(error)
    for marker in ("TrainingError: ", "ConfigError: ", "DataError: ", "ModelError: ", "ValueError: "):
        if marker in text:
            lines = text[text.rindex(marker) :].splitlines()
            # a ConfigError lists its problems on the following lines ("  - where: what", "    fix: ...")
            details = [
                line.strip() for line in itertools.takewhile(lambda x: x.startswith(("  - ", "    fix: ")), lines[1:])
            ]
            return " ".join([lines[0], *details])[:500]
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:500]


def best_trial(trials: list[TrialRecord], mode: str) -> TrialRecord | None:
    scored = [t for t in trials if t.status != "error" and t.best_metric is not None]
    if not scored:
        return None
    key = (lambda t: t.best_metric) if mode == "max" else (lambda t: -t.best_metric)  # type: ignore[operator]
    return max(scored, key=key)


def export_best_model(plan: SweepPlan, best: TrialRecord | None) -> Path | str | None:
    """Copy the best trial's model (its ``best/`` checkpoint, else ``final/``) to ``<sweep dir>/best_model``, when
    ``tune.export_best`` is on; the folder (its URI on a bucket), or None when nothing was exported."""
    if best is None or not plan.tune.export_best or not best.run_dir:
        return None
    sources = [storage.join(best.run_dir, name) for name in ("best", "final")]
    source = next((s for s in sources if is_published(s)), None)  # on a bucket: complete exports only
    if source is None:
        return None
    best_model = plan.sweep_dir / BEST_MODEL_DIR
    if best_model.exists():
        shutil.rmtree(best_model)
    if storage.is_uri(source):
        storage.download(source, best_model)
        (best_model / EXPORT_MARKER).unlink(missing_ok=True)  # the copy gets its own marker when published
    else:
        shutil.copytree(source, best_model)
    return plan.publish(best_model)


def write_table(
    plan: SweepPlan, trials: list[TrialRecord], best: TrialRecord | None, best_model: Path | str | None
) -> tuple[Path | str, Path | str]:
    """Save every trial as ``results.csv`` and, with the best trial, as ``results.json``; where they are read
    (their URIs on a bucket)."""
    params = sorted({p for t in trials for p in t.params})
    csv_path = plan.sweep_dir / "results.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["trial_id", "status", "stop_reason", f"best {plan.metric}", f"last {plan.metric}", "steps", *params,
             "error"]
        )  # fmt: skip
        for t in trials:
            writer.writerow(
                [t.trial_id, t.status, t.stop_reason or "", t.best_metric, t.last_metric, t.steps,
                 *(t.params.get(p) for p in params), t.error or ""]
            )  # fmt: skip
    json_path = plan.sweep_dir / "results.json"
    summary = {
        "sweep": plan.name,
        "metric": plan.metric,
        "mode": plan.mode,
        "best_trial": best.trial_id if best else None,
        "best_metric": best.best_metric if best else None,
        "best_params": best.params if best else None,
        "best_model": str(best_model) if best_model else None,
        "trials": [asdict(t) for t in trials],
    }
    json_path.write_text(json.dumps(summary, indent=2, default=str))
    return plan.publish(csv_path), plan.publish(json_path)


_LINE_STYLES = {"completed": "-", "early_stopped": "--", "error": ":"}


def plot_learning_curves(trials: list[TrialRecord], metric: str, best_id: str | None, out_dir: Path) -> Path | None:
    """Every trial's metric per step in one PNG; early-stopped trials dashed and ending in an x."""
    from matplotlib.figure import Figure

    curves = [t for t in trials if t.history]
    if not curves:
        return None
    fig = Figure(figsize=(9, 5.5))
    ax = fig.subplots()
    for t in curves:
        steps = [s for s, _ in t.history]
        values = [v for _, v in t.history]
        label = f"{t.trial_id} ({t.status.replace('_', ' ')}{', best' if t.trial_id == best_id else ''})"
        (line,) = ax.plot(
            steps,
            values,
            linestyle=_LINE_STYLES.get(t.status, "-"),
            marker="o",
            markersize=3,
            linewidth=2.8 if t.trial_id == best_id else 1.3,
            label=label,
        )
        if t.status != "completed":
            ax.scatter([steps[-1]], [values[-1]], marker="x", s=90, color=line.get_color(), zorder=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed, x: stopped early; dotted: failed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    path = out_dir / "learning_curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
