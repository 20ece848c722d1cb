"""Fault tolerance end to end on a local Ray cluster (issue 7): resuming on another number of workers, a
worker process killed with SIGKILL, checkpoint retention and a crash while a checkpoint is being written."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cluster.launcher import run_training
from orchestrator.config import config_from_dict
from orchestrator.tracking import read_metrics
from tests.conftest import tiny_job
from tests.support.faults import FailAfterCheckpoint, FailWhileUploadingCheckpoint
from tests.test_job_submit import RAY, _free_ports, _job_dir, _stop_head, _user_env, ray_job_submit

pytestmark = pytest.mark.slow


def _checkpoints(run_dir: Path, name: str) -> dict[int, Path]:
    """Complete checkpoints in a run's Ray storage by the step they were taken at."""
    found = {}
    for folder in (run_dir / "ray" / name).glob("checkpoint_*"):
        state = folder / "train_state.json"
        if state.is_file():
            found[json.loads(state.read_text())["step"]] = folder
    return found


def _param_l2(checkpoint: Path, model_path: Path) -> float:
    """L2 norm of the model parameters consolidated from a checkpoint's ZeRO shards (any stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    names = {n for n, _ in model.named_parameters()}
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
    assert names <= set(state)
    return math.sqrt(sum(float(state[n].detach().double().pow(2).sum()) for n in names))


@pytest.mark.parametrize(("stage", "grad_accumulation"), [(2, 1), pytest.param(3, 2, marks=pytest.mark.ci)])
def test_a_two_worker_checkpoint_resumes_on_one_worker(
    stage, grad_accumulation, ray_cluster, tiny_models, shared_data, tmp_path, monkeypatch
):
    name = f"reshard-z{stage}"
    job = tiny_job(name, tiny_models["bert"], shared_data, tmp_path, stage=stage)  # 6 steps, checkpoint every 3
    with pytest.raises(Exception, match="injected fault"):
        run_training(config_from_dict(job), worker_callbacks=[FailAfterCheckpoint(step=3)])
    saved = _checkpoints(tmp_path / name, name)
    assert list(saved) == [3]
    expected_l2 = _param_l2(saved[3], tiny_models["bert"])

    # --resume with one worker; ZeRO-3 keeps the global batch (2 micro-batches per step), ZeRO-2 halves it.
    job["scaling"]["num_workers"] = 1
    job["training"]["grad_accumulation"] = grad_accumulation
    result = run_training(config_from_dict(job), resume=True)

    records = read_metrics(result.run_dir)
    start = [r for r in records if r["kind"] == "start"][-1]
    assert start["world_size"] == 1 and start["resumed_from_step"] == 3
    assert start["resume/old_world_size"] == 2 and start["resume/universal_checkpoint"] is True
    # 3 micro-batches on each of 2 workers = the first 48 rows of the epoch = 6 micro-batches of 1 worker.
    position = (start["resume/old_batch_in_epoch"], start["resume/batch_in_epoch"], start["resume/skipped_rows"])
    assert position == (3, 6, 0)
    # The re-sharded weights right after loading are the checkpointed ones.
    assert start["resume/weights_l2"] == pytest.approx(expected_l2, rel=1e-6)
    assert ("resume/warning" in start) == (grad_accumulation == 1)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert result.metrics["step"] == 6
    assert math.isfinite(result.metrics["sst2/loss"]) and 0.0 <= result.metrics["sst2/accuracy"] <= 1.0

    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(result.final_model)
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in exported.parameters())
    final = _checkpoints(tmp_path / name, name)
    assert json.loads((final[6] / "train_state.json").read_text())["world_size"] == 1


def _registered_checkpoint_step(storage: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered (its checkpoint manager snapshot)."""
    snapshot = storage / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, json.JSONDecodeError):
        return None
    return latest["metrics"].get("step") if latest else None


class WorkerKiller(threading.Thread):
    """Waits until Ray Train has registered a checkpoint and training has gone on past it, then SIGKILLs one
    live training worker process of this test's Ray cluster (found through Ray's state API, not by process
    name: other Ray clusters may run on the same machine)."""

    def __init__(self, run_dir: Path, name: str, *, steps_past_checkpoint: int = 2, timeout_s: float = 600):
        import ray

        super().__init__(daemon=True)
        self.ray_address = ray.get_runtime_context().gcs_address  # this test's cluster
        self.run_dir, self.storage = run_dir, run_dir / "ray" / name
        self.steps_past, self.timeout_s = steps_past_checkpoint, timeout_s
        self.killed_pid: int | None = None
        self.checkpoint_step: int | None = None
        self.at_step: int | None = None

    def run(self) -> None:
        from ray.util.state import list_actors

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and self.killed_pid is None:
            registered = _registered_checkpoint_step(self.storage)
            steps = [r["step"] for r in read_metrics(self.run_dir) if r["kind"] == "train"]
            if registered is not None and steps and steps[-1] >= registered + self.steps_past:
                workers = list_actors(
                    address=self.ray_address,
                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                )
                if workers:
                    self.checkpoint_step, self.at_step = registered, steps[-1]
                    self.killed_pid = workers[0].pid
                    os.kill(self.killed_pid, signal.SIGKILL)
                    return
            time.sleep(0.05)


