"""Submitting jobs to a Ray cluster through the Jobs API (``JobSubmissionClient``).

Ray 2.60 turns token authentication on by default. The token comes from ``RAY_AUTH_TOKEN``, the file
named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token`` (written by ``ray start``/``ray.init``), and
is sent as a bearer header. It is never printed, and never put in the job's runtime_env.

No secret is ever put in a job's runtime env: Ray stores the runtime env with the job and serves it to every
holder of the cluster token (Jobs API job info, ``ray job list``, the dashboard's job pages). A job gets its
secrets on the cluster: from the nodes' environment, or from a 0600 secrets file that the job names by path
(``--secrets-file``, see ``orchestrator.tracking``).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig
from orchestrator.errors import OrchestratorError
from orchestrator.tracking import (
    SECRET_ENV_VARS,
    SECRETS_FILE_ENV,
    SECRETS_HOOK,
    VERBOSE_ENV,
    is_secret_name,
    read_secrets_file,
    redact_secrets,
)

# Passed to the job by default when set here: W&B settings the workers need (no secrets: see the module doc).
DEFAULT_PASSTHROUGH_ENV = ("WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY", VERBOSE_ENV)
RUNTIME_ENV_EXCLUDES = [".venv", "runs", "outputs", "wandb", ".git", "**/__pycache__"]


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
    secrets_file: str | None = None,
    poll_seconds: float = 1.0,
) -> str:
    """Submit the job; with follow, stream its logs and return its final status.

    ``secrets_file``: the path, as the cluster's nodes see it, of a 0600 file of ``NAME=value`` secrets that the
    job's processes read at start (only the path is sent; see :func:`job_runtime_env`).
    """
    if not (working_dir / "jobs" / "train.py").is_file():
        raise OrchestratorError(f"--working-dir {working_dir} has no jobs/train.py; run from the project root")
    all_overrides = [*overrides, *absolute_path_overrides(config, working_dir)]
    entrypoint = build_entrypoint(config_path, working_dir, all_overrides, resume)
    secrets_path = check_secrets_file(secrets_file) if secrets_file else None
    runtime_env = job_runtime_env(working_dir, env_names=env_names, pip=pip, secrets_file=secrets_path)
    missing = [name for name in env_names if name not in os.environ]
    if missing:
        raise OrchestratorError(f"--env {missing[0]}: the variable is not set here")
    client = job_client(address)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        metadata={"orchestrator_job": config.name},
    )
    shown = ", ".join(k for k in runtime_env["env_vars"] if k != SECRETS_FILE_ENV) or "none"
    echo(
        f"submitted {job_id} to {address}\n  entrypoint: {entrypoint}\n  env passed through: {shown}\n"
        f"  secrets: {_secrets_note(secrets_path)}\n"
    )
    if not follow:
        return "PENDING"
    return follow_job(client, job_id, echo=echo, poll_seconds=poll_seconds)


def job_runtime_env(
    working_dir: Path,
    *,
    env_names: Sequence[str],
    pip: Sequence[str],
    secrets_file: str | None,
    option: str = "--env",
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The runtime env of a job (``orchestrator submit``, the retraining scheduler): never a secret in it.

    Args:
        working_dir: uploaded as the job's working dir.
        env_names: variables passed through from here when set (``--env``, ``schedule.env``); a secret's name
            is refused, whether set here or not.
        pip: extra requirements installed for the job.
        secrets_file: the path of the job's secrets file on the cluster (see ``orchestrator.tracking``): the
            job carries the path, and every Ray worker of the job reads the file at start (setup hook).
        option: the setting ``env_names`` came from, for the error message.
        extra_env: more (non-secret) variables.

    Raises:
        OrchestratorError: a secret's name in ``env_names``.
    """
    secret = [name for name in env_names if is_secret_name(name)]
    if secret:
        raise OrchestratorError(
            f"{option} {secret[0]}: a secret never travels with a job (Ray serves a job's runtime env to every "
            "holder of the cluster token); give it to the cluster's nodes (a Kubernetes Secret as in "
            "cluster/kuberay-raycluster.yaml, or the environment of `ray start`), or put NAME=value in a file "
            "with mode 0600 on storage the nodes mount and pass --secrets-file PATH (ORCHESTRATOR_SECRETS_FILE)"
        )
    env_vars = {name: os.environ[name] for name in (*DEFAULT_PASSTHROUGH_ENV, *env_names) if name in os.environ}
    env_vars.update(extra_env or {})
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir.resolve()),
        "env_vars": env_vars,
        "excludes": list(RUNTIME_ENV_EXCLUDES),
    }
    if secrets_file:
        env_vars[SECRETS_FILE_ENV] = secrets_file
        runtime_env["worker_process_setup_hook"] = SECRETS_HOOK
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def check_secrets_file(path: str) -> str:
    """The secrets file's absolute path; when this machine sees it, also checked (mode 0600, NAME=value lines).

    A path this machine does not see is passed on as given: the cluster's nodes may mount it elsewhere, and the
    job's driver checks it there before it takes resources."""
    local = Path(path).expanduser()
    if local.exists():
        read_secrets_file(local)  # raises with the file, line and fix
        return str(local.resolve())
    return path


def _secrets_note(secrets_path: str | None) -> str:
    """What the job gets its secrets from, and which secrets set here it does not get."""
    here = [name for name in SECRET_ENV_VARS if name in os.environ and name != "RAY_AUTH_TOKEN"]
    source = f"the nodes' environment and {secrets_path}" if secrets_path else "the nodes' environment"
    not_sent = f" ({', '.join(here)} set here: not sent)" if here else ""
    return f"read on the cluster from {source}{not_sent}"


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
    text = redact_secrets(text)
    token = find_auth_token()
    if token:
        text = text.replace(token, "***")
    return text
