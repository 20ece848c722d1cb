"""``orchestrator schedule``: a light, long-running scheduler that submits retraining rounds as Ray jobs.

Each tick it (1) reconciles the rounds the registry says are active with the Jobs API (a job that ended
without recording its round is marked failed; a claim whose job never reached the cluster is abandoned),
(2) does nothing while a round of the model is active, so two rounds of one model never run at once, (3)
checks the trigger (new data / interval / cron), and (4) if there is new data, claims the next round in the
registry (one transaction: the claim fails if another round is active) and submits ``jobs/retrain.py
--registry R --round-id N`` through the Jobs API. The job reads the resolved retrain config stored with the
claim, runs the round and records its outcome.

A round that fails does not make the scheduler resubmit its shards at every poll: each failure is one attempt
of each of the round's shards; a shard that failed waits (``schedule.retry_backoff_s``, doubled per failure)
and is then retried alone, and after ``schedule.max_attempts`` failures its content hash is quarantined in the
registry (:mod:`orchestrator.lifecycle.shard_retries`).

All state lives in the registry, so a restarted scheduler carries on: it finds the running round, waits for
it, and schedules the next one from the time of the last round. The clock and the job client are injected,
so tests drive ticks with a fake clock and a fake client.
"""

from __future__ import annotations

import os
import shlex
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from orchestrator.config.retrain import LoadedRetrain
from orchestrator.errors import OrchestratorError
from orchestrator.lifecycle.new_data import DataFile, HashCache, find_new_data
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.registry_records import RoundRecord
from orchestrator.lifecycle.round_plan import check_round_output
from orchestrator.lifecycle.run_registration import code_version
from orchestrator.lifecycle.shard_retries import ShardAttempts, retry_delay

TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobClient(Protocol):
    """The part of ``ray.job_submission.JobSubmissionClient`` the scheduler uses."""

    def submit_job(self, **kwargs: Any) -> str: ...

    def get_job_status(self, job_id: str) -> Any: ...


class Clock(Protocol):
    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def job_state(status: Any) -> str:
    """'RUNNING', 'SUCCEEDED', ... from a JobStatus enum or a plain string."""
    return str(getattr(status, "value", status)).upper()


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


