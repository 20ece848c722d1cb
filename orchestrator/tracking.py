"""Experiment tracking from rank 0: a local ``metrics.jsonl`` and one W&B run per job; and the job's secrets.

W&B mode 'auto' is online when ``WANDB_API_KEY`` is set and offline otherwise. The key is read by the
wandb library from the environment; it is never copied into configs, logs or files here.

W&B never stops training: a W&B run that cannot start, or that fails later (its service process gone, the
server unreachable), is dropped with one warning, and ``metrics.jsonl`` keeps every record.

Secrets never travel with a job: Ray keeps a job's runtime env (``env_vars`` included) in its job record and
shows it to every holder of the cluster token (Jobs API job info, ``ray job list``, the dashboard), for as long
as the cluster lives. A job's processes get secrets from the environment of the Ray nodes (a Kubernetes Secret
in the KubeRay manifests, the environment of ``ray start``), or from a secrets file: ``NAME=value`` lines, mode
0600, on storage the nodes mount, whose *path* the job carries as ``ORCHESTRATOR_SECRETS_FILE``. Every Ray
worker of the job reads it at start (:func:`load_job_secrets`, the runtime env's ``worker_process_setup_hook``)
and so does the job's driver (``orchestrator.cluster.preflight``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.config import JobConfig
from orchestrator.errors import OrchestratorError
from orchestrator.run_outputs import publish_file, restore_file

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
_PUBLISHED_FILES = (METRICS_FILE, WANDB_ID_FILE)  # what a resume needs back when the scratch is gone

# Environment variables whose values must never reach a log, a saved config, W&B or a job's runtime env.
SECRET_ENV_VARS = ("WANDB_API_KEY", "RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")
# Names that look like a secret: a word KEY, TOKEN, ... (not TOKENIZERS_PARALLELISM, not RAY_AUTH_TOKEN_PATH).
_SECRET_WORD = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

SECRETS_FILE_ENV = "ORCHESTRATOR_SECRETS_FILE"  # the path of a job's secrets file (the path is no secret)
SECRETS_HOOK = "orchestrator.tracking.load_job_secrets"  # Ray's worker_process_setup_hook for that file
VERBOSE_ENV = "ORCHESTRATOR_VERBOSE"  # 1: every worker's and library's output on the terminal (``-v``)

WANDB_DEFAULT_BASE_URL = "https://api.wandb.ai"
WANDB_CHECK_TIMEOUT_S = 5.0  # how long the driver waits for W&B to answer before the run goes offline


def verbose_output() -> bool:
    """Whether the user asked to see everything (``orchestrator train -v`` sets ``ORCHESTRATOR_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


# ------------------------------------------------------------------------------------------------- secrets
def is_secret_name(name: str) -> bool:
    """WANDB_API_KEY, HF_TOKEN, MY_PASSWORD, ...: names whose values never travel with a job."""
    upper = name.upper()
    if upper.endswith(("_PATH", "_FILE", "_DIR")):  # where a secret is, not the secret
        return False
    return name in SECRET_ENV_VARS or bool(_SECRET_WORD.search(upper))


def redact_secrets(text: str) -> str:
    """``text`` with the values of this process's secret variables replaced by ``***``."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "***")
    return text


def read_secrets_file(path: Path) -> dict[str, str]:
    """The ``NAME=value`` lines of a secrets file (``#`` comments, blank lines and ``export`` allowed).

    Raises:
        OrchestratorError: the file is missing, readable by other users (not mode 0600 or stricter), or has a
            line that is not ``NAME=value``. Messages name the file and line, never a value.
    """
    where = f"{SECRETS_FILE_ENV}={path}"
    try:
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise OrchestratorError(
            f"{where}: {exc.strerror or exc} on this node; put the file on storage every Ray node mounts"
        ) from None
    if mode & 0o077:
        raise OrchestratorError(f"{where}: mode {mode:o} lets other users read the secrets; run: chmod 600 {path}")
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, value = stripped.removeprefix("export ").partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not _ENV_NAME.fullmatch(name):
            raise OrchestratorError(f"{path}:{number}: expected NAME=value (the line is not shown: it may be a secret)")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def load_job_secrets(*, strict: bool = False) -> list[str]:
    """Set the variables of the job's secrets file (``ORCHESTRATOR_SECRETS_FILE``) in this process.

    Ray runs this in every worker process of a job that names a file (``worker_process_setup_hook``), before any
    task or Train worker code; the job's driver calls it with ``strict=True`` before its checks. The file wins
    over the node's environment: the job asked for it.

    Returns:
        The names set (none when the job names no file).

    Raises:
        OrchestratorError: with ``strict``, when the file cannot be used (see :func:`read_secrets_file`); a
            worker logs the problem instead, so that it still starts (the driver has reported it already).
    """
    path = os.environ.get(SECRETS_FILE_ENV)
    if not path:
        return []
    try:
        values = read_secrets_file(Path(path).expanduser())
    except OrchestratorError as exc:
        if strict:
            raise
        logger.warning("secrets not loaded: %s", exc)
        return []
    os.environ.update(values)
    return sorted(values)


# ---------------------------------------------------------------------------------------------------- W&B
def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_key_problem(key: str) -> str | None:
    """Why W&B would refuse this API key without asking its server (None: the key is well formed)."""
    if key != key.strip():
        return "the key starts or ends with whitespace"
    try:
        from wandb.sdk.lib.wbauth.validation import check_api_key  # the check wandb.init itself runs
    except ImportError:  # moved in another wandb version: the rule of wandb 0.31
        return None if re.fullmatch(r"(?:[\w]+-)?[\w-]{40,}", key) else "API key must have 40+ characters."
    return check_api_key(key)


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or WANDB_DEFAULT_BASE_URL


def wandb_unreachable(base_url: str, timeout: float = WANDB_CHECK_TIMEOUT_S) -> str | None:
    """Why the W&B server at ``base_url`` did not answer within ``timeout`` seconds (None: it answered)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/healthz", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # any HTTP status is an answer: the server is there
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:  # a timeout while reading, a malformed URL
        return f"{type(exc).__name__}: {exc}"


def sync_hint(wandb_dir: Path) -> str:
    return f"upload it later with `wandb sync {wandb_dir}/offline-run-*`"


# ---------------------------------------------------------------------------------------------------- Tracker
class Tracker:
    """Writes metrics to metrics.jsonl and W&B. Create it on rank 0 only; other ranks get a no-op.

    The orchestrator's own warnings on this worker are written to metrics.jsonl too (``kind: warning``): the
    driver shows them with the progress, also when the workers' output is not copied to its terminal.
    """

    def __init__(self, config: JobConfig, run_dir: Path, *, enabled: bool, publish_to: str | None = None):
        """Args:
            run_dir: the local folder written to (the run folder, or its scratch when that is a URI).
            publish_to: the run folder on a bucket (``orchestrator.run_outputs``): its copies of metrics.jsonl
                and the W&B run id are the starting point (a resume after the scratch was lost), and
                :meth:`publish` uploads them there.
        """
        self.enabled = enabled
        self.run_dir = run_dir
        self.publish_to = publish_to
        self.wandb_run: Any = None
        self._file = None
        self._lock = threading.Lock()  # warnings may come from other threads
        self._step = 0
        self._warnings: logging.Handler | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if publish_to is not None:
            for name in _PUBLISHED_FILES:
                restore_file(storage.join(publish_to, name), run_dir / name)
        self._file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        self._warnings = _WarningRecords(self)
        logging.getLogger("orchestrator").addHandler(self._warnings)
        mode = resolve_wandb_mode(config.tracking.wandb.mode)
        if mode != "disabled":
            self.wandb_run = self._start_wandb(config, mode)

    def _start_wandb(self, config: JobConfig, mode: str) -> Any:
        """The W&B run; on failure online, an offline one; on failure offline, none (warned once)."""
        try:
            return _wandb_init(config, self.run_dir, mode)
        except Exception as exc:
            failure = f"W&B could not start ({mode}): {_describe(exc)}"
        if mode == "online":
            try:
                import wandb

                wandb.teardown()  # else the failed online run keeps its id "in use" and the offline one is refused
                run = _wandb_init(config, self.run_dir, "offline")
            except Exception as exc:
                failure += f"; offline neither: {_describe(exc)}"
            else:
                logger.warning("%s; logging offline instead, %s", failure, sync_hint(self.run_dir / "wandb"))
                return run
        logger.warning("%s; training goes on without W&B, metrics.jsonl keeps every record", failure)
        return None

    @property
    def wandb_path(self) -> str | None:
        if self.wandb_run is None:
            return None
        if self.wandb_run.settings.mode == "offline" or getattr(self.wandb_run, "offline", False):
            return str(Path(self.wandb_run.dir).parent)
        return self.wandb_run.path if isinstance(self.wandb_run.path, str) else "/".join(self.wandb_run.path)

    def _write(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()

    def _wandb(self, what: str, call: Callable[[Any], None]) -> None:
        """Run one W&B call; if it fails, warn once and go on without W&B (it never stops training)."""
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as exc:
            offline = self.wandb_run.settings.mode == "offline"
            self.wandb_run = None  # not finished: its service may be gone, and finishing could block
            hint = f"; what it logged before is in {self.run_dir / 'wandb'}" if offline else ""
            logger.warning(
                "W&B failed at step %d (%s: %s); training goes on without W&B, metrics.jsonl keeps every record%s",
                self._step,
                what,
                _describe(exc),
                hint,
            )

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._step = step
        self._write({"kind": kind, "step": step, "time": time.time(), **metrics})
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self._wandb("log", lambda run: run.log(numbers, step=step))

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled:
            self._wandb("summary", lambda run: run.summary.update(values))

    def publish(self) -> None:
        """Upload metrics.jsonl and the W&B run id to the run folder on the bucket (no-op for a local run).

        Called at every eval and checkpoint and at the end, so a driver or node lost mid-run loses at most one
        interval of records. A failed upload is a warning: the next one carries every record again.
        """
        if not self.enabled or self.publish_to is None:
            return
        with self._lock:  # no record half-written into the copy
            if self._file is not None:
                self._file.flush()
            try:
                for name in _PUBLISHED_FILES:
                    if (self.run_dir / name).is_file():
                        publish_file(self.run_dir / name, storage.join(self.publish_to, name))
            except OSError as exc:
                failure: OSError | None = exc
            else:
                failure = None
        if failure is not None:
            logger.warning("metrics not uploaded at step %d (%s); the next upload carries them", self._step, failure)

    def finish(self) -> None:
        self._wandb("finish", lambda run: run.finish())
        self.wandb_run = None
        if self._warnings is not None:
            logging.getLogger("orchestrator").removeHandler(self._warnings)
            self._warnings = None
        self.publish()
        if self.enabled and self.publish_to is not None and (self.run_dir / "wandb").is_dir():
            try:  # offline W&B runs, for a later `wandb sync` from anywhere
                storage.upload(self.run_dir / "wandb", storage.join(self.publish_to, "wandb"))
            except OSError as exc:
                logger.warning("the W&B folder %s was not uploaded (%s)", self.run_dir / "wandb", exc)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class _WarningRecords(logging.Handler):
    """Copies the orchestrator's warnings on rank 0 into metrics.jsonl (secret values masked)."""

    def __init__(self, tracker: Tracker):
        super().__init__(logging.WARNING)
        self.tracker = tracker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = redact_secrets(record.getMessage())
            self.tracker._write(
                {
                    "kind": "warning",
                    "step": self.tracker._step,
                    "time": record.created,
                    "logger": record.name,
                    "level": record.levelname,
                    "message": message,
                }
            )
        except Exception:
            self.handleError(record)


def _wandb_init(config: JobConfig, run_dir: Path, mode: str) -> Any:
    import wandb

    wandb_cfg = config.tracking.wandb
    id_file = run_dir / WANDB_ID_FILE
    # A restarted run (worker failure, --resume) continues the same W&B run.
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        group=wandb_cfg.group,
        tags=wandb_cfg.tags,
        name=wandb_cfg.run_name or config.name,
        job_type=wandb_cfg.job_type,
        config=config.to_dict(),
        dir=str(run_dir),
        mode=mode,
        id=run_id,
        resume="allow",
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )


def _describe(exc: BaseException) -> str:
    """One line for a warning: the error's type and first line, secret values masked."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact_secrets(f"{type(exc).__name__}: {text}"[:300])


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl: a local run folder's, or the copy on the bucket for a URI."""
    path = storage.join(str(run_dir), METRICS_FILE)
    if not storage.exists(path):
        return []
    records = []
    for line in storage.read_text(path).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return records
