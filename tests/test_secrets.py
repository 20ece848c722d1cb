"""Secrets in the environment never reach what a run writes or prints (issue 7).

One real tiny training (2 Ray workers, ZeRO-2, W&B offline) runs with planted values in every secret variable
the project knows of (``orchestrator.tracking.SECRET_ENV_VARS``), then every byte the run left behind is
searched for them: metrics, saved job configs, checkpoints, the exported model, the W&B offline run (its binary
``.wandb`` log included), the model registry, the Ray session's logs, and the printed output of ``orchestrator
train`` and ``orchestrator registry``.

The run happens in a child process with a Ray instance of its own (``address="local"``, its own temp dir), so
the planted ``RAY_AUTH_TOKEN`` is the token of that instance alone: it cannot break the authentication of a
cluster that is already running (the session's ``ray_cluster``, or a head started by ``ray start``), and the
default token file ``~/.ray/auth_token`` is not touched.

A submitted job (issue 20, item 9) carries no secret: against a real ``ray start --head``, planted values are in
none of what the cluster serves about the job (Jobs API job info and list, job logs, the dashboard's job
endpoints) nor in the head's session logs, while the job's driver, a task and a Ray Train worker still have them,
from the node's environment and from the job's 0600 secrets file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.tracking import SECRET_ENV_VARS, SECRETS_FILE_ENV
from tests.conftest import REPO, tiny_job
from tests.test_job_submit import ORCHESTRATOR, _job_dir, _stop_head, _user_env, running_head, served_job_records

pytestmark = [pytest.mark.slow, pytest.mark.ci]

# The child: a Ray instance of its own, then the user's commands. Worker output reaches its stderr (log_to_driver).
DRIVER = r"""
import os
import sys

import ray

from orchestrator.cli import app
from orchestrator.lifecycle.registry import Registry

job, ray_dir, registry, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")


def cli(*args):
    try:
        app(list(args), prog_name="orchestrator")
    except SystemExit as exc:
        if exc.code:
            raise


ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=ray_dir)
try:

    @ray.remote(num_cpus=0)
    def environment_of_a_worker():
        return {name: os.environ.get(name) for name in names}

    seen = ray.get(environment_of_a_worker.remote())
    missing = [name for name in names if seen[name] != os.environ[name]]
    print("planted values missing in the workers:", missing or "none")
    cli("train", job)
finally:
    ray.shutdown()
cli("registry", "list", "--registry", registry)
for model in Registry(registry).models(None, None):
    cli("registry", "show", model.id, "--registry", registry)
    cli("registry", "show", model.id, "--registry", registry, "--json")
"""


def _files_holding(root: Path, planted: dict[str, bytes]) -> dict[str, list[str]]:
    """For each file under root (binary files read as bytes), the names of the planted values it holds."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            content = path.read_bytes()
        except OSError:
            continue  # a socket or a file removed while we walk
        hits = [name for name, value in planted.items() if value in content]
        if hits:
            found[str(path)] = hits
    return found


@pytest.fixture
def planted() -> dict[str, str]:
    """A fresh random value per secret variable: whatever holds one of them got it from the environment."""
    return {name: secrets.token_hex(20) for name in SECRET_ENV_VARS}  # 40 hex characters, W&B key length


