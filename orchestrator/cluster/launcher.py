"""Running a job on a Ray cluster: checks first, then a Ray Train ``TorchTrainer`` of DeepSpeed workers.

``preflight`` does every check that can be done without the cluster (config, model, data, output dir)
and reports all failures together; only then is Ray started and are workers reserved.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig
from orchestrator.data.sources import PreparedData, prepare_data
from orchestrator.errors import ConfigError, ConfigIssue, DataError, ModelError, OrchestratorError
from orchestrator.methods import get_method
from orchestrator.models.loading import resolve_model_path
from orchestrator.tracking import read_metrics

logger = logging.getLogger(__name__)


@dataclass
class Preflight:
    config: JobConfig
    model_path: str
    data: PreparedData
    run_dir: Path
    storage_path: Path


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    best_metric: float | None
    final_model: Path | None
    best_model: Path | None
    checkpoint_path: str | None
    wandb: str | None
    data: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None  # the registry id of the exported model (output.registry)


def preflight(config: JobConfig, *, resume: bool = False, source: str | None = None) -> Preflight:
    """Check everything that can be checked before taking cluster resources; report all problems at once.

    Raises:
        ConfigError: listing every problem (missing model, bad data rows, unwritable output, ...).
    """
    issues: list[ConfigIssue] = []
    if config.model.trust_remote_code:
        logger.warning(
            "model.trust_remote_code is ON: Python code shipped with %s%s will run here and in every worker; "
            "set it only for a model source you trust",
            config.model.path,
            f" and {config.distill.teacher}" if config.distill is not None else "",
        )
    model_path = ""
    try:
        model_path = resolve_model_path(config.model.path)
    except ModelError as exc:
        issues.append(ConfigIssue(location="model.path", message=str(exc).removeprefix("model.path: ")))
    if model_path:
        method_preflight = getattr(get_method(config.method), "preflight", None)
        if method_preflight is not None:
            issues.extend(method_preflight(config, model_path))
    data = None
    try:
        data = prepare_data(config.data, config.model.task)
    except DataError as exc:
        issues.append(ConfigIssue(location="data", message=str(exc)))
    if config.deepspeed.config_file and not Path(config.deepspeed.config_file).is_file():
        issues.append(
            ConfigIssue(location="deepspeed.config_file", message=f"{config.deepspeed.config_file} not found")
        )
    run_dir = (Path(config.output.dir).expanduser() / config.name).resolve()
    storage = Path(config.output.storage_path).expanduser().resolve() if config.output.storage_path else run_dir / "ray"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        issues.append(
            ConfigIssue(
                location="output.dir",
                message=f"cannot write to {run_dir} ({exc.strerror or exc})",
                hint="choose a writable output.dir",
            )
        )
    existing = storage / config.name
    if not resume and existing.exists() and any(p.is_dir() for p in existing.glob("checkpoint_*")):
        issues.append(
            ConfigIssue(
                location="name",
                message=f"a run named {config.name!r} already has checkpoints in {existing}",
                hint="pass --resume to continue it, or choose another name (nothing is overwritten)",
            )
        )
    if issues:
        raise ConfigError(issues, source=source)
    assert data is not None
    return Preflight(config=config, model_path=model_path, data=data, run_dir=run_dir, storage_path=storage)


def _ensure_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers and the local head get the same environment; W&B reads WANDB_API_KEY from it.
    ray.init(address=address)


def check_cluster_fits(config: JobConfig) -> bool:
    """Decide use_gpu and fail fast when the cluster can never hold the requested workers.

    Returns:
        Whether workers use GPUs.
    """
    import ray

    total = ray.cluster_resources()
    s = config.scaling
    gpus = total.get("GPU", 0.0)
    use_gpu = gpus > 0 if s.use_gpu == "auto" else bool(s.use_gpu)
    problems = []
    need_cpu = s.num_workers * s.cpus_per_worker
    if need_cpu > total.get("CPU", 0.0):
        problems.append(
            f"scaling: {s.num_workers} workers x {s.cpus_per_worker:g} CPU = {need_cpu:g} CPUs, but the cluster has "
            f"{total.get('CPU', 0):g}; lower scaling.num_workers or scaling.cpus_per_worker"
        )
    if use_gpu and s.num_workers * s.gpus_per_worker > gpus:
        problems.append(
            f"scaling: {s.num_workers} workers x {s.gpus_per_worker:g} GPU, but the cluster has {gpus:g} GPUs; "
            "lower scaling.num_workers or set scaling.use_gpu: false"
        )
    for name, amount in s.resources_per_worker.items():
        if s.num_workers * amount > total.get(name, 0.0):
            problems.append(f"scaling.resources_per_worker.{name}: the cluster has {total.get(name, 0):g} in all")
    if config.model.liger_kernel and not use_gpu:
        problems.append(
            "model.liger_kernel: Liger's Triton kernels run on GPU workers only, and this job's workers have none; "
            "set model.liger_kernel: false (or scaling.use_gpu: true on a cluster with GPUs)"
        )
    if problems:
        raise OrchestratorError("the job can never be scheduled on this cluster:\n  - " + "\n  - ".join(problems))
    return use_gpu


def build_trainer(
    checked: Preflight,
    *,
    use_gpu: bool,
    callbacks: list[Any] | None = None,
    run_name: str | None = None,
    init_checkpoint: str | None = None,
    stop_signal: Any = None,
) -> Any:
    """The Ray Train ``TorchTrainer`` of a checked job.

    Args:
        checked: the job as returned by :func:`preflight`.
        use_gpu: whether workers take GPUs (see :func:`check_cluster_fits`).
        callbacks: Ray Train callbacks for the run (sweeps pass the ones that report to Ray Tune).
        run_name: the Ray Train run name in storage (default: the job name; a run of that name resumes
            from its latest checkpoint).
        init_checkpoint: a Train checkpoint folder to start from when the run has none of its own (a PBT
            trial continuing another trial's model with its own hyperparameters).
        stop_signal: an actor handle whose ``is_set()`` tells the workers to stop after the current step
            (a sweep trial stopped by Ray Tune ends cleanly instead of being killed).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.budget import best_metric_name
    from orchestrator.train.recipe import train_loop_per_worker

    config = checked.config
    s = config.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    payload = {
        "config": config.to_dict(),
        "data": checked.data,
        "model_path": checked.model_path,
        "run_dir": str(checked.run_dir),
        "init_checkpoint": init_checkpoint,
        "stop_signal": stop_signal,
        # Fault injection for drills and tests: the run fails once after the first checkpoint at or
        # past this step (it does not fail again once it has resumed from a checkpoint).
        "fault_at_step": int(os.environ["ORCHESTRATOR_FAULT_AT_STEP"])
        if os.environ.get("ORCHESTRATOR_FAULT_AT_STEP")
        else None,
        # Where it fails: "after_checkpoint" (default), or "checkpoint_upload": rank 0 dies after copying part of
        # its checkpoint files to storage, as a node lost while writing a checkpoint would.
        "fault_point": os.environ.get("ORCHESTRATOR_FAULT_POINT", "after_checkpoint"),
        # data.packing's tokenized-block cache: the driver's ORCHESTRATOR_CACHE if set (workers of a running
        # cluster do not see the driver's environment), else each node's default.
        "cache_dir": os.environ.get("ORCHESTRATOR_CACHE"),
    }
    checkpoint_config = CheckpointConfig(num_to_keep=config.output.keep_checkpoints)
    if config.output.keep_checkpoints_by == "best":
        # Ray Train keeps the N best by this metric (every checkpoint is reported with an eval, see the config
        # check) and always the latest one, which is what a resume continues from.
        metric, mode = best_metric_name(config, checked.data)
        checkpoint_config = CheckpointConfig(
            num_to_keep=config.output.keep_checkpoints, checkpoint_score_attribute=metric, checkpoint_score_order=mode
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name or config.name,
            storage_path=str(checked.storage_path),
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=checkpoint_config,
            callbacks=callbacks,
        ),
    )