class RetrainScheduler:
    """Submits rounds of one model; see the module docstring."""

    def __init__(
        self,
        loaded: LoadedRetrain,
        *,
        registry: Registry,
        client: JobClient,
        clock: Clock | None = None,
        working_dir: Path | None = None,
        echo: Callable[[str], None] = print,
    ):
        self.loaded = loaded
        self.registry = registry
        self.client = client
        self.clock = clock or SystemClock()
        self.schedule = loaded.config.schedule
        self.working_dir = (working_dir or Path(self.schedule.working_dir)).resolve()
        self.echo = echo
        self.hash_cache = HashCache()
        self.started = self.clock.time()
        self.last_check: float | None = None  # a due time that found no new data (in memory only)

    @property
    def name(self) -> str:
        return self.loaded.name

    # -- state -------------------------------------------------------------------------------------------

    def reconcile(self) -> list[RoundRecord]:
        """Bring active rounds up to date with the Jobs API; return those still active."""
        still = []
        for r in self.registry.rounds(self.name, active_only=True):
            if r.submission_id is None:
                still.append(r)  # a local `orchestrator retrain`; its claim lapses when its process is gone
                continue
            try:
                state = job_state(self.client.get_job_status(r.submission_id))
            except Exception:  # unknown to the cluster (404) or the cluster restarted
                state = None
            if state is None:
                if r.status == "claimed":
                    self.registry.update_round(
                        r.id, status="abandoned", message=f"job {r.submission_id} never reached the cluster"
                    )
                else:
                    self.registry.update_round(
                        r.id, status="failed", message=f"job {r.submission_id} is no longer known to the cluster"
                    )
                continue
            if state in TERMINAL_JOB_STATES:
                fresh = self.registry.get_round(r.id)
                if fresh.active:  # the job ended without recording the round (e.g. it failed on start)
                    self.registry.update_round(
                        r.id, status="failed", message=f"job {r.submission_id} ended {state} without a result"
                    )
                continue
            still.append(r)
        return still

    def _last_round_time(self) -> float | None:
        rounds = self.registry.rounds(self.name)
        return _epoch(rounds[-1].created_at) if rounds else None

    def due(self, now: float) -> bool:
        trigger = self.schedule.trigger
        if trigger == "new_data":
            return True
        marks = [t for t in (self._last_round_time(), self.last_check) if t is not None]
        if trigger == "interval":
            assert self.schedule.interval_s is not None
            return not marks or now >= max(marks) + self.schedule.interval_s
        from croniter import croniter

        base = max(marks) if marks else self.started
        assert self.schedule.cron is not None
        start = datetime.fromtimestamp(base, tz=timezone.utc)
        return croniter(self.schedule.cron, start).get_next(float) <= now

    # -- one tick ----------------------------------------------------------------------------------------

    def tick(self) -> str:
        """One look at jobs, clock and data; returns what happened (for logs and tests)."""
        now = self.clock.time()
        active = self.reconcile()
        attempts = self._settle_failures(now)  # stamped now: the back-off counts from when a failure is seen
        if active:
            r = active[0]
            return f"busy: round {r.round} is {r.status} (job {r.submission_id or f'pid {r.pid}@{r.host}'})"
        if not self.due(now):
            return "not due"
        try:
            found = find_new_data(self.loaded, self.registry, hasher=self.hash_cache, now=now)
        except OrchestratorError as exc:  # e.g. the watched folder is not mounted yet: try again next tick
            return f"cannot look for new data: {exc}"
        self.last_check = now
        if not found:
            return "no new data"
        new, waiting = self.ready_files(found, attempts, now)
        if not new:
            return waiting
        try:  # a bucket output.dir that cannot be written: no claim, so no failed attempt of the shards either
            check_round_output(self.loaded)
        except OrchestratorError as exc:
            return f"cannot start a round: {exc}"
        submission_id = f"retrain-{self.name}-{uuid.uuid4().hex[:8]}"
        claimed = self.registry.claim_round(
            self.name,
            new_data=[f.to_dict() for f in new],
            spec=self.loaded.resolved(),
            submission_id=submission_id,
            at=_iso(now),
        )
        if claimed is None:
            return "busy: another round was claimed meanwhile"
        try:
            self.client.submit_job(
                entrypoint=self.entrypoint(claimed.id),
                submission_id=submission_id,
                runtime_env=self.runtime_env(),
                entrypoint_num_cpus=self.schedule.entrypoint_num_cpus,
                metadata={"orchestrator_retrain": self.name, "round": str(claimed.round)},
            )
        except Exception as exc:  # the job never reached the cluster: no attempt of its shards (abandoned)
            self.registry.update_round(claimed.id, status="abandoned", message=f"submission failed: {exc}"[:4000])
            return f"submission of round {claimed.round} failed: {exc}"
        files = ", ".join(Path(f.path).name for f in new)
        return f"submitted round {claimed.round} as {submission_id} ({files})"

    # -- failed rounds: back-off and quarantine -------------------------------------------------------------

    def _settle_failures(self, now: float) -> dict[str, ShardAttempts]:
        """Count the rounds that failed since the last tick (one attempt per shard, stamped ``now``) and
        quarantine the shards that reached ``schedule.max_attempts``; returns every shard's attempts."""
        attempts, quarantined = self.registry.settle_failed_rounds(
            self.name, at=now, max_attempts=self.schedule.max_attempts
        )
        for q in quarantined:
            self.echo(
                f"{_iso(now)} {self.name}: quarantined {q.path} (sha256 {q.sha256[:12]}) after {q.reason}; "
                f"release it with: orchestrator registry release {q.sha256[:12]} --registry {self.registry.path}"
            )
        return attempts

    def ready_files(
        self, found: list[DataFile], attempts: dict[str, ShardAttempts], now: float
    ) -> tuple[list[DataFile], str]:
        """The files the next round trains on: a shard that failed before, alone, once its back-off is over;
        else every file that never failed. Returns them, and what the tick says when there are none."""
        s = self.schedule
        fresh, retry, waits = [], [], []
        for f in found:
            shard = attempts.get(f.sha256)
            if shard is None:
                fresh.append(f)
                continue
            due_at = shard.last_failed_at + retry_delay(shard.attempts, s.retry_backoff_s, s.retry_backoff_max_s)
            (retry if now >= due_at else waits).append((f, shard, due_at))
        if retry:
            return [retry[0][0]], ""
        if fresh:
            return fresh, ""
        f, shard, due_at = min(waits, key=lambda w: w[2])
        return [], (
            f"backing off: {Path(f.path).name} failed {shard.attempts} of {s.max_attempts} attempts "
            f"({(shard.reason or 'no message')[:200]}); next try at {_iso(due_at)}"
        )

    def entrypoint(self, round_id: int) -> str:
        return shlex.join(
            ["python", "jobs/retrain.py", "--registry", str(self.registry.path), "--round-id", str(round_id)]
        )

    def runtime_env(self) -> dict[str, Any]:
        """The round job's runtime env: never a secret in it (``orchestrator.cluster.jobs.job_runtime_env``).

        The round's processes get secrets on the cluster: from the Ray nodes' environment (the KubeRay
        manifests' Secret), or from the secrets file this scheduler's ``ORCHESTRATOR_SECRETS_FILE`` names."""
        from orchestrator.cluster.jobs import job_runtime_env
        from orchestrator.tracking import SECRETS_FILE_ENV

        if not (self.working_dir / "jobs" / "retrain.py").is_file():
            raise OrchestratorError(
                f"schedule.working_dir {self.working_dir} has no jobs/retrain.py; run from the project root"
            )
        return job_runtime_env(
            self.working_dir,
            env_names=self.schedule.env,
            pip=self.schedule.pip,
            secrets_file=os.environ.get(SECRETS_FILE_ENV),
            option="schedule.env:",
            extra_env={"ORCHESTRATOR_CODE_VERSION": code_version()},  # the uploaded copy has no .git
        )

    def run(self, *, once: bool = False, max_ticks: int | None = None) -> None:
        """Tick every ``schedule.poll_s`` until stopped (Ctrl-C), or once."""
        ticks = 0
        while True:
            stamp = _iso(self.clock.time())
            self.echo(f"{stamp} {self.name}: {self.tick()}")
            ticks += 1
            if once or (max_ticks is not None and ticks >= max_ticks):
                return
            self.clock.sleep(self.schedule.poll_s)
