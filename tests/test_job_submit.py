"""`ray job submit` end to end: a head started with `ray start --head` on loopback (token auth on, as
Ray 2.60 defaults), a 2-worker ZeRO-2 job submitted with the working dir uploaded, and only that head
stopped afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from orchestrator.cluster.jobs import find_auth_token
from tests.conftest import REPO, tiny_job
from tests.support.s3_server import S3_TEST_ENV

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
ORCHESTRATOR = str(Path(sys.executable).with_name("orchestrator"))


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def _user_env(**extra: str) -> dict[str, str]:
    """The environment of a user whose virtualenv is active: `python` on PATH is the project's."""
    env = {**os.environ, **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    for name in S3_TEST_ENV:  # the test session's S3 server (conftest's s3_server): not this user's shell
        env.pop(name, None)
    return env


def _stop_head(temp_dir: str) -> None:
    """Stop only the processes of this head (their command lines name its temp dir), never `ray stop`."""
    ours = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                ours.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in ours:
        proc.terminate()
    _, alive = psutil.wait_procs(ours, timeout=15)
    for proc in alive:
        proc.kill()


@contextlib.contextmanager
def running_head(**node_env: str) -> Iterator[tuple[str, str]]:
    """A `ray start --head` on loopback with ports and a temp dir of its own (token auth on); yields the
    dashboard address and the temp dir, and stops only this head's processes. ``node_env``: more variables in
    the head's environment, which every Ray process of the node (job drivers and workers included) inherits."""
    temp_dir = tempfile.mkdtemp(prefix="orh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard, agent, agent_grpc, client, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    env = _user_env(RAY_AUTH_MODE="token", **node_env)
    command = [
        RAY,
        "start",
        "--head",
        "--num-cpus",
        "3",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--ray-client-server-port",
        str(client),
        "--metrics-export-port",
        str(metrics),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--node-manager-port",
        str(node_mgr),
        "--object-manager-port",
        str(obj_mgr),
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the Jobs API comes up a little after `ray start` returns
            probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True)
            if probe.returncode == 0:
                break
            time.sleep(2)
        yield address, temp_dir
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head() -> Iterator[str]:
    with running_head() as (address, _):
        yield address


def served_job_records(address: str, job_id: str) -> dict[str, str]:
    """Everything the cluster serves about a job to a holder of its token, as text: the Jobs API's job info, job
    list and job logs (``JobSubmissionClient``), and the dashboard's job endpoints (HTTP GET /api/jobs/ and
    /api/jobs/<id>)."""
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {find_auth_token()}"}
    client = JobSubmissionClient(address, headers=headers)
    records = {
        "get_job_info": client.get_job_info(job_id).model_dump_json(),
        "list_jobs": json.dumps([job.model_dump(mode="json") for job in client.list_jobs()]),
        "get_job_logs": client.get_job_logs(job_id),
    }
    for path in ("/api/jobs/", f"/api/jobs/{job_id}"):
        with urllib.request.urlopen(urllib.request.Request(address + path, headers=headers), timeout=30) as answer:
            records[f"GET {path}"] = answer.read().decode()
    return records


def _job_dir(tiny_models, shared_data, tmp_path: Path) -> tuple[Path, Path]:
    """A working dir with the project's code (as a user's checkout) and a tiny job config inside it."""
    work = tmp_path / "work"
    shutil.copytree(REPO / "orchestrator", work / "orchestrator", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "jobs", work / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    job = tiny_job("submitted", tiny_models["bert"], shared_data, tmp_path / "runs", stage=2)
    config = work / "configs" / "tiny.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump(job))
    return work, config


def ray_job_submit(address: str, work: Path, env: dict[str, str], *, timeout: int) -> str:
    """`ray job submit --working-dir work -- python jobs/train.py configs/tiny.yaml`; its output, once it succeeded."""
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(work), "--",
         "python", "jobs/train.py", "configs/tiny.yaml"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    return output


def test_ray_job_submit_runs_a_two_worker_zero2_job(ray_head, tiny_models, shared_data, tmp_path):
    work, config = _job_dir(tiny_models, shared_data, tmp_path)
    env = _user_env(RAY_AUTH_MODE="token")
    output = ray_job_submit(ray_head, work, env, timeout=600)
    assert "succeeded" in output.lower()
    final = tmp_path / "runs" / "submitted" / "final"
    assert (final / "model.safetensors").is_file()
    token = find_auth_token()
    assert token and token not in output


@pytest.mark.ci
def test_orchestrator_submit_follows_logs_and_fails_loudly(ray_head, tiny_models, shared_data, tmp_path):
    work, config = _job_dir(tiny_models, shared_data, tmp_path)
    env = _user_env()
    env.pop("RAY_AUTH_MODE", None)  # orchestrator submit finds the token itself
    planted = secrets.token_hex(20)
    env["WANDB_API_KEY"] = planted  # set in the user's shell: never sent with the job (issue 20)
    env["WANDB_MODE"] = "offline"
    ok = subprocess.run(
        [ORCHESTRATOR, "submit", str(config), "--address", ray_head, "--working-dir", str(work)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = ok.stdout + ok.stderr
    assert ok.returncode == 0, output[-4000:]
    # What the cluster keeps and serves about the job (the client's own output is masked, so it proves nothing).
    job_id = re.search(r"submitted (\S+) to ", output).group(1)
    served = served_job_records(ray_head, job_id)
    assert "WANDB_MODE" in served["get_job_info"]  # the runtime env is in what was searched
    assert [where for where, text in served.items() if planted in text] == []
    assert "WANDB_API_KEY set here: not sent" in output
    assert (tmp_path / "runs" / "submitted" / "final" / "config.json").is_file()

    bad = subprocess.run(
        [
            ORCHESTRATOR,
            "submit",
            str(config),
            "--address",
            ray_head,
            "--working-dir",
            str(work),
            "--set",
            "name=broken",
            "--set",
            "model.path=/nonexistent/model/folder",
        ],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0
    assert "FAILED" in bad.stdout + bad.stderr
