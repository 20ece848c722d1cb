"""Continual retraining end to end with the base job's ``output.dir`` on a bucket (issue 18): two rounds, each a
2-worker DeepSpeed run of a tiny BERT on real SST-2 shards watched on the bucket, against a real S3 endpoint
(moto's server on 127.0.0.1). Every output of the rounds is on the bucket (the runs, the round's own data files,
``round.yaml``/``round.json``, the registered version folders), nothing in a local ``runs/``; round 2 warm-starts
from round 1's champion by its URI. The registry is a local SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator import storage
from orchestrator.config.retrain import retrain_from_dict
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.rounds import run_round
from orchestrator.run_outputs import is_published
from tests.conftest import tiny_job

pytestmark = pytest.mark.slow


def _upload_sst2_shard(shared_data: Path, uri: str, start: int, rows: int) -> str:
    lines = (shared_data / "sst2" / "train.tsv").read_text().splitlines()
    storage.write_text(uri, "\n".join([lines[0], *lines[1 + start : 1 + start + rows]]) + "\n")
    return uri


# Slow only (122 s in CI): tests/test_continual_bucket.py runs the same two bucket rounds with a fake trainer on
# every commit, and tests/test_storage_e2e_ray.py a real 2-worker run on the bucket.
def test_two_rounds_with_the_base_jobs_output_dir_on_a_bucket(
    ray_cluster, s3_bucket, tiny_models, shared_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # an output mistaken for a local path would land here (runs/, s3:/...)
    monkeypatch.setenv("ORCHESTRATOR_SCRATCH", str(tmp_path / "scratch"))  # the driver's staging: only that
    out = f"{s3_bucket}/runs"
    job = tiny_job("cl", tiny_models["bert"], shared_data, Path("unused"), max_steps=4)
    job["training"].update(eval_every_steps=None, checkpoint_every_steps=None)
    job["output"] = {"dir": out, "registry": str(tmp_path / "registry" / "registry.sqlite")}  # the registry: local
    spec = {
        "job": job,
        "watch": {"dir": f"{s3_bucket}/incoming", "settle_s": 0},
        "replay": {"fraction": 0.5, "seed": 1},
        "eval": {"holdout_fraction": 0.2},
        "gate": {"min_new": 0.0, "max_forgetting": 1.0, "floor": 0.0},  # a tiny random model: the gate lets it pass
    }
    loaded = retrain_from_dict(spec)
    registry = Registry(tmp_path / "registry" / "registry.sqlite")

    _upload_sst2_shard(shared_data, f"{s3_bucket}/incoming/shard1.tsv", 0, 80)
    first = run_round(loaded, registry=registry)
    assert first.status == "succeeded" and first.decision == "promote", first.reason
    _upload_sst2_shard(shared_data, f"{s3_bucket}/incoming/shard2.tsv", 80, 80)
    second = run_round(loaded, registry=registry)
    assert second.status == "succeeded" and second.decision == "promote", second.reason

    v1, v2 = registry.get(first.candidate.id), registry.get(second.candidate.id)
    assert (v1.status, v2.status) == ("archived", "champion") and v2.parent_id == v1.id
    for record, result in ((v1, first), (v2, second)):
        folder = f"{out}/cl-round{record.round}"
        assert result.run_dir == folder
        assert record.artifact.startswith(f"{out}/registry-artifacts/") and is_published(record.artifact)
        assert storage.is_file(f"{record.artifact}/model.safetensors")
        assert is_published(f"{folder}/final") and storage.is_file(f"{folder}/metrics.jsonl")
        for name in ("data/train.jsonl", "data/new_train.jsonl", "data/new_eval.jsonl", "round.yaml", "round.json"):
            assert storage.is_file(f"{folder}/{name}"), f"{folder}/{name}"
        assert record.config["output"]["dir"] == out and record.config["data"]["train"]["path"].startswith(folder)
        assert json.loads(storage.read_text(f"{folder}/round.json"))["candidate"] == record.id
    assert v2.config["model"]["path"] == v1.artifact  # round 2 warm-started from the champion's URI
    assert yaml.safe_load(storage.read_text(f"{out}/cl-round2/round.yaml"))["model"]["path"] == v1.artifact
    assert v2.data["continual"]["replay"][0]["path"] == f"{out}/cl-round1/data/new_train.jsonl"  # replayed from it
    assert sorted(v2.eval_metrics) == ["shard1", "shard2", "sst2"]  # round 1's holdout scored from the bucket

    local = sorted({p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()})
    assert set(local) <= {"registry", "scratch"}, local  # no runs/, no s3:/..., the round's files all uploaded