def test_planted_secrets_appear_in_no_file_log_or_output_of_a_run(tiny_models, shared_data, tmp_path, planted):
    assert {"WANDB_API_KEY", "RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY"} <= set(planted)
    default_token = Path.home() / ".ray" / "auth_token"
    token_file_before = default_token.stat().st_mtime_ns if default_token.exists() else None

    runs = tmp_path / "runs"
    job = tiny_job("secrets", tiny_models["bert"], shared_data, runs, stage=2, max_steps=4, checkpoint_every_steps=2)
    job["tracking"]["wandb"]["mode"] = "offline"  # explicitly: 'auto' would go online with a WANDB_API_KEY set
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    registry = runs / "registry.sqlite"  # output.registry: auto

    home = tmp_path / "home"  # W&B's own folders (settings, cache, artifacts) inside the test's temp dir too
    env = {
        **os.environ,
        **planted,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(home / "wandb-config"),
        "WANDB_CACHE_DIR": str(home / "wandb-cache"),
        "WANDB_DATA_DIR": str(home / "wandb-data"),
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        "PYTHONPATH": str(REPO),
    }
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    ray_dir = tempfile.mkdtemp(prefix="ors-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, str(job_file), ray_dir, str(registry), ",".join(planted)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            timeout=900,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output.decode(errors="replace")[-6000:]
        assert b"planted values missing in the workers: none" in output  # the workers had them to leak

        # Printed: the train progress, the result table, the registry listing and records, Ray's worker logs.
        printed = [name for name, value in planted.items() if value.encode() in output]
        assert printed == [], f"printed by orchestrator train/registry: {printed}"

        # Written: everything under the test's temp dir (run dir, registry, W&B folders) and the Ray session.
        leaks = {**_files_holding(tmp_path, {n: v.encode() for n, v in planted.items()})}
        leaks.update(_files_holding(Path(ray_dir), {n: v.encode() for n, v in planted.items()}))
        assert leaks == {}, f"planted secrets found in: {leaks}"
    finally:
        _stop_head(ray_dir)  # only the child's Ray instance: its command lines name its temp dir
        shutil.rmtree(ray_dir, ignore_errors=True)

    # The search covered what a run writes (it would pass trivially if the run wrote elsewhere).
    run_dir = runs / "secrets"
    written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert "metrics.jsonl" in written
    assert {"final/orchestrator_job.yaml", "final/model.safetensors", "best/orchestrator_job.yaml"} <= written
    assert any(p.startswith("ray/") and "/checkpoint_" in p and p.endswith(".pt") for p in written)
    assert any(p.startswith("wandb/offline-run-") and p.endswith(".wandb") for p in written)
    assert registry.is_file()

    # Exports are safetensors (no pickled weights), and the per-rank RNG files load without unpickling code.
    assert not [p for p in written if p.startswith(("final/", "best/")) and p.endswith((".bin", ".pt", ".pkl"))]
    rng_files = sorted(run_dir.glob("ray/*/checkpoint_*/rng_rank*.pt"))
    assert len(rng_files) >= 2
    for rng_file in rng_files:
        state = torch.load(rng_file, weights_only=True)
        assert set(state) >= {"torch", "python", "numpy"}

    token_file_after = default_token.stat().st_mtime_ns if default_token.exists() else None
    assert token_file_after == token_file_before, "the default Ray token file was rewritten"


# Stands in for jobs/train.py in the uploaded working dir: where the job's processes see the secrets, as digests.
PROBE = r"""
import hashlib, json, os, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestrator.cluster.preflight import preflight
from orchestrator.config import load_config

NAMES = ("WANDB_API_KEY", "HF_TOKEN")


def digests():
    return {n: hashlib.sha256(os.environ[n].encode()).hexdigest() if os.environ.get(n) else None for n in NAMES}


def train_worker(config):
    if ray.train.get_context().get_world_rank() == 0:  # where W&B runs
        Path(config["out"], "train_worker.json").write_text(json.dumps(digests()))


out = Path(os.environ["PROBE_OUT"])
overrides = [sys.argv[i + 1] for i, arg in enumerate(sys.argv) if arg == "--set"]
checked = preflight(load_config(sys.argv[1], overrides))  # what `orchestrator train` does first, on the driver
(out / "driver.json").write_text(json.dumps(digests()))
ray.init()
(out / "task.json").write_text(json.dumps(ray.get(ray.remote(num_cpus=0)(digests).remote())))
storage = str(checked.run_dir / "ray")
TorchTrainer(train_worker, train_loop_config={"out": str(out)}, scaling_config=ScalingConfig(num_workers=1),
             run_config=RunConfig(name="probe", storage_path=storage)).fit()
print("probe done: digests only")
"""


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_a_submitted_job_carries_no_secret_yet_its_processes_have_them(tiny_models, shared_data, tmp_path):
    wandb_key, hf_token = secrets.token_hex(20), f"hf_{secrets.token_hex(16)}"
    # HF_TOKEN from the node's environment (as the KubeRay manifests give a Secret to the Ray pods); the W&B key
    # from the job's secrets file on storage the nodes mount (here: the same host).
    with running_head(HF_TOKEN=hf_token) as (address, head_dir):
        work, config = _job_dir(tiny_models, shared_data, tmp_path)
        (work / "jobs" / "train.py").write_text(PROBE)
        secrets_file = tmp_path / "shared" / "orchestrator.env"
        secrets_file.parent.mkdir()
        secrets_file.write_text(f"WANDB_API_KEY={wandb_key}\n")
        secrets_file.chmod(0o600)
        probe_out = tmp_path / "probe"
        probe_out.mkdir()
        # The user's shell has both secrets set too (so they could leak from there) and names the file.
        env = _user_env(WANDB_API_KEY=wandb_key, HF_TOKEN=hf_token, PROBE_OUT=str(probe_out))
        env[SECRETS_FILE_ENV] = str(secrets_file)
        env.pop("RAY_AUTH_MODE", None)
        submitted = subprocess.run(
            [ORCHESTRATOR, "submit", str(config), "--address", address, "--working-dir", str(work),
             "--env", "PROBE_OUT"],
            env=env, cwd=work, capture_output=True, text=True, timeout=600,
        )
        output = submitted.stdout + submitted.stderr
        job_id = re.search(r"submitted (\S+) to ", output).group(1)
        served = served_job_records(address, job_id)
        head_logs = _files_holding(Path(head_dir), {"WANDB_API_KEY": wandb_key.encode()})

    planted = {"WANDB_API_KEY": wandb_key, "HF_TOKEN": hf_token}
    assert "PROBE_OUT" in served["GET /api/jobs/" + job_id]  # the job's runtime env is in what was searched
    leaks = {where: [n for n, v in planted.items() if v in text] for where, text in served.items()}
    assert {where: names for where, names in leaks.items() if names} == {}, "secrets served with the job"
    assert head_logs == {}, f"the W&B key is in the head's session files: {head_logs}"
    assert [name for name, value in planted.items() if value in output] == []

    assert submitted.returncode == 0, output[-4000:]
    assert "probe done: digests only" in served["get_job_logs"]
    expected = {"WANDB_API_KEY": _sha(wandb_key), "HF_TOKEN": _sha(hf_token)}
    for process in ("driver", "task", "train_worker"):
        assert json.loads((probe_out / f"{process}.json").read_text()) == expected, process

