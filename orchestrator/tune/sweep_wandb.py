"""W&B logging of a sweep: one run per trial in the sweep's group, early-stopped ones marked, plus a summary run.

Trials stream their own runs from rank 0 while they train (:mod:`orchestrator.tune.trial`); once the sweep
ends, :func:`log_sweep_to_wandb` marks how each stopped or failed trial ended and logs the summary run (the
trials table, the learning curves and the best trial). W&B writes in local folders; a sweep on a bucket keeps
the summary run's id there (a resume on another machine logs to the same run) and uploads offline runs.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.run_outputs import scratch_dir
from orchestrator.tracking import WANDB_ID_FILE, resolve_wandb_mode
from orchestrator.tune.sweep_plan import SweepPlan
from orchestrator.tune.sweep_results import TrialRecord
from orchestrator.tune.trial import ended_gracefully


def log_sweep_to_wandb(
    plan: SweepPlan, trials: list[TrialRecord], best: TrialRecord | None, plot: Path | None
) -> str | None:
    """Mark each trial's W&B run with how it ended, and log a summary run for the sweep (same group).

    Trials stream their own runs from rank 0 while they train; a stopped trial's workers are ended without
    warning, so its run is resumed here (same id) to record the status.
    """
    wandb_cfg = plan.config.tracking.wandb
    mode = resolve_wandb_mode(wandb_cfg.mode)
    if mode == "disabled":
        return None
    import wandb

    settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
    common = {"project": wandb_cfg.project, "entity": wandb_cfg.entity, "group": plan.name, "mode": mode}
    _mark_trial_runs(wandb, trials, common, settings)
    run = _summary_run(wandb, plan, common, settings)
    _log_summary(wandb, run, trials, best, plot)
    path = str(plan.sweep_dir / "wandb") if mode == "offline" else run.url
    run.finish()
    if mode == "offline" and plan.on_bucket:  # offline runs, for a later `wandb sync` from anywhere
        path = plan.location("wandb")
        storage.upload(plan.sweep_dir / "wandb", path)
    return path


def _mark_trial_runs(wandb: Any, trials: list[TrialRecord], common: dict[str, Any], settings: Any) -> None:
    """Resume the W&B run of each trial that did not close it itself (stopped without warning, or failed) and
    record its status, stop reason and steps."""
    for t in trials:
        if t.status == "completed" or not t.run_dir:
            continue
        id_file = storage.join(t.run_dir, WANDB_ID_FILE)  # on a bucket: the copy the trial published
        if not storage.is_file(id_file):
            continue
        if t.status == "early_stopped" and ended_gracefully(t.run_dir):
            continue  # rank 0 closed the run itself, marked early-stopped
        local = scratch_dir(t.run_dir)  # W&B writes locally: the run folder, or its scratch on a bucket
        local.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            **common,
            job_type="trial",
            name=t.trial_id,
            id=storage.read_text(id_file).strip(),
            resume="allow",
            dir=str(local),
            settings=settings,
        )
        run.tags = tuple(dict.fromkeys([*(run.tags or ()), t.status.replace("_", "-")]))
        run.summary.update(
            {"sweep/status": t.status, "sweep/stop_reason": t.stop_reason or "", "sweep/steps": t.steps or 0}
        )
        run.finish(exit_code=1 if t.status == "error" else 0)
        if storage.is_uri(t.run_dir) and (local / "wandb").is_dir():  # beside the trial's own offline run
            storage.upload(local / "wandb", storage.join(t.run_dir, "wandb"))


def _summary_run(wandb: Any, plan: SweepPlan, common: dict[str, Any], settings: Any) -> Any:
    """The sweep's summary run (its id kept in the sweep dir, so a resumed sweep logs to the same run)."""
    id_file = plan.location(WANDB_ID_FILE)  # on a bucket: there, so a resume from another machine finds it
    run_id = storage.read_text(id_file).strip() if storage.is_file(id_file) else uuid.uuid4().hex[:8]
    storage.write_text(id_file, run_id)
    return wandb.init(
        **common,
        job_type="sweep",
        name=f"{plan.name}-summary",
        id=run_id,
        resume="allow",
        tags=plan.config.tracking.wandb.tags,
        config={"metric": plan.metric, "mode": plan.mode, "tune": plan.tune.model_dump(mode="json")},
        dir=str(plan.sweep_dir),
        settings=settings,
    )


def _log_summary(wandb: Any, run: Any, trials: list[TrialRecord], best: TrialRecord | None, plot: Path | None) -> None:
    """Log the trials table and the learning curves to the summary run, and the counts and best trial to its
    summary."""
    params = sorted({p for t in trials for p in t.params})
    columns = ["trial_id", "status", "stop_reason", "best_metric", "last_metric", "steps", *params, "error"]
    rows = [
        [t.trial_id, t.status, t.stop_reason, t.best_metric, t.last_metric, t.steps,
         *(str(t.params.get(p)) for p in params), t.error]
        for t in trials
    ]  # fmt: skip
    logged: dict[str, Any] = {"trials": wandb.Table(columns=columns, data=rows)}
    if plot is not None:
        logged["learning_curves"] = wandb.Image(str(plot))
    run.log(logged)
    run.summary.update(
        {
            "trials": len(trials),
            "completed": sum(t.status == "completed" for t in trials),
            "early_stopped": sum(t.status == "early_stopped" for t in trials),
            "errors": sum(t.status == "error" for t in trials),
            "best_trial": best.trial_id if best else "",
            "best_metric": best.best_metric if best else None,
            "best_params": best.params if best else {},
        }
    )
