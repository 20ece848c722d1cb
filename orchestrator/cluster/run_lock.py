"""One driver per run folder: a lock file that ``run_training`` holds for the whole run.

Two runs of one name started together would both pass preflight's "already has checkpoints" check and train
into one folder. The lock is an exclusive create (``O_CREAT | O_EXCL``) of ``<run folder>/.run.lock`` holding
the driver's pid, host and process start time; a second driver is refused with the holder named. The lock is
released when the run ends, whether it succeeded or failed.

A lock whose holder is gone (a killed driver: ``--resume`` after a crash) is stale: on the holder's own host a
pid that no longer runs, or runs a process started at another time (the pid was reused), is taken over with a
warning. A lock held from another host cannot be checked from here; the error says how to remove it once that
driver is known to be gone. Checking and taking over happen under an ``flock`` of ``.run.lock.guard``, so two
drivers finding one stale lock do not both take it (the kernel drops an flock when its process dies, so the
guard itself never goes stale).

A run folder on a bucket (``output.dir: s3://...``) has no flock and no exclusive create through pyarrow (its
S3 client sends no ``If-None-Match``; S3's conditional PUT would need boto3, which is no dependency of the
project, and GCS's preconditions differ again). So the lock there is two parts: the local lock above in the
run's scratch folder (``orchestrator.run_outputs``), which serialises the drivers of one machine, where a
cluster's drivers usually start (the head node, the CLI machine), and a holder record ``<run folder>/.run.lock``
on the bucket, checked and then written, which refuses a driver started while another host's driver runs (a
stale record of this host is taken over as above). Two drivers on two hosts starting within the same second
could both pass the bucket's check-then-write; that window is the known limit.

Sweep trials do not take this lock: Ray Tune gives each trial a folder of its own and restarts a trial in
another process, so a trial never waits for a lock (its own or its previous attempt's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.errors import OrchestratorError
from orchestrator.lifecycle.round_claims import pid_alive
from orchestrator.run_outputs import scratch_dir

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
GUARD_FILE = ".run.lock.guard"
UNREADABLE_GRACE_S = 30.0  # an unreadable lock younger than this is being written; older: its writer died


class RunLockedError(OrchestratorError):
    """Another driver runs a job in the same run folder."""


@dataclass
class RunLock:
    """A held run lock; :meth:`release` removes it (only while it is still this holder's)."""

    path: Path
    token: str

    def release(self) -> None:
        holder = _read_holder(self.path)
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), to tell a reused pid from its first owner."""
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except Exception:  # psutil missing, or the process is gone
        return None


def _holder_record(name: str, token: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "name": name,
        "pid": pid,
        "host": socket.gethostname(),
        "process_start": _process_start(pid),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
        "token": token,
    }


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's holder record; None when the file is gone or not (yet) readable JSON."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_stale(path: Path, holder: dict[str, Any] | None) -> bool:
    """Whether the lock's holder is known to be gone (only a holder on this host can be checked)."""
    if holder is None:  # written by a driver that died between create and write, or being written now
        try:
            return time.time() - path.stat().st_mtime > UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True
    return _holder_gone(holder)