def run_training(
    config: JobConfig,
    *,
    resume: bool = False,
    address: str | None = None,
    source: str | None = None,
    progress: Any = None,
) -> TrainResult:
    """Run a job end to end on a Ray cluster (a local one is started if none is given).

    Args:
        config: the validated job.
        resume: continue a run whose checkpoints exist in storage (after a killed driver).
        address: Ray address; default RAY_ADDRESS or a new local cluster.
        source: the config file name, for error messages.
        progress: called with the run's metrics records while training runs (for progress bars).
    """
    checked = preflight(config, resume=resume, source=source)
    _ensure_ray(address)
    use_gpu = check_cluster_fits(config)
    trainer = build_trainer(checked, use_gpu=use_gpu)

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # surfaced in the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="orchestrator-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=1.0)
        if progress is not None:
            progress(read_metrics(checked.run_dir))
    if progress is not None:
        progress(read_metrics(checked.run_dir))
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    records = read_metrics(checked.run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    final_metrics = dict(result.metrics or (evals[-1] if evals else {}))
    wandb_path = None
    wandb_dirs = sorted((checked.run_dir / "wandb").glob("*run-*"), key=lambda p: p.stat().st_mtime)
    if wandb_dirs:
        wandb_path = str(wandb_dirs[-1])
    final_dir = checked.run_dir / "final"
    best_dir = checked.run_dir / "best"
    train_result = TrainResult(
        run_dir=checked.run_dir,
        metrics=final_metrics,
        best_metric=final_metrics.get("best_metric"),
        final_model=final_dir if final_dir.exists() else None,
        best_model=best_dir if best_dir.exists() else None,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        wandb=wandb_path,
        data=checked.data.summary(),
    )
    # Model registry (issue #6): every job that exports a model registers it as a candidate.
    if config.output.registry:
        from orchestrator.lifecycle.registry import register_run

        record = register_run(config, train_result, checked)
        train_result.model_id = record.id if record is not None else None
    return train_result
