"""Hyperparameter sweeps: Ray Tune over whole jobs (each trial a multi-worker DeepSpeed run), streamed to W&B.

The flow, top to bottom:

1. :func:`plan_sweep` checks everything that can be checked without the cluster (search space against the
   job, metric, model and data, budgets) and reports every problem at once.
2. :func:`run_sweep` (or :func:`resume_sweep` after the driver died) starts Ray, sizes trial concurrency so
   that running trials always get all their workers, and runs a ``ray.tune.Tuner`` whose trainable is
   :func:`orchestrator.tune.trial.run_trial` (one ``TorchTrainer`` per trial; see that module for how a
   stopped trial's workers and placement group are freed).
3. The results are collected into :class:`SweepResult`: a CSV/JSON table of every trial (params, metric,
   steps, status), a PNG of every learning curve, the best trial's model as an HF folder, and W&B (one run
   per trial in the sweep's group, early-stopped ones marked, plus a summary run).

Layout of ``<output.dir>/<name>/`` (the sweep dir)::

    sweep_config.yaml   the validated job, paths absolute (``--resume`` reads it)
    tune/               the Ray Tune experiment (Tuner.restore)
    trials/<name>-<trial id>/   each trial's run folder (metrics.jsonl, wandb/, best/, ray/ checkpoints)
    results.csv, results.json, learning_curves.png, best_model/, trial_events.jsonl
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import JobConfig, TuneSection, config_from_dict, set_dotted
from orchestrator.config.search_space import Distribution, check_search_space, parse_search_space
from orchestrator.errors import ConfigError, ConfigIssue, OrchestratorError, TrainingError
from orchestrator.tracking import read_metrics
from orchestrator.tune.trial import TrialPlan, ended_gracefully, trial_job_name, trial_trainable

SWEEP_CONFIG_FILE = "sweep_config.yaml"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
EVENTS_FILE = "trial_events.jsonl"
BEST_MODEL_DIR = "best_model"

# Fields whose values change how many eval intervals a trial runs (for ASHA's max_t).
_BUDGET_FIELDS = (
    "training.max_steps",
    "training.epochs",
    "training.batch_size_per_worker",
    "training.grad_accumulation",
    "training.eval_every_steps",
)
_METRIC_KEYS = {"sequence-classification": ("accuracy", "f1_macro", "loss"), "causal-lm": ("loss", "perplexity")}
_TRIAL_ID_LENGTH = 11  # Tune trial ids look like 'a1b2c_00003'


@dataclass
class SweepPlan:
    """A checked sweep: the job, its parsed search space, the metric and where everything goes."""

    config: JobConfig
    space: dict[str, Distribution]
    metric: str
    mode: str
    sweep_dir: Path
    base: dict[str, Any]  # the job without its tune section, paths absolute
    evals_per_trial: int  # eval intervals of the longest trial (ASHA's max_t unless set)

    @property
    def tune(self) -> TuneSection:
        assert self.config.tune is not None
        return self.config.tune

    @property
    def name(self) -> str:
        return self.config.name


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
    run_dir: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, metric) per eval


@dataclass
class SweepResult:
    sweep_dir: Path
    metric: str
    mode: str
    trials: list[TrialRecord]
    best: TrialRecord | None
    best_model: Path | None
    results_csv: Path
    results_json: Path
    plot: Path | None
    wandb: str | None


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def plan_sweep(config: JobConfig, *, resume: bool = False, source: str | None = None) -> SweepPlan:
    """Check a sweep without taking cluster resources.

    Raises:
        ConfigError: listing every problem (search space, metric, model, data, budgets, an existing sweep).
    """
    from orchestrator.budget import best_metric_name
    from orchestrator.cluster.preflight import preflight

    if config.tune is None:
        raise ConfigError(
            [
                ConfigIssue(
                    location="tune",
                    message="this job has no tune section, so there is nothing to sweep",
                    hint="add e.g. tune: {search_space: {training.lr: 'loguniform(1e-5, 1e-3)'}}",
                )
            ],
            source=source,
        )
    tune_cfg = config.tune
    base = _base_job(config)
    space = parse_search_space(tune_cfg.search_space)
    issues = check_search_space(base, space)
    base_config = config_from_dict(base)
    sweep_dir = (Path(config.output.dir).expanduser() / config.name).resolve()
    data = None
    try:
        data = preflight(base_config, resume=True, source=source).data
    except ConfigError as exc:
        issues.extend(exc.issues)

    metric, mode = tune_cfg.metric, tune_cfg.mode
    evals = 1
    if data is not None:
        if not data.evals:
            issues.append(
                ConfigIssue(location="data.eval", message="a sweep scores trials on an eval set; add one to data.eval")
            )
        else:
            if metric == "auto":
                metric, auto_mode = best_metric_name(base_config, data)
                metric = metric or ""
            names = [e.name for e in data.evals]
            keys = _METRIC_KEYS[config.model.task]
            eval_name, _, key = metric.rpartition("/")
            if eval_name not in names or key not in keys:
                issues.append(
                    ConfigIssue(
                        location="tune.metric",
                        message=f"{metric!r} is not a reported metric",
                        hint=f"use '<eval set>/<metric>' with an eval set of {names} and a metric of {list(keys)}",
                    )
                )
        if not issues:
            evals = _evals_per_trial(base, space, len(data.train))
    if mode == "auto":
        mode = "min" if metric.endswith(("loss", "perplexity")) else "max"

    if (
        tune_cfg.scheduler != "none"
        and base_config.training.eval_every_steps is None
        and "training.eval_every_steps" not in space
    ):
        issues.append(
            ConfigIssue(
                location="training.eval_every_steps",
                message=f"scheduler {tune_cfg.scheduler} compares trials at every eval, but trials evaluate only "
                "at the end",
                hint="set training.eval_every_steps (or tune.scheduler: none)",
            )
        )
    if tune_cfg.scheduler == "asha" and not issues:
        max_t = tune_cfg.asha.max_t or evals
        if tune_cfg.asha.grace_period > max_t:
            issues.append(
                ConfigIssue(
                    location="tune.asha.grace_period",
                    message=f"{tune_cfg.asha.grace_period} eval intervals is more than a trial runs ({max_t})",
                    hint="lower tune.asha.grace_period or evaluate more often (training.eval_every_steps)",
                )
            )
    limit = 100 - 1 - _TRIAL_ID_LENGTH
    if len(config.name) > limit:
        issues.append(ConfigIssue(location="name", message=f"a sweep name has at most {limit} characters"))
    if not resume and (sweep_dir / TUNE_DIR).exists():
        issues.append(
            ConfigIssue(
                location="name",
                message=f"a sweep named {config.name!r} already ran in {sweep_dir}",
                hint=f"continue it with: orchestrator sweep --resume {sweep_dir} (or choose another name)",
            )
        )
    if issues:
        raise ConfigError(issues, source=source)
    return SweepPlan(
        config=config,
        space=space,
        metric=metric,
        mode=mode,
        sweep_dir=sweep_dir,
        base=base,
        evals_per_trial=evals,
    )


def _base_job(config: JobConfig) -> dict[str, Any]:
    """The job as plain data without its tune section; paths absolute (trials run in other folders)."""
    data = config.to_dict()
    data.pop("tune", None)
    for key, value in config.path_fields().items():
        set_dotted(data, key, str(Path(value).expanduser().resolve()))
    return data


def _evals_per_trial(base: dict[str, Any], space: dict[str, Distribution], n_train: int) -> int:
    """Eval intervals of the longest trial, over the values of the searched budget fields."""
    from orchestrator.budget import StepBudget

    paths = [p for p in space if p in _BUDGET_FIELDS]
    longest = 1
    for values in itertools.islice(itertools.product(*(space[p].candidates() for p in paths)), 512):
        try:
            job = config_from_dict(base, list(zip(paths, values)))
            total = StepBudget.for_job(job, n_train, job.scaling.num_workers).total_steps
        except (ConfigError, TrainingError):
            continue
        every = job.training.eval_every_steps or total
        longest = max(longest, math.ceil(total / every))
    return longest


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def run_sweep(
    config: JobConfig, *, address: str | None = None, source: str | None = None, verbose: bool = True
) -> SweepResult:
    """Run a sweep end to end on a Ray cluster (a local one is started if none is given).

    Args:
        config: a validated job with a tune section.
        address: Ray address; default RAY_ADDRESS or a new local cluster.
        source: the config file name, for error messages.
        verbose: print a line per trial event (start, eval, stop, error).

    Raises:
        ConfigError: the sweep cannot run as configured (nothing was started).
        OrchestratorError: the cluster cannot hold one trial.
    """
    plan = plan_sweep(config, source=source)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    saved = {**plan.base, "tune": config.tune.model_dump(mode="json") if config.tune else None}
    (plan.sweep_dir / SWEEP_CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    return _run(plan, address=address, restore=False, verbose=verbose)


def resume_sweep(sweep_dir: str | Path, *, address: str | None = None, verbose: bool = True) -> SweepResult:
    """Continue a sweep whose driver died: finished trials are kept, unfinished ones continue from their
    latest checkpoint (Tuner.restore)."""
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    saved = sweep_dir / SWEEP_CONFIG_FILE
    if not saved.is_file() or not (sweep_dir / TUNE_DIR).is_dir():
        raise OrchestratorError(f"{sweep_dir} is not a sweep folder (no {SWEEP_CONFIG_FILE} or {TUNE_DIR}/ in it)")
    config = config_from_dict(yaml.safe_load(saved.read_text()), source=str(saved))
    plan = plan_sweep(config, resume=True, source=str(saved))
    return _run(plan, address=address, restore=True, verbose=verbose)


def _run(plan: SweepPlan, *, address: str | None, restore: bool, verbose: bool) -> SweepResult:
    from ray import tune

    from orchestrator.cluster.launcher import ensure_ray
    from orchestrator.cluster.preflight import check_cluster_fits

    ensure_ray(address)
    use_gpu = check_cluster_fits(config_from_dict(plan.base))
    concurrency = trial_concurrency(plan, use_gpu=use_gpu)
    trial_plan = TrialPlan(
        base=plan.base,
        sweep_name=plan.name,
        trials_dir=str(plan.sweep_dir / TRIALS_DIR),
        metric=plan.metric,
        mode=plan.mode,
        use_gpu=use_gpu,
        checkpoints_to_tune=plan.tune.scheduler == "pbt",
    )
    trainable = tune.with_resources(
        trial_trainable(trial_plan),
        # The trial driver only waits on its Train run: it reserves memory, not a CPU; the workers'
        # CPUs/GPUs are reserved by the run's own placement group, and `concurrency` keeps every running
        # trial's workers within the cluster, so no trial waits on another's workers.
        tune.PlacementGroupFactory([{"memory": plan.tune.driver_memory_mb * 1024 * 1024}]),
    )
    _log_event(plan.sweep_dir, {"event": "sweep_start", "time": time.time(), "restore": restore})
    if restore:
        tuner = tune.Tuner.restore(
            str(plan.sweep_dir / TUNE_DIR),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        tuner = _new_tuner(plan, trainable, concurrency, verbose=verbose)
    grid = tuner.fit()
    trials = collect_trials(plan, grid)
    return write_results(plan, trials)


def trial_concurrency(plan: SweepPlan, *, use_gpu: bool) -> int:
    """How many trials may run at once: what the user allows, and never more than the cluster holds whole
    (all workers of every running trial, plus each trial driver's memory).

    Raises:
        OrchestratorError: not even one trial fits.
    """
    import ray

    s = plan.config.scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker, "memory": plan.tune.driver_memory_mb * 1024 * 1024}
    if use_gpu:
        need["GPU"] = s.num_workers * s.gpus_per_worker
    for name, amount in s.resources_per_worker.items():
        need[name] = need.get(name, 0.0) + s.num_workers * amount
    total = ray.cluster_resources()
    fits = min(int(total.get(name, 0.0) // amount + 1e-9) for name, amount in need.items() if amount > 0)
    if fits < 1:
        raise OrchestratorError(
            f"one trial needs {need} but the cluster has {total}; lower scaling.* or tune.driver_memory_mb"
        )
    return min(fits, plan.tune.max_concurrent_trials or fits)


def _trial_dirname(trial: Any) -> str:
    return str(trial.trial_id)


def _new_tuner(plan: SweepPlan, trainable: Any, concurrency: int, *, verbose: bool) -> Any:
    from ray import tune

    t = plan.tune
    return tune.Tuner(
        trainable,
        param_space={path: dist.to_tune() for path, dist in plan.space.items()},
        tune_config=tune.TuneConfig(
            metric=plan.metric,
            mode=plan.mode,
            scheduler=_scheduler(plan),
            search_alg=_searcher(plan, concurrency),
            num_samples=t.num_samples,
            max_concurrent_trials=concurrency,
            time_budget_s=t.time_budget_s,
            trial_name_creator=_trial_dirname,
            trial_dirname_creator=_trial_dirname,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=str(plan.sweep_dir),
            stop=MetricStopper(
                metric=plan.metric,
                mode=plan.mode,
                stop_on_nan=t.stop_on_nan,
                plateau=t.plateau.model_dump() if t.plateau else None,
                sweep_dir=str(plan.sweep_dir),
            ),
            callbacks=[SweepLog(str(plan.sweep_dir), plan.metric, verbose=verbose)],
            failure_config=tune.FailureConfig(max_failures=0),  # a failing trial is recorded; the sweep goes on
            verbose=0,
        ),
    )


def _scheduler(plan: SweepPlan) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, PopulationBasedTraining

    t = plan.tune
    # One Tune result per eval interval (the trial forwards only results that hold the metric).
    if t.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=t.asha.max_t or plan.evals_per_trial,
            grace_period=t.asha.grace_period,
            reduction_factor=t.asha.reduction_factor,
        )
    if t.scheduler == "median":
        return MedianStoppingRule(
            time_attr="training_iteration",
            grace_period=t.median.grace_period,
            min_samples_required=t.median.min_samples_required,
        )
    if t.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=t.pbt.perturbation_interval,
            hyperparam_mutations={path: dist.to_tune() for path, dist in plan.space.items()},
            quantile_fraction=t.pbt.quantile_fraction,
            resample_probability=t.pbt.resample_probability,
        )
    return FIFOScheduler()


def _searcher(plan: SweepPlan, concurrency: int) -> Any:
    """The search algorithm, limited to ``concurrency`` running trials. Tune applies max_concurrent_trials only
    to a ``Searcher`` (Optuna) and to the generator it builds itself; a seeded BasicVariantGenerator passed in is
    not limited unless told, and would start every trial at once (their drivers then wait on each other's
    workers)."""
    t = plan.tune
    if t.searcher == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # pragma: no cover - optuna is an optional extra
            raise OrchestratorError("searcher optuna needs Optuna: pip install 'orchestrator[tune]'") from exc
        try:
            import optuna  # noqa: F401
        except ImportError as exc:
            raise OrchestratorError("searcher optuna needs Optuna: pip install 'orchestrator[tune]'") from exc
        return OptunaSearch(seed=t.seed)
    if t.seed is not None:
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)
    return None


# --------------------------------------------------------------------------------------------------
# Driver-side Tune plug-ins: early stopping on NaN / plateau, and an event log of the sweep
# --------------------------------------------------------------------------------------------------


def _log_event(sweep_dir: str | Path, event: dict[str, Any]) -> None:
    with open(Path(sweep_dir) / EVENTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=str) + "\n")


def _read_events(sweep_dir: Path) -> list[dict[str, Any]]:
    path = sweep_dir / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _finite(value: Any) -> bool:
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
        if self.metric in result and self.stop_on_nan and not _finite(value):
            reason = "nan"
        elif self._plateau is not None and _finite(value) and self._plateau(trial_id, result):
            reason = "plateau"
        if reason is None:
            return False
        _log_event(self.sweep_dir, {"event": "stop", "trial_id": trial_id, "reason": reason, "time": time.time()})
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
        _log_event(self.sweep_dir, {"event": event, "trial_id": trial.trial_id, "time": time.time(), **extra})
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


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def collect_trials(plan: SweepPlan, grid: Any) -> list[TrialRecord]:
    """One record per trial of a finished (or restored) Tune experiment."""
    events = _read_events(plan.sweep_dir)
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
        values = [v for _, v in history if _finite(v)]
        best = (max(values) if plan.mode == "max" else min(values)) if values else None
        run_dir = plan.sweep_dir / TRIALS_DIR / trial_job_name(plan.name, trial_id)
        trained = [r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
        steps = max(trained) if trained else (int(last["step"]) if _finite(last.get("step")) else None)
        record = TrialRecord(
            trial_id=trial_id,
            status="completed",
            params=dict(result.config or started.get(trial_id, {})),
            best_metric=best,
            last_metric=history[-1][1] if history else None,
            steps=steps,
            run_dir=str(run_dir),
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


def write_results(plan: SweepPlan, trials: list[TrialRecord]) -> SweepResult:
    """Save the table (CSV, JSON) and plot, export the best model and log the sweep to W&B."""
    best = best_trial(trials, plan.mode)
    best_model = None
    if best is not None and plan.tune.export_best and best.run_dir:
        source = Path(best.run_dir) / "best"
        if not source.is_dir():
            source = Path(best.run_dir) / "final"
        if source.is_dir():
            best_model = plan.sweep_dir / BEST_MODEL_DIR
            if best_model.exists():
                shutil.rmtree(best_model)
            shutil.copytree(source, best_model)
    csv_path, json_path = _write_table(plan, trials, best, best_model)
    plot = plot_learning_curves(trials, plan.metric, best.trial_id if best else None, plan.sweep_dir)
    wandb_path = log_sweep_to_wandb(plan, trials, best, plot)
    return SweepResult(
        sweep_dir=plan.sweep_dir,
        metric=plan.metric,
        mode=plan.mode,
        trials=trials,
        best=best,
        best_model=best_model,
        results_csv=csv_path,
        results_json=json_path,
        plot=plot,
        wandb=wandb_path,
    )


def _write_table(
    plan: SweepPlan, trials: list[TrialRecord], best: TrialRecord | None, best_model: Path | None
) -> tuple[Path, Path]:
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
    return csv_path, json_path


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


def log_sweep_to_wandb(
    plan: SweepPlan, trials: list[TrialRecord], best: TrialRecord | None, plot: Path | None
) -> str | None:
    """Mark each trial's W&B run with how it ended, and log a summary run for the sweep (same group).

    Trials stream their own runs from rank 0 while they train; a stopped trial's workers are ended without
    warning, so its run is resumed here (same id) to record the status.
    """
    from orchestrator.tracking import WANDB_ID_FILE, resolve_wandb_mode

    wandb_cfg = plan.config.tracking.wandb
    mode = resolve_wandb_mode(wandb_cfg.mode)
    if mode == "disabled":
        return None
    import wandb

    settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
    common = {"project": wandb_cfg.project, "entity": wandb_cfg.entity, "group": plan.name, "mode": mode}
    for t in trials:
        id_file = Path(t.run_dir or "") / WANDB_ID_FILE
        if t.status == "completed" or not id_file.is_file():
            continue
        if t.status == "early_stopped" and ended_gracefully(t.run_dir or ""):
            continue  # rank 0 closed the run itself, marked early-stopped
        run = wandb.init(
            **common,
            job_type="trial",
            name=t.trial_id,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=t.run_dir,
            settings=settings,
        )
        run.tags = tuple(dict.fromkeys([*(run.tags or ()), t.status.replace("_", "-")]))
        run.summary.update(
            {"sweep/status": t.status, "sweep/stop_reason": t.stop_reason or "", "sweep/steps": t.steps or 0}
        )
        run.finish(exit_code=1 if t.status == "error" else 0)

    id_file = plan.sweep_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    run = wandb.init(
        **common,
        job_type="sweep",
        name=f"{plan.name}-summary",
        id=run_id,
        resume="allow",
        tags=wandb_cfg.tags,
        config={"metric": plan.metric, "mode": plan.mode, "tune": plan.tune.model_dump(mode="json")},
        dir=str(plan.sweep_dir),
        settings=settings,
    )
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
    path = str(plan.sweep_dir / "wandb") if mode == "offline" else run.url
    run.finish()
    return path
