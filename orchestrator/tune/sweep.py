"""Hyperparameter sweeps: Ray Tune over whole jobs (each trial a multi-worker DeepSpeed run), streamed to W&B.

The flow, top to bottom:

1. :func:`orchestrator.tune.sweep_plan.plan_sweep` checks everything that can be checked without the cluster
   (search space against the job, metric, model and data, budgets) and reports every problem at once.
2. :func:`run_sweep` (or :func:`resume_sweep` after the driver died) starts Ray, sizes trial concurrency so
   that running trials always get all their workers, and runs a ``ray.tune.Tuner`` whose trainable is
   :func:`orchestrator.tune.trial.run_trial` (one ``TorchTrainer`` per trial; see that module for how a
   stopped trial's workers and placement group are freed), with the stopper and event log of
   :mod:`orchestrator.tune.sweep_events`.
3. :func:`write_results` gathers the results into a :class:`~orchestrator.tune.sweep_results.SweepResult`: a
   CSV/JSON table of every trial (params, metric, steps, status), a PNG of every learning curve, the best
   trial's model as an HF folder (:mod:`orchestrator.tune.sweep_results`), and W&B (one run per trial in the
   sweep's group, early-stopped ones marked, plus a summary run; :mod:`orchestrator.tune.sweep_wandb`).

The sweep dir's layout is described in :mod:`orchestrator.tune.sweep_plan`; it may be on a bucket
(``output.dir: s3://...``): Tune's experiment state, every trial's run folder and the results are then there, and
:func:`resume_sweep` takes the sweep's URI.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

import orchestrator.storage as storage
from orchestrator.cluster.output_paths import ray_storage
from orchestrator.config import JobConfig, config_from_dict
from orchestrator.errors import OrchestratorError
from orchestrator.run_outputs import SCRATCH_ENV
from orchestrator.tune.sweep_events import MetricStopper, SweepLog, log_event
from orchestrator.tune.sweep_plan import (
    SWEEP_CONFIG_FILE,
    TRIALS_DIR,
    TUNE_DIR,
    SweepPlan,
    plan_sweep,
    trial_concurrency,
)
from orchestrator.tune.sweep_results import (
    SweepResult,
    TrialRecord,
    best_trial,
    collect_trials,
    export_best_model,
    plot_learning_curves,
    write_table,
)
from orchestrator.tune.sweep_wandb import log_sweep_to_wandb
from orchestrator.tune.trial import TrialPlan, trial_trainable


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
    saved = {**plan.base, "tune": config.tune.model_dump(mode="json") if config.tune else None}
    storage.write_text(plan.location(SWEEP_CONFIG_FILE), yaml.safe_dump(saved, sort_keys=False))
    return _run(plan, address=address, restore=False, verbose=verbose)


def resume_sweep(sweep_dir: str | Path, *, address: str | None = None, verbose: bool = True) -> SweepResult:
    """Continue a sweep whose driver died: finished trials are kept, unfinished ones continue from their
    latest checkpoint (Tuner.restore).

    Args:
        sweep_dir: the sweep folder, a local path or a URI (``s3://bucket/sweeps/name``); on a bucket nothing
            local is needed (the driver's scratch may be gone).

    Raises:
        OrchestratorError: the folder holds no sweep (a StorageError naming the URI when it cannot be read).
    """
    folder = storage.normalize(sweep_dir)  # a local path made absolute, a URI canonical
    saved = storage.join(folder, SWEEP_CONFIG_FILE)
    if not storage.is_file(saved) or not storage.is_dir(storage.join(folder, TUNE_DIR)):
        raise OrchestratorError(
            f"{folder} is not a sweep folder (no {SWEEP_CONFIG_FILE} or {TUNE_DIR}/ in it); give the folder "
            "`orchestrator sweep` printed (<output.dir>/<sweep name>)"
        )
    config = config_from_dict(yaml.safe_load(storage.read_text(saved)), source=saved)
    plan = plan_sweep(config, resume=True, source=saved)
    return _run(plan, address=address, restore=True, verbose=verbose)


def _run(plan: SweepPlan, *, address: str | None, restore: bool, verbose: bool) -> SweepResult:
    """Start Ray, run the Tune experiment (or continue it) and write its results."""
    from orchestrator.cluster.launcher import ensure_ray
    from orchestrator.cluster.preflight import check_cluster_fits

    ensure_ray(address)
    use_gpu = check_cluster_fits(config_from_dict(plan.base))
    concurrency = trial_concurrency(plan, use_gpu=use_gpu)
    trainable = _trainable(plan, use_gpu=use_gpu)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)  # on a bucket: the scratch (a resume may find it gone)
    log_event(plan.folder, {"event": "sweep_start", "time": time.time(), "restore": restore})
    if restore:
        tuner = _restored_tuner(plan, trainable)
    else:
        tuner = _new_tuner(plan, trainable, concurrency, verbose=verbose)
    grid = tuner.fit()
    trials = collect_trials(plan, grid)
    return write_results(plan, trials)


def _trainable(plan: SweepPlan, *, use_gpu: bool) -> Any:
    """The Tune trainable of the sweep's trials, with the resources each trial driver reserves."""
    from ray import tune

    trial_plan = TrialPlan(
        base=plan.base,
        sweep_name=plan.name,
        trials_dir=plan.location(TRIALS_DIR),
        metric=plan.metric,
        mode=plan.mode,
        use_gpu=use_gpu,
        checkpoints_to_tune=plan.tune.scheduler == "pbt",
        scratch_root=os.environ.get(SCRATCH_ENV),  # trial actors may not see the driver's environment
    )
    return tune.with_resources(
        trial_trainable(trial_plan),
        # The trial driver only waits on its Train run: it reserves memory, not a CPU; the workers'
        # CPUs/GPUs are reserved by the run's own placement group, and `concurrency` keeps every running
        # trial's workers within the cluster, so no trial waits on another's workers.
        tune.PlacementGroupFactory([{"memory": plan.tune.driver_memory_mb * 1024 * 1024}]),
    )


def _restored_tuner(plan: SweepPlan, trainable: Any) -> Any:
    """The sweep's Tune experiment as the dead driver left it: finished and failed trials kept, unfinished ones
    continued from their latest checkpoint."""
    from ray import tune

    experiment = ray_storage(plan.location(TUNE_DIR))  # on a bucket: its path there and the pyarrow filesystem
    return tune.Tuner.restore(
        experiment["storage_path"],
        storage_filesystem=experiment.get("storage_filesystem"),
        trainable=trainable,
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )


def write_results(plan: SweepPlan, trials: list[TrialRecord]) -> SweepResult:
    """Save the table (CSV, JSON) and plot, export the best model and log the sweep to W&B (on a bucket, each
    written in the scratch and published to the sweep folder)."""
    best = best_trial(trials, plan.mode)
    best_model = export_best_model(plan, best)
    csv_path, json_path = write_table(plan, trials, best, best_model)
    plot = plot_learning_curves(trials, plan.metric, best.trial_id if best else None, plan.sweep_dir)
    wandb_path = log_sweep_to_wandb(plan, trials, best, plot)
    return SweepResult(
        sweep_dir=plan.folder if plan.on_bucket else plan.sweep_dir,
        metric=plan.metric,
        mode=plan.mode,
        trials=trials,
        best=best,
        best_model=best_model,
        results_csv=csv_path,
        results_json=json_path,
        plot=plan.publish(plot) if plot is not None else None,
        wandb=wandb_path,
    )


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
            **ray_storage(plan.folder),  # on a bucket: Tune's experiment state there, through orchestrator.storage
            stop=MetricStopper(
                metric=plan.metric,
                mode=plan.mode,
                stop_on_nan=t.stop_on_nan,
                plateau=t.plateau.model_dump() if t.plateau else None,
                sweep_dir=plan.folder,
            ),
            callbacks=[SweepLog(plan.folder, plan.metric, verbose=verbose)],
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
