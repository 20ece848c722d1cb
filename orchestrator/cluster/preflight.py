"""Checks before a job takes cluster resources: config, model, data and output folder (all problems reported
together), then whether the cluster can ever hold the requested workers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import JobConfig
from orchestrator.data.sources import PreparedData, prepare_data
from orchestrator.errors import ConfigError, ConfigIssue, DataError, ModelError, OrchestratorError
from orchestrator.methods import get_method
from orchestrator.models.loading import resolve_model_path

logger = logging.getLogger(__name__)


@dataclass
class Preflight:
    config: JobConfig
    model_path: str
    data: PreparedData
    run_dir: Path
    storage_path: Path


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