@pytest.mark.ci
def test_a_sigkilled_worker_restarts_from_the_checkpoint_and_ends_like_an_uninterrupted_run(
    ray_cluster, tiny_models, shared_data, tmp_path
):
    def job(name: str) -> dict:
        # 30 steps (2.5 epochs of 12 batches per worker), a checkpoint and an eval every 10; dropout on.
        spec = tiny_job(
            name,
            tiny_models["bert"],
            shared_data,
            tmp_path,
            stage=2,
            max_steps=30,
            eval_every_steps=10,
            checkpoint_every_steps=10,
        )
        spec["scaling"]["max_failures"] = 1
        return spec

    started = time.monotonic()
    reference = run_training(config_from_dict(job("uninterrupted")))
    reference_s = time.monotonic() - started

    killer = WorkerKiller(tmp_path / "killed", "killed")
    killer.start()
    started = time.monotonic()
    result = run_training(config_from_dict(job("killed")))
    killed_s = time.monotonic() - started
    killer.join(timeout=5)
    assert killer.killed_pid is not None, "the run ended before a worker could be killed"
    assert killer.checkpoint_step in (10, 20)

    starts = [r for r in read_metrics(result.run_dir) if r["kind"] == "start"]
    assert len(starts) == 2
    # Restarted from the latest registered checkpoint (or the next one, if it was registered as the kill landed).
    assert starts[1]["resumed_from_step"] in (killer.checkpoint_step, killer.checkpoint_step + 10)
    assert starts[1]["resumed_from_step"] < killer.at_step + 10
    assert result.metrics["step"] == reference.metrics["step"] == 30

    # Exact resume (weights, Adam moments, LR schedule, data position, every rank's RNG incl. dropout): the
    # restarted run computes what the uninterrupted one did, bit for bit on CPU (fixed thread count, gloo sums
    # of two ranks in a fixed order), so the comparison is equality, not a tolerance.
    for key in ("sst2/loss", "sst2/accuracy", "sst2/f1_macro"):
        assert result.metrics[key] == reference.metrics[key], key

    def last_train_losses(run_dir: Path) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}  # last wins

    assert last_train_losses(result.run_dir) == last_train_losses(reference.run_dir)
    print(
        f"\nSIGKILL pid {killer.killed_pid} at step {killer.at_step} (checkpoint {killer.checkpoint_step}); "
        f"uninterrupted {reference_s:.0f} s, killed+restarted {killed_s:.0f} s; final sst2/loss "
        f"{reference.metrics['sst2/loss']!r} vs {result.metrics['sst2/loss']!r}"
    )


