"""A job's output locations, and preflight's checks of them before resources are taken.

``output.dir`` and ``output.storage_path`` are local paths or URIs (``orchestrator.storage``). The run folder
``<output.dir>/<name>`` holds the run's lock, metrics and exports; for a URI it is on the bucket and the driver
and workers write into a local scratch folder first (``orchestrator.run_outputs``). Ray Train's checkpoints go
to ``output.storage_path`` (default ``<run folder>/ray``), through the same pyarrow filesystem when a URI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.config import JobConfig
from orchestrator.errors import ConfigIssue
from orchestrator.run_outputs import run_folder, scratch_dir


def run_folder_of(config: JobConfig) -> str:
    """The run folder ``<output.dir>/<name>``: a URI, or an absolute local path."""
    return run_folder(config.output.dir, config.name)


def run_dir_of(config: JobConfig) -> Path:
    """The local folder the run writes into: the run folder itself, or its scratch when that is a URI."""
    return scratch_dir(run_folder_of(config))


def storage_path_of(config: JobConfig) -> str:
    """Where Ray Train keeps the run's checkpoints: ``output.storage_path``, default ``<run folder>/ray``."""
    value = config.output.storage_path
    if not value:
        return storage.join(run_folder_of(config), "ray")
    return storage.normalize(value) if storage.is_uri(value) else str(Path(value).expanduser().resolve())


def ray_storage(path: str) -> dict[str, Any]:
    """``RunConfig`` arguments for ``path``: a URI becomes the bucket path plus its pyarrow filesystem (built from
    the standard environment, with this layer's timeouts), so Ray Train and the orchestrator reach the bucket
    through one client configuration; a local path goes as it is."""
    if not storage.is_uri(path):
        return {"storage_path": path}
    fs, inner = storage.resolve(path)
    return {"storage_path": inner, "storage_filesystem": fs}


def check_outputs(config: JobConfig, *, resume: bool) -> list[ConfigIssue]:
    """Every output location writable (a bucket probed with a small write and delete: a missing bucket, wrong
    credentials or an unreachable endpoint named with the field), and no earlier run of the name to overwrite."""
    issues = []
    folder, checkpoints = run_folder_of(config), storage_path_of(config)
    for field, path in (("output.dir", folder), ("output.storage_path", checkpoints)):
        if field == "output.storage_path" and not config.output.storage_path:
            continue  # inside the run folder, probed already
        problem = _write_problem(path)
        if problem:
            issues.append(ConfigIssue(location=field, message=problem, hint=f"choose a writable {field}"))
    if storage.is_uri(folder):  # the scratch, where the driver's lock and the exports are staged
        problem = _write_problem(str(scratch_dir(folder)))
        if problem:
            issues.append(ConfigIssue(location="ORCHESTRATOR_SCRATCH (environment)", message=problem,
                                      hint="point ORCHESTRATOR_SCRATCH (or ORCHESTRATOR_CACHE) at a writable disk"))
    if issues or resume:
        return issues
    existing = storage.join(checkpoints, config.name)
    if _has_checkpoints(existing):
        issues.append(
            ConfigIssue(
                location="name",
                message=f"a run named {config.name!r} already has checkpoints in {existing}",
                hint="pass --resume to continue it, or choose another name (nothing is overwritten)",
            )
        )
    return issues


def _write_problem(path: str) -> str | None:
    """Why ``path`` cannot be written (None: it can)."""
    if storage.is_uri(path):
        try:
            storage.check(path, write=True)
        except storage.StorageError as exc:
            return str(exc)
        return None
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return f"cannot write to {folder} ({exc.strerror or exc})"
    return None


def _has_checkpoints(run_storage: str) -> bool:
    """Whether Ray Train's folder of a run holds a ``checkpoint_*`` folder (a prefix, on a bucket)."""
    if not storage.is_uri(run_storage):
        folder = Path(run_storage)
        return folder.exists() and any(p.is_dir() for p in folder.glob("checkpoint_*"))
    prefix = storage.normalize(run_storage) + "/"
    return any(e.path[len(prefix):].startswith("checkpoint_") and "/" in e.path[len(prefix):]
               for e in storage.list_files(run_storage))
