"""W&B failures never kill training (issue 20, item 11).

Before resources are taken, the driver refuses a malformed ``WANDB_API_KEY`` (it can never work) and turns the
run offline when W&B does not answer within a few seconds; on the workers, a W&B run that cannot start, or that
goes away mid-run, is dropped with one warning while ``metrics.jsonl`` keeps every record. No network here: an
unreachable W&B is ``WANDB_BASE_URL`` on a closed (or silent) port of 127.0.0.1, and a W&B that refuses the key
is a small HTTP server on 127.0.0.1 that answers 401.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cluster import launcher
from orchestrator.cluster.preflight import preflight
from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError
from orchestrator.tracking import WANDB_CHECK_TIMEOUT_S, Tracker, read_metrics
from tests.conftest import REPO, tiny_job

ORCHESTRATOR = str(Path(sys.executable).with_name("orchestrator"))


def _job(tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path, mode: str, **training: Any) -> dict:
    job = tiny_job("wb", tiny_models["bert"], shared_data, tmp_path / "runs", stage=2, **training)
    job["tracking"]["wandb"]["mode"] = mode
    return job


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: a hung server or a firewall."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


class _FakeWandb(http.server.BaseHTTPRequestHandler):
    """Answers /healthz (the server is there) and refuses everything else with 401, as for a revoked key."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        code = 200 if self.path.startswith("/healthz") else 401
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "invalid api key"}]}')

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_wandb() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeWandb)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------- before resources
@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("k" * 23, "API key must have 40+ characters, has 23"),
        (f" {'k' * 40}\n", "the key starts or ends with whitespace"),
    ],
    ids=["23 characters", "pasted with whitespace"],
)
def test_a_malformed_key_is_a_clear_error_before_ray_starts(
    key, problem, tiny_models, shared_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_API_KEY", key)
    config = config_from_dict(_job(tiny_models, shared_data, tmp_path, "auto"))

    def no_ray(address: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray was started for a job whose W&B key can never work")

    monkeypatch.setattr(launcher, "ensure_ray", no_ray)
    with pytest.raises(ConfigError) as error:
        launcher.run_training(config)
    text = str(error.value)
    assert f"WANDB_API_KEY (environment): {problem}" in text
    assert "tracking.wandb.mode 'auto' logs to W&B online with it" in text
    assert "fix: set the key shown at https://wandb.ai/authorize" in text and "tracking.wandb.mode: offline" in text
    assert key.strip() not in text
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    for mode in ("offline", "disabled"):  # runs that never log online never look at the key or the server
        checked = preflight(config_from_dict(_job(tiny_models, shared_data, tmp_path, mode)))
        assert checked.config.tracking.wandb.mode == mode


@pytest.mark.parametrize("server", ["closed port", "silent port"])
def test_unreachable_wandb_turns_the_run_offline_within_seconds(
    server, silent_port, refusing_wandb, tiny_models, shared_data, tmp_path, monkeypatch, caplog
):
    port = _closed_port() if server == "closed port" else silent_port
    monkeypatch.setenv("WANDB_API_KEY", secrets.token_hex(20))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    config = config_from_dict(_job(tiny_models, shared_data, tmp_path, "auto"))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        checked = preflight(config)
    elapsed = time.monotonic() - started
    assert elapsed < WANDB_CHECK_TIMEOUT_S + 5, f"the check took {elapsed:.1f} s"
    assert checked.config.tracking.wandb.mode == "offline"  # what the workers get
    assert config.tracking.wandb.mode == "auto"  # the caller's config is not changed
    wandb_dir = tmp_path / "runs" / "wb" / "wandb"
    assert f"W&B at http://127.0.0.1:{port} did not answer within" in caplog.text
    assert f"upload it later with `wandb sync {wandb_dir}/offline-run-*`" in caplog.text
    monkeypatch.setenv("WANDB_BASE_URL", refusing_wandb)  # a server that answers (any status): the run stays online
    assert preflight(config).config.tracking.wandb.mode == "auto"


# --------------------------------------------------------------------------------------------- the Tracker
def _ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The orchestrator's log records (wandb logs its own errors too, depending on its state)."""
    return [r for r in caplog.records if r.name.startswith("orchestrator")]


def _warnings(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "warning"]


def test_a_tracker_whose_key_the_server_refuses_logs_offline_and_says_how_to_sync(
    refusing_wandb, tiny_models, shared_data, tmp_path, monkeypatch, caplog
):
    """The real wandb.init against a W&B that answers 401 (a revoked key): it fails in about a second."""
    monkeypatch.setenv("WANDB_API_KEY", secrets.token_hex(20))
    monkeypatch.setenv("WANDB_BASE_URL", refusing_wandb)
    config = config_from_dict(_job(tiny_models, shared_data, tmp_path, "online"))
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        tracker = Tracker(config, run_dir, enabled=True)
        for step in (1, 2):
            tracker.log("train", step, {"train/loss": 0.5})
        tracker.finish()
    assert tracker.wandb_path is None  # finished
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == [1, 2]
    assert len(_ours(caplog)) == 1
    assert "W&B could not start (online): CommError: " in caplog.text and "; logging offline instead" in caplog.text
    assert f"`wandb sync {run_dir / 'wandb'}/offline-run-*`" in caplog.text
    assert [w["message"] for w in _warnings(run_dir)] == [_ours(caplog)[0].getMessage()]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_tracker_whose_wandb_cannot_start_at_all_still_writes_every_record(
    tiny_models, shared_data, tmp_path, monkeypatch, caplog
):
    import wandb

    def broken(**kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wandb, "init", broken)
    config = config_from_dict(_job(tiny_models, shared_data, tmp_path, "offline"))
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        tracker = Tracker(config, tmp_path / "run", enabled=True)
        for step in (1, 2, 3):
            tracker.log("train", step, {"train/loss": 0.5})
        tracker.summary({"best": 1.0})
        tracker.finish()
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"] == [1, 2, 3]
    assert len(_ours(caplog)) == 1 and "training goes on without W&B" in caplog.text


class _RunThatGoesAway:
    """A W&B run whose service is gone after the first log call (what wandb 0.31 raises then)."""

    class settings:  # noqa: N801 - mimics wandb.Run.settings
        mode = "online"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.summary: dict[str, Any] = {}

    def log(self, values: dict[str, Any], step: int) -> None:
        self.calls.append(f"log {step}")
        if len(self.calls) > 1:
            raise ConnectionResetError("Connection lost")

    def finish(self) -> None:
        self.calls.append("finish")


def test_a_tracker_whose_wandb_goes_away_mid_run_warns_once_and_keeps_writing(
    tiny_models, shared_data, tmp_path, monkeypatch, caplog
):
    import wandb

    run = _RunThatGoesAway()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    config = config_from_dict(_job(tiny_models, shared_data, tmp_path, "online"))
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        tracker = Tracker(config, tmp_path / "run", enabled=True)
        for step in (1, 2, 3, 4):
            tracker.log("train", step, {"train/loss": 0.5})
        tracker.summary({"best": 1.0})
        tracker.finish()
    assert run.calls == ["log 1", "log 2"]  # no call after it failed (a finish could block on a dead service)
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"] == [1, 2, 3, 4]
    assert len(_ours(caplog)) == 1
    assert "W&B failed at step 2 (log: ConnectionResetError: Connection lost); training goes on" in caplog.text
    assert len(_warnings(tmp_path / "run")) == 1


# ------------------------------------------------------------------------------------------- end to end
def train_cli(
    job: dict[str, Any], tmp_path: Path, env: dict[str, str], *options: str, timeout: int = 900
) -> tuple[int, str]:
    """``orchestrator train JOB --address local [options]`` as a user runs it (its own Ray, no terminal); its exit
    code and output (stdout and stderr)."""
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    home = tmp_path / "home"
    full_env = {
        **os.environ,
        "WANDB_CONFIG_DIR": str(home / "wandb-config"),
        "WANDB_CACHE_DIR": str(home / "wandb-cache"),
        "WANDB_DATA_DIR": str(home / "wandb-data"),
        "PYTHONPATH": str(REPO),
        **env,
    }
    for name in ("WANDB_MODE", "RAY_ADDRESS"):  # as a user's shell: W&B's mode comes from the job file
        full_env.pop(name, None)
    done = subprocess.run(
        [ORCHESTRATOR, "train", str(job_file), "--address", "local", *options],
        env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.slow
def test_with_wandb_unreachable_an_auto_run_trains_offline_end_to_end(tiny_models, shared_data, tmp_path):
    """Before: rank 0 waited in wandb.init and the job failed after ~141 s (CommError, context deadline)."""
    url = f"http://127.0.0.1:{_closed_port()}"
    job = _job(tiny_models, shared_data, tmp_path, "auto")
    code, output = train_cli(job, tmp_path, {"WANDB_API_KEY": secrets.token_hex(20), "WANDB_BASE_URL": url})
    assert code == 0, output[-4000:]
    run_dir = tmp_path / "runs" / "wb"
    assert f"W&B at {url} did not answer within" in output and "wandb sync" in output
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (run_dir / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_key_the_server_refuses_the_worker_logs_offline_and_the_terminal_says_so(
    refusing_wandb, tiny_models, shared_data, tmp_path
):
    """W&B answers (the driver's check passes) but refuses the key: rank 0's wandb.init fails. Before: the job
    died with the traceback; now the worker logs offline, and its warning reaches the user's terminal through
    metrics.jsonl although the workers' output is not copied there."""
    job = _job(tiny_models, shared_data, tmp_path, "online")
    code, output = train_cli(job, tmp_path, {"WANDB_API_KEY": secrets.token_hex(20), "WANDB_BASE_URL": refusing_wandb})
    assert code == 0, output[-4000:]
    run_dir = tmp_path / "runs" / "wb"
    shown = [line for line in output.splitlines() if line.startswith("warning: W&B could not start (online)")]
    assert len(shown) == 1, output
    assert f"wandb sync {run_dir / 'wandb'}/offline-run-*" in shown[0]
    assert "Traceback" not in output
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_wandb_going_away_mid_run_never_stops_training(ray_cluster, tiny_models, shared_data, tmp_path):
    """Rank 0's W&B service process is killed after step 2 (before: the next log raised and the job failed)."""
    from tests.support.wandb_faults import KillWandbService

    job = _job(tiny_models, shared_data, tmp_path, "offline")
    result = launcher.run_training(config_from_dict(job), worker_callbacks=[KillWandbService(step=2)])
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    warnings = [r for r in records if r["kind"] == "warning"]
    assert len(warnings) == 1, json.dumps(warnings)
    assert warnings[0]["message"].startswith("W&B failed at step 2 (log: ")
    assert "training goes on without W&B, metrics.jsonl keeps every record" in warnings[0]["message"]
    assert (result.run_dir / "final" / "model.safetensors").is_file()