def _holder_gone(holder: dict[str, Any]) -> bool:
    """Whether a readable holder record's driver is known to be gone (only this host's can be checked)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return True
    recorded, now = holder.get("process_start"), _process_start(pid)
    return recorded is not None and now is not None and abs(now - recorded) > 1.0


def _refusal(run_dir: Path | str, path: Path | str, holder: dict[str, Any] | None) -> RunLockedError:
    if holder is None:
        who = "a driver that is starting now"
    else:
        who = (
            f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started_at')}: "
            f"{holder.get('command') or '?'})"
        )
    return RunLockedError(
        f"the run folder {run_dir} is in use by another run of {(holder or {}).get('name', 'this job')!r}: {who}. "
        f"Wait for it to end, or give this job another name. If that driver is gone (e.g. it ran on another "
        f"host), delete {path} and start again (--resume continues its checkpoints)"
    )


@contextlib.contextmanager
def _guard(run_dir: Path) -> Iterator[None]:
    """An exclusive flock serialising lock checks of this folder (none where flock is unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the exclusive create alone decides
        yield
        return
    fd = os.open(run_dir / GUARD_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the flock


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Exclusively create the lock file with ``record``; False when it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def acquire_run_lock(run_dir: Path, name: str) -> RunLock:
    """Take the run folder's lock (creating the folder), taking over a stale one.

    Raises:
        RunLockedError: another live driver holds it (its pid, host, start and command named).
        OSError: the folder cannot be written.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    token = uuid.uuid4().hex
    record = _holder_record(name, token)
    with _guard(run_dir):
        if _create(path, record):
            return RunLock(path, token)
        holder = _read_holder(path)
        if not _is_stale(path, holder):
            raise _refusal(run_dir, path, holder)
        logger.warning(
            "taking over the stale lock of %s (pid %s on %s is gone)",
            run_dir, (holder or {}).get("pid"), (holder or {}).get("host"),
        )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if not _create(path, record):  # only a driver that bypasses the guard could get here first
            raise _refusal(run_dir, path, _read_holder(path))
    return RunLock(path, token)


@dataclass
class BucketLock:
    """A held holder record on a bucket; :meth:`release` deletes it while it is still this holder's."""

    uri: str
    token: str

    def release(self) -> None:
        try:
            holder = _read_bucket_holder(self.uri)
            if holder is not None and holder.get("token") == self.token:
                storage.delete(self.uri)
        except OSError as exc:  # the bucket went away: the record stays, and is stale for the next driver here
            logger.warning("could not remove the run lock %s (%s)", self.uri, exc)


def _read_bucket_holder(uri: str) -> dict[str, Any] | None:
    try:
        value = json.loads(storage.read_text(uri))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def acquire_bucket_lock(folder: str, name: str) -> BucketLock:
    """Write the holder record ``<folder>/.run.lock`` on the bucket, unless a live driver's record is there.

    Raises:
        RunLockedError: a record of another host, or of a live driver of this host, is there.
        StorageError: the bucket cannot be read or written (preflight reports it with its fix).
    """
    uri = storage.join(folder, LOCK_FILE)
    entry = storage.stat(uri)
    if entry is not None:
        holder = _read_bucket_holder(uri)
        age = time.time() - entry.mtime.timestamp() if entry.mtime else 0.0
        stale = age > UNREADABLE_GRACE_S if holder is None else _holder_gone(holder)
        if not stale:
            raise _refusal(folder, uri, holder)
        logger.warning("taking over the stale lock %s (pid %s on %s is gone)", uri, (holder or {}).get("pid"),
                       (holder or {}).get("host"))
    token = uuid.uuid4().hex
    storage.write_text(uri, json.dumps(_holder_record(name, token)))
    return BucketLock(uri, token)


@contextlib.contextmanager
def run_lock(run_dir: Path | str, name: str) -> Iterator[RunLock | None]:
    """Hold the run folder's lock for the ``with`` block (released however it ends).

    ``run_dir`` may be a URI: then the local lock is taken in the run's scratch folder and a holder record is
    kept on the bucket (see the module docstring).

    Yields None, without a lock, when the folder cannot be created or written: preflight then reports the
    unwritable ``output.dir`` with its fix.

    Raises:
        RunLockedError: another live driver holds it.
    """
    remote = str(run_dir) if storage.is_uri(run_dir) else None
    local = scratch_dir(remote) if remote else Path(run_dir)
    bucket_lock: BucketLock | None = None
    try:
        lock: RunLock | None = acquire_run_lock(local, name)
    except OSError as exc:
        logger.debug("no run lock in %s: %s", local, exc)
        lock = None
    try:
        if remote and lock is not None:
            try:
                bucket_lock = acquire_bucket_lock(remote, name)
            except OSError as exc:  # StorageError included: preflight names the bucket problem
                logger.debug("no run lock in %s: %s", remote, exc)
        yield lock
    finally:
        if bucket_lock is not None:
            bucket_lock.release()
        if lock is not None:
            lock.release()
