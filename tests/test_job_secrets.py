"""Secrets never travel with a job (issue 20, item 9), without a cluster: what `orchestrator submit` and the
retraining scheduler hand to the Jobs API, the secrets file and its worker hook, and the driver's load of it.

The real Jobs API, dashboard and job logs are checked against a `ray start --head` in tests/test_secrets.py.
"""

from __future__ import annotations

import importlib
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cluster import jobs
from orchestrator.config import load_config
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.tracking import SECRETS_FILE_ENV, SECRETS_HOOK, load_job_secrets, read_secrets_file
from tests.conftest import REPO, tiny_job
from tests.test_continual import FakeClock, FakeJobClient, _scheduler, _shard


class RecordingClient:
    """Takes what a real ``JobSubmissionClient.submit_job`` takes (keyword arguments only) and keeps it."""

    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []

    def submit_job(self, *, entrypoint: str, runtime_env: dict[str, Any], entrypoint_num_cpus: float = 0,
                   entrypoint_num_gpus: float = 0, metadata: dict[str, str] | None = None,
                   submission_id: str | None = None) -> str:
        self.submitted.append({"entrypoint": entrypoint, "runtime_env": runtime_env, "metadata": metadata})
        return "raysubmit_test"


@pytest.fixture
def planted(monkeypatch) -> dict[str, str]:
    """Recognisable values in the secret variables of the submitting shell (as a user with W&B set up has)."""
    values = {"WANDB_API_KEY": secrets.token_hex(20), "HF_TOKEN": f"hf_{secrets.token_hex(16)}"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return values


@pytest.fixture
def unset(monkeypatch):
    """Unset variables, restored afterwards even when the code under test sets them (os.environ.update)."""

    def unset_names(*names: str) -> None:
        for name in names:
            monkeypatch.setenv(name, "x")  # records the original state, so that teardown restores it
            monkeypatch.delenv(name)

    return unset_names


def _secrets_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _submit(tmp_path: Path, monkeypatch, **options: Any) -> dict[str, Any]:
    """``orchestrator submit`` of a tiny job without following it; what the Jobs API was sent."""
    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True)
    (work / "jobs" / "train.py").write_text("")
    job = tiny_job("s", Path("/models/tiny"), Path("/data"), tmp_path / "runs")
    config_path = work / "job.yaml"
    config_path.write_text(yaml.safe_dump(job))
    client = RecordingClient()
    monkeypatch.setattr(jobs, "job_client", lambda address: client)
    kwargs: dict[str, Any] = {"env_names": [], "pip": [], **options}
    jobs.submit_job(
        load_config(config_path), config_path=config_path, address="http://127.0.0.1:1", overrides=[],
        working_dir=work, entrypoint_num_cpus=0, entrypoint_num_gpus=0, follow=False, resume=False,
        echo=lambda text: None, **kwargs,
    )
    return client.submitted[0]


def test_submit_sends_no_secret_set_in_the_submitting_shell_and_still_passes_plain_variables(
    tmp_path, monkeypatch, planted
):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/etc/ray/token")  # where a secret is: not the secret
    sent = _submit(tmp_path, monkeypatch, env_names=["TOKENIZERS_PARALLELISM", "RAY_AUTH_TOKEN_PATH"])
    text = json.dumps(sent)
    assert [name for name, value in planted.items() if value in text] == []
    env_vars = sent["runtime_env"]["env_vars"]
    assert env_vars["WANDB_MODE"] == "offline"  # non-secret W&B settings still pass
    assert env_vars["TOKENIZERS_PARALLELISM"] == "false" and env_vars["RAY_AUTH_TOKEN_PATH"] == "/etc/ray/token"


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "HF_TOKEN", "MY_SERVICE_TOKEN", "DB_PASSWORD", "AWS_SECRET_KEY"])
def test_env_option_refuses_a_secret_and_says_where_secrets_go(tmp_path, monkeypatch, planted, name):
    monkeypatch.setenv(name, "a-value-that-must-stay-here")
    with pytest.raises(OrchestratorError) as error:
        _submit(tmp_path, monkeypatch, env_names=[name])
    assert f"--env {name}: a secret never travels with a job" in str(error.value)
    assert "--secrets-file" in str(error.value) and "a-value-that-must-stay-here" not in str(error.value)