@pytest.mark.parametrize("keep_by", ["latest", "best"])
def test_checkpoint_retention_keeps_the_latest_or_the_best_n(keep_by, ray_cluster, tiny_models, shared_data, tmp_path):
    name = f"keep-{keep_by}"
    # A checkpoint and an eval at each of 6 steps, 2 kept. "best" is ranked by the *largest* eval loss here: the
    # loss falls over these steps, so the kept set then differs from the latest two and the ranking shows.
    job = tiny_job(
        name,
        tiny_models["bert"],
        shared_data,
        tmp_path,
        stage=2,
        checkpoint_every_steps=1,
        eval_every_steps=1,
        metric="sst2/loss",
        metric_mode="max",
    )
    job["output"].update(keep_checkpoints=2, keep_checkpoints_by=keep_by)
    result = run_training(config_from_dict(job))

    storage = tmp_path / name / "ray" / name
    kept = _checkpoints(tmp_path / name, name)
    assert len([f for f in storage.glob("checkpoint_*") if f.is_dir()]) == len(kept)  # nothing else left behind
    losses = {r["step"]: r["sst2/loss"] for r in read_metrics(result.run_dir) if r["kind"] == "eval"}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    if keep_by == "latest":
        assert sorted(kept) == [5, 6]
    else:
        best_two = sorted(losses, key=lambda step: -losses[step])[:2]
        assert sorted(kept) == sorted({*best_two, 6})  # the N best, and the latest (what a resume continues from)
        assert set(best_two) != {5, 6}
    assert _registered_checkpoint_step(storage) == 6


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_to_resume_from(
    ray_cluster, tiny_models, shared_data, tmp_path, monkeypatch
):
    name = "torn"
    job = tiny_job(name, tiny_models["bert"], shared_data, tmp_path, stage=2, checkpoint_every_steps=2)
    config = config_from_dict(job)
    # Rank 0 copies half of its files of the step-4 checkpoint to storage, then dies inside ray.train.report.
    with pytest.raises(Exception, match="injected fault while uploading checkpoint"):
        run_training(config, worker_callbacks=[FailWhileUploadingCheckpoint(step=4)])

    storage = tmp_path / name / "ray" / name
    folders = sorted(f for f in storage.glob("checkpoint_*") if f.is_dir())
    complete = _checkpoints(tmp_path / name, name)
    torn = [f for f in folders if not (f / "train_state.json").exists()]
    assert list(complete) == [2] and len(torn) == 1 and len(folders) == 2
    assert any(torn[0].rglob("*optim_states.pt"))  # a real, partly written checkpoint folder is there...
    assert _registered_checkpoint_step(storage) == 2  # ...but Ray Train never registered it

    result = run_training(config, resume=True)
    records = read_metrics(result.run_dir)
    assert [r["resumed_from_step"] for r in records if r["kind"] == "start"] == [None, 2]
    assert result.metrics["step"] == 6
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(result.final_model)


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    started = subprocess.run(
        [RAY, "start", *args, "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180
    )
    assert started.returncode == 0, started.stdout + started.stderr


def _nodes(gcs: str, env: dict[str, str]) -> list[dict]:
    listed = subprocess.run(
        [RAY, "list", "nodes", "--address", gcs, "--format", "json"], env=env, capture_output=True, text=True
    )
    return json.loads(listed.stdout) if listed.returncode == 0 and listed.stdout.strip() else []


@pytest.fixture
def two_node_cluster():
    """A head (1 CPU, resource node_a) and a second node (1 CPU, node_b) on this machine: two raylets, each with
    its own ports and temp dir, token auth on. Only their processes are stopped afterwards."""
    head_dir = tempfile.mkdtemp(prefix="orh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    node_dir = tempfile.mkdtemp(prefix="orn-", dir="/tmp")
    env = _user_env(RAY_AUTH_MODE="token")
    gcs, dashboard, client, *head_ports = _free_ports(9)
    node_ports = _free_ports(6)

    def node_args(ports: list[int], temp_dir: str) -> list[str]:
        manager, objects, metrics, agent, agent_grpc, runtime_env = ports
        return [
            "--node-ip-address",
            "127.0.0.1",
            "--node-manager-port",
            str(manager),
            "--object-manager-port",
            str(objects),
            "--metrics-export-port",
            str(metrics),
            "--dashboard-agent-listen-port",
            str(agent),
            "--dashboard-agent-grpc-port",
            str(agent_grpc),
            "--runtime-env-agent-port",
            str(runtime_env),
            "--temp-dir",
            temp_dir,
            "--num-cpus",
            "1",
        ]

    try:
        _ray_start(
            [
                "--head",
                "--port",
                str(gcs),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dashboard),
                "--ray-client-server-port",
                str(client),
                "--resources",
                '{"node_a": 1}',
                *node_args(head_ports, head_dir),
            ],
            env,
        )
        _ray_start(
            ["--address", f"127.0.0.1:{gcs}", "--resources", '{"node_b": 1}', *node_args(node_ports, node_dir)], env
        )
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # both nodes alive and the Jobs API up
            alive = [n for n in _nodes(f"127.0.0.1:{gcs}", env) if n["state"] == "ALIVE"]
            jobs_up = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True)
            if len(alive) == 2 and jobs_up.returncode == 0:
                break
            time.sleep(2)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        _stop_head(node_dir)
        _stop_head(head_dir)
        shutil.rmtree(node_dir, ignore_errors=True)
        shutil.rmtree(head_dir, ignore_errors=True)


def test_a_job_submitted_to_a_two_node_cluster_spreads_its_workers(
    two_node_cluster, tiny_models, shared_data, tmp_path
):
    work, config_file = _job_dir(tiny_models, shared_data, tmp_path)
    job = yaml.safe_load(config_file.read_text())
    job["name"] = "two-nodes"
    job["scaling"].update(placement_strategy="SPREAD", cpus_per_worker=1)
    job["output"]["storage_path"] = str(tmp_path / "shared-storage")  # one filesystem that both nodes see
    config_file.write_text(yaml.safe_dump(job))
    env = two_node_cluster["env"]
    ray_job_submit(two_node_cluster["address"], work, env, timeout=900)

    run_dir = tmp_path / "runs" / "two-nodes"
    start = [r for r in read_metrics(run_dir) if r["kind"] == "start"][0]
    assert start["world_size"] == 2
    rank_nodes = start["worker_nodes"]
    assert len(set(rank_nodes)) == 2, rank_nodes  # the two ranks ran on different Ray nodes
    resources = {n["node_id"]: n["resources_total"] for n in _nodes(two_node_cluster["gcs"], env)}
    assert {name for node in rank_nodes for name in resources[node] if name.startswith("node_")} == {"node_a", "node_b"}
    assert any((tmp_path / "shared-storage" / "two-nodes").glob("checkpoint_*/train_state.json"))
    assert (run_dir / "final" / "model.safetensors").is_file()
