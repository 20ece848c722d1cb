"""Submitting jobs to a Ray cluster through the Jobs API (``JobSubmissionClient``).

Ray 2.60 turns token authentication on by default. The token comes from ``RAY_AUTH_TOKEN``, the file
named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token`` (written by ``ray start``/``ray.init``), and
is sent as a bearer header. It is never printed, and never put in the job's runtime_env.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig
from orchestrator.errors import OrchestratorError
from orchestrator.tracking import SECRET_ENV_VARS

# Passed to the job by default when set here: W&B needs them on the workers.
DEFAULT_PASSTHROUGH_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY", "HF_TOKEN")


def find_auth_token() -> str | None:
    """The Ray auth token from the environment or the default token file, if any."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.is_file():
        return path.read_text().strip() or None
    return None


def job_client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    token = find_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # connection refused, 401, ...
        text = str(exc)
        if token and token in text:
            text = text.replace(token, "***")
        hint = "" if token else " (no Ray auth token found: set RAY_AUTH_TOKEN or copy the head's ~/.ray/auth_token)"
        raise OrchestratorError(f"cannot reach the Ray Jobs API at {address}: {text}{hint}") from None


def absolute_path_overrides(config: JobConfig, working_dir: Path) -> list[str]:
    """Make relative data/model/output paths absolute, so the job (which runs from an uploaded copy of
    the working dir) reads and writes the same places. Assumes the cluster sees the same filesystem
    (local head, NFS, or a shared volume as in cluster/); use URIs/absolute paths otherwise."""
    overrides = []
    for key, value in config.path_fields().items():
        if "://" in value or Path(value).expanduser().is_absolute():
            continue
        overrides.append(f"{key}={Path(value).expanduser().resolve()}")
    return overrides


def build_entrypoint(config_path: Path, working_dir: Path, overrides: list[str], resume: bool) -> str:
    try:
        relative = config_path.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise OrchestratorError(
            f"{config_path} is not inside the working dir {working_dir}; put the config in the uploaded folder"
        ) from None
    parts = ["python", "jobs/train.py", str(relative)]
    for override in overrides:
        parts += ["--set", override]
    if resume:
        parts.append("--resume")
    return shlex.join(parts)


def submit_job(
    config: JobConfig,
    *,
    config_path: Path,
    address: str,
    overrides: list[str],
    working_dir: Path,
    env_names: list[str],
    pip: list[str],
    entrypoint_num_cpus: float,
    entrypoint_num_gpus: float,
    follow: bool,
    resume: bool,
    echo: Callable[[str], None],
    poll_seconds: float = 1.0,
) -> str:
    """Submit the job; with follow, stream its logs and return its final status."""
    if not (working_dir / "jobs" / "train.py").is_file():
        raise OrchestratorError(f"--working-dir {working_dir} has no jobs/train.py; run from the project root")
    all_overrides = [*overrides, *absolute_path_overrides(config, working_dir)]
    entrypoint = build_entrypoint(config_path, working_dir, all_overrides, resume)
    env_vars = {}
    for name in (*DEFAULT_PASSTHROUGH_ENV, *env_names):
        if name in os.environ:
            env_vars[name] = os.environ[name]
        elif name in env_names:
            raise OrchestratorError(f"--env {name}: the variable is not set here")
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir.resolve()),
        "env_vars": env_vars,
        "excludes": [".venv", "runs", "outputs", "wandb", ".git", "**/__pycache__"],
    }
    if pip:
        runtime_env["pip"] = list(pip)
    client = job_client(address)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        metadata={"orchestrator_job": config.name},
    )
    shown = ", ".join(f"{k}=***" if k in SECRET_ENV_VARS else k for k in env_vars) or "none"
    echo(f"submitted {job_id} to {address}\n  entrypoint: {entrypoint}\n  env passed through: {shown}\n")
    if not follow:
        return "PENDING"
    return follow_job(client, job_id, echo=echo, poll_seconds=poll_seconds)


def follow_job(client: Any, job_id: str, *, echo: Callable[[str], None], poll_seconds: float = 1.0) -> str:
    """Print new log text until the job reaches a terminal state; return that state."""
    from ray.job_submission import JobStatus

    printed = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            echo(_redact(logs[printed:]))
            printed = len(logs)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return str(status.value if hasattr(status, "value") else status)
        time.sleep(poll_seconds)


def _redact(text: str) -> str:
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "***")
    token = find_auth_token()
    if token:
        text = text.replace(token, "***")
    return text
