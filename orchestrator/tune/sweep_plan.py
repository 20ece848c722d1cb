"""Planning a sweep: everything that can be checked without the cluster, and how many trials fit at once.

:func:`plan_sweep` checks the search space against the job, the metric, model and data, the budgets and the
sweep's name, reports every problem at once, and returns a :class:`SweepPlan`. :func:`trial_concurrency` sizes
trial concurrency so that running trials always get all their workers.

Layout of ``<output.dir>/<name>/`` (the sweep folder: a local path, or a URI such as ``s3://bucket/sweeps/x``)::

    sweep_config.yaml   the validated job, paths absolute (``--resume`` reads it)
    tune/               the Ray Tune experiment (Tuner.restore)
    trials/<name>-<trial id>/   each trial's run folder (metrics.jsonl, wandb/, best/, ray/ checkpoints)
    results.csv, results.json, learning_curves.png, best_model/, trial_events.jsonl

On a bucket, the folder there is the truth, as for a train run's (``orchestrator.run_outputs``): Tune keeps its
experiment state there through the pyarrow filesystem of ``orchestrator.storage``, each trial is a bucket run,
and the driver writes the sweep's own files in a local scratch folder (:attr:`SweepPlan.sweep_dir`) and
publishes them (:meth:`SweepPlan.publish`); the scratch may be lost, ``--resume <URI>`` needs only the bucket.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orchestrator.storage as storage
from orchestrator.config import JobConfig, TuneSection, config_from_dict, set_dotted
from orchestrator.config.search_space import Distribution, check_search_space, parse_search_space
from orchestrator.errors import ConfigError, ConfigIssue, OrchestratorError, TrainingError
from orchestrator.run_outputs import publish_file, publish_folder, run_folder, scratch_dir

if TYPE_CHECKING:
    from orchestrator.data.sources import PreparedData

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
    sweep_dir: Path  # where the driver writes the sweep's files: the sweep folder, or its scratch on a bucket
    base: dict[str, Any]  # the job without its tune section, paths absolute
    evals_per_trial: int  # eval intervals of the longest trial (ASHA's max_t unless set)
    sweep_folder: str = ""  # <output.dir>/<name>: an absolute local path or a URI (default: sweep_dir)

    @property
    def on_bucket(self) -> bool:
        return storage.is_uri(self.folder)

    @property
    def folder(self) -> str:
        """The sweep folder: an absolute local path or a URI."""
        return self.sweep_folder or str(self.sweep_dir)

    def location(self, *parts: str) -> str:
        """A path in the sweep folder (a URI on a bucket)."""
        return storage.join(self.folder, *parts)

    def publish(self, local: Path) -> Path | str:
        """Where a file or folder the driver wrote in :attr:`sweep_dir` is read from: the local path itself, or,
        on a bucket, its copy there (uploaded now; a folder marker-last, so a reader never sees a part of it).

        Raises:
            StorageError: naming the destination URI.
        """
        if not self.on_bucket:
            return local
        destination = self.location(local.relative_to(self.sweep_dir).as_posix())
        if local.is_dir():
            publish_folder(local, destination)
        else:
            publish_file(local, destination)
        return destination

    @property
    def tune(self) -> TuneSection:
        assert self.config.tune is not None
        return self.config.tune

    @property
    def name(self) -> str:
        return self.config.name


def plan_sweep(config: JobConfig, *, resume: bool = False, source: str | None = None) -> SweepPlan:
    """Check a sweep without taking cluster resources.

    Raises:
        ConfigError: listing every problem (search space, metric, model, data, budgets, an existing sweep).
    """
    tune_cfg = _tune_section(config, source)
    base = _base_job(config)
    space = parse_search_space(tune_cfg.search_space)
    issues = check_search_space(base, space)
    base_config = config_from_dict(base)
    folder = run_folder(config.output.dir, config.name)  # a URI when output.dir is one
    data = _check_data(base_config, source, issues)
    metric = tune_cfg.metric
    evals = 1
    if data is not None:
        metric = _check_metric(metric, config.model.task, base_config, data, issues)
        if not issues:
            evals = _evals_per_trial(base, space, len(data.train))
    mode = _resolve_mode(tune_cfg.mode, metric)
    _check_scheduler(tune_cfg, base_config, space, evals, issues)
    _check_name(config, folder, resume, issues)
    if issues:
        raise ConfigError(issues, source=source)
    return SweepPlan(
        config=config,
        space=space,
        metric=metric,
        mode=mode,
        sweep_dir=scratch_dir(folder),  # the folder itself when it is local
        base=base,
        evals_per_trial=evals,
        sweep_folder=folder,
    )


def _tune_section(config: JobConfig, source: str | None) -> TuneSection:
    """The job's tune section.

    Raises:
        ConfigError: the job has none, so there is nothing to sweep.
    """
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
    return config.tune


def _base_job(config: JobConfig) -> dict[str, Any]:
    """The job as plain data without its tune section; paths absolute (trials run in other folders)."""
    data = config.to_dict()
    data.pop("tune", None)
    for key, value in config.path_fields().items():
        if "://" not in value:  # URIs stay as they are
            set_dotted(data, key, str(Path(value).expanduser().resolve()))
    return data


def _check_data(base_config: JobConfig, source: str | None, issues: list[ConfigIssue]) -> PreparedData | None:
    """The job's model and data checked as ``orchestrator train`` would (the scanned data, or None with the
    problems added to ``issues``). Its output checks probe the sweep folder ``<output.dir>/<name>`` too: on a
    bucket a small write and delete, so a missing bucket, wrong credentials or an endpoint that does not answer
    is reported at ``output.dir`` before any resource is taken."""
    from orchestrator.cluster.preflight import preflight

    try:
        return preflight(base_config, resume=True, source=source).data
    except ConfigError as exc:
        issues.extend(exc.issues)
    return None


def _check_metric(metric: str, task: str, base_config: JobConfig, data: PreparedData, issues: list[ConfigIssue]) -> str:
    """The metric trials are scored on (``auto`` resolved as training would); a problem with it (no eval set,
    a metric that is not reported) is added to ``issues``."""
    from orchestrator.budget import best_metric_name

    if not data.evals:
        issues.append(
            ConfigIssue(location="data.eval", message="a sweep scores trials on an eval set; add one to data.eval")
        )
        return metric
    if metric == "auto":
        metric = best_metric_name(base_config, data)[0] or ""
    names = [e.name for e in data.evals]
    keys = _METRIC_KEYS[task]
    eval_name, _, key = metric.rpartition("/")
    if eval_name not in names or key not in keys:
        issues.append(
            ConfigIssue(
                location="tune.metric",
                message=f"{metric!r} is not a reported metric",
                hint=f"use '<eval set>/<metric>' with an eval set of {names} and a metric of {list(keys)}",
            )
        )
    return metric


def _resolve_mode(mode: str, metric: str) -> str:
    """``max`` or ``min``; ``auto`` minimises losses and perplexities and maximises everything else."""
    if mode == "auto":
        return "min" if metric.endswith(("loss", "perplexity")) else "max"
    return mode


def _check_scheduler(
    tune_cfg: TuneSection,
    base_config: JobConfig,
    space: dict[str, Distribution],
    evals: int,
    issues: list[ConfigIssue],
) -> None:
    """Add to ``issues`` what keeps the scheduler from comparing trials: no evals during a trial, or an ASHA
    grace period longer than a trial runs."""
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


def _check_name(config: JobConfig, sweep_folder: str, resume: bool, issues: list[ConfigIssue]) -> None:
    """Add to ``issues`` a sweep name too long for Tune's trial names, or one that already ran in the sweep
    folder, local or on a bucket (unless resuming)."""
    limit = 100 - 1 - _TRIAL_ID_LENGTH
    if len(config.name) > limit:
        issues.append(ConfigIssue(location="name", message=f"a sweep name has at most {limit} characters"))
    try:
        ran = not resume and storage.exists(storage.join(sweep_folder, TUNE_DIR))
    except storage.StorageError:
        ran = False  # an unreadable bucket: the output probe (_check_data's preflight) names the problem
    if ran:
        issues.append(
            ConfigIssue(
                location="name",
                message=f"a sweep named {config.name!r} already ran in {sweep_folder}",
                hint=f"continue it with: orchestrator sweep --resume {sweep_folder} (or choose another name)",
            )
        )


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