def test_secrets_file_travels_by_path_and_every_worker_reads_it_at_start(tmp_path, monkeypatch, planted, unset):
    key = secrets.token_hex(20)
    path = _secrets_file(tmp_path / "job.env", f"# W&B\nWANDB_API_KEY={key}\nexport HF_TOKEN='hf_{key}'\n")
    sent = _submit(tmp_path, monkeypatch, secrets_file=str(path))
    runtime_env = sent["runtime_env"]
    assert key not in json.dumps(sent)
    assert runtime_env["env_vars"][SECRETS_FILE_ENV] == str(path.resolve())
    assert runtime_env["worker_process_setup_hook"] == SECRETS_HOOK

    # A worker of the job: the runtime env's variables, then Ray calls the hook (by its import path) at start.
    unset("WANDB_API_KEY", "HF_TOKEN")
    monkeypatch.setenv(SECRETS_FILE_ENV, runtime_env["env_vars"][SECRETS_FILE_ENV])
    module, _, function = runtime_env["worker_process_setup_hook"].rpartition(".")
    getattr(importlib.import_module(module), function)()
    assert jobs.os.environ["WANDB_API_KEY"] == key and jobs.os.environ["HF_TOKEN"] == f"hf_{key}"


def test_a_secrets_file_others_can_read_or_that_is_malformed_is_refused_without_showing_it(tmp_path):
    key = secrets.token_hex(20)
    shared = _secrets_file(tmp_path / "shared.env", f"WANDB_API_KEY={key}\n", mode=0o644)
    with pytest.raises(OrchestratorError, match=r"mode 644 lets other users read the secrets; run: chmod 600"):
        read_secrets_file(shared)
    malformed = _secrets_file(tmp_path / "bad.env", f"WANDB_API_KEY={key}\n{key}\n")
    with pytest.raises(OrchestratorError) as error:
        read_secrets_file(malformed)
    assert f"{malformed}:2: expected NAME=value" in str(error.value) and key not in str(error.value)
    missing = tmp_path / "missing.env"
    assert jobs.check_secrets_file(str(missing)) == str(missing)  # may be mounted on the cluster only: passed on
    with pytest.raises(OrchestratorError, match="put the file on storage every Ray node mounts"):
        read_secrets_file(missing)  # ... where the job's driver reads it before taking resources
    with pytest.raises(OrchestratorError, match="chmod 600"):
        jobs.check_secrets_file(str(shared))  # one this machine sees is checked before submitting


def test_a_worker_that_cannot_read_the_file_logs_it_and_starts(tmp_path, monkeypatch, caplog, unset):
    unset("WANDB_API_KEY")
    monkeypatch.setenv(SECRETS_FILE_ENV, str(tmp_path / "not-mounted-here.env"))
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        assert load_job_secrets() == []
    assert "secrets not loaded" in caplog.text and "not-mounted-here.env" in caplog.text
    with pytest.raises(OrchestratorError):
        load_job_secrets(strict=True)


def test_the_driver_loads_the_job_secrets_file_before_its_checks(tmp_path, monkeypatch, tiny_models, shared_data,
                                                                   unset):
    from orchestrator.cluster.preflight import preflight

    unset("HF_TOKEN")
    token = f"hf_{secrets.token_hex(16)}"
    monkeypatch.setenv(SECRETS_FILE_ENV, str(_secrets_file(tmp_path / "job.env", f"HF_TOKEN={token}\n")))
    config = load_config_dict(tmp_path, tiny_job("drv", tiny_models["bert"], shared_data, tmp_path / "runs"))
    preflight(config)
    assert jobs.os.environ["HF_TOKEN"] == token  # model downloads on this driver may need it

    (tmp_path / "job.env").chmod(0o640)
    with pytest.raises(ConfigError, match=r"ORCHESTRATOR_SECRETS_FILE \(environment\): .*chmod 600"):
        preflight(config)


def load_config_dict(tmp_path: Path, job: dict[str, Any]) -> Any:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return load_config(path)


def test_the_scheduler_sends_rounds_without_secrets(tmp_path, monkeypatch, planted):
    client, clock = FakeJobClient(), FakeClock()
    scheduler = _scheduler(tmp_path, client, clock)
    (tmp_path / "incoming").mkdir()
    _shard(tmp_path / "incoming", "s1.tsv", 20)
    assert scheduler.tick().startswith("submitted round 1")
    text = json.dumps(client.submitted[0]["runtime_env"])
    assert [name for name, value in planted.items() if value in text] == []

    scheduler.schedule.env = ["WANDB_API_KEY"]
    with pytest.raises(OrchestratorError, match=r"schedule.env: WANDB_API_KEY: a secret never travels with a job"):
        scheduler.runtime_env()


def test_the_shipped_runtime_env_and_readme_name_the_mechanism():
    """Where users copy from: cluster/runtime_env.yaml and the README send secrets nowhere near a runtime env."""
    runtime_env = (REPO / "cluster" / "runtime_env.yaml").read_text()
    assert "orchestrator submit --env" not in runtime_env  # it used to tell users to pass secrets that way
    readme = (REPO / "README.md").read_text()
    assert "passes `WANDB_API_KEY` (and `--env` names) to the job through the runtime env" not in readme
    assert "--secrets-file" in readme
