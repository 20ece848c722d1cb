"""Continual retraining end to end: two rounds submitted by the scheduler through the real Ray Jobs API (a
head started with `ray start --head`, token auth on), each a 2-worker DeepSpeed job on a tiny BERT and real
SST-2 shards; a local round whose new data (AG News after SST-2) grows the label space; plus the registration
of a plain training run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from orchestrator.cluster.jobs import job_client
from orchestrator.config import config_from_dict
from orchestrator.config.retrain import retrain_from_dict
from orchestrator.lifecycle.new_data import sha256_file
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.report import write_report
from orchestrator.lifecycle.scheduler import RetrainScheduler, job_state
from orchestrator.tracking import read_metrics
from tests.conftest import REPO, tiny_job
from tests.test_job_submit import ray_head  # noqa: F401  (the fixture: a head of our own, stopped afterwards)

pytestmark = pytest.mark.slow


def _sst2_shard(shared_data: Path, path: Path, start: int, rows: int) -> Path:
    lines = (shared_data / "sst2" / "train.tsv").read_text().splitlines()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([lines[0], *lines[1 + start : 1 + start + rows]]) + "\n")
    return path


def _wait_for_job(client, submission_id: str, timeout_s: float = 540) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_state(client.get_job_status(submission_id))
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(3)
    raise AssertionError(f"job {submission_id} still running after {timeout_s}s")


@pytest.mark.ci
def test_two_rounds_through_the_ray_jobs_api(ray_head, tiny_models, shared_data, tmp_path):  # noqa: F811
    work = tmp_path / "work"  # the working dir uploaded with each round job (the project's code)
    shutil.copytree(REPO / "orchestrator", work / "orchestrator", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "jobs", work / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    job = tiny_job("cl", tiny_models["bert"], shared_data, tmp_path / "runs", stage=2, max_steps=4)
    job["training"].update(eval_every_steps=None, checkpoint_every_steps=None)
    incoming = tmp_path / "incoming"
    spec = {
        "job": job,
        "watch": {"dir": str(incoming), "settle_s": 0},
        "replay": {"fraction": 0.5, "seed": 1},
        "eval": {"holdout_fraction": 0.2},
        "gate": {"min_new": 0.0, "max_forgetting": 1.0, "floor": 0.0},  # a tiny random model: the gate lets it pass
        "l2_to_champion": 0.01,
        "schedule": {"trigger": "new_data", "poll_s": 5, "address": ray_head},
    }
    loaded = retrain_from_dict(spec)
    registry = Registry(tmp_path / "runs" / "registry.sqlite")
    client = job_client(ray_head)
    scheduler = RetrainScheduler(loaded, registry=registry, client=client, working_dir=work, echo=print)

    shard1 = _sst2_shard(shared_data, incoming / "shard1.tsv", 0, 160)
    outcome = scheduler.tick()
    assert outcome.startswith("submitted round 1"), outcome
    sid1 = registry.rounds("cl")[0].submission_id
    assert scheduler.tick().startswith("busy: round 1")  # never a second round while one runs
    state = _wait_for_job(client, sid1)
    assert state == "SUCCEEDED", client.get_job_logs(sid1)[-6000:]

    shard2 = _sst2_shard(shared_data, incoming / "shard2.tsv", 160, 160)
    outcome = scheduler.tick()
    assert outcome.startswith("submitted round 2"), outcome
    sid2 = registry.rounds("cl")[1].submission_id
    state = _wait_for_job(client, sid2)
    assert state == "SUCCEEDED", client.get_job_logs(sid2)[-6000:]
    assert scheduler.tick() == "no new data"

    v1, v2 = registry.models("cl")
    assert [r.status for r in registry.rounds("cl")] == ["succeeded", "succeeded"]
    assert (v1.status, v2.status) == ("archived", "champion")  # v2 passed the gate and replaced v1
    assert v2.parent_id == v1.id and v1.parent_ref == str(tiny_models["bert"].resolve())
    assert v1.data["continual"]["new"][0]["sha256"] == sha256_file(shard1)
    assert v2.data["continual"]["new"][0]["sha256"] == sha256_file(shard2)
    assert v2.data["continual"]["replay"][0]["rows"] == 64  # half of the 128 rows v1 learned
    assert sorted(v2.eval_metrics) == ["shard1", "shard2", "sst2"]  # every eval set seen so far + the new one
    assert set(v2.metrics["forgetting"]) == {"shard1", "sst2"}
    assert v2.decision == "promote" and "max forgetting" in v2.decision_reason
    assert v2.code_version  # passed to the job: its uploaded copy has no .git
    assert Path(v2.artifact, "model.safetensors").is_file()
    round2 = read_metrics(Path(v2.config["output"]["dir"]) / v2.config["name"])  # the round's run folder
    assert any("train/l2_to_start" in r for r in round2 if r["kind"] == "train")  # L2 to the champion was on
    # Round 2 started from the champion v1 and scored it before its first step: on the same eval set, the score v1
    # ended with; v2 records its end against it.
    (start,) = [r for r in round2 if r["kind"] == "start_eval"]
    assert start["reference"] == "model" and start["fresh_head"] is None
    assert start["reference_path"] == v2.config["model"]["path"] == v1.artifact
    assert start["sst2/accuracy"] == pytest.approx(v1.eval_metrics["sst2"]["accuracy"], abs=1e-9)
    compared = v2.metrics["start_vs_end"]
    end = v2.eval_metrics["sst2"]["accuracy"]
    assert compared["delta"]["sst2"]["accuracy"] == pytest.approx(end - start["sst2/accuracy"])

    files = write_report(registry, "cl", tmp_path / "report")
    assert files.png is not None and files.matrix.eval_sets == ["sst2", "shard1", "shard2"]


def _agnews_shard(shared_data: Path, path: Path, rows: int) -> Path:
    """AG News rows (no header, label names) written as the SST-2 shards are (sentence<TAB>label, a header)."""
    lines = (shared_data / "agnews" / "train.tsv").read_text(encoding="utf-8").splitlines()[:rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["sentence\tlabel", *lines]) + "\n", encoding="utf-8")
    return path


def test_a_round_with_a_new_label_space_grows_the_head(ray_cluster, tiny_models, shared_data, tmp_path):
    """SST-2 (negative/positive), then AG News: the second round trains a head over the union of the labels,
    and the SST-2 eval sets are still scored, over their own two labels."""
    from orchestrator.lifecycle.rounds import run_round

    job = tiny_job("tasks", tiny_models["bert"], shared_data, tmp_path / "runs", max_steps=4)
    job["training"].update(eval_every_steps=None, checkpoint_every_steps=None)
    job["data"]["label_names"] = ["negative", "positive"]  # the SST-2 files hold their ids 0/1
    incoming = tmp_path / "incoming"
    spec = {
        "job": job,
        "watch": {"dir": str(incoming), "settle_s": 0},
        "replay": {"fraction": 0.5, "seed": 1},
        "eval": {"holdout_fraction": 0.2},
        "gate": {"min_new": 0.0, "max_forgetting": 1.0, "floor": 0.0},  # a tiny random model: let it pass
    }
    loaded = retrain_from_dict(spec)
    registry = Registry(tmp_path / "runs" / "registry.sqlite")

    _sst2_shard(shared_data, incoming / "shard1.tsv", 0, 160)
    first = run_round(loaded, registry=registry)
    assert first.status == "succeeded" and first.decision == "promote", first.reason
    _agnews_shard(shared_data, incoming / "news.tsv", 160)
    second = run_round(loaded, registry=registry)
    assert second.status == "succeeded", second.reason

    news = ["Business", "Sci/Tech", "Sports", "World"]
    union = ["negative", "positive", *news]
    v2 = registry.get(second.candidate.id)
    assert v2.parent_id == first.candidate.id and v2.data["label_names"] == union
    assert v2.data["continual"]["labels_added"] == news
    assert {e["name"]: e.get("labels") for e in v2.data["eval"]} == {
        "sst2": ["negative", "positive"],
        "shard1": ["negative", "positive"],
        "news": news,
    }
    for eval_set in ("sst2", "shard1", "news"):  # the old eval sets are still scored
        assert 0.0 <= v2.eval_metrics[eval_set]["accuracy"] <= 1.0
    assert set(v2.metrics["forgetting"]) == {"sst2", "shard1"}
    config = json.loads(Path(v2.artifact, "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(union)} and config["label2id"]["World"] == 5
    from safetensors.torch import load_file

    weights = load_file(Path(v2.artifact, "model.safetensors"))
    assert weights["classifier.weight"].shape[0] == 6 and weights["classifier.bias"].shape == (6,)


def test_a_plain_training_run_registers_its_model(ray_cluster, tiny_models, shared_data, tmp_path):
    from orchestrator.cluster.launcher import run_training

    config = config_from_dict(tiny_job("plain", tiny_models["bert"], shared_data, tmp_path, max_steps=2))
    result = run_training(config)
    assert result.model_id == "plain-v1"
    record = Registry(tmp_path / "registry.sqlite").get("plain-v1")
    assert record.status == "candidate" and Path(record.artifact).name == "plain-v1"  # its own version folder
    exported = [p for p in result.final_model.rglob("*") if p.is_file()]
    assert record.files == {p.relative_to(result.final_model).as_posix(): sha256_file(p) for p in exported}
    assert record.data["train"]["sha256"] == sha256_file(shared_data / "sst2" / "train.tsv")
    assert record.data["train"]["rows"] == 192 and record.eval_metrics["sst2"]["accuracy"] >= 0
    assert record.parent_ref == str(tiny_models["bert"].resolve()) and record.config["name"] == "plain"
