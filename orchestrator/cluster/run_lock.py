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

from orchestrator.errors import OrchestratorError
from orchestrator.lifecycle.round_claims import pid_alive

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
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return True
    recorded, now = holder.get("process_start"), _process_start(pid)
    return recorded is not None and now is not None and abs(now - recorded) > 1.0


def _refusal(run_dir: Path, path: Path, holder: dict[str, Any] | None) -> RunLockedError:
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


@contextlib.contextmanager
def run_lock(run_dir: Path, name: str) -> Iterator[RunLock | None]:
    """Hold the run folder's lock for the ``with`` block (released however it ends).

    Yields None, without a lock, when the folder cannot be created or written: preflight then reports the
    unwritable ``output.dir`` with its fix.

    Raises:
        RunLockedError: another live driver holds it.
    """
    try:
        lock: RunLock | None = acquire_run_lock(run_dir, name)
    except OSError as exc:
        logger.debug("no run lock in %s: %s", run_dir, exc)
        lock = None
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
