"""One driver per run folder: a second run of the same name is refused before it takes any cluster resource,
the lock goes when the run ends (success or failure), and a dead driver's lock is taken over on --resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import orchestrator.cluster.launcher as launcher
from orchestrator.cluster.launcher import run_training
from orchestrator.cluster.preflight import preflight
from orchestrator.config import config_from_dict
from orchestrator.errors import OrchestratorError
from tests.conftest import REPO

LOCK = ".run.lock"


class _Stop(Exception):
    """Ends a run where Ray would start (no cluster in these tests)."""


def _job(tmp_path: Path, name: str = "same"):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(8)))
    return config_from_dict(
        {
            "name": name,
            "model": {"path": str(model)},
            "data": {"train": {"path": str(train), "text_column": "sentence"}},
            "output": {"dir": str(tmp_path / "runs"), "registry": None},
        }
    )


@pytest.fixture
def cluster_calls(monkeypatch):
    """Replaces ensure_ray (the first cluster resource a run takes): the first call holds its run there until
    ``release`` is set; every call is recorded and ends its run with _Stop."""
    calls: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def ensure_ray(*args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            entered.set()
            assert release.wait(60)
        raise _Stop()

    monkeypatch.setattr(launcher, "ensure_ray", ensure_ray)
    return calls, entered, release


def test_two_runs_of_one_name_at_once_one_is_refused_before_taking_the_cluster(tmp_path, cluster_calls):
    calls, entered, release = cluster_calls
    config = _job(tmp_path)
    run_dir = (tmp_path / "runs" / "same").resolve()
    outcome: dict[str, BaseException] = {}

    def first() -> None:
        try:
            run_training(config)
        except BaseException as exc:
            outcome["first"] = exc

    thread = threading.Thread(target=first, name="first-run")
    thread.start()
    assert entered.wait(60)  # the first run is past its checks, on the cluster
    try:
        with pytest.raises(OrchestratorError) as info:
            run_training(config)  # the same name at the same time
        message = str(info.value)
        assert str(run_dir) in message and f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert "another name" in message
        assert calls == ["first-run"]  # refused before any cluster resource
        assert preflight(config, resume=True).run_dir == run_dir  # a sweep trial's checks do not wait for it
    finally:
        release.set()
        thread.join(60)
    assert isinstance(outcome["first"], _Stop)
    assert not (run_dir / LOCK).exists()  # released although the run failed

    with pytest.raises(_Stop):
        run_training(config, resume=True)  # after the first ended, the name runs again
    assert len(calls) == 2 and not (run_dir / LOCK).exists()


def _lock_of_a_dead_driver(run_dir: Path) -> dict:
    """What a SIGKILLed driver leaves: a lock naming a pid that no longer runs."""
    code = (
        "import os, sys; from pathlib import Path; from orchestrator.cluster.run_lock import acquire_run_lock; "
        "acquire_run_lock(Path(sys.argv[1]), 'same'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True, cwd=REPO, timeout=120)
    return json.loads((run_dir / LOCK).read_text())


def test_resume_after_the_driver_died_takes_over_its_stale_lock(tmp_path, cluster_calls):
    calls, _, release = cluster_calls
    release.set()
    config = _job(tmp_path)
    run_dir = (tmp_path / "runs" / "same").resolve()
    holder = _lock_of_a_dead_driver(run_dir)
    assert holder["pid"] != os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(_Stop):
        run_training(config, resume=True)
    assert calls and not (run_dir / LOCK).exists()


def test_a_live_or_foreign_holder_is_refused_and_a_reused_pid_is_not(tmp_path):
    from orchestrator.cluster.run_lock import RunLockedError, acquire_run_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / LOCK
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {"name": "same", "pid": sleeper.pid, "host": socket.gethostname(), "process_start": None}
        lock.write_text(json.dumps(live))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid} on host"):
            acquire_run_lock(run_dir, "same")
    finally:
        sleeper.kill()
        sleeper.wait()

    lock.write_text(json.dumps({"name": "same", "pid": 1, "host": "another-host", "started_at": "t"}))
    with pytest.raises(RunLockedError) as info:
        acquire_run_lock(run_dir, "same")  # cannot tell from here whether it is gone
    assert "another-host" in str(info.value) and f"delete {lock}" in str(info.value)

    # This very pid, recorded with another start time: the pid was reused by a new process; the lock is stale.
    lock.write_text(json.dumps({"name": "same", "pid": os.getpid(), "host": socket.gethostname(),
                                "process_start": 12345.0}))  # fmt: skip
    held = acquire_run_lock(run_dir, "same")
    assert json.loads(lock.read_text())["token"] == held.token
    held.release()
    assert not lock.exists()


@pytest.mark.slow
def test_a_real_run_refuses_a_second_driver_then_releases_its_lock(
    ray_cluster, tiny_models, shared_data, tmp_path, monkeypatch
):
    from tests.conftest import tiny_job

    config = config_from_dict(tiny_job("locked", tiny_models["bert"], shared_data, tmp_path, max_steps=3))
    run_dir = (tmp_path / "locked").resolve()
    on_cluster = threading.Event()
    real_ensure_ray = launcher.ensure_ray

    def ensure_ray(*args, **kwargs):
        on_cluster.set()  # the first driver holds the lock and takes the cluster now
        return real_ensure_ray(*args, **kwargs)

    monkeypatch.setattr(launcher, "ensure_ray", ensure_ray)
    outcome: dict[str, object] = {}

    def first() -> None:
        try:
            outcome["result"] = run_training(config)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert on_cluster.wait(600) and thread.is_alive(), outcome
        on_cluster.clear()
        with pytest.raises(OrchestratorError, match="is in use by another run of 'locked'"):
            run_training(config)
        assert not on_cluster.is_set()  # refused before it took the cluster
    finally:
        thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    assert not (run_dir / LOCK).exists()  # released after a successful run
    again = run_training(config, resume=True)  # the name runs again (resuming its checkpoints)
    assert again.final_model is not None and not (run_dir / LOCK).exists()
